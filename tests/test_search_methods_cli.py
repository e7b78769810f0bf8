"""`dnis search --method M` for every registered method, then `dnis export` and `dnis predict`.

Each method runs through the CLI on tiny synthetic data (one epoch, one budget) and must write
the same artifacts (config.yaml, results and report, per budget the compact model, its result and
its `plan-<budget>.json`); the compact model is then exported (TorchScript) and scored by
`dnis predict` from the raw values, and those scores must equal the in-process model's to 1e-5.
The in-process models are those `search_run` returned to the CLI (a spy keeps them).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import dnis.app.search as app_search
from dnis.app.config import load_config
from dnis.cli import main
from dnis.data.synthetic import make_frame
from dnis.export import load
from dnis.search.methods import METHODS
from dnis.search.plan import EmbeddingPlan

TOLERANCE = 1e-5
# ONNX runs where its optional extra is installed (as in the dev environment and CI)
FORMATS = ("torchscript", "onnx") if importlib.util.find_spec("onnxruntime") else ("torchscript",)
DATA = {"n_rows": 1500, "ranks": [4, 2], "noise_fields": 1, "vocab": 40, "numeric_fields": 1}
QUICK = {  # each method's shortest settings
    "autodim": {"warmup_epochs": 0, "search_epochs": 1},
    "optfs": {"search_epochs": 1, "rewind_epoch": 0},
    "pep": {"extra_epochs": 1},
    "random": {"trials": 1, "trial_epochs": 1},
    "mde": {"num_blocks": 2},
    "dnis-nested": {"num_blocks": 2, "warmup_epochs": 0, "search_epochs": 1},
    "magprune": {"finetune_epochs": 1},
    "dnis-precision": {"num_blocks": 2, "warmup_epochs": 0, "search_epochs": 1},
}
KINDS = {  # the embedding kind each method's compact model is
    "dnis": "block-mixed", "dnis-random": "block-mixed", "random": "block-mixed",
    "uniform": "full", "hashing": "hashed", "qr": "qr", "unified": "multiplexed",
    "outrank": "field-subset", "mde": "projected", "autodim": "projected",
    "optfs": "kept-rows", "pep": "ragged", "dsl": "ragged", "magprune": "ragged",
    "dnis-nested": "block-mixed", "matryoshka": "block-mixed",
    "int8": "quantized", "int4": "quantized", "dnis-precision": "quantized-blocks",
    "int8-qat": "quantized", "int4-qat": "quantized",
}  # fmt: skip


def write_config(root: Path) -> Path:
    data = {
        "name": "methods",
        "seed": 0,
        "output_dir": str(root / "runs"),
        "dataset": {"name": "synthetic", "task": "ctr", "options": DATA},
        "model": {"name": "fm"},
        "embedding": {"dim": 8},
        "train": {"epochs": 1, "batch_size": 256, "lr": 0.01, "patience": 0},
        "search": {"num_blocks": 2, "warmup_epochs": 0, "search_epochs": 1, "budgets": [0.5]},
        # a method's options live in compare.options, which names only methods of the grid
        "compare": {"methods": sorted(QUICK), "options": QUICK},
    }
    path = root / "methods.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("methods"))


def test_every_registered_method_is_covered():
    assert sorted(METHODS) == sorted(KINDS)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_search_export_predict_equals_the_in_process_model(
    name, config_path, tmp_path, monkeypatch, capsys
):
    kept: dict[str, object] = {}
    real = app_search.search_run

    def spy(*args, **kwargs):
        kept["dataset"], kept["results"] = real(*args, **kwargs)
        return kept["dataset"], kept["results"]

    monkeypatch.setattr(app_search, "search_run", spy)
    assert main(["search", "--config", str(config_path), "--method", name, "--quiet"]) == 0
    assert "report:" in capsys.readouterr().out
    (result,) = kept["results"]  # type: ignore[misc]
    run_dir = app_search.method_run_dir(load_config(config_path), name)
    for artifact in ("config.yaml", "encoder.json", "results.json", "dims.json", "report.md",
                     "model-0.5.pt", "result-0.5.json", "plan-0.5.json"):  # fmt: skip
        assert (run_dir / artifact).is_file(), artifact

    plan = EmbeddingPlan.read(run_dir / "plan-0.5.json")
    assert plan == result.plan and plan.kind == KINDS[name]
    assert plan.params == result.embedding_params
    assert sum(f.rows for f in plan.fields) == sum(kept["dataset"].cardinalities)  # type: ignore[attr-defined]

    frame, _ = make_frame(300, (4, 2), 1, 40, 1, 1.1, "ctr", seed=7)  # fresh raw rows
    frame.loc[0, "signal0"] = "never-seen"
    frame.to_csv(tmp_path / "in.csv", index=False)
    model = result.model.cpu().eval()
    for fmt in FORMATS:
        export = tmp_path / f"export-{fmt}"
        assert main(["export", str(run_dir), "--format", fmt, "--budget", "0.5",
                     "--output", str(export)]) == 0  # fmt: skip
        for source, extra in ((export, ["--trust"]), (run_dir, ["--budget", "0.5"])):
            out = tmp_path / f"scores-{source.name}.csv"
            assert main(["predict", str(source), "--input", str(tmp_path / "in.csv"),
                         "--output", str(out), "--quiet", *extra]) == 0  # fmt: skip
            scores = pd.read_csv(out)["score"].to_numpy()
            ids = torch.from_numpy(load(export, trust=True).encode(frame))
            with torch.no_grad():
                expected = torch.sigmoid(model(ids)).numpy()
            assert np.max(np.abs(scores - expected)) <= TOLERANCE, (fmt, source)


def test_an_unknown_method_is_refused_with_a_suggestion(config_path, capsys):
    assert main(["search", "--config", str(config_path), "--method", "hashng"]) == 2
    assert "Did you mean 'hashing'" in capsys.readouterr().err


def test_optfs_closing_every_gate_is_a_clear_error(tmp_path, capsys):
    """A gate L1 that outweighs the task loss closes every gate (as the default did on Gowalla):
    the user is told which option to lower, not shown a torch error from a model with nothing
    to train."""
    config = yaml.safe_load(write_config(tmp_path).read_text(encoding="utf-8"))
    config["compare"]["options"]["optfs"] = {
        "search_epochs": 2,
        "rewind_epoch": 0,
        "reg_lambda": 1e3,
    }
    config["train"].update(lr=0.3, batch_size=32)  # enough Adam steps for the gates to cross 0
    path = tmp_path / "closed.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["search", "--config", str(path), "--method", "optfs", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "closed every gate" in err and "compare.options.optfs.reg_lambda" in err
    assert "Traceback" not in err


def test_an_embedding_of_unknown_kind_is_planned_but_not_rebuilt():
    from dnis.embeddings import FieldLayout, FusedEmbedding
    from dnis.errors import DnisError
    from dnis.search.plan import build, plan_of

    class MyEmbedding(FusedEmbedding):
        pass

    layout = FieldLayout(("a", "b"), (3, 5), (0, 1), (False, False), (False, False))
    plan = plan_of(MyEmbedding(layout, 4))
    assert plan.kind == "custom:MyEmbedding" and not plan.rebuildable
    assert EmbeddingPlan.from_json(plan.to_json()) == plan
    with pytest.raises(DnisError, match="kind 'custom:MyEmbedding' cannot be rebuilt"):
        build(plan, layout, {})
    full = plan_of(FusedEmbedding(layout, 4))
    assert full.kind == "full" and [f.params for f in full.fields] == [12, 20]
