"""Out-of-core data: streaming loads equal in-memory loads, the cache is reused, memory is bounded."""

from __future__ import annotations

import json
import logging
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dnis.app.config import Config, DatasetConfig
from dnis.cli import main
from dnis.data.cache import DiskSplit, SplitWriter
from dnis.data.loader import batches, num_batches
from dnis.data.schema import FeatureSpec, Schema
from dnis.data.sketch import CountMinSketch, Reservoir
from dnis.data.streaming import StreamingOptions, builder, sources
from dnis.data.tabular import load_files
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.errors import ConfigError, DataError
from dnis.models import build
from dnis.tasks import make_task
from dnis.train import TrainConfig, Trainer

SCHEMA = Schema(
    (
        FeatureSpec("user", min_count=2),
        FeatureSpec("item"),
        FeatureSpec("city"),
        FeatureSpec("genres", kind="sequence", max_len=3),
        FeatureSpec("price", kind="numeric", buckets=6),
        FeatureSpec("note"),
    ),
    label="clicked",
)


def clicks_frame(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    user = rng.zipf(1.3, n) % 400
    item = rng.zipf(1.2, n) % 300
    logit = 0.8 * np.sin(user) + 0.8 * np.cos(item) - 0.2
    price = np.round(rng.lognormal(2, 1, n), 2).astype(object)
    price[rng.random(n) < 0.05] = ""
    price[7] = "n/a"  # not a number: OOV, as in memory
    return pd.DataFrame(
        {
            "user": user,
            "item": [f"i{x}" for x in item],
            "city": rng.choice(["paris", "lyon", "", "nice", "a, b"], n),  # "a, b" gets quoted
            "genres": rng.choice(["a|b", "c", "", "b|c|d|e", "a"], n),
            "price": price,
            "note": rng.choice(['say "hi"', "x", "y"], n),
            "clicked": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int),
        }
    )


def write_csv(path: Path, frame: pd.DataFrame, blank_every: int = 0) -> Path:
    text = frame.to_csv(index=False)
    if blank_every:
        lines = text.splitlines(keepends=True)
        text = "".join(
            line + ("\n" if i and i % blank_every == 0 else "") for i, line in enumerate(lines)
        )
    path.write_text(text, encoding="utf-8")
    return path


def options(tmp_path: Path, **kwargs) -> StreamingOptions:
    kwargs.setdefault("chunk_bytes", 2000)  # dozens of chunks: boundaries and line offsets matter
    return StreamingOptions(cache_dir=tmp_path / "cache", **kwargs)


def assert_same_dataset(memory, disk) -> None:
    for a, b in zip(memory.encoder.fields, disk.encoder.fields, strict=True):
        assert a.to_dict() == b.to_dict(), a.spec.name
    for name in ("train", "valid", "test"):
        assert isinstance(disk.split(name), DiskSplit)
        ids, labels = disk.split(name).read(0, len(disk.split(name)))
        assert torch.equal(memory.split(name).ids, torch.from_numpy(ids).long()), name
        assert torch.equal(memory.split(name).labels, torch.from_numpy(labels)), name
    assert disk.summary() == memory.summary()


@pytest.mark.parametrize("variant", ["blank lines", "crlf", "headerless"])
def test_csv_streaming_equals_in_memory(tmp_path: Path, variant: str) -> None:
    frame = clicks_frame()
    path = write_csv(
        tmp_path / "clicks.csv", frame, blank_every=97 if variant == "blank lines" else 0
    )
    kwargs = dict(format="csv", path=path, schema=SCHEMA, task="ctr", seed=3)
    if variant == "crlf":
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    if variant == "headerless":
        path.write_text(frame.to_csv(index=False, header=False), encoding="utf-8")
        kwargs.update(header=False, names=list(frame.columns))
    memory = load_files(**kwargs)
    disk = load_files(**kwargs, streaming=options(tmp_path))
    assert_same_dataset(memory, disk)
    assert disk.encoder.fields[0].vocabulary[:3] == memory.encoder.fields[0].vocabulary[:3]
    assert len(disk.train) == 2400 and len(disk.valid) == 300  # the in-memory 80/10/10


def test_multibyte_delimiter_and_three_files(tmp_path: Path) -> None:
    frame = clicks_frame(900, seed=1).drop(columns=["note"])
    frame["genres"] = frame["genres"].str.replace("|", ";")
    schema = Schema(
        (*SCHEMA.features[:3], FeatureSpec("genres", kind="sequence", max_len=3, separator=";"),
         SCHEMA.features[4]),
        label="clicked",
    )  # fmt: skip
    files = {}
    for i, name in enumerate(("train", "valid", "test")):
        files[name] = tmp_path / f"{name}.txt"
        part = frame.iloc[i * 300 : (i + 1) * 300].to_csv(index=False, sep="\t")
        files[name].write_text(part.replace("\t", "::"), "utf-8")
    kwargs = dict(format="tsv", path=files, schema=schema, task="ctr", delimiter="::")
    assert_same_dataset(load_files(**kwargs), load_files(**kwargs, streaming=options(tmp_path)))


def test_parquet_streaming_equals_in_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 2500
    whole = rng.integers(0, 50, n).astype(float)
    whole[::13] = np.nan  # float ids that are whole numbers: "7", as in memory
    fraction = whole.copy()
    fraction[5] = 2.5  # one fraction: that split's values print as "7.0"
    frame = pd.DataFrame(
        {
            "user": rng.integers(0, 80, n),
            "whole": whole,
            "fraction": fraction,
            "city": rng.choice(["x", "", "y"], n),
            "age": rng.normal(40, 9, n),
            "rating": rng.integers(1, 6, n).astype(float),
        }
    )
    path = tmp_path / "r.parquet"
    frame.to_parquet(path)
    schema = Schema(
        (FeatureSpec("user"), FeatureSpec("whole"), FeatureSpec("fraction"), FeatureSpec("city"),
         FeatureSpec("age", kind="numeric")),
        label="rating",
    )  # fmt: skip
    kwargs = dict(format="parquet", path=path, schema=schema, task="rating", seed=1)
    memory = load_files(**kwargs)
    disk = load_files(**kwargs, streaming=options(tmp_path, chunk_rows=333))
    assert_same_dataset(memory, disk)
    assert "7" in disk.encoder.fields[1].vocabulary
    task = make_task(disk)
    assert (task.low, task.high) == (1.0, 5.0)  # the label range without reading the split


def test_training_and_evaluation_equal_in_memory(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "clicks.csv", clicks_frame())
    kwargs = dict(format="csv", path=path, schema=SCHEMA, task="ctr", seed=0)
    memory = load_files(**kwargs)
    disk = load_files(**kwargs, streaming=options(tmp_path))  # one shuffle block: same batches
    blocks = load_files(**kwargs, streaming=options(tmp_path, shuffle_block=500))
    config = TrainConfig(epochs=3, batch_size=128, lr=0.01, seed=0, patience=0)
    results = []
    for data in (memory, disk, blocks):
        torch.manual_seed(0)
        model = build("deepfm", data.schema, FusedEmbedding(FieldLayout.from_dataset(data), 8))
        task = make_task(data)
        fit = Trainer(model, task, config).fit()
        history = [{k: v for k, v in r.items() if k != "seconds"} for r in fit.history]
        results.append((history, task.evaluate(model, "test", batch_size=100)))
    assert results[1] == results[0]  # identical batches, identical floats
    # Five blocks of 500 rows: the block-wise shuffle orders rows differently from one global
    # permutation, so only the quality is comparable (same data, same model, same epochs).
    auc_memory, auc_blocks = results[0][1]["auc"], results[2][1]["auc"]
    assert abs(auc_blocks - auc_memory) < 0.03, (auc_memory, auc_blocks)
    assert auc_blocks > 0.6


def test_second_load_reuses_the_cache(tmp_path: Path, monkeypatch, caplog) -> None:
    path = write_csv(tmp_path / "clicks.csv", clicks_frame(500))
    kwargs = dict(format="csv", path=path, schema=SCHEMA, task="ctr", streaming=options(tmp_path))
    with caplog.at_level(logging.INFO, logger="dnis.data.streaming"):
        first = load_files(**kwargs)
    assert "built cache" in caplog.text
    caplog.clear()
    entries = [p for p in (tmp_path / "cache").iterdir()]
    assert [p.name for p in entries] == [Path(first.meta["cache"]).name]  # no temp folder left
    assert sorted(p.name for p in entries[0].iterdir()) == sorted(
        ["meta.json", "encoder.json"]
        + [f"{s}.{k}.npy" for s in ("train", "valid", "test") for k in ("ids", "labels")]
    )

    def refuse(*args, **kwargs):
        raise AssertionError("the data file was read again")

    monkeypatch.setattr(sources.CsvFile, "scan", refuse)
    monkeypatch.setattr(sources.CsvFile, "chunks", refuse)
    with caplog.at_level(logging.INFO, logger="dnis.data.streaming"):
        second = load_files(**kwargs)
    assert "reusing cache" in caplog.text
    assert second.meta["cache"] == first.meta["cache"]
    assert torch.equal(second.train.ids, first.train.ids)
    monkeypatch.undo()
    entry, expected = Path(first.meta["cache"]), first.train.read(0, len(first.train))
    first.train._mapped = second = None  # no live map of a file about to be truncated (SIGBUS)
    with (entry / "train.ids.npy").open("r+b") as handle:  # a damaged entry is rebuilt
        handle.truncate(100)
    rebuilt = load_files(**kwargs)
    assert rebuilt.meta["cache"] == first.meta["cache"]
    assert np.array_equal(rebuilt.train.read(0, len(rebuilt.train))[0], expected[0])
    changed = dict(kwargs, seed=1)  # another split: another entry
    assert load_files(**changed).meta["cache"] != first.meta["cache"]
    with path.open("a", encoding="utf-8") as handle:  # the file changes: another entry
        handle.write("u1,i1,paris,a,3.0,x,1\n")
    assert load_files(**kwargs).meta["cache"] != first.meta["cache"]


def test_a_failed_build_leaves_no_entry(tmp_path: Path, monkeypatch) -> None:
    path = write_csv(tmp_path / "clicks.csv", clicks_frame(300))

    def crash(self, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(builder.Builder, "_write", crash)
    with pytest.raises(KeyboardInterrupt):
        load_files(format="csv", path=path, schema=SCHEMA, task="ctr", streaming=options(tmp_path))
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize(
    "bad, where",
    [
        ("u1,i1,paris,a,3.0,x\n", "ragged line"),
        ("u1,i1,paris,a,3.0,x,yes\n", "bad label"),
        ("u1,i1,par\xe9s,a,3.0,x,1\n", "bad byte"),
    ],
)
def test_a_bad_line_in_the_middle_is_named(tmp_path: Path, bad: str, where: str) -> None:
    good = clicks_frame(1500).drop(columns=["city", "note"]).assign(city="c", note="n")
    good = good[["user", "item", "city", "genres", "price", "note", "clicked"]]
    lines = good.to_csv(index=False).splitlines(keepends=True)
    lines.insert(900, bad)  # file line 901
    path = tmp_path / "bad.csv"
    data = "".join(lines).encode("utf-8")
    if where == "bad byte":
        data = data.replace("\xe9".encode(), b"\xe9")  # a latin-1 byte in a utf-8 file
    path.write_bytes(data)
    kwargs = dict(format="csv", path=path, schema=SCHEMA, task="ctr")
    with pytest.raises(DataError) as in_memory:
        load_files(**kwargs)
    with pytest.raises(DataError) as streamed:
        load_files(**kwargs, streaming=options(tmp_path))
    assert streamed.value.line == 901
    assert str(streamed.value) == str(in_memory.value)  # the same message, line, column and fix
    assert not list((tmp_path / "cache").glob("*")) or all(
        not p.name.startswith(".tmp") for p in (tmp_path / "cache").iterdir()
    )


def test_many_ragged_lines_and_a_lone_carriage_return_are_refused_as_in_memory(
    tmp_path: Path,
) -> None:
    """pyarrow counts the ragged records of the whole file ("3 in all", as `read_csv` does), and
    a lone \\r, which the parser takes for a line end, is refused with `read_csv`'s message."""
    lines = clicks_frame(1500).assign(city="c", note="n").to_csv(index=False).splitlines(True)
    ragged = list(lines)
    for at in (1400, 700, 300):
        ragged.insert(at, "u1,i1\n")
    lone = [*lines[:500], "12\r3,i1,c,a,3.0,n,1\n", *lines[500:]]  # one line, two rows
    messages = {}
    for name, content in (("ragged", ragged), ("lone", lone)):
        path = tmp_path / f"{name}.csv"
        path.write_bytes("".join(content).encode("utf-8"))
        kwargs = dict(format="csv", path=path, schema=SCHEMA, task="ctr")
        with pytest.raises(DataError) as in_memory:
            load_files(**kwargs)
        with pytest.raises(DataError) as streamed:
            load_files(**kwargs, streaming=options(tmp_path, chunk_bytes=4096))
        assert str(streamed.value) == str(in_memory.value)
        messages[name] = str(streamed.value)
    assert "line 301: expected 7 fields" in messages["ragged"]
    assert "(3 ragged line(s) in all)" in messages["ragged"]
    assert "the parser read 1502 rows but the file has 1501" in messages["lone"]


def test_bytes_are_checked_across_block_edges(tmp_path: Path) -> None:
    """A character cut in two by a block edge is fine; an invalid byte on either side of an edge
    is named by line and byte as `read_csv` names it; a "::" delimiter cut in two still splits."""
    from dnis.data.readers import read_csv

    row = "user::é::x\n"  # 12 bytes: edges (64 bytes) fall everywhere, between é's two bytes too
    text = "a::b::c\n" + row * 40
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    source = sources.CsvFile(path, "::", True, None, "utf-8", 64)
    source.scan()
    chunks = list(source.chunks(["a", "b", "c"]))
    assert len(chunks) > 1
    assert [value for c in chunks for value in c.table.column("b").to_pylist()] == ["é"] * 40
    raw = text.encode("utf-8")
    for at in range(60, 70):  # an invalid byte replaces each byte around the first edge
        broken = raw[:at] + b"\xff" + raw[at + 1 :]
        path.write_bytes(broken)
        with pytest.raises(DataError) as in_memory:
            read_csv(path, delimiter="::")
        with pytest.raises(DataError) as streamed:
            sources.CsvFile(path, "::", True, None, "utf-8", 64).scan()
        assert str(streamed.value) == str(in_memory.value), at


def test_a_record_longer_than_a_block_and_other_encodings(tmp_path: Path) -> None:
    """pyarrow refuses a record longer than its block; the block then grows until it fits. A
    latin-1 file is transcoded into a UTF-8 copy for pyarrow, deleted once the cache is built:
    the same dataset as in memory."""
    frame = clicks_frame(600)
    frame.loc[100, "note"] = "é" * 3000 + "\nsecond line"
    path = write_csv(tmp_path / "long.csv", frame)
    path.write_bytes(path.read_text(encoding="utf-8").encode("latin-1"))
    kwargs = dict(format="csv", path=path, schema=SCHEMA, task="ctr", encoding="latin-1")
    disk = load_files(**kwargs, streaming=options(tmp_path, chunk_bytes=256))
    assert_same_dataset(load_files(**kwargs), disk)
    assert len(list(Path(disk.meta["cache"]).iterdir())) == 8  # meta, encoder, 3 x (ids, labels)


def test_a_reader_left_halfway_lets_the_process_exit(tmp_path: Path) -> None:
    """A streamed read stopped halfway (by a bad label, say) lets the process exit. pyarrow's
    streaming reader reading a Python file object instead of a file hung or aborted the process
    at exit ("terminate called without an active exception"), so pyarrow reads files only (a
    latin-1 file through its UTF-8 copy, as here)."""
    import subprocess
    import sys

    frame = clicks_frame(30_000)
    frame.loc[2000, "clicked"] = 7
    path = write_csv(tmp_path / "bad.csv", frame)
    path.write_bytes(path.read_text(encoding="utf-8").encode("latin-1"))
    script = f"""
from pathlib import Path
from dnis.data.streaming.sources import CsvFile
source = CsvFile(Path({str(path)!r}), ",", True, None, "latin-1", 4096)
source.scan()
for _ in range(5):
    chunks = source.chunks(source.columns)
    next(chunks), next(chunks)
    chunks.close()
print("done")
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr[-2000:]


def test_missing_column_and_refused_settings(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "clicks.csv", clicks_frame(200).drop(columns=["city"]))
    kwargs = dict(format="csv", path=path, schema=SCHEMA, task="ctr")
    with pytest.raises(DataError) as in_memory:
        load_files(**kwargs)
    with pytest.raises(DataError) as streamed:
        load_files(**kwargs, streaming=options(tmp_path))
    assert str(streamed.value) == str(in_memory.value)
    with pytest.raises(ConfigError, match="split: random"):
        load_files(**kwargs, split="temporal", streaming=options(tmp_path))
    with pytest.raises(ConfigError, match="tasks"):
        load_files(**dict(kwargs, task="topk"), streaming=options(tmp_path))
    with pytest.raises(ConfigError, match="vocab"):
        StreamingOptions(vocab="exact")


def test_count_min_maps_rare_ids_to_oov(tmp_path: Path) -> None:
    frame = clicks_frame()
    path = write_csv(tmp_path / "clicks.csv", frame)
    schema = Schema(
        (FeatureSpec("user", min_count=3), FeatureSpec("item", min_count=5)), label="clicked"
    )
    kwargs = dict(format="csv", path=path, schema=schema, task="ctr", seed=0)
    two_pass = load_files(**kwargs, streaming=options(tmp_path))
    # A tiny sketch: most rare ids collide with frequent ones and pass the sketch, and the exact
    # recount of those candidates still drops them, so the vocabulary is the exact one.
    tiny = load_files(**kwargs, streaming=options(tmp_path, vocab="count_min", sketch_width=16))
    wide = load_files(**kwargs, streaming=options(tmp_path, vocab="count_min", sketch_depth=3))
    for data in (tiny, wide):
        assert [f.to_dict() for f in data.encoder.fields] == [
            f.to_dict() for f in two_pass.encoder.fields
        ]
    memory = load_files(**kwargs)
    assert_same_dataset(memory, wide)
    train_rows = memory.split("train")
    users = pd.Series(frame["user"].astype(str).to_numpy())
    counts = users.value_counts()
    vocabulary = set(wide.encoder.fields[0].vocabulary)
    rare = {u for u, c in counts.items() if c < 3}
    assert rare and not rare & vocabulary  # rare in the whole file: rare in train, so OOV
    ids, _ = wide.train.read(0, len(wide.train))
    assert (ids[:, 0] == 0).sum() == int((train_rows.ids[:, 0] == 0).sum()) > 0


def test_count_min_sketch_and_reservoir() -> None:
    rng = np.random.default_rng(0)
    values = np.array([f"v{i}" for i in range(5000)], dtype=object)
    counts = rng.integers(1, 20, 5000)
    sketch = CountMinSketch(width=2000, depth=4)
    sketch.add(values[:2500], counts[:2500])
    sketch.add(values[2500:], counts[2500:])
    estimate = sketch.estimate(values)
    assert (estimate >= counts).all()  # never an underestimate
    assert np.mean(estimate - counts <= sketch.error_bound()) > 0.95
    roomy = CountMinSketch(width=1 << 16, depth=2)
    roomy.add(values, counts, field=0)
    assert (roomy.estimate(values, field=1) == 0).mean() > 0.8  # fields are kept apart
    assert (roomy.estimate(values, field=0) == counts).mean() > 0.9
    chunked, whole = Reservoir(100, seed=1), Reservoir(100, seed=1)
    stream = rng.normal(size=1000)
    for start in range(0, 1000, 37):
        chunked.add(stream[start : start + 37])
    whole.add(stream)
    assert np.array_equal(np.sort(chunked.values), np.sort(whole.values))  # chunking-invariant
    assert len(whole.values) == 100 and not whole.exact
    assert set(whole.values) <= set(stream)


def disk_split(folder: Path, rows: int, slots: int = 4, block_rows: int = 4096) -> DiskSplit:
    """A split on disk whose label is the row number (to check coverage)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = SplitWriter(folder, "train", rows, slots)
    for start in range(0, rows, 50_000):
        stop = min(rows, start + 50_000)
        position = np.arange(start, stop)
        ids = np.repeat(position[:, None] % 1000, slots, axis=1).astype(np.int32)
        writer.write(position[::-1].copy(), ids[::-1].copy(), position[::-1].astype(np.float32))
    writer.close()
    return DiskSplit(folder, "train", rows, slots, block_rows=block_rows)


def peak_numpy_bytes(split: DiskSplit, batch_size: int) -> int:
    tracemalloc.start()
    seen = 0
    for ids, _ in batches(split, batch_size, shuffle=True, generator=torch.Generator()):
        seen += len(ids)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == len(split)
    return peak


def test_disk_batches_shuffle_blocks_with_bounded_memory(tmp_path: Path) -> None:
    small = disk_split(tmp_path / "small", 20_000)
    large = disk_split(tmp_path / "large", 200_000)
    generator = torch.Generator().manual_seed(5)
    got = list(batches(large, 1000, shuffle=True, generator=generator))
    assert len(got) == num_batches(large, 1000) and {len(ids) for ids, _ in got} == {1000}
    order = torch.cat([labels for _, labels in got]).long()
    assert torch.equal(order.sort().values, torch.arange(200_000))  # every row once
    assert not torch.equal(order, torch.arange(200_000))
    assert got[0][0].dtype == torch.int64
    assert torch.equal(got[0][0][:, 0], order[:1000] % 1000)  # ids travel with their label
    again = torch.cat([lab for _, lab in batches(large, 1000, shuffle=True,
                                                 generator=torch.Generator().manual_seed(5))])  # fmt: skip
    assert torch.equal(again.long(), order)
    plain = torch.cat([lab for _, lab in batches(large, 999)]).long()
    assert torch.equal(plain, torch.arange(200_000))
    # Memory: the numpy blocks read at a time do not grow with the rows (10x here).
    block_bytes = 4096 * (4 * 4 + 4)
    peak_small, peak_large = peak_numpy_bytes(small, 1000), peak_numpy_bytes(large, 1000)
    assert peak_large < 4 * block_bytes, peak_large
    assert peak_large < peak_small + block_bytes
    assert peak_large < large.rows * 4 * 4 / 10  # far below the split's ids


def test_disk_split_pickles_by_path_and_maps_lazily(tmp_path: Path) -> None:
    split = disk_split(tmp_path / "s", 1000, block_rows=128)
    copy = pickle.loads(pickle.dumps(split))
    assert copy == split and copy.block_rows == 128
    assert len(pickle.dumps(split)) < 1000  # the path, not the data
    assert split.ids.dtype == torch.int32 and split.ids.shape == (1000, 4)
    assert torch.equal(split.labels[:3], torch.tensor([0.0, 1.0, 2.0]))


def test_dataset_config_streaming_keys(tmp_path: Path) -> None:
    own = dict(format="csv", path="x.csv", schema={"features": ["a"], "label": "y"}, task="ctr")
    plain = Config(dataset=DatasetConfig(**own))
    moved = Config(dataset=DatasetConfig(**own, cache_dir="elsewhere"))
    assert moved.digest() == plain.digest()  # where the cache lives changes nothing
    assert Config(dataset=DatasetConfig(**own, vocab="count_min")).digest() == plain.digest()
    streamed = Config(dataset=DatasetConfig(**own, streaming=True), output_dir=str(tmp_path))
    assert streamed.digest() != plain.digest()
    opts = streamed.dataset.streaming_options(streamed.output_dir)
    assert opts.cache_dir == tmp_path / ".cache" and opts.vocab == "two_pass"
    assert plain.dataset.streaming_options("runs") is False
    with pytest.raises(ConfigError, match="csv, tsv or parquet"):
        DatasetConfig(**dict(own, format="libfm"), streaming=True)
    with pytest.raises(ConfigError, match="rating and ctr"):
        DatasetConfig(**dict(own, task="topk"), streaming=True)
    with pytest.raises(ConfigError, match="split: random"):
        DatasetConfig(**own, split="temporal", streaming=True)
    with pytest.raises(ConfigError, match="vocab"):
        DatasetConfig(**own, vocab="exact")


# how fast, and the config hash (streaming is part of it): not what was computed
NOT_RESULTS = ("search_seconds", "retrain_seconds", "latency_ms", "peak_memory_mb", "config_hash")


def cli_results(runs: Path, command: str) -> object:
    """What a command computed (not how fast), from the files of its one run folder."""
    (folder,) = [p for p in runs.iterdir() if p.is_dir() and p.name != ".cache"]
    if command == "train":
        final = json.loads((folder / "final.json").read_text(encoding="utf-8"))
        return {k: final[k] for k in ("valid", "test", "best_epoch", "params", "dataset")}
    if command == "search":
        rows = [json.loads((folder / "result-0.5.json").read_text(encoding="utf-8"))]
    else:
        cells = sorted((folder / "cells").glob("*.json"))
        rows = [row for cell in cells for row in json.loads(cell.read_text(encoding="utf-8"))]
    assert rows and all("metrics" in row for row in rows)
    return [{k: v for k, v in row.items() if k not in NOT_RESULTS} for row in rows]


@pytest.mark.parametrize(
    "command, extra",
    [("train", ["--quiet"]), ("search", ["--quiet"]), ("compare", ["--jobs", "2"])],
)
def test_commands_stream_through_the_cache(
    tmp_path: Path, monkeypatch, caplog, command: str, extra: list[str]
) -> None:
    """`dnis train`, `search` and `compare` with `dataset.streaming: true` build the cache in
    `<output_dir>/.cache` once, reuse it (compare's worker processes too), and give exactly the
    in-memory results: 2,400 training rows are one shuffle block, so the batches are the same."""
    monkeypatch.chdir(tmp_path)  # a cache misplaced in the default ./runs/.cache would show
    path = write_csv(tmp_path / "clicks.csv", clicks_frame(3000))
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": {"format": "csv", "path": str(path), "task": "ctr", "streaming": True,
                            "schema": SCHEMA.to_dict()},
                "model": {"name": "deepfm", "params": {"hidden": [16]}},
                "embedding": {"dim": 8},
                "train": {"epochs": 2, "batch_size": 256, "lr": 0.01},
                "search": {"warmup_epochs": 1, "search_epochs": 1, "budgets": [0.5]},
                "compare": {"methods": ["dnis", "uniform"], "budgets": [0.5], "seeds": 1},
            }
        ),
        encoding="utf-8",
    )  # fmt: skip
    results, logs = {}, {}
    for mode, folder in (("streamed", "streamed"), ("again", "streamed"), ("memory", "memory")):
        runs = tmp_path / folder
        args = [command, "--config", str(config), "--set", f"output_dir={runs}", *extra]
        args += ["--set", "dataset.streaming=false"] * (mode == "memory")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dnis.data.streaming"):
            assert main(args) == 0
        results[mode], logs[mode] = cli_results(runs, command), caplog.text
    assert "built cache" in logs["streamed"] and "reusing cache" not in logs["streamed"]
    assert "reusing cache" in logs["again"] and "built cache" not in logs["again"]
    assert "cache" not in logs["memory"] and not (tmp_path / "memory" / ".cache").exists()
    (entry,) = (tmp_path / "streamed" / ".cache").iterdir()  # the default: <output_dir>/.cache
    assert (entry / "meta.json").is_file() and (entry / "train.ids.npy").is_file()
    assert not (tmp_path / "runs").exists()  # nothing (compare's workers neither) used ./runs
    assert results["streamed"] == results["memory"] == results["again"]


def test_the_label_mean_of_a_split_on_disk_equals_the_in_memory_one(tmp_path):
    """The global bias starts at the training labels' mean; on disk it is read in chunks."""
    import numpy as np

    from dnis.data.cache import DiskSplit
    from dnis.data.loader import label_mean

    labels = np.random.default_rng(0).random(2500).astype(np.float32) * 5
    np.save(tmp_path / "train.labels.npy", labels)
    np.save(tmp_path / "train.ids.npy", np.zeros((2500, 1), dtype=np.int32))
    split = DiskSplit(tmp_path, "train", 2500, 1, label_range=(0.0, 5.0))
    assert split.label_mean(chunk_rows=1000) == pytest.approx(
        float(labels.astype(np.float64).mean())
    )
    assert label_mean(split) == pytest.approx(float(labels.astype(np.float64).mean()))
