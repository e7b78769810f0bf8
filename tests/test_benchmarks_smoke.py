"""Smoke test of the benchmark scripts: they run end to end and report sane numbers of our own."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run(args: list[str], timeout: int = 600) -> str:  # generous: a loaded 2-core CI machine
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_quality_quick(tmp_path: Path) -> None:
    out, rows_json = tmp_path / "quality.md", tmp_path / "quality.json"
    stdout = run(
        [str(BENCH / "quality_vs_peers.py"), "--quick", "--out", str(out), "--json", str(rows_json)]
    )
    assert out.read_text(encoding="utf-8") in stdout + "\n" or "dnis MF" in stdout
    rows = json.loads(rows_json.read_text(encoding="utf-8"))
    by_model = {(r["task"], r["model"]): r for r in rows}
    mf = by_model[("rating", "dnis MF (biased)")]["metrics"]
    assert math.isfinite(mf["rmse"]) and mf["rmse"] < 1.5
    assert 0 < mf["mae"] <= mf["rmse"]
    for model in ("dnis FM", "dnis DeepFM"):
        metrics = by_model[("ctr", model)]["metrics"]
        assert 0.6 < metrics["auc"] <= 1.0 and math.isfinite(metrics["logloss"])
    for model in ("dnis BPR-MF", "MostPop"):
        metrics = by_model[("topk", model)]["metrics"]
        assert 0.0 <= metrics["recall@10"] <= metrics["recall@20"] <= 1.0
        assert 0.0 <= metrics["ndcg@10"] <= metrics["ndcg@20"] <= 1.0
    assert metrics["recall@20"] > 0.0  # MostPop finds some held-out items
    # peers: either measured or reported unavailable, never a crash
    for key in (("rating", "Surprise SVD"), ("ctr", "sklearn LogisticRegression")):
        peer = [r for r in rows if r["task"] == key[0] and r["model"].startswith(key[1])]
        assert len(peer) == 1
        assert peer[0]["metrics"] or "unavailable" in peer[0]["note"]


def test_throughput_small() -> None:
    stdout = run([str(BENCH / "throughput.py"), "--rows", "20000", "--repeats", "1"])
    rates = dict(re.findall(r"^(ours|handwritten) samples/s:\s+([\d,]+)", stdout, re.MULTILINE))
    assert set(rates) == {"ours", "handwritten"}, stdout
    assert all(int(v.replace(",", "")) > 0 for v in rates.values())
    ratio = float(re.search(r"ratio ours/handwritten: ([\d.]+)", stdout).group(1))
    assert ratio > 0  # the >= 0.8 goal is judged by the full-size run, not this tiny smoke run


def test_dnis_vs_uniform_quick(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    args = [str(BENCH / "dnis_vs_uniform.py"), "--quick", "--jobs", "2",
            "--cache", str(tmp_path / "cache"), "--output", str(out)]  # fmt: skip
    run(args)
    text = out.read_text(encoding="utf-8")
    assert "| DNIS | 0.25 |" in text and "| uniform | d=64 |" in text
    assert re.search(r"Search cost: .* ratio \d+\.\d+", text)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 8  # 7 uniform widths + 1 search
    assert "8 cells cached, 0 to run" in run(args)  # a rerun resumes from the cache


def test_model_zoo_quick(tmp_path: Path) -> None:
    out = tmp_path / "models.md"
    args = [str(BENCH / "model_zoo.py"), "--quick", "--jobs", "2", "--models", "fm",
            "--cache", str(tmp_path / "cache"), "--output", str(out)]  # fmt: skip
    run(args)
    rows = [
        line for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("| fm |")
    ]
    assert len(rows) == 1
    cells = rows[0].split("|")
    full_auc, dnis_auc = float(cells[2].split("±")[0]), float(cells[5].split("±")[0])
    assert 0.5 < full_auc <= 1 and 0.5 < dnis_auc <= 1


def test_defaults_vs_tuned_quick(tmp_path: Path) -> None:
    stdout = run([str(BENCH / "defaults_vs_tuned.py"), "--quick", "--no-write", "--only",
                  "synthetic", "--out", str(tmp_path / "runs")])  # fmt: skip
    rows = [line for line in stdout.splitlines() if line.startswith(("| defaults", "| tuned"))]
    assert len(rows) == 2, stdout
    for row in rows:
        cells = [c.strip() for c in row.split("|")[2:-2]]
        full = float(cells[0].split(",")[0])
        assert 0.5 < full <= 1.0 and all(0.5 < float(c) <= 1.0 for c in cells[1:]), row
