"""Export (TorchScript, ONNX) and predict: raw values in, the in-process model's scores out.

Every model family (MF, DeepFM, AutoInt, DIN with its history sequence) is trained for one epoch
on small data; the compact embeddings of a DNIS search (block granularity: BlockMixedEmbedding,
element granularity: RaggedEmbedding) are exported too. ONNX tests need the `onnx` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dnis.app.config import load_config
from dnis.app.search import search_run
from dnis.app.train import train
from dnis.cli import main
from dnis.data.synthetic import make_frame
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding
from dnis.errors import DataError, DnisError
from dnis.export import export_run, load, load_run, predict_file, read_manifest
from dnis.export.folder import file_entry

ONNX_REASON = "ONNX export is tested with the optional extra: pip install -e '.[onnx]'"
TOLERANCE = 1e-5
FORMATS = ("torchscript", "onnx")


def need(fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason=ONNX_REASON)
        pytest.importorskip("onnx", reason=ONNX_REASON)


# ---------------------------------------------------------------- tiny runs


def history_frame(n_rows: int = 1500, seed: int = 0) -> pd.DataFrame:
    """user, item, a '|'-joined history of earlier items (sometimes empty), a price, a 0/1 label."""
    rng = np.random.default_rng(seed)
    items = [f"m{k}" for k in range(60)]
    weights = 1.0 / np.arange(1, 61)
    weights /= weights.sum()
    history = [
        "|".join(rng.choice(items, size=int(rng.integers(0, 7)), replace=False, p=weights))
        for _ in range(n_rows)
    ]
    item = rng.choice(items, size=n_rows, p=weights)
    liked = np.array([i in h.split("|") for i, h in zip(item, history, strict=True)])
    return pd.DataFrame(
        {
            "row_id": [f"r{k}" for k in range(n_rows)],
            "user": rng.integers(0, 40, n_rows).astype(str),
            "item": item,
            "history": history,
            "price": np.round(rng.normal(size=n_rows), 3),
            "label": ((rng.random(n_rows) < 0.3) | liked).astype(int),
        }
    )


SYNTHETIC = {"n_rows": 2000, "vocab": 300, "ranks": [4, 2], "noise_fields": 1, "numeric_fields": 1}

CASES = {
    # name: (task, model, model params, dim, data)
    "mf": ("rating", "mf", {}, 8, "synthetic"),
    "deepfm": ("ctr", "deepfm", {"hidden": [16]}, 32, "synthetic"),
    "autoint": ("ctr", "autoint", {"attention_dim": 4, "num_layers": 2, "dnn_hidden": [8]}, 8, "synthetic"),
    "din": ("ctr", "din", {"attention_hidden": [8], "hidden": [16]}, 8, "history"),
}  # fmt: skip


def config_for(root: Path, case: str, granularity: str = "block"):
    task, model, params, dim, data = CASES[case]
    if data == "history":
        csv = root / "history.csv"
        if not csv.exists():
            history_frame().drop(columns=["row_id"]).to_csv(csv, index=False)
        dataset = {
            "format": "csv",
            "path": str(csv),
            "task": task,
            "schema": {
                "features": [
                    "user",
                    "item",
                    {"name": "history", "kind": "sequence", "max_len": 5},
                    {"name": "price", "kind": "numeric", "buckets": 4},
                ],
                "label": "label",
            },
        }
    else:
        dataset = {"name": "synthetic", "task": task, "options": SYNTHETIC}
    data = {
        "name": f"{case}-{granularity}",
        "seed": 0,
        "output_dir": str(root / "runs"),
        "dataset": dataset,
        "model": {"name": model, "params": params},
        "embedding": {"dim": dim, "init_std": 0.05},
        "train": {"epochs": 1, "batch_size": 256, "lr": 0.01, "patience": 0},
        "search": {
            "warmup_epochs": 0,
            "search_epochs": 1,
            "num_blocks": 3,
            "granularity": granularity,
            "budgets": [0.25, 0.5],
        },
    }
    path = root / f"{case}-{granularity}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_config(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(case, kind)` -> run folder; kind: full (dnis train), block or element (dnis search).

    Train and search runs of one config share a folder, as they do from the CLI.
    """
    root = tmp_path_factory.mktemp("export")
    made: dict[tuple[str, str], Path] = {}

    def get(case: str, kind: str = "full") -> Path:
        granularity = "element" if kind == "element" else "block"
        if (case, kind) not in made:
            config = config_for(root, case, granularity)
            if kind == "full":
                train(config)
            else:
                search_run(config)
            made[(case, kind)] = config.run_dir()
        return made[(case, kind)]

    return get


def raw_frame(case: str, n_rows: int = 300, seed: int = 7) -> pd.DataFrame:
    """Fresh raw rows (other seed than training) with unseen values mixed in."""
    if CASES[case][4] == "history":
        frame = history_frame(n_rows, seed)
        frame.loc[0, ["user", "item", "history", "price"]] = ["nobody", "new-item", "", np.nan]
        frame.loc[1, "history"] = "new-a|m1|new-b"
        return frame
    frame, _ = make_frame(
        n_rows, (4, 2), 1, 300, 1, 1.1, CASES[case][0], seed
    )  # same generator, other seed
    frame.loc[0, "signal0"] = "never-seen"
    return frame


def eager_scores(run_dir: Path, budget, ids: np.ndarray) -> np.ndarray:
    run = load_run(run_dir, budget)
    with torch.no_grad():
        return run.model(torch.from_numpy(ids)).numpy()


# ---------------------------------------------------------------- round trips


ROUND_TRIPS = [
    ("mf", "full", "full"),
    ("mf", "element", 0.25),
    ("deepfm", "full", "full"),
    ("deepfm", "block", 0.25),
    ("autoint", "full", "full"),
    ("autoint", "element", 0.25),
    ("din", "full", "full"),
    ("din", "block", 0.25),
    ("din", "element", 0.25),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("case", "kind", "budget"), ROUND_TRIPS)
def test_export_round_trip_equals_the_in_process_model(runs, tmp_path, fmt, case, kind, budget):
    need(fmt)
    run_dir = runs(case, kind)
    result = export_run(run_dir, fmt, budget=budget, output=tmp_path / "export")
    predictor = load(result.path, trust=True)
    assert predictor.backend == fmt

    frame = raw_frame(case)
    ids = predictor.encode(frame)
    expected = eager_scores(run_dir, budget, ids)
    got = predictor.raw(frame, batch_size=64)  # several batches, the last one partial
    assert got.shape == expected.shape == (len(frame),)
    assert np.max(np.abs(got - expected)) <= TOLERANCE

    # the saved encoders map unseen values to the OOV id 0
    assert ids[0, 0] == 0
    if case == "din":
        history = predictor.encoder.schema.slot_range("history")
        assert (ids[0, history] == 0).all() and ids[0, -1] == 0  # empty history, missing price
        assert ids[1, history].tolist()[:2] != [0, 0] and ids[1, history][1:].tolist() == [0] * 4
    # the compact embedding is what was exported
    embedding = load_run(run_dir, budget).model.embedding
    expected_type = {"block": BlockMixedEmbedding, "element": RaggedEmbedding}.get(kind)
    if expected_type is not None:
        assert isinstance(embedding, expected_type)
    assert result.manifest["embedding_bytes"] == embedding.memory_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_din_rows_without_any_history_match(runs, tmp_path, fmt):
    """A batch where no row has a real history item (the attention sees zero positions)."""
    need(fmt)
    run_dir = runs("din", "element")
    predictor = load(export_run(run_dir, fmt, budget=0.5, output=tmp_path / "e").path, trust=True)
    frame = raw_frame("din", 5).assign(history="")
    ids = predictor.encode(frame)
    assert (ids[:, 2:7] == 0).all()
    expected = eager_scores(run_dir, 0.5, ids)
    assert np.max(np.abs(predictor.raw(frame) - expected)) <= TOLERANCE


def test_scores_from_a_dict_of_columns_and_ctr_probabilities(runs, tmp_path):
    run_dir = runs("deepfm", "block")
    predictor = load(
        export_run(run_dir, "torchscript", budget=0.25, output=tmp_path / "e").path, trust=True
    )
    frame = raw_frame("deepfm", 4)
    columns = {c: frame[c].tolist() for c in predictor.columns}
    raw = predictor.raw(columns)
    np.testing.assert_allclose(predictor.raw(frame), raw, rtol=0, atol=0)
    np.testing.assert_allclose(predictor.predict(columns), 1 / (1 + np.exp(-raw)), rtol=1e-6)
    assert predictor.columns == [f["column"] for f in predictor.manifest["fields"]]


# ---------------------------------------------------------------- size and manifest


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quarter_budget_exports_far_fewer_bytes(runs, tmp_path, fmt):
    need(fmt)
    run_dir = runs("deepfm", "block")
    runs("deepfm", "full")  # the same config trained at full width, in the same folder
    full = export_run(run_dir, fmt, budget="full", output=tmp_path / "full")
    quarter = export_run(run_dir, fmt, budget=0.25, output=tmp_path / "quarter")
    params_full, params_quarter = full.manifest["parameters"], quarter.manifest["parameters"]
    assert params_full["embedding"] == params_full["full_embedding"]
    assert params_quarter["embedding"] <= 0.26 * params_full["embedding"]
    assert quarter.manifest["embedding_bytes"] < 0.35 * full.manifest["embedding_bytes"]
    # the graph file shrinks by most of the embedding bytes saved
    saved = full.manifest["embedding_bytes"] - quarter.manifest["embedding_bytes"]
    assert full.model_bytes - quarter.model_bytes > 0.8 * saved
    assert quarter.model_bytes < 0.6 * full.model_bytes


def test_manifest_describes_the_export(runs, tmp_path):
    run_dir = runs("din", "block")
    result = export_run(run_dir, "torchscript", budget=0.25, output=tmp_path / "e")
    folder = result.path
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.yaml", "encoders.json", "manifest.json", "model.torchscript.pt"
    ]  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest == result.manifest == read_manifest(folder)
    assert manifest["format"] == "torchscript" and manifest["model"] == "din"
    assert manifest["budget"] == 0.25 and manifest["task"] == "ctr"
    assert [f["name"] for f in manifest["fields"]] == ["user", "item", "history", "price"]
    assert [f["slots"] for f in manifest["fields"]] == [1, 1, 5, 1]
    assert manifest["input"]["shape"] == ["batch", 8]
    assert manifest["versions"]["dnis"] and manifest["versions"]["torch"] == torch.__version__
    for name, entry in manifest["files"].items():
        assert entry == file_entry(folder / name)
    assert manifest["model_bytes"] == (folder / "model.torchscript.pt").stat().st_size
    assert manifest["check"]["max_abs_diff"] <= TOLERANCE
    assert manifest["parameters"]["total"] == sum(
        p.numel() for p in load_run(run_dir, 0.25).model.parameters()
    )


def test_a_changed_file_is_refused(runs, tmp_path):
    folder = export_run(runs("mf"), "torchscript", output=tmp_path / "e").path
    encoders = folder / "encoders.json"
    original = encoders.read_text()
    encoders.write_text(original.replace('"1"', '"one"', 1))
    with pytest.raises(DnisError, match=r"encoders.json is corrupt or was changed.*export the run"):
        load(folder, trust=True)
    encoders.write_text(original)
    assert load(folder, trust=True).backend == "torchscript"
    (folder / "model.torchscript.pt").unlink()
    with pytest.raises(DnisError, match="model.torchscript.pt is missing"):
        load(folder, trust=True)


# ---------------------------------------------------------------- choosing the model


def test_budget_choice_is_explicit_when_a_folder_holds_several_models(runs, tmp_path):
    run_dir = runs("deepfm", "block")
    runs("deepfm", "full")
    with pytest.raises(DnisError, match=r"several models.*--budget full.*budgets 0.25, 0.5"):
        export_run(run_dir, "torchscript", output=tmp_path / "e")
    with pytest.raises(DnisError, match=r"no model for budget 0.3.*budgets 0.25, 0.5"):
        export_run(run_dir, "torchscript", budget=0.3, output=tmp_path / "e")
    with pytest.raises(DnisError, match="neither a number"):
        export_run(run_dir, "torchscript", budget="most", output=tmp_path / "e")
    assert not (tmp_path / "e").exists()
    # a folder with one model needs no --budget; the default output sits in the run folder
    result = export_run(runs("mf"), "torchscript")
    assert result.path == runs("mf") / "export-torchscript" and result.manifest["budget"] is None
    with pytest.raises(DnisError, match=r"no model for budget 0.5.*--budget full"):
        export_run(runs("mf"), "torchscript", budget=0.5)


def test_unfinished_and_foreign_folders_are_refused(tmp_path, runs):
    with pytest.raises(DnisError, match="not a folder"):
        export_run(tmp_path / "nope", "torchscript")
    with pytest.raises(DnisError, match="config.yaml is missing"):
        export_run(tmp_path, "torchscript")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.yaml", "encoder.json"):
        (unfinished / name).write_bytes((runs("mf") / name).read_bytes())
    with pytest.raises(DnisError, match="holds no trained model"):
        export_run(unfinished, "torchscript")
    with pytest.raises(DnisError, match="unknown export format 'tflite'"):
        export_run(runs("mf"), "tflite")


def test_export_replaces_an_old_export_atomically_and_leaves_nothing_on_failure(
    runs, tmp_path, monkeypatch
):
    from dnis.export import artifact

    target = tmp_path / "e"
    first = export_run(runs("mf"), "torchscript", output=target)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DnisError, match="not a dnis export"):
        export_run(runs("mf"), "torchscript", output=tmp_path / "foreign")

    def broken(*args, **kwargs):
        raise DnisError("check failed")

    monkeypatch.setattr(artifact, "check_graph", broken)
    with pytest.raises(DnisError, match="check failed"):
        export_run(runs("mf"), "torchscript", output=target)
    assert read_manifest(target) == first.manifest  # the old export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "foreign"]  # no temp folders left
    monkeypatch.undo()
    second = export_run(runs("mf"), "torchscript", output=target)
    assert second.manifest["files"]["encoders.json"] == first.manifest["files"]["encoders.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "foreign"]


def test_onnx_without_onnxruntime_says_how_to_install(runs, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(DnisError, match=r"pip install 'dnis\[onnx\]'"):
        export_run(runs("mf"), "onnx", output=tmp_path / "e")
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------- predict


def test_predict_cli_scores_a_csv_into_parquet_and_csv(runs, tmp_path, capsys):
    run_dir = runs("din", "block")
    export = tmp_path / "export"
    assert main(["export", str(run_dir), "--format", "torchscript", "--budget", "0.25",
                 "--output", str(export)]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["model_bytes"] == read_manifest(export)["model_bytes"]
    frame = raw_frame("din", 700)
    frame.to_csv(tmp_path / "in.csv", index=False)

    out = tmp_path / "scores.parquet"
    assert main(["predict", str(export), "--input", str(tmp_path / "in.csv"),
                 "--output", str(out), "--batch-size", "128", "--trust"]) == 0  # fmt: skip
    assert "scored 700 rows" in capsys.readouterr().err
    scores = pd.read_parquet(out)
    assert list(scores.columns) == ["row_id", "score"]  # the id column is kept
    assert scores["row_id"].tolist() == frame["row_id"].tolist()
    predictor = load(export, trust=True)
    expected = predictor.predict(frame)
    np.testing.assert_allclose(scores["score"].to_numpy(), expected, rtol=0, atol=1e-6)
    assert ((expected > 0) & (expected < 1)).all()  # ctr scores are probabilities

    # the run folder itself scores the same (the PyTorch model), written as CSV
    out_csv = tmp_path / "scores.csv"
    assert main(["predict", str(run_dir), "--budget", "0.25", "--input", str(tmp_path / "in.csv"),
                 "--output", str(out_csv), "--keep", "user", "item", "--quiet"]) == 0  # fmt: skip
    again = pd.read_csv(out_csv, dtype={"user": str, "item": str})
    assert list(again.columns) == ["user", "item", "score"]
    np.testing.assert_allclose(again["score"].to_numpy(), expected, rtol=0, atol=1e-5)


def test_predict_missing_column_is_a_clear_error(runs, tmp_path, capsys):
    export = export_run(runs("din", "block"), "torchscript", budget=0.25, output=tmp_path / "e")
    bad = tmp_path / "bad.parquet"
    raw_frame("din", 20).drop(columns=["history"]).to_parquet(bad)
    out = tmp_path / "out.csv"
    assert (
        main(["predict", str(export.path), "--input", str(bad), "--output", str(out), "--trust"])
        == 2
    )
    err = " ".join(capsys.readouterr().err.split())
    assert str(bad) in err and "column 'history'" in err and "fix:" in err
    assert not out.exists()
    with pytest.raises(DataError, match="missing feature column") as info:
        predict_file(load(export.path, trust=True), bad, out)
    assert info.value.column == "history" and info.value.path == str(bad)
    with pytest.raises(DnisError, match="unknown output format"):
        predict_file(load(export.path, trust=True), bad, tmp_path / "out.xlsx")
    with pytest.raises(DataError, match=r"--keep names column\(s\) \['nope'\]"):
        raw_frame("din", 20).to_csv(tmp_path / "ok.csv", index=False)
        predict_file(load(export.path, trust=True), tmp_path / "ok.csv", out, keep=["nope"])
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx"]) == 2
    assert "is not a folder" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("kept_count", [1, 2, 7, 64, 100])
def test_the_traceable_kept_rows_search_equals_searchsorted(kept_count):
    from dnis.embeddings.gated import KeptRowsEmbedding
    from dnis.embeddings.layout import FieldLayout, interval_of
    from dnis.export.traceable import TraceableKeptRows

    layout = FieldLayout(names=("a", "b"), cardinalities=(90, 60), slot_fields=(0, 1),
                         sequence_fields=(False, False), mean_pooled=(False, False))  # fmt: skip
    generator = torch.Generator().manual_seed(kept_count)
    keep = torch.zeros(150, dtype=torch.bool)
    keep[torch.randperm(150, generator=generator)[:kept_count]] = True
    eager = KeptRowsEmbedding(layout, 4, keep)
    twin = TraceableKeptRows.from_module(eager)
    rows = torch.arange(150).view(10, 15)
    for got, want in zip(twin.positions(rows), eager.positions(rows), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(twin.lookup(rows), eager.lookup(rows))
    starts = torch.tensor([0, 90])
    assert torch.equal(interval_of(rows, starts), torch.searchsorted(starts, rows, right=True) - 1)
