"""The "Write your own method" page's example runs as written: its method file and config are
extracted from docs/own-method.md and its commands run (`dnis search --method magnitude --import
magnitude.py`, then `dnis export`) in a fresh process, so the method registers only there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "own-method.md"


def blocks(language: str, titled: bool) -> list[tuple[str, str]]:
    """(title, body) of the page's fenced blocks of `language`, with or without a title."""
    title = r' title="([^"]+)"' if titled else r"()"
    pattern = rf"^```{language}{title}\n(.*?)^```"
    return re.findall(pattern, PAGE.read_text(encoding="utf-8"), re.S | re.M)


def test_the_example_method_searches_and_exports_end_to_end(tmp_path):
    files = dict(blocks(r"\w+", titled=True))
    code = files["magnitude.py"]
    assert "@register_method(" in code and 30 <= len(code.splitlines()) <= 60
    for name, body in files.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dnis").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dnis "$@"\n')
    (bin_dir / "dnis").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    (script,) = (body for _, body in blocks("bash", titled=False))
    done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = (tmp_path / "runs").glob("own-magnitude-*")
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert [r["method"] for r in results] == ["magnitude", "magnitude"]
    for result in results:
        assert result["embedding_params"] <= result["budget"] * result["full_params"]
        plan = json.loads((run_dir / f"plan-{result['budget']}.json").read_text(encoding="utf-8"))
        assert plan["kind"] == "masked" and plan["params"] == result["embedding_params"]
    assert (tmp_path / "magnitude-export" / "manifest.json").is_file()


OWN_MODEL = '''
import torch
from dnis.models import Model, register_model
from dnis.models.layers import LinearTerms


@register_model("linear-only")
class LinearOnly(Model):
    """A logistic regression on the ids: the linear terms of FM, no interactions."""

    def __init__(self, schema, embedding):
        super().__init__(schema, embedding)
        self.linear = LinearTerms(embedding.layout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(ids)
'''


def test_own_model_and_method_register_through_import_in_every_process(tmp_path):
    """`--import` loads a model of one's own for `dnis train`, and `dnis compare --jobs 2` imports
    the docs' method again in its spawned worker processes (they start without it)."""
    files = dict(blocks(r"\w+", titled=True))
    (tmp_path / "magnitude.py").write_text(files["magnitude.py"], encoding="utf-8")
    (tmp_path / "linear_only.py").write_text(OWN_MODEL, encoding="utf-8")
    config = files["own.yaml"].replace("name: own\n", "name: plug\n")
    (tmp_path / "own.yaml").write_text(config, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    dnis = [sys.executable, "-m", "dnis"]
    commands = [
        [*dnis, "train", "--config", "own.yaml", "--import", "linear_only.py", "--quiet",
         "--set", "model.name=linear-only"],
        [*dnis, "compare", "--config", "own.yaml", "--import", "magnitude.py", "--jobs", "2",
         "--seeds", "2", "--budgets", "0.5"],
    ]  # fmt: skip
    for command in commands:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (train_dir,) = (p.parent for p in (tmp_path / "runs").glob("plug-*/metrics.jsonl"))
    assert "linear-only" in (train_dir / "config.yaml").read_text(encoding="utf-8")
    (compare_dir,) = (p.parent for p in (tmp_path / "runs").glob("plug-*/cells"))
    cells = sorted(p.name for p in (compare_dir / "cells").glob("*.json"))
    assert cells == ["magnitude-seed0.json", "magnitude-seed1.json"]
