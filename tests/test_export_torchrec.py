"""TorchRec hand-off: `dnis export RUN --format torchrec` writes table configs, weights, routing.

A tiny DNIS block search on synthetic data (and a train run of the same config, in the same
folder), plus a block search and a train run on data with a mean-pooled history sequence, are
exported; so are quantized runs (`dnis search --method int8 | int4 | dnis-precision`, at an odd
width so int4 rows need FBGEMM's padding column) and a hand-built mixed-precision block table
(fp32, fp16, int8, odd and even int4, a pruned block, a split mean-pooled sequence). So are
`dnis search --method outrank` (a field-subset: a table per kept field) and `--method optfs`
(kept rows: a table per field of its kept rows, their ids in row_ids.pt; ids without a row are
left out of the bag but count in a mean) on the history data, and a hand-built kept-rows table
(a field kept whole, padding row included, and a field with no row). The tables
must hold exactly the compact embedding (quantized ones: its stored codes, scales and biases,
which dequantize to exactly what the module serves), carry TorchRec's documented
`EmbeddingBagConfig` fields with the right `data_type`, count the module's bytes, and give the
model's embedding output (to 1e-6, on every id and on batches of encoded rows) when looked up
through the documented routing: with plain torch (`nn.EmbeddingBag` per table over rows
dequantized here independently of dnis' own reader) and, where torchrec imports beside this torch,
with TorchRec's `EmbeddingBagCollection` and its quantized twin. The outrank and optfs models'
scores from the export's weights alone (tables through the reader, dense.pt) equal those of the
in-process models the CLI search trained, to 1e-6.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

import dnis.app.search as app_search
from dnis.app.config import load_config
from dnis.app.search import method_run_dir, search_run
from dnis.app.train import train
from dnis.cli import main
from dnis.embeddings.field_subset import FieldSubsetEmbedding
from dnis.embeddings.gated import KeptRowsEmbedding
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding
from dnis.embeddings.quantized import QuantizedEmbedding, dequantize_rows, row_bytes
from dnis.embeddings.quantized_blocks import QuantizedBlockEmbedding
from dnis.errors import DnisError
from dnis.export import TorchRecTables, export_run, load, load_run, read_manifest
from dnis.export.traceable import example_ids
from dnis.search.plan import EmbeddingPlan

TOLERANCE = 1e-6
BUDGET = 0.5
# TorchRec's documented EmbeddingBagConfig (pytorch.org/torchrec, modules API reference):
# EmbeddingBagConfig(num_embeddings: int, embedding_dim: int, name: str = '', data_type: DataType,
# feature_names: List[str], weight_init_max, weight_init_min, num_embeddings_post_pruning,
# init_fn, need_pos, input_dim, pooling: PoolingType = PoolingType.SUM); PoolingType: SUM, MEAN, NONE
TORCHREC_FIELDS = {
    "num_embeddings", "embedding_dim", "name", "data_type", "feature_names", "weight_init_max",
    "weight_init_min", "num_embeddings_post_pruning", "init_fn", "need_pos", "input_dim", "pooling",
}  # fmt: skip
EXPORTED_FIELDS = {"name": str, "num_embeddings": int, "embedding_dim": int, "feature_names": list,
                   "pooling": str, "data_type": str}  # fmt: skip
POOLING_TYPES = {"SUM", "MEAN", "NONE"}
# TorchRec's DataType members for the storage precisions dnis has
DATA_TYPE = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8", "int4": "INT4"}
PRECISION = {name: precision for precision, name in DATA_TYPE.items()}


# ---------------------------------------------------------------- tiny runs


def history_frame(n_rows: int = 1200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    items = np.array([f"m{k}" for k in range(60)])
    p = 1.0 / np.arange(1, 61)
    p /= p.sum()
    history = [
        "|".join(rng.choice(items, size=int(rng.integers(0, 6)), replace=False, p=p))
        for _ in range(n_rows)
    ]
    return pd.DataFrame(
        {
            "user": rng.integers(0, 40, n_rows).astype(str),
            "item": rng.choice(items, size=n_rows, p=p),
            "history": history,
            "label": (rng.random(n_rows) < 0.4).astype(int),
        }
    )


def write_config(root: Path, name: str) -> Path:
    if name == "synthetic":
        options = {"n_rows": 2000, "vocab": 300, "ranks": [4, 2], "noise_fields": 1,
                   "numeric_fields": 1}  # fmt: skip
        dataset = {"name": "synthetic", "task": "ctr", "options": options}
    else:
        csv = root / "history.csv"
        history_frame().to_csv(csv, index=False)
        features = ["user", "item", {"name": "history", "kind": "sequence", "max_len": 5}]
        dataset = {"format": "csv", "path": str(csv), "task": "ctr",
                   "schema": {"features": features, "label": "label"}}  # fmt: skip
    data = {
        "name": f"torchrec-{name}",
        "seed": 0,
        "output_dir": str(root / "runs"),
        "dataset": dataset,
        "model": {"name": "deepfm", "params": {"hidden": [16]}},
        "embedding": {"dim": 8, "init_std": 0.05},
        "train": {"epochs": 1, "batch_size": 256, "lr": 0.01, "patience": 0},
        "search": {
            "warmup_epochs": 0,
            "search_epochs": 1,
            "num_blocks": 3,
            "granularity": "block",
            "budgets": [BUDGET],
        },  # fmt: skip
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """{"synthetic", "history"} -> a run folder holding a block search and a train run."""
    root = tmp_path_factory.mktemp("torchrec")
    out = {}
    for name in ("synthetic", "history"):
        config = load_config(write_config(root, name))
        search_run(config)
        train(config)
        out[name] = config.run_dir()
    return out


# ---------------------------------------------------------------- an independent reader


def read_export(folder: Path) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    tables = json.loads((folder / "torchrec_tables.json").read_text())
    weights = torch.load(folder / "weights.pt", weights_only=True)
    return tables, weights, json.loads((folder / "manifest.json").read_text())


def served_rows(table: dict, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [num_embeddings, embedding_dim]: a table's rows by the documented layout, read
    straight from weights.pt (value = code * scale + bias for INT8/INT4)."""
    name, precision = table["name"], PRECISION[table["data_type"]]
    stored = weights[f"{name}.weight"]
    if precision in ("fp32", "fp16"):
        assert stored.dtype == {"fp32": torch.float32, "fp16": torch.float16}[precision]
        assert tuple(stored.shape) == (table["num_embeddings"], table["embedding_dim"])
        assert f"{name}.weight_qscale" not in weights and f"{name}.weight_qbias" not in weights
        return stored.float()
    per_byte = 2 if precision == "int4" else 1
    assert table["embedding_dim"] % per_byte == 0  # FBGEMM packs int4 at byte granularity
    assert stored.dtype == torch.uint8
    assert tuple(stored.shape) == (table["num_embeddings"], table["embedding_dim"] // per_byte)
    scale, bias = weights[f"{name}.weight_qscale"], weights[f"{name}.weight_qbias"]
    for part in (scale, bias):
        assert part.dtype == torch.float16 and tuple(part.shape) == (table["num_embeddings"], 1)
    return dequantize_rows(
        stored, scale.flatten(), bias.flatten(), precision, table["embedding_dim"]
    )


def rebuild(folder: Path, ids: torch.Tensor, module: str = "embedding") -> torch.Tensor:
    """Field vectors [B, F, dim] from the exported files: one nn.EmbeddingBag per table, bags
    built row by row by the documented routing, columns scattered into the kept dims (padding
    columns dropped)."""
    tables, weights, manifest = read_export(folder)
    section = manifest["torchrec"]
    row_ids = torch.load(folder / "row_ids.pt") if (folder / "row_ids.pt").exists() else {}
    out = torch.zeros(ids.shape[0], len(section["fields"]), section["modules"][module]["dim"])
    for table in (t for t in tables if t["dnis"]["module"] == module):
        route = table["dnis"]
        assert table["embedding_dim"] == len(route["kept_dims"]) + route["padding_columns"]
        bag = nn.EmbeddingBag.from_pretrained(
            served_rows(table, weights), mode=table["pooling"].lower()
        )
        if route["row_ids"] is None:  # row r holds id id_start + r
            row_of = {i: i - route["id_start"] for i in range(route["id_start"], route["id_end"])}
        else:  # row r holds id row_ids[r]; other ids have no row and are left out of the bag
            listed = row_ids[table["name"]]
            assert listed.dtype == torch.int32 and listed.shape == (table["num_embeddings"],)
            row_of = {i: r for r, i in enumerate(listed.tolist())}
        values, offsets = [], []
        for row in ids[:, route["slot_start"] : route["slot_start"] + route["slots"]].tolist():
            offsets.append(len(values))
            values += [row_of[i] for i in row if i in row_of and i != route["padding_id"]]
        pooled = bag(torch.tensor(values, dtype=torch.long), torch.tensor(offsets))
        out[:, route["field_index"], route["kept_dims"]] += pooled[:, : len(route["kept_dims"])]
    for field in section["fields"]:
        divide = [t["dnis"]["divide_by_count"] for t in tables
                  if t["dnis"]["module"] == module and t["dnis"]["field"] == field["field"]]  # fmt: skip
        if any(divide):
            columns = ids[:, field["slot_start"] : field["slot_start"] + field["slots"]]
            count = (columns != field["padding_id"]).sum(dim=1).clamp(min=1)
            out[:, field["field_index"]] /= count.unsqueeze(-1)
    return out


def all_ids_and_rows(layout, rows: int = 300) -> torch.Tensor:
    """Every id of every field once (in the field's first slot, other slots 0), then random rows
    with several history ids, padding, OOV and the all-zero row."""
    every = torch.zeros(max(layout.cardinalities), layout.num_slots, dtype=torch.long)
    slot_fields = list(layout.slot_fields)
    for f, cardinality in enumerate(layout.cardinalities):
        every[:cardinality, slot_fields.index(f)] = torch.arange(cardinality)
    return torch.cat([every, example_ids(layout, rows, seed=3)])


def assert_lookups_match(folder: Path, model) -> None:
    ids = all_ids_and_rows(model.embedding.layout)
    with torch.no_grad():
        expected = model.embedding(ids)
        linear = model.linear.weights(ids) if getattr(model, "linear", None) else None
    got = rebuild(folder, ids)
    assert got.shape == expected.shape
    assert torch.max(torch.abs(got - expected)) <= TOLERANCE
    assert torch.max(torch.abs(TorchRecTables.read(folder).lookup(ids) - expected)) <= TOLERANCE
    if linear is not None:  # DeepFM's per-id linear weights are tables too
        got = rebuild(folder, ids, module="linear.weights")
        assert torch.max(torch.abs(got - linear)) <= TOLERANCE


# ---------------------------------------------------------------- block search


def test_block_search_exports_one_table_per_field_block(runs, tmp_path):
    run_dir = runs["synthetic"]
    result = export_run(run_dir, "torchrec", budget=BUDGET, output=tmp_path / "e")
    folder = result.path
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.yaml", "dense.pt", "encoders.json", "manifest.json", "torchrec_tables.json",
        "weights.pt",
    ]  # fmt: skip
    assert read_manifest(folder) == result.manifest  # every sha256 checks
    tables, weights, manifest = read_export(folder)
    run = load_run(run_dir, BUDGET)
    embedding = run.model.embedding
    assert isinstance(embedding, BlockMixedEmbedding)
    inputs = [t for t in tables if t["dnis"]["module"] == "embedding"]

    # widths and rows are the search's (dims.json); pruned blocks are listed without a table
    dims = json.loads((run_dir / "dims.json").read_text())[str(BUDGET)]
    blocks = manifest["torchrec"]["modules"]["embedding"]["blocks"]
    for name, found in dims.items():
        mine = [b for b in blocks if b["field"] == name]
        assert [b["width"] for b in mine] == found["block_dims"]
        assert [b["id_end"] - b["id_start"] for b in mine] == found["block_rows"]
        assert mine[0]["id_start"] == 0 and all(
            a["id_end"] == b["id_start"] for a, b in zip(mine, mine[1:], strict=False)
        )  # contiguous ranges of the field's frequency-sorted ids, OOV id 0 in block 0
        for block in mine:
            named = [t for t in inputs if t["name"] == block["table"]]
            assert len(named) == (1 if block["width"] else 0)
            if named:
                assert named[0]["name"] == f"{name}__b{block['block']}"
                assert named[0]["embedding_dim"] == len(named[0]["dnis"]["kept_dims"])
                keep = embedding.keep[embedding.blocks.blocks_of(run.encoder.schema.index(name))]
                kept = keep[block["block"]].nonzero().flatten().tolist()
                assert named[0]["dnis"]["kept_dims"] == kept

    # the tables hold exactly the compact embedding's parameters
    params = sum(t["num_embeddings"] * t["embedding_dim"] for t in inputs)
    assert params == embedding.num_parameters() == manifest["parameters"]["embedding"]
    assert params < manifest["parameters"]["full_embedding"]
    for table in tables:
        weight = weights[f"{table['name']}.weight"]
        assert weight.dtype == torch.float32 and table["data_type"] == "FP32"
        assert tuple(weight.shape) == (table["num_embeddings"], table["embedding_dim"])
        assert table["dnis"]["padding_columns"] == 0
    assert len(weights) == len(tables)
    module = manifest["torchrec"]["modules"]["embedding"]
    assert module["bytes"] == 4 * params == manifest["embedding_bytes"]
    assert module["structure_bytes"] == {"keep": embedding.keep.numel()}
    assert module["memory_bytes"] == embedding.memory_bytes() == params * 4 + embedding.keep.numel()
    assert manifest["torchrec"]["layouts"].keys() == {"FP32"}

    # dense.pt holds the rest of the model, keyed as in the model
    dense = torch.load(folder / "dense.pt", weights_only=True)
    state = run.model.state_dict()
    assert set(dense) == {k for k in state if not k.startswith(("embedding.", "linear.weights."))}
    assert all(torch.equal(dense[k], state[k]) for k in dense)
    assert result.manifest["check"]["max_abs_diff"] <= TOLERANCE
    assert_lookups_match(folder, run.model)


def test_tables_follow_torchrecs_documented_fields(runs, tmp_path):
    folder = export_run(runs["history"], "torchrec", budget=BUDGET, output=tmp_path / "e").path
    tables, weights, _ = read_export(folder)
    names = [t["name"] for t in tables]
    features = [f for t in tables for f in t["feature_names"]]
    assert len(set(names)) == len(names) and len(set(features)) == len(features)
    for table in tables:
        config = {k: v for k, v in table.items() if k != "dnis"}
        assert set(config) == set(EXPORTED_FIELDS) and set(config) <= TORCHREC_FIELDS
        for key, kind in EXPORTED_FIELDS.items():
            assert isinstance(config[key], kind), (key, config[key])
        assert all(isinstance(f, str) for f in config["feature_names"])
        assert config["pooling"] in POOLING_TYPES
        assert config["num_embeddings"] >= 1 and config["embedding_dim"] >= 1
        assert re.fullmatch(r"[A-Za-z0-9_]+", config["name"])  # a TorchRec module key
    # the mean-pooled history, split over blocks, is SUM-pooled and divided by its id count
    history = [t for t in tables if t["dnis"]["field"] == "history"
               and t["dnis"]["module"] == "embedding"]  # fmt: skip
    assert history and all(t["dnis"]["field_pooling"] == "mean" for t in history)
    assert all(t["dnis"]["padding_id"] == 0 and t["dnis"]["slots"] == 5 for t in history)
    if len(history) > 1 or history[0]["dnis"]["num_blocks"] > 1:
        assert all(t["pooling"] == "SUM" and t["dnis"]["divide_by_count"] for t in history)
    assert_lookups_match(folder, load_run(runs["history"], BUDGET).model)


def test_a_pruned_block_and_a_split_mean_field_route_correctly(runs, tmp_path):
    """History block 1 pruned to width 0: no table, its ids give zeros but count in the mean."""
    run = load_run(runs["history"], BUDGET)
    old = run.model.embedding
    field = run.encoder.schema.index("history")
    blocks = old.blocks.blocks_of(field)
    assert len(blocks) >= 2
    keep = old.keep.clone()
    keep[blocks[1]] = False
    keep[blocks[0], :3] = True  # at least one table for the field
    pruned = BlockMixedEmbedding(old.layout, old.dim, old.blocks, keep)
    with torch.no_grad():
        pruned.load_dense(old.lookup(torch.arange(old.layout.total_rows)))
    run.model.embedding = pruned.eval()
    result = export_run(run, "torchrec", output=tmp_path / "e")
    entries = [b for b in result.manifest["torchrec"]["modules"]["embedding"]["blocks"]
               if b["field"] == "history"]  # fmt: skip
    assert entries[1]["width"] == 0 and entries[1]["table"] is None
    tables, _, _ = read_export(result.path)
    history = [t for t in tables if t["dnis"]["field"] == "history"
               and t["dnis"]["module"] == "embedding"]  # fmt: skip
    assert all(t["pooling"] == "SUM" and t["dnis"]["divide_by_count"] for t in history)
    assert "history__b1" not in {t["name"] for t in tables}
    assert_lookups_match(result.path, run.model)


# ---------------------------------------------------------------- full width


def test_a_full_width_train_run_exports_one_table_per_field(runs, tmp_path):
    for name, fields in (("synthetic", 4), ("history", 3)):
        folder = export_run(runs[name], "torchrec", budget="full", output=tmp_path / name).path
        tables, weights, manifest = read_export(folder)
        run = load_run(runs[name], "full")
        inputs = [t for t in tables if t["dnis"]["module"] == "embedding"]
        assert [t["name"] for t in inputs] == run.encoder.schema.names and len(inputs) == fields
        for table, cardinality in zip(inputs, run.encoder.cardinalities, strict=True):
            assert table["num_embeddings"] == cardinality and table["embedding_dim"] == 8
            assert table["dnis"]["kept_dims"] == list(range(8)) and table["data_type"] == "FP32"
            sequence = table["dnis"]["kind"] == "sequence"
            assert table["pooling"] == ("MEAN" if sequence else "SUM")  # one table: TorchRec's mean
            assert not table["dnis"]["divide_by_count"]
        params = sum(t["num_embeddings"] * t["embedding_dim"] for t in inputs)
        assert (
            params
            == manifest["parameters"]["full_embedding"]
            == manifest["parameters"]["embedding"]
        )
        assert_lookups_match(folder, run.model)


# ---------------------------------------------------------------- ragged, errors, CLI


def test_element_granularity_is_refused_with_the_fix(runs, tmp_path):
    run = load_run(runs["synthetic"], BUDGET)
    layout, dim = run.model.embedding.layout, run.model.embedding.dim
    keep = torch.rand(layout.total_rows, dim, generator=torch.Generator().manual_seed(0)) < 0.5
    run.model.embedding = RaggedEmbedding(layout, dim, keep)
    with pytest.raises(DnisError, match=r"element granularity.*search.granularity: block"):
        export_run(run, "torchrec", output=tmp_path / "e")
    assert not (tmp_path / "e").exists() and list(tmp_path.iterdir()) == []


def test_cli_exports_and_a_changed_file_or_predict_is_refused(runs, tmp_path):
    out = tmp_path / "export"
    command = [sys.executable, "-m", "dnis", "export", str(runs["synthetic"]), "--format",
               "torchrec", "--budget", str(BUDGET), "--output", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "as torchrec" in " ".join(done.stderr.split())  # the summary; stdout is JSON
    assert json.loads(done.stdout)["path"] == str(out)
    manifest = read_manifest(out)
    assert manifest["format"] == "torchrec" and manifest["budget"] == BUDGET
    with pytest.raises(DnisError, match="TorchRec export"):
        load(out)  # no scoring graph: predict says what to do instead
    weights = out / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(DnisError, match="weights.pt is corrupt or was changed"):
        TorchRecTables.read(out)


# ---------------------------------------------------------------- TorchRec itself


def torchrec_or_skip():
    try:
        import torchrec
        from torchrec.modules.embedding_configs import PoolingType
    except Exception as error:  # ImportError, or fbgemm_gpu's OSError when its build mismatches
        first = (str(error).strip().splitlines() or [""])[0][:200]
        pytest.skip(
            f"torchrec does not import beside torch {torch.__version__} "
            f"({type(error).__name__}: {first}); the format is checked against its documented "
            "fields and with plain torch instead"
        )
    return torchrec, PoolingType


def torchrec_configs(tables: list[dict]) -> list:
    """TorchRec EmbeddingBagConfigs of the exported tables, data type and pooling as enums."""
    from torchrec import EmbeddingBagConfig
    from torchrec.modules.embedding_configs import DataType, PoolingType

    return [
        EmbeddingBagConfig(
            **{k: t[k] for k in EXPORTED_FIELDS if k not in ("pooling", "data_type")},
            pooling=PoolingType[t["pooling"]],
            data_type=DataType[t["data_type"]],
        )
        for t in tables
    ]


@pytest.mark.parametrize("budget", [BUDGET, "full"])
def test_an_embedding_bag_collection_from_the_export_looks_up_what_the_model_does(
    runs, tmp_path, budget
):
    torchrec, PoolingType = torchrec_or_skip()
    folder = export_run(runs["history"], "torchrec", budget=budget, output=tmp_path / "e").path
    tables, weights, _ = read_export(folder)
    documented = {f.name for f in dataclasses.fields(torchrec.EmbeddingBagConfig)}
    assert set(EXPORTED_FIELDS) <= documented
    configs = torchrec_configs(tables)
    assert all(c.data_type.name == "FP32" for c in configs)
    collection = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    collection.load_state_dict({f"embedding_bags.{k}": v for k, v in weights.items()})

    run = load_run(runs["history"], budget)
    reader = TorchRecTables.read(folder)
    ids = all_ids_and_rows(run.model.embedding.layout)
    modules = {"embedding": run.model.embedding, "linear.weights": run.model.linear.weights}
    features = {k: v for module in modules for k, v in reader.features(ids, module).items()}
    keys = list(features)  # every feature of the collection, in one KeyedJaggedTensor
    jagged = torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([features[k][0] for k in keys]),
        lengths=torch.cat([features[k][1] for k in keys]).int(),
    )
    with torch.no_grad():
        pooled = collection(jagged).to_dict()
        for module, expected in modules.items():
            got = reader.combine(pooled, ids, module)
            assert torch.max(torch.abs(got - expected(ids))) <= TOLERANCE


def test_table_names_are_torchrec_module_keys_and_unique():
    from dnis.export.torchrec import safe, unique

    assert [safe(n) for n in ("user.id", "a-b c", "ok_1")] == ["user_id", "a_b_c", "ok_1"]
    assert unique([safe("a.b"), safe("a_b"), "a_b_1"]) == ["a_b", "a_b_1", "a_b_1_1"]


# ---------------------------------------------------------------- quantized tables

QUANT_DIM = 7  # odd: an int4 row of width 7 needs FBGEMM's padding column
QUANT_METHODS = ("int8", "int4", "dnis-precision")


@pytest.fixture(scope="module")
def quantized_runs(tmp_path_factory) -> dict[str, Path]:
    """{method: run folder} of `dnis search --method M` for the quantized methods, tiny data."""
    root = tmp_path_factory.mktemp("quantized")
    quick = {"num_blocks": 2, "warmup_epochs": 0, "search_epochs": 1}
    data = {
        "name": "quantized",
        "seed": 0,
        "output_dir": str(root / "runs"),
        "dataset": {
            "name": "synthetic",
            "task": "ctr",
            "options": {
                "n_rows": 1500,
                "ranks": [4, 2],
                "noise_fields": 1,
                "vocab": 40,
                "numeric_fields": 1,
            },
        },  # fmt: skip
        "model": {"name": "deepfm", "params": {"hidden": [16]}},
        "embedding": {"dim": QUANT_DIM},
        "train": {"epochs": 1, "batch_size": 256, "lr": 0.01, "patience": 0},
        "search": {**quick, "budgets": [BUDGET]},
        "compare": {"methods": ["dnis-precision"], "options": {"dnis-precision": quick}},
    }
    path = root / "quantized.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    out = {}
    for method in QUANT_METHODS:
        assert main(["search", "--config", str(path), "--method", method, "--quiet"]) == 0
        out[method] = method_run_dir(load_config(path), method)
    return out


def block_precisions(embedding) -> list[tuple[int, int, int, list[int], str]]:
    """(field, first row, rows, kept dims, precision) of every block of a quantized module."""
    layout = embedding.layout
    if isinstance(embedding, QuantizedEmbedding):
        offsets = layout.field_offsets().tolist()
        return [
            (f, offsets[f], n, list(range(embedding.dim)), embedding.precision)
            for f, n in enumerate(layout.cardinalities)
        ]
    blocks = embedding.blocks
    return [
        (blocks.field[k], blocks.start[k], blocks.size[k],
         embedding.keep[k].nonzero().flatten().tolist(), embedding.precisions[k])
        for k in range(blocks.num_blocks)
    ]  # fmt: skip


def assert_quantized_export(folder: Path, run) -> None:
    """Data types, dims, stored bytes and served values of a quantized run's export."""
    tables, weights, manifest = read_export(folder)
    embedding = run.model.embedding
    inputs = [t for t in tables if t["dnis"]["module"] == "embedding"]
    served = embedding.dequantized()  # what the module serves, every row
    offsets = embedding.layout.field_offsets().tolist()
    expected_bytes, tensors = 0, set()
    by_block = iter(inputs)
    for field, first, rows, kept, precision in block_precisions(embedding):
        if not kept:  # pruned: no table, no bytes
            continue
        table = next(by_block)  # tables come in block order
        route = table["dnis"]
        assert route["field_index"] == field and route["id_start"] == first - offsets[field]
        assert table["num_embeddings"] == rows and route["kept_dims"] == kept
        assert table["data_type"] == DATA_TYPE[precision]
        padding = len(kept) % 2 if precision == "int4" else 0
        assert route["padding_columns"] == padding
        assert table["embedding_dim"] == len(kept) + padding
        # the stored rows dequantize to exactly what the module serves
        values = served_rows(table, weights)
        assert torch.equal(values[:, : len(kept)], served[first : first + rows][:, kept])
        pruned = [d for d in range(embedding.dim) if d not in kept]
        assert not served[first : first + rows][:, pruned].any()
        expected_bytes += rows * row_bytes(len(kept), precision)
        name = table["name"]
        tensors |= {f"{name}.weight"}
        if precision in ("int8", "int4"):
            tensors |= {f"{name}.weight_qscale", f"{name}.weight_qbias"}
    assert next(by_block, None) is None
    assert {k for k in weights if k.split(".")[0] in {t["name"] for t in inputs}} == tensors

    # bytes: the tables hold the module's rows exactly; memory_bytes adds its structure buffers
    module = manifest["torchrec"]["modules"]["embedding"]
    stored = sum(weights[k].numel() * weights[k].element_size() for k in tensors)
    assert module["bytes"] == stored == expected_bytes == manifest["embedding_bytes"]
    assert module["memory_bytes"] == embedding.memory_bytes()
    if isinstance(embedding, QuantizedEmbedding):
        assert module["structure_bytes"] == {} and module["bytes"] == embedding.memory_bytes()
    else:  # keep mask (a byte per block and dim) and precision codes (a byte per block)
        num_blocks = embedding.blocks.num_blocks
        assert module["structure_bytes"] == {
            "keep": num_blocks * embedding.dim,
            "block_precision": num_blocks,
        }
        assert module["bytes"] + num_blocks * (embedding.dim + 1) == embedding.memory_bytes()
    params = sum(t["num_embeddings"] * len(t["dnis"]["kept_dims"]) for t in inputs)
    assert params == embedding.num_parameters() == module["parameters"]
    assert params == manifest["parameters"]["embedding"]
    assert set(manifest["torchrec"]["layouts"]) == {t["data_type"] for t in tables}
    assert manifest["check"]["max_abs_diff"] <= TOLERANCE
    assert_lookups_match(folder, run.model)


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_a_quantized_search_exports_its_data_types_and_stored_rows(
    quantized_runs, tmp_path, method
):
    run_dir, out = quantized_runs[method], tmp_path / "e"
    assert main(["export", str(run_dir), "--format", "torchrec", "--budget", str(BUDGET),
                 "--output", str(out)]) == 0  # fmt: skip
    assert read_manifest(out)["format"] == "torchrec"  # every sha256 checks
    run = load_run(run_dir, BUDGET)
    embedding = run.model.embedding
    kind = QuantizedBlockEmbedding if method == "dnis-precision" else QuantizedEmbedding
    assert isinstance(embedding, kind)
    if method != "dnis-precision":
        assert embedding.precision == method and embedding.dim == QUANT_DIM  # int4: odd width
    tables, _, manifest = read_export(out)
    for table in tables:
        assert {k for k in table if k != "dnis"} == set(EXPORTED_FIELDS)
        assert table["data_type"] in DATA_TYPE.values()
    names = [t["name"] for t in tables if t["dnis"]["module"] == "embedding"]
    if method == "dnis-precision":
        assert all(re.fullmatch(r".+__b\d+", n) for n in names)
    else:
        assert names == run.encoder.schema.names
    linear = [t for t in tables if t["dnis"]["module"] == "linear.weights"]
    assert linear and all(t["data_type"] == "FP32" for t in linear)  # DeepFM's fp32 linear terms
    assert_quantized_export(out, run)


def mixed_precision_run(run_dir: Path):
    """The history block search with a hand-built QuantizedBlockEmbedding in its input layer:
    every precision, int4 at an odd and an even width, a pruned block, the mean-pooled history
    split over several stored blocks."""
    run = load_run(run_dir, BUDGET)
    old = run.model.embedding
    blocks, dim = old.blocks, old.dim
    keep = torch.ones(blocks.num_blocks, dim, dtype=torch.bool)
    cycle = ["int4", "fp16", "int8", "fp32"]
    precisions = [cycle[k % len(cycle)] for k in range(blocks.num_blocks)]
    keep[0, [1, 3, 6]] = False  # int4 at width 5: one padding column
    keep[4, ::2] = False  # int4 at width 4
    history = blocks.blocks_of(run.encoder.schema.index("history"))
    assert len(history) >= 3
    keep[history[1]] = False  # pruned
    keep[history[2], :5] = False  # width 3
    precisions[history[0]], precisions[history[2]] = "int4", "int8"
    table = old.lookup(torch.arange(old.layout.total_rows)) + 0.01  # no all-zero rows
    mixed = QuantizedBlockEmbedding.from_dense(old.layout, dim, blocks, keep, precisions, table)
    run.model.embedding = mixed.eval()
    return run


def test_a_mixed_precision_block_table_exports_every_data_type(runs, tmp_path):
    run = mixed_precision_run(runs["history"])
    result = export_run(run, "torchrec", output=tmp_path / "e")
    tables, weights, manifest = read_export(result.path)
    inputs = [t for t in tables if t["dnis"]["module"] == "embedding"]
    assert {t["data_type"] for t in inputs} == {"FP32", "FP16", "INT8", "INT4"}
    assert any(t["dnis"]["padding_columns"] == 1 for t in inputs)
    odd = next(t for t in inputs if t["dnis"]["padding_columns"])
    assert odd["data_type"] == "INT4" and odd["embedding_dim"] == 6
    assert weights[f"{odd['name']}.weight"].shape[1] == 3
    history = [b for b in manifest["torchrec"]["modules"]["embedding"]["blocks"]
               if b["field"] == "history"]  # fmt: skip
    assert history[1]["width"] == 0 and history[1]["table"] is None
    assert history[1]["data_type"] is None
    split = [t for t in inputs if t["dnis"]["field"] == "history"]
    assert len(split) >= 2 and all(t["pooling"] == "SUM" for t in split)
    assert all(t["dnis"]["divide_by_count"] for t in split)
    assert_quantized_export(result.path, run)
    # the reader serves each table's rows as documented
    reader = TorchRecTables.read(result.path)
    for table in tables:
        assert torch.equal(reader.weight(table["name"]), served_rows(table, weights))


def fbgemm_weights(tables: list[dict], weights: dict[str, torch.Tensor]) -> dict:
    """TorchRec's `table_name_to_quantized_weights` built from the files by the documented
    layout: (codes, fp16 scale then fp16 bias as 4 bytes) per integer table, a float table's
    values as bytes."""
    out = {}
    for table in tables:
        name = table["name"]
        weight = weights[f"{name}.weight"]
        if table["data_type"] in ("INT8", "INT4"):
            pair = torch.cat([weights[f"{name}.weight_qscale"], weights[f"{name}.weight_qbias"]], 1)
            out[name] = (weight, pair.view(torch.uint8))
        else:
            out[name] = (weight.view(torch.uint8), None)
    return out


def test_the_quantized_weights_are_torchrecs_fbgemm_rows():
    """Without torchrec: the reader's argument equals the layout built here, byte for byte."""
    tables = [
        {"name": "a", "num_embeddings": 3, "embedding_dim": 4, "data_type": "INT4"},
        {"name": "b", "num_embeddings": 2, "embedding_dim": 2, "data_type": "FP16"},
    ]
    scale = torch.tensor([[0.5], [0.25], [2.0]], dtype=torch.float16)
    bias = torch.tensor([[-1.0], [0.0], [3.0]], dtype=torch.float16)
    weights = {
        "a.weight": torch.tensor([[0x21, 0x43], [0xF0, 0x0F], [0, 0]], dtype=torch.uint8),
        "a.weight_qscale": scale,
        "a.weight_qbias": bias,
        "b.weight": torch.tensor([[1.5, -2.0], [0.0, 4.0]], dtype=torch.float16),
    }
    reader = TorchRecTables([dict(t, dnis={}) for t in tables], weights, {})
    got, expected = reader.quantized_weights(), fbgemm_weights(tables, weights)
    assert got.keys() == expected.keys()
    codes, scale_shift = got["a"]
    assert torch.equal(codes, expected["a"][0]) and torch.equal(scale_shift, expected["a"][1])
    assert scale_shift.dtype == torch.uint8 and tuple(scale_shift.shape) == (3, 4)
    assert torch.equal(scale_shift[:, :2].view(torch.float16), scale)  # scale first, then bias
    assert torch.equal(got["b"][0], weights["b.weight"].view(torch.uint8)) and got["b"][1] is None
    # int4: column 2j in the low nibble; value = code * scale + bias
    assert reader.weight("a").tolist() == [
        [-0.5, -0.0, 0.5, 1.0],
        [0.0, 3.75, 3.75, 0.0],
        [3.0, 3.0, 3.0, 3.0],
    ]
    assert torch.equal(reader.weight("b"), weights["b.weight"].float())


@pytest.mark.parametrize("source", ["mixed", "int4"])
def test_a_quantized_embedding_bag_collection_from_the_export_looks_up_what_the_model_does(
    runs, quantized_runs, tmp_path, source
):
    torchrec, _ = torchrec_or_skip()
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantCollection

    if source == "mixed":
        run = mixed_precision_run(runs["history"])
        folder = export_run(run, "torchrec", output=tmp_path / "e").path
    else:
        run = load_run(quantized_runs[source], BUDGET)
        folder = export_run(quantized_runs[source], "torchrec", budget=BUDGET,
                            output=tmp_path / "e").path  # fmt: skip
    tables, weights, _ = read_export(folder)
    reader = TorchRecTables.read(folder)
    quantized = fbgemm_weights(tables, weights)
    got = reader.quantized_weights()
    assert all(torch.equal(got[k][0], v[0]) for k, v in quantized.items())
    assert all(
        (got[k][1] is None and v[1] is None) or torch.equal(got[k][1], v[1])
        for k, v in quantized.items()
    )
    collection = QuantCollection(
        torchrec_configs(tables),
        is_weighted=False,
        device=torch.device("cpu"),
        table_name_to_quantized_weights=quantized,
    )
    ids = all_ids_and_rows(run.model.embedding.layout)
    modules = {"embedding": run.model.embedding, "linear.weights": run.model.linear.weights}
    features = {k: v for module in modules for k, v in reader.features(ids, module).items()}
    keys = list(features)
    jagged = torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([features[k][0] for k in keys]),
        lengths=torch.cat([features[k][1] for k in keys]).int(),
    )
    with torch.no_grad():
        pooled = collection(jagged).to_dict()
        for module, expected in modules.items():
            got_vectors = reader.combine(pooled, ids, module)
            assert torch.max(torch.abs(got_vectors - expected(ids))) <= TOLERANCE


# ---------------------------------------------------------------- field selection and kept rows

SELECTION_METHODS = ("outrank", "optfs")


@pytest.fixture(scope="module")
def selection_runs(tmp_path_factory) -> dict[str, tuple[Path, nn.Module]]:
    """{method: (run folder, the in-process compact model)} of `dnis search --method M` on the
    history data (a mean-pooled sequence) for outrank (field-subset) and optfs (kept-rows)."""
    root = tmp_path_factory.mktemp("selection")
    path = write_config(root, "history")
    data = yaml.safe_load(path.read_text())
    quick = {"optfs": {"search_epochs": 1, "rewind_epoch": 0}}
    data["compare"] = {"methods": ["optfs"], "options": quick}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    kept: dict[str, nn.Module] = {}
    real = app_search.search_run

    def spy(*args, **kwargs):
        dataset, results = real(*args, **kwargs)
        kept["model"] = results[0].model
        return dataset, results

    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app_search, "search_run", spy)
        for method in SELECTION_METHODS:
            assert main(["search", "--config", str(path), "--method", method, "--quiet"]) == 0
            run_dir = method_run_dir(load_config(path), method)
            out[method] = (run_dir, kept.pop("model").cpu().eval())
    return out


def export_by_cli(run_dir: Path, out: Path) -> Path:
    assert main(["export", str(run_dir), "--format", "torchrec", "--budget", str(BUDGET),
                 "--output", str(out)]) == 0  # fmt: skip
    assert read_manifest(out)["format"] == "torchrec"  # every sha256 checks
    return out


class Served(nn.Module):
    """A per-id module of the model read from the export's tables instead."""

    def __init__(self, reader: TorchRecTables, module: str) -> None:
        super().__init__()
        self.reader, self.module = reader, module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.reader.lookup(ids, self.module)


def assert_scores_match(folder: Path, model: nn.Module, run_dir: Path) -> None:
    """The in-process model's scores from the export's weights alone: the run's model with every
    weight zeroed, its per-id modules read from the tables (the reader), dense.pt into the rest."""
    served = load_run(run_dir, BUDGET).model
    with torch.no_grad():
        for tensor in served.state_dict().values():
            tensor.zero_()
    reader = TorchRecTables.read(folder)
    served.embedding = Served(reader, "embedding")
    served.linear.weights = Served(reader, "linear.weights")
    served.load_state_dict(torch.load(folder / "dense.pt", weights_only=True))  # strict: all
    ids = all_ids_and_rows(model.embedding.layout)
    with torch.no_grad():
        got, expected = served.eval()(ids), model(ids)
    assert torch.max(torch.abs(got - expected)) <= TOLERANCE


def test_an_outrank_field_selection_exports_a_table_per_kept_field(selection_runs, tmp_path):
    run_dir, model = selection_runs["outrank"]
    folder = export_by_cli(run_dir, tmp_path / "e")
    assert not (folder / "row_ids.pt").exists()
    tables, weights, manifest = read_export(folder)
    embedding = model.embedding
    assert isinstance(embedding, FieldSubsetEmbedding)
    assert isinstance(load_run(run_dir, BUDGET).model.embedding, FieldSubsetEmbedding)
    keep = embedding.keep.tolist()
    assert any(keep) and not all(keep)  # the budget drops a field and keeps another
    plan = EmbeddingPlan.read(run_dir / f"plan-{BUDGET}.json")
    assert plan.kind == "field-subset" and [f.options["kept"] for f in plan.fields] == keep
    schema = load_run(run_dir, BUDGET).encoder.schema
    inputs = [t for t in tables if t["dnis"]["module"] == "embedding"]
    # one full-width table per kept field, named after it; dropped fields are listed, tableless
    assert [t["name"] for t in inputs] == [n for n, k in zip(schema.names, keep, strict=True) if k]
    assert "history" in [t["name"] for t in inputs]  # a mean-pooled sequence is kept here
    listed = manifest["torchrec"]["modules"]["embedding"]["blocks"]
    assert [b["field"] for b in listed] == schema.names
    for f, (entry, kept) in enumerate(zip(listed, keep, strict=True)):
        cardinality = embedding.layout.cardinalities[f]
        assert (entry["id_start"], entry["id_end"]) == (0, cardinality)
        if not kept:
            assert entry["width"] == 0 and entry["table"] is None and entry["stored_rows"] == 0
            assert not embedding.field_rows(f).any()  # what the model reads for it
            continue
        table = next(t for t in inputs if t["name"] == entry["table"])
        route = table["dnis"]
        assert table["num_embeddings"] == cardinality == entry["stored_rows"]
        assert table["embedding_dim"] == embedding.dim == entry["width"]
        assert route["kept_dims"] == list(range(embedding.dim)) and route["row_ids"] is None
        assert table["data_type"] == "FP32" and route["padding_columns"] == 0
        mean = route["field_pooling"] == "mean"  # the history, where kept: TorchRec's MEAN
        assert table["pooling"] == ("MEAN" if mean else "SUM") and not route["divide_by_count"]
        assert torch.equal(weights[f"{table['name']}.weight"], embedding.field_rows(f))
    # bytes and parameters: the kept fields' rows; the keep mask (a byte per field) is structure
    module = manifest["torchrec"]["modules"]["embedding"]
    params = sum(t["num_embeddings"] * t["embedding_dim"] for t in inputs)
    assert params == embedding.num_parameters() == module["parameters"] == plan.params
    assert module["structure"] == "field-subset"
    assert module["bytes"] == 4 * params == manifest["embedding_bytes"]
    assert module["structure_bytes"] == {"keep": len(keep)}
    assert module["memory_bytes"] == embedding.memory_bytes() == 4 * params + len(keep)
    assert_lookups_match(folder, model)
    assert_scores_match(folder, model, run_dir)


def kept_ids(embedding: KeptRowsEmbedding, field: int) -> list[int]:
    """The encoded ids of a field that a KeptRowsEmbedding keeps, ascending."""
    start = int(embedding.field_offsets[field])
    end = start + embedding.layout.cardinalities[field]
    return [r - start for r in embedding.kept.tolist() if start <= r < end]


def assert_kept_rows_export(folder: Path, embedding: KeptRowsEmbedding) -> None:
    """Per field one table of exactly its kept rows, their ids in row_ids.pt; tableless fields
    that keep no row; bytes and structure as the module counts them."""
    tables, weights, manifest = read_export(folder)
    row_ids = torch.load(folder / "row_ids.pt", weights_only=True)
    assert "row_ids.pt" in manifest["files"]  # its sha256 is checked
    assert "row_ids.pt" in manifest["torchrec"]["row_ids"]  # its layout, said
    inputs = [t for t in tables if t["dnis"]["module"] == "embedding"]
    listed = manifest["torchrec"]["modules"]["embedding"]["blocks"]
    layout = embedding.layout
    assert [b["field_index"] for b in listed] == list(range(layout.num_fields))
    for f, entry in enumerate(listed):
        ids = kept_ids(embedding, f)
        assert (entry["id_start"], entry["id_end"]) == (0, layout.cardinalities[f])
        if not ids:  # keeps no row: no table (TorchRec tables need rows), every id reads 0
            assert entry["width"] == 0 and entry["table"] is None and entry["stored_rows"] == 0
            continue
        table = next(t for t in inputs if t["name"] == entry["table"])
        route = table["dnis"]
        assert table["name"] == entry["field"] and route["row_ids"] == "row_ids.pt"
        assert row_ids[table["name"]].tolist() == ids == sorted(ids)
        assert table["num_embeddings"] == len(ids) == entry["stored_rows"]
        assert table["embedding_dim"] == embedding.dim == entry["width"]
        assert route["kept_dims"] == list(range(embedding.dim)) and table["data_type"] == "FP32"
        rows = torch.tensor(ids) + int(embedding.field_offsets[f])
        with torch.no_grad():
            assert torch.equal(weights[f"{table['name']}.weight"], embedding.lookup(rows))
        # a mean-pooled sequence is TorchRec's MEAN only if its table holds every id it routes
        padding = route["padding_id"]
        whole = set(range(layout.cardinalities[f])) - {padding} <= set(ids)
        mean = route["field_pooling"] == "mean"
        assert table["pooling"] == ("MEAN" if mean and whole else "SUM")
        assert route["divide_by_count"] == (mean and not whole)
    assert set(row_ids) == {t["name"] for t in inputs}  # the linear terms are plain tables
    module = manifest["torchrec"]["modules"]["embedding"]
    kept = embedding.kept.numel()
    params = sum(t["num_embeddings"] * t["embedding_dim"] for t in inputs)
    assert params == kept * embedding.dim == embedding.num_parameters() == module["parameters"]
    assert module["structure"] == "kept-rows"
    assert module["bytes"] == 4 * params == manifest["embedding_bytes"]
    assert module["structure_bytes"] == {"kept": 4 * kept}  # the int32 index: row_ids.pt's ids
    assert sum(t.numel() * t.element_size() for t in row_ids.values()) == 4 * kept
    assert module["memory_bytes"] == embedding.memory_bytes() == 4 * params + 4 * kept


def test_an_optfs_run_exports_each_fields_kept_rows(selection_runs, tmp_path):
    run_dir, model = selection_runs["optfs"]
    folder = export_by_cli(run_dir, tmp_path / "e")
    embedding = model.embedding
    assert isinstance(embedding, KeptRowsEmbedding)
    assert torch.equal(load_run(run_dir, BUDGET).model.embedding.kept, embedding.kept)
    plan = EmbeddingPlan.read(run_dir / f"plan-{BUDGET}.json")
    assert plan.kind == "kept-rows"
    tables = {t["name"]: t for t in read_export(folder)[0] if t["dnis"]["module"] == "embedding"}
    assert [tables[f.name]["num_embeddings"] if f.name in tables else 0 for f in plan.fields] == [
        f.stored_rows for f in plan.fields
    ]
    # the history keeps some ids and drops others: SUM-pooled, divided by every id's count
    layout = embedding.layout
    field = layout.names.index("history")
    ids = kept_ids(embedding, field)
    dropped = sorted(set(range(1, layout.cardinalities[field])) - set(ids))
    real = [i for i in ids if i != 0]
    assert real and dropped, "the budget should keep some history ids and drop others"
    assert tables["history"]["pooling"] == "SUM" and tables["history"]["dnis"]["divide_by_count"]
    assert_kept_rows_export(folder, embedding)
    # a bag of one kept and one dropped id is half the kept row, as the model's mean says
    bag = torch.zeros(1, layout.num_slots, dtype=torch.long)
    slot = tables["history"]["dnis"]["slot_start"]
    bag[0, slot : slot + 2] = torch.tensor([real[0], dropped[0]])
    reader = TorchRecTables.read(folder)
    values, lengths = reader.features(bag)["history"]
    assert values.tolist() == [ids.index(real[0])]  # its row among the kept
    assert lengths.tolist() == [1]  # the dropped id is not in the bag
    row = int(embedding.field_offsets[field]) + real[0]
    with torch.no_grad():
        half = embedding.lookup(torch.tensor([row]))[0] / 2
        assert torch.allclose(model.embedding(bag)[0, field], half, atol=0, rtol=1e-6)
        assert torch.allclose(reader.lookup(bag)[0, field], half, atol=0, rtol=1e-6)
    assert_lookups_match(folder, model)
    assert_scores_match(folder, model, run_dir)


def whole_field_run(run_dir: Path):
    """The optfs run with a hand-built KeptRowsEmbedding: every history row kept, its padding
    row 0 too (in the table, never routed), no user row, every other item row."""
    run = load_run(run_dir, BUDGET)
    layout, dim = run.model.embedding.layout, run.model.embedding.dim
    offsets = layout.field_offsets().tolist()
    keep = torch.zeros(layout.total_rows, dtype=torch.bool)
    names = list(layout.names)
    history, item = names.index("history"), names.index("item")
    keep[offsets[history] : offsets[history] + layout.cardinalities[history]] = True
    keep[offsets[item] : offsets[item] + layout.cardinalities[item] : 2] = True
    whole = KeptRowsEmbedding(layout, dim, keep)
    whole.load_dense(
        torch.randn(layout.total_rows, dim, generator=torch.Generator().manual_seed(0))
    )
    run.model.embedding = whole.eval()
    return run


def test_a_field_kept_whole_pools_by_mean_and_a_field_with_no_row_has_no_table(
    selection_runs, tmp_path
):
    run = whole_field_run(selection_runs["optfs"][0])
    layout, whole = run.model.embedding.layout, run.model.embedding
    item = layout.names.index("item")
    folder = export_run(run, "torchrec", output=tmp_path / "e").path
    tables = {t["name"]: t for t in read_export(folder)[0] if t["dnis"]["module"] == "embedding"}
    assert set(tables) == {"item", "history"}  # user keeps no row
    assert (
        tables["history"]["pooling"] == "MEAN" and not tables["history"]["dnis"]["divide_by_count"]
    )
    assert tables["item"]["num_embeddings"] == (layout.cardinalities[item] + 1) // 2
    assert_kept_rows_export(folder, whole)
    assert_lookups_match(folder, run.model)


@pytest.mark.parametrize("source", [*SELECTION_METHODS, "whole-field"])
def test_an_embedding_bag_collection_from_a_selection_export_looks_up_what_the_model_does(
    selection_runs, tmp_path, source
):
    torchrec, _ = torchrec_or_skip()
    if source == "whole-field":  # kept rows pooled by TorchRec's MEAN
        run = whole_field_run(selection_runs["optfs"][0])
        folder, model = export_run(run, "torchrec", output=tmp_path / "e").path, run.model
    else:
        run_dir, model = selection_runs[source]
        folder = export_by_cli(run_dir, tmp_path / "e")
    tables, weights, _ = read_export(folder)
    collection = torchrec.EmbeddingBagCollection(
        tables=torchrec_configs(tables), device=torch.device("cpu")
    )
    collection.load_state_dict({f"embedding_bags.{k}": v for k, v in weights.items()})
    reader = TorchRecTables.read(folder)
    ids = all_ids_and_rows(model.embedding.layout)
    modules = {"embedding": model.embedding, "linear.weights": model.linear.weights}
    features = {k: v for module in modules for k, v in reader.features(ids, module).items()}
    keys = list(features)  # every feature of the collection, ids without a row left out
    jagged = torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([features[k][0] for k in keys]),
        lengths=torch.cat([features[k][1] for k in keys]).int(),
    )
    with torch.no_grad():
        pooled = collection(jagged).to_dict()
        for module, expected in modules.items():
            got = reader.combine(pooled, ids, module)
            assert torch.max(torch.abs(got - expected(ids))) <= TOLERANCE
