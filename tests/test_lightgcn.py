"""LightGCN-style implicit folders (`user item item ...` per line): parsing, splits, errors, Gowalla."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dnis import models
from dnis.app.config import load_config
from dnis.data import catalog
from dnis.data.dataset import EncodedDataset
from dnis.data.lightgcn import hold_out_valid, load_lightgcn, read_lightgcn
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.errors import ConfigError, DataError
from dnis.tasks.topk import TopKTask

ROOT = Path(__file__).resolve().parents[1]
GOWALLA = ROOT.parent / "shared" / "data" / "gowalla"
SPLITS = ("train", "valid", "test")


def write_split(path: Path, lines: dict[int, list[int]]) -> None:
    path.write_text("".join(f"{u} {' '.join(map(str, its))}\n" for u, its in lines.items()))


def generated(folder: Path, seed: int = 0, valid: bool = True) -> dict[str, dict[int, list[int]]]:
    """Random disjoint train/valid/test items per user, written as LightGCN files."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[int, list[int]]] = {s: {} for s in SPLITS}
    for user in range(40):
        items = rng.choice(60, size=int(rng.integers(4, 15)), replace=False).tolist()
        out["train"][user] = items[:-2]
        out["valid"][user] = items[-2:-1]
        out["test"][user] = items[-1:]
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS if valid else ("train", "test"):
        write_split(folder / f"{split}.txt", out[split])
    return out


def decoded_pairs(ds: EncodedDataset, split: str) -> set[tuple[int, int]]:
    """(user, item) of every row, mapped back to the file's ids through the encoder."""
    vocab = [np.array([-1, *map(int, f.vocabulary)]) for f in ds.encoder.fields]
    ids = ds.split(split).ids.numpy()
    users, items = vocab[0][ids[:, 0]], vocab[1][ids[:, 1]]
    return {(int(u), int(i)) for u, i in zip(users, items, strict=True)}  # -1: the OOV id


def pairs(lines: dict[int, list[int]]) -> set[tuple[int, int]]:
    return {(u, i) for u, its in lines.items() for i in its}


def test_round_trip_counts_and_pairs(tmp_path: Path) -> None:
    written = generated(tmp_path)
    ds = catalog.load("lightgcn", task="topk", path=tmp_path)
    assert ds.name == "lightgcn" and ds.task == "topk" and ds.meta["valid_from"] == "valid.txt"
    known = {i for v in written["train"].values() for i in v}
    for split in SPLITS:
        assert len(ds.split(split)) == sum(len(v) for v in written[split].values())
        assert ds.meta["interactions"][split] == len(ds.split(split))
        assert ds.meta["users"][split] == len(written[split])
        assert ds.meta["items"][split] == len({i for v in written[split].values() for i in v})
        expected = {(u, i if i in known else -1) for u, i in pairs(written[split])}
        assert decoded_pairs(ds, split) == expected
    assert ds.cardinalities == [41, 1 + len(known)]
    counts = np.asarray(ds.encoder.fields[1].counts)
    assert np.all(np.diff(counts) <= 0)  # frequency-sorted ids, as every dnis dataset
    assert torch.all(ds.test.labels == 1)


def test_known_item_masking_sees_train_and_valid_items(tmp_path: Path) -> None:
    generated(tmp_path)
    ds = catalog.load("lightgcn", task="topk", path=tmp_path)
    task = TopKTask(ds)
    users = torch.arange(1, ds.cardinalities[0])

    def known(split: str, of: tuple[str, ...]) -> set[tuple[int, int]]:
        rows, items = task.seen[split].pairs(users)
        got = {(int(users[r]), int(i)) for r, i in zip(rows, items, strict=True)}
        ids = torch.cat([ds.split(s).ids for s in of])
        assert got == {(int(u), int(i)) for u, i in ids.tolist()}
        return got

    assert known("valid", ("train",))
    assert known("test", ("train", "valid"))
    embedding = FusedEmbedding(FieldLayout.from_dataset(ds), 8, 0.01)
    metrics = task.evaluate(models.build("bprmf", ds.schema, embedding), "test")
    assert metrics["users"] == len(ds.test) and 0 <= metrics["recall@20"] <= 1


def test_only_train_and_test_hold_out_one_training_item_per_user(tmp_path: Path) -> None:
    written = generated(tmp_path, valid=False)
    ds = load_lightgcn(task="topk", path=tmp_path, seed=3)
    assert ds.meta["valid_from"].startswith("train.txt")
    assert len(ds.valid) == 40  # every generated user has >= 2 training items
    assert decoded_pairs(ds, "train") == pairs(written["train"]) - raw_valid(tmp_path, 3)
    valid = raw_valid(tmp_path, 3)
    assert valid <= pairs(written["train"]) and sorted(u for u, _ in valid) == list(range(40))
    assert valid == raw_valid(tmp_path, 3)  # the seed fixes the draw
    assert valid != raw_valid(tmp_path, 4)
    assert load_lightgcn(task="topk", path=tmp_path, seed=4).meta["valid_from"].endswith("seed 4")


def raw_valid(folder: Path, seed: int) -> set[tuple[int, int]]:
    """The (user, item) pairs the loader holds out of train.txt with `seed` (file ids)."""
    _, valid = hold_out_valid(read_lightgcn(folder / "train.txt"), seed)
    return set(zip(valid.users.tolist(), valid.items.tolist(), strict=True))


def test_hold_out_keeps_users_with_one_training_item(tmp_path: Path) -> None:
    write_split(tmp_path / "train.txt", {0: [1], 1: [2, 3, 4], 2: [5, 6]})
    train, valid = hold_out_valid(read_lightgcn(tmp_path / "train.txt"), seed=0)
    assert sorted(valid.users.tolist()) == [1, 2] and len(train) == 4
    assert 0 in train.users.tolist()


def test_users_and_items_unseen_in_train_map_to_oov(tmp_path: Path) -> None:
    write_split(tmp_path / "train.txt", {0: [1, 2], 1: [2, 3]})
    write_split(tmp_path / "valid.txt", {0: [3], 1: [9]})  # item 9 unseen in train
    write_split(tmp_path / "test.txt", {0: [3], 7: [1, 2]})  # user 7 unseen in train
    ds = load_lightgcn(task="topk", path=tmp_path)
    assert ds.meta["oov_rows"] == {"valid": {"user": 0, "item": 1}, "test": {"user": 2, "item": 0}}
    assert len(ds.test) == 3  # the unseen user's rows are kept


def test_parsing_tolerates_crlf_tabs_blank_lines_no_final_newline_and_gzip(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbf0 10 11\r\n\n1\t12  13\r\n2\n3 14")
    parsed = read_lightgcn(tmp_path / "a.txt")
    assert parsed.users.tolist() == [0, 0, 1, 1, 3]
    assert parsed.items.tolist() == [10, 11, 12, 13, 14]
    assert parsed.lines.tolist() == [1, 1, 3, 3, 5] and parsed.n_lines == 4
    (tmp_path / "b.txt").write_bytes(gzip.compress(b"5 123456789012345678 7\n"))
    assert read_lightgcn(tmp_path / "b.txt").items.tolist() == [123456789012345678, 7]


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        (b"0 1 2\n1 3 x4 5\n", 2, "'x4' is not a non-negative integer id"),
        (b"0 1 2\n1 3\n2 -4\n", 3, "'-4' is not a non-negative integer id"),
        (b"0 1 2.0\n", 1, "'2.0' is not a non-negative integer id"),
        (b"0,1,2\n", 1, "'0,1,2' is not a non-negative integer id"),
        (b"0 1\n1 1234567890123456789\n", 2, "more than 18 digits"),
        (b"0 1\n1 2\n0 3\n", 3, "user 0 has a second line (its first is line 1"),
    ],
)
def test_malformed_lines_name_file_and_line(
    tmp_path: Path, text: bytes, line: int, says: str
) -> None:
    generated(tmp_path)
    (tmp_path / "valid.txt").write_bytes(text)
    with pytest.raises(DataError) as error:
        catalog.load("lightgcn", task="topk", path=tmp_path)
    assert error.value.path == str(tmp_path / "valid.txt") and error.value.line == line
    assert says in str(error.value) and f"line {line}" in str(error.value)


@pytest.mark.parametrize(
    ("text", "says"), [(b"", "empty"), (b"  \n\n", "empty"), (b"0\n1\n", "no item id")]
)
def test_files_without_interactions_are_refused(tmp_path: Path, text: bytes, says: str) -> None:
    generated(tmp_path)
    (tmp_path / "test.txt").write_bytes(text)
    with pytest.raises(DataError, match=says) as error:
        load_lightgcn(task="topk", path=tmp_path)
    assert error.value.path == str(tmp_path / "test.txt")


def test_folder_and_options_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        load_lightgcn(task="topk", path=tmp_path / "nope")
    generated(tmp_path / "data")
    (tmp_path / "data" / "test.txt").unlink()
    with pytest.raises(DataError, match=r"lacks \['test.txt'\]"):
        load_lightgcn(task="topk", path=tmp_path / "data")
    with pytest.raises(ConfigError, match="supports tasks"):
        catalog.load("gowalla", task="ctr", path=tmp_path)
    with pytest.raises(ConfigError, match="not bundled"):
        catalog.load("gowalla", task="topk")
    with pytest.raises(ConfigError, match="Did you mean 'min_count'"):
        catalog.load("lightgcn", task="topk", path=tmp_path, min_cont=2)
    with pytest.raises(ConfigError, match="positive integer"):
        load_lightgcn(task="topk", path=tmp_path, min_count=0)


def test_min_count_maps_rare_items_to_oov(tmp_path: Path) -> None:
    write_split(tmp_path / "train.txt", {0: [1, 2], 1: [2, 3], 2: [2]})
    write_split(tmp_path / "test.txt", {0: [3], 1: [1]})
    ds = load_lightgcn(task="topk", path=tmp_path, min_count=2)
    assert ds.encoder.fields[1].vocabulary == ["2"]


def test_gowalla_config_is_defaults_only() -> None:
    path = ROOT / "configs" / "gowalla-topk-bprmf-defaults.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(raw) == {"dataset", "model", "embedding", "search"}
    config = load_config(path)
    assert config.dataset.name == "gowalla" and config.dataset.task == "topk"
    assert config.model.name == "bprmf" and config.embedding.dim == 64


@pytest.mark.skipif(not (GOWALLA / "train.txt").is_file(), reason=f"needs {GOWALLA}")
def test_real_gowalla_counts() -> None:
    start = time.perf_counter()
    ds = catalog.load("gowalla", task="topk", path=GOWALLA)
    seconds = time.perf_counter() - start
    rows = {s: len(ds.split(s)) for s in SPLITS}
    assert rows == {"train": 719_081, "valid": 91_047, "test": 217_242}
    assert sum(rows.values()) == 1_027_370
    assert ds.meta["users"] == {s: 29_858 for s in SPLITS}
    assert ds.cardinalities[0] == 29_858 + 1  # every user has training items; + the OOV id
    items = np.unique(np.concatenate([read_lightgcn(GOWALLA / f"{s}.txt").items for s in SPLITS]))
    assert len(items) == 40_981
    assert ds.meta["oov_rows"]["test"]["user"] == 0
    assert seconds < 15, f"loading Gowalla took {seconds:.1f} s"
