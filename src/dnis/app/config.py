"""Run configuration: one YAML file is the single source of a run.

Every section is a dataclass; unknown keys are refused with a "did you mean", values are
type-checked, and the resolved config (defaults filled in) is saved with every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dnis import distributed
from dnis.data.schema import check_keys
from dnis.data.streaming.options import StreamingOptions, check_streamable
from dnis.errors import ConfigError
from dnis.registry import typed
from dnis.search.dnis import DnisConfig
from dnis.search.methods import BUDGET_UNITS
from dnis.search.prune import parse_byte_size
from dnis.train.trainer import TrainConfig

STREAMING_KEYS: tuple[str, ...] = (
    "streaming",
    "vocab",
    "sketch_width",
    "sketch_depth",
    "quantile_sample",
    "shuffle_block",
)


@dataclass
class DatasetConfig:
    """A registered dataset (`name`) or your own files (`format` + `path` + `schema`)."""

    name: str | None = None  # e.g. movielens-latest-small; see `dnis datasets`
    task: str = "rating"  # rating | ctr | topk
    path: str | dict[str, str] | None = None  # folder/file, or {train, valid, test} files
    options: dict[str, Any] = field(default_factory=dict)  # loader options, e.g. min_count
    format: str | None = None  # csv | tsv | parquet | libfm (own files only)
    schema: dict[str, Any] | None = None  # own files only: features, label, user, item, time
    split: str | None = None  # own files: random | temporal | leave_last_out (topk's default)
    delimiter: str | None = None  # own csv files; default "," for csv, tab for tsv
    header: bool = True  # own csv files: whether the first line names the columns
    names: list[str] | None = None  # own csv files: column names (override or supply)
    encoding: str = "utf-8"  # own csv files
    # Out-of-core data (own csv/tsv/parquet files, rating/ctr): read in chunks into an on-disk
    # cache and train from it block by block; the same dataset as in memory (docs/data.md).
    streaming: bool = False
    cache_dir: str | None = None  # streaming cache folder; default <output_dir>/.cache
    vocab: str = "two_pass"  # streaming: two_pass (exact counts) | count_min (sketch, then exact)
    sketch_width: int = 1 << 21  # count_min: counters per row (8 * width * depth bytes)
    sketch_depth: int = 4  # count_min: hash rows; error bound holds w.p. 1 - exp(-depth)
    quantile_sample: int = 100_000  # streaming: reservoir size per numeric field (quantile edges)
    shuffle_block: int = 65_536  # streaming: rows per shuffle block of the loader

    def __post_init__(self) -> None:
        if (self.name is None) == (self.format is None):
            raise ConfigError(
                "dataset: give either `name` (a registered dataset, see `dnis datasets`) "
                "or `format` + `path` + `schema` (your own files), not both"
            )
        if self.format is not None and (self.path is None or self.schema is None):
            raise ConfigError("dataset: own files need `path` and `schema` besides `format`")
        if self.format is not None and self.options:
            raise ConfigError(
                f"dataset.options ({', '.join(sorted(self.options))}) are options of registered "
                "datasets (`name`) and would be ignored for your own files: set a feature's "
                "min_count (or max_len, pooling) in dataset.schema and the reading options as "
                "dataset keys (delimiter, header, names, encoding, split), then remove `options`"
            )
        if self.split is None:
            self.split = "leave_last_out" if self.task == "topk" else "random"
        self._streaming_keys()  # checks vocab and the sizes, streamed or not
        if self.streaming:
            check_streamable(self.format, self.task, self.split, not isinstance(self.path, dict))

    def streaming_options(self, output_dir: str | Path) -> StreamingOptions | bool:
        """False, or the `StreamingOptions` of these keys (`cache_dir` defaulting to
        `<output_dir>/.cache`): the `streaming` argument of `load_files`."""
        if not self.streaming:
            return False
        default = Path(output_dir) / ".cache"
        return self._streaming_keys(Path(self.cache_dir) if self.cache_dir else default)

    def _streaming_keys(self, cache_dir: Path = Path(".cache")) -> StreamingOptions:
        return StreamingOptions(
            cache_dir=cache_dir,
            vocab=self.vocab,
            sketch_width=self.sketch_width,
            sketch_depth=self.sketch_depth,
            quantile_sample=self.quantile_sample,
            shuffle_block=self.shuffle_block,
        )


@dataclass
class ModelConfig:
    name: str = "mf"  # mf | bprmf | neumf | fm | widedeep | deepfm
    params: dict[str, Any] = field(default_factory=dict)  # the model's own hyper-parameters


@dataclass
class EmbeddingConfig:
    dim: int = 64  # width of every field's embedding
    init_std: float = 0.01  # std of the normal initialisation

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"embedding.dim must be >= 1, got {self.dim}")


@dataclass
class CompareConfig:
    """The `compare:` section: the grid of `dnis compare`."""

    methods: list[str] = field(default_factory=lambda: ["dnis", "uniform"])
    # fractions of the full-width embedding; with budget_unit bytes also byte sizes ("2MB")
    budgets: list[float | str] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    # params: a budget counts parameters; bytes: it counts stored bytes (a fraction of the fp32
    # full-width table's bytes), which the quantized methods (int8, int4) compete in
    budget_unit: str = "params"
    seeds: int = 3  # training seeds per cell
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method hyper-parameters
    inference_batch: int = 4096
    jobs: int = 1  # cells run in parallel processes (each with `threads` torch threads)

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ConfigError(f"compare.jobs must be >= 1, got {self.jobs}")
        if self.seeds < 1:
            raise ConfigError(f"compare.seeds must be >= 1, got {self.seeds}")
        if self.budget_unit not in BUDGET_UNITS:
            raise ConfigError(
                f"compare.budget_unit must be one of {BUDGET_UNITS}, got {self.budget_unit!r}",
                key="compare.budget_unit",
            )
        for i, budget in enumerate(self.budgets):
            where = f"compare.budgets[{i}]"
            if isinstance(budget, str):
                if self.budget_unit != "bytes":
                    raise ConfigError(
                        f"{where} {budget!r} is a byte size; set compare.budget_unit: bytes to "
                        "count budgets in bytes",
                        key="compare.budget_unit",
                    )
                parse_byte_size(budget, where)
            elif not 0 < budget <= 1:
                raise ConfigError(
                    f"{where}: budgets are fractions in (0, 1] (or byte sizes such as 2MB with "
                    f"budget_unit: bytes), got {budget}"
                )
        unknown = set(self.options) - set(self.methods)
        if unknown:
            raise ConfigError(
                f"compare.options names methods not in compare.methods: {sorted(unknown)}"
            )


# keys added after runs existed: at these values they stay out of the run's digest, so a run made
# before the key was added keeps its folder (and a grid its finished cells)
DIGEST_DEFAULTS: dict[tuple[str, str], Any] = {
    ("compare", "budget_unit"): "params",
    ("search", "alpha_every"): 1,
    ("search", "fallback"): "none",
}


@dataclass
class TrackingConfig:
    """The `tracking:` section: experiment loggers, off by default (`pip install 'dnis[tracking]'`).

    It never changes results, so it is left out of the run's digest."""

    mlflow: bool = False  # log to MLflow: params, per-epoch metrics, final metrics, artifacts
    tensorboard: bool = False  # write TensorBoard event files (scalars, config, report, plots)
    mlflow_uri: str | None = (
        None  # tracking store; default: a local file store ./mlruns (no server)
    )
    experiment: str | None = None  # MLflow experiment; default: the run's name (without its hash)
    tensorboard_dir: str | None = None  # default: <run folder>/tensorboard/<command>


@dataclass
class Config:
    dataset: DatasetConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: DnisConfig = field(default_factory=DnisConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    name: str | None = None  # run name; default model-dataset-task
    seed: int = 0  # data split and training seed
    output_dir: str = "runs"
    # torch intra-op threads. 1 is the fastest for the small per-batch ops of embedding models on
    # CPU (MF on MovieLens: 1.5 s an epoch with 1 thread, 2.8 s with 2, on 2 cores); raise it for
    # wide MLPs or large batches. 0 keeps torch's default.
    threads: int = 1

    def __post_init__(self) -> None:
        if self.train.seed not in (0, self.seed):
            raise ConfigError("set the run's seed at the top level (`seed:`), not as train.seed")
        self.train.seed = self.seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short hash of everything that changes results (not where or how fast they are made).

        The compare grid's method list and seed count only choose which cells run (each cell is
        cached per method and seed), so adding a method or a seed reuses the finished cells.
        """
        data = self.to_dict()
        data.pop("output_dir")
        data.pop("threads")
        data.pop("tracking")  # loggers watch a run; they do not change it
        data["train"].pop("device")
        data["train"].pop("compile")  # how fast, not what (like the device)
        data["dataset"].pop("cache_dir")  # where the streaming cache lives changes nothing
        if not self.dataset.streaming:  # the streaming keys change nothing when it is off
            for key in STREAMING_KEYS:
                data["dataset"].pop(key)
        for key in ("jobs", "methods", "seeds"):
            data["compare"].pop(key)
        for (section, key), default in DIGEST_DEFAULTS.items():
            if data[section][key] == default:  # runs made before the key keep their hash
                data[section].pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]

    def base_name(self) -> str:
        """The run's name without its hash: `name`, or model-dataset-task."""
        return self.name or f"{self.model.name}-{self.dataset.name or 'custom'}-{self.dataset.task}"

    def run_name(self) -> str:
        return f"{self.base_name()}-{self.digest()}"

    def run_dir(self) -> Path:
        """The run folder; under torchrun, rank r > 0 keeps its own files in `<folder>/ranks/<r>`."""
        folder = Path(self.output_dir) / self.run_name()
        return folder if distributed.is_main() else folder / "ranks" / str(distributed.rank())


def parse(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types recursively.

    `where` is the dotted key of `data` in the config ("" for the whole file); every ConfigError
    raised here carries the key at fault, for `load_config` to point at its line."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}",
            key=where,
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in known]
    if unknown:
        try:
            check_keys(data, known, where or "config")
        except ConfigError as error:
            error.key = _join(where, str(unknown[0]))
            raise
    values = {key: _convert(hints[key], value, _join(where, key)) for key, value in data.items()}
    try:
        return cls(**values)
    except TypeError as error:  # a required key is missing
        raise ConfigError(f"{where or 'config'}: {error}", key=where) from None
    except ConfigError as error:  # a value checked by the section itself
        if error.key is None:
            error.key = where
        raise


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(hint: Any, value: Any, where: str) -> Any:
    """A config value checked against its field's type; a section is parsed as a dataclass."""
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, where)
    return typed(hint, value, where)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config and apply `key.sub=value` overrides (values parsed as YAML).

    Errors name the file and, for a key of the file, its line and column."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(
            f"config file {path} is a folder, not a file; pass a YAML file, e.g. "
            f"--config configs/movielens-rating-mf.yaml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read ({error})") from None
    data, positions = read_yaml(text, path)
    if data is None:
        raise ConfigError(
            f"config file {path} is empty; it needs at least a `dataset:` section, e.g. "
            "dataset: {name: movielens-latest-small, task: rating} (see docs/configuration.md)"
        )
    for item in overrides or []:
        apply_override(data, item)
    try:
        return parse(Config, data)
    except ConfigError as error:
        raise ConfigError(_located(str(error), path, positions, error.key), error.key) from None


def read_yaml(text: str, path: Path) -> tuple[Any, dict[str, tuple[int, int]]]:
    """(data, {dotted key: (line, column)}) of a YAML text; duplicated keys are refused.

    The position map lets an error about `train.lr` point at the line a user has to edit."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    positions: dict[str, tuple[int, int]] = {}
    if node is not None:
        _walk(node, "", positions, path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:  # e.g. an unhashable key, which compose accepts
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return data, positions


def _walk(node: yaml.Node, where: str, positions: dict[str, tuple[int, int]], path: Path) -> None:
    """Record where every mapping key sits, refusing a key given twice in one mapping."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line, column = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            if key in seen:
                raise ConfigError(
                    f"{path}, line {line}, column {column}: key {_join(where, key)!r} is given "
                    f"twice (first on line {seen[key]}); YAML keeps only the last silently, so "
                    "remove one of them",
                    key=_join(where, key),
                )
            seen[key] = line
            positions[_join(where, key)] = (line, column)
            _walk(value_node, _join(where, key), positions, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            positions[f"{where}[{index}]"] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _walk(item, f"{where}[{index}]", positions, path)


def _located(
    message: str, path: Path, positions: dict[str, tuple[int, int]], key: str | None
) -> str:
    """`message` prefixed with the file and the line/column of `key` (or its nearest parent)."""
    while key:
        if key in positions:
            line, column = positions[key]
            return f"{path}, line {line}, column {column}: {message}"
        key = key[: max(key.rfind("."), key.rfind("["), 0)]
    return f"{path}: {message}"


def apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.01")
    key, raw = item.split("=", 1)
    target = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    target[parts[-1]] = yaml.safe_load(raw)
