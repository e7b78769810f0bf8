"""The documentation site: it builds offline and strictly, its examples run, its catalogues are whole.

- The site builds with `mkdocs build --strict` while any network use fails loudly.
- The quickstart's shell blocks (```bash) and Python blocks run as written, in a temporary folder.
- The bring-your-own-data example files load, and its commands and Python block run.
- Every registered search method and every model has a section; every option, config key and
  model parameter is listed, with the code's default where the code has one.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Runs mkdocs with every way out to the network replaced by an error, so a plugin or theme that
# fetches something at build time fails the build instead of passing silently.
OFFLINE_MKDOCS = textwrap.dedent(
    """
    import socket, sys

    def refuse(*args, **kwargs):
        raise OSError(f"network access during the docs build: {args!r}")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    from mkdocs.__main__ import cli

    sys.argv = ["mkdocs", *sys.argv[1:]]
    cli()
    """
)


def code_blocks(path: Path, language: str) -> list[str]:
    """Bodies of the fenced blocks whose info string starts with `language` (no title)."""
    text = path.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def titled_blocks(path: Path) -> dict[str, str]:
    """Fenced blocks with a title="file" attribute: {file name: body}."""
    text = path.read_text(encoding="utf-8")
    return dict(re.findall(r'^```\w+ title="([^"]+)"\n(.*?)^```', text, re.S | re.M))


def sections(path: Path) -> dict[str, str]:
    """{anchor: text} of the level-2 sections whose heading ends with `{ #anchor }`."""
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"^(## .*)$", text, flags=re.M)
    out = {}
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        match = re.search(r"\{ #([\w-]+) \}\s*$", heading)
        if match:
            out[match.group(1)] = heading + body
    return out


def cells(row: str) -> list[str]:
    """Cells of a markdown table row; a | inside backticks does not split."""
    out, current, in_code = [], "", False
    for char in row.strip().strip("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            out.append(current.strip())
            current = ""
        else:
            current += char
    out.append(current.strip())
    return out


def table_rows(text: str) -> dict[str, list[str]]:
    """{key: cells} of every table row whose first cell is a `key` in backticks."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            row = cells(line)
            match = re.fullmatch(r"`(\w+)`", row[0])
            if match:
                rows[match.group(1)] = row
    return rows


def yaml_text(value: Any) -> str:
    """A default as the docs write it: YAML flow style (null, true, [1, 2], {})."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):  # 12 significant digits: 5e-5 / 2000 is written 2.5e-08
        short = f"{value:.12g}"
        return short if any(c in short for c in ".en") else short + ".0"
    return str(value)


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def check_documented(
    rows: dict[str, list[str]],
    expected: dict[str, Any],
    where: str,
    default_column: int | None,
) -> None:
    """Every expected key has a row (and no row names a key the code lacks); defaults match."""
    missing = sorted(set(expected) - set(rows))
    extra = sorted(set(rows) - set(expected))
    assert not missing, f"{where}: not documented: {missing}"
    assert not extra, f"{where}: documented but not in the code: {extra}"
    if default_column is None:
        return
    for key, default in expected.items():
        cell = rows[key][default_column]
        if default is dataclasses.MISSING:
            assert "required" in cell, f"{where}.{key}: required, but the docs say {cell!r}"
        elif dataclasses.is_dataclass(default):
            continue  # a nested section: the docs link to its own table
        else:
            shown = f"`{yaml_text(default)}`"
            assert shown in cell, f"{where}.{key}: default is {shown}, the docs say {cell!r}"


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{command[:2]} failed ({done.returncode})\n--- stdout\n{done.stdout[-4000:]}\n"
        f"--- stderr\n{done.stderr[-4000:]}"
    )
    return done.stdout


@pytest.fixture
def shell_env(tmp_path: Path) -> dict[str, str]:
    """PATH with a `dnis` that runs this interpreter's dnis; one torch thread, quiet warnings."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "dnis"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dnis "$@"\n', encoding="utf-8")
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "200"
    env["NO_MKDOCS_2_WARNING"] = "1"
    return env


# ---------------------------------------------------------------------------------------- build


def test_site_builds_strictly_and_offline(tmp_path: Path, shell_env: dict[str, str]) -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(
            module, reason="the docs extra is not installed: pip install -e '.[docs]'"
        )
    site = tmp_path / "site"
    command = [sys.executable, "-c", OFFLINE_MKDOCS, "build", "--strict"]
    run([*command, "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)], ROOT, shell_env)
    pages = list(site.rglob("*.html"))
    assert (site / "quickstart" / "index.html").exists()
    api = (site / "api" / "search" / "index.html").read_text(encoding="utf-8")
    assert "SearchResult" in api and "dnis.search.methods" in api  # docstrings were rendered
    for page in pages:  # nothing a reader's browser would fetch from elsewhere either
        html = page.read_text(encoding="utf-8")
        assert "fonts.googleapis" not in html, page
        assert not re.search(r'<(script|link)[^>]+(src|href)="https?://', html), page


# ----------------------------------------------------------------------------------- quickstart


def test_quickstart_shell_commands_run(tmp_path: Path, shell_env: dict[str, str]) -> None:
    blocks = code_blocks(DOCS / "quickstart.md", "bash")
    assert any("dnis search" in b for b in blocks) and any("dnis compare" in b for b in blocks)
    work = tmp_path / "work"
    work.mkdir()
    script = "set -euo pipefail\n" + "\n".join(blocks)
    out = run(["bash", "-c", script], work, shell_env, timeout=600)
    assert "rmse" in out and "★" in out  # the train, search and compare tables were printed
    written = {path.name for path in (work / "runs").glob("*/*")}
    for name in ("final.json", "report.md", "dims.json", "compare.md", "pareto.png"):
        assert name in written, name
    scores = (work / "scores.csv").read_text(encoding="utf-8").splitlines()
    assert scores[0].split(",")[-1] == "score" and len(scores) == 4


def test_quickstart_python_runs(tmp_path: Path, shell_env: dict[str, str]) -> None:
    (block,) = code_blocks(DOCS / "quickstart.md", "python")
    (tmp_path / "quickstart.py").write_text(block, encoding="utf-8")
    run([sys.executable, "quickstart.py"], tmp_path, shell_env)
    assert (tmp_path / "python-report" / "report.md").exists()


# ------------------------------------------------------------------------- bring your own data


def test_own_data_example_loads_and_runs(tmp_path: Path, shell_env: dict[str, str]) -> None:
    from dnis.app.config import load_config
    from dnis.app.train import load_dataset

    files = titled_blocks(DOCS / "data.md")
    assert {"clicks.csv", "clicks.yaml", "libfm.yaml", "libffm.yaml"} <= set(files)
    for name, body in files.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    cwd = Path.cwd()
    os.chdir(tmp_path)  # paths in the configs are relative to where dnis runs
    try:
        clicks = load_config("clicks.yaml")
        ds = load_dataset(clicks.dataset, clicks.seed)
        assert ds.schema.names == ["user", "item", "city", "age", "genres"]
        assert ds.schema["genres"].max_len == 3 and ds.task == "ctr"
        assert sum(ds.summary()["rows"].values()) == len(files["clicks.csv"].splitlines()) - 1
        for name in ("libfm.yaml", "libffm.yaml"):
            config = load_config(name)
            assert len(load_dataset(config.dataset, config.seed).train) > 0
    finally:
        os.chdir(cwd)
    (shell,) = code_blocks(DOCS / "data.md", "bash")
    run(["bash", "-c", "set -euo pipefail\n" + shell], tmp_path, shell_env)
    (python,) = code_blocks(DOCS / "data.md", "python")
    run([sys.executable, "-c", python], tmp_path, shell_env)


# --------------------------------------------------------------------------------- catalogues


def all_methods() -> tuple[set[str], dict[str, Any]]:
    """(registered once dnis.search is imported, registered by any module of dnis.search)."""
    from dnis.search import methods

    builtin = set(methods.METHODS)
    import dnis.search

    for module in pkgutil.iter_modules(dnis.search.__path__):
        importlib.import_module(f"dnis.search.{module.name}")
    return builtin, dict(methods.METHODS)


def method_options(method: Any) -> dict[str, Any]:
    """A registered method's options and their defaults: the fields of its options class that a
    user may set."""
    return {
        f.name: field_default(f)
        for f in dataclasses.fields(method.options)
        if f.name not in method.fixed
    }


def test_method_catalogue_is_complete_and_honest() -> None:
    builtin, registered = all_methods()
    unlisted = sorted(set(registered) - builtin)
    assert not unlisted, (
        f"methods dnis/search/__init__.py does not import (unregistered): {unlisted}"
    )
    documented = sections(DOCS / "methods.md")
    assert builtin <= set(documented), f"undocumented methods: {sorted(builtin - set(documented))}"
    missing = sorted(set(registered) - set(documented))
    assert not missing, f"methods registered in dnis.search but not documented: {missing}"
    placeholders = sorted(set(documented) - set(registered))
    assert not placeholders, f"documented methods that no module registers: {placeholders}"
    for name, fn in registered.items():
        text = documented[name]
        assert re.search(r"\d{4}", text) or name == "uniform", f"{name}: no paper reference"
        if name != "dnis" and fn.options is registered["dnis"].options:
            continue  # the control shares DNIS's options, documented once under dnis
        options = method_options(fn)
        rows = table_rows(text)
        inherited = set(method_options(registered["dnis"])) if name != "dnis" else set()
        if issubclass(fn.options, registered["dnis"].options) and not inherited & set(rows):
            # DNIS's options plus its own, and its section documents only its own
            options = {k: v for k, v in options.items() if k not in inherited}
        check_documented(rows, options, f"method {name}", None)
        for option, default in options.items():
            if default is not dataclasses.MISSING:
                cell = rows[option][1]
                shown = f"`{yaml_text(default)}`"
                assert shown in cell, f"{name}.{option}: default {shown}, the docs say {cell!r}"


def test_model_catalogue_is_complete() -> None:
    from dnis import models

    documented = sections(DOCS / "models-catalogue.md")
    assert set(documented) == set(models.MODELS), (
        f"models without a section: {sorted(set(models.MODELS) - set(documented))}; "
        f"sections without a model: {sorted(set(documented) - set(models.MODELS))}"
    )
    for name in models.MODELS:
        check_documented(
            table_rows(documented[name]), models.model_params(name), f"model {name}", 1
        )


def test_configuration_reference_lists_every_key_with_its_default() -> None:
    from dnis.app.config import Config
    from dnis.data.schema import FeatureSpec, Schema

    documented = sections(DOCS / "configuration.md")
    hints = typing.get_type_hints(Config)
    classes: dict[str, type] = {"top-level": Config}
    for f in dataclasses.fields(Config):  # every section, including ones added later
        if dataclasses.is_dataclass(hints[f.name]):
            classes[f.name] = hints[f.name]
    for anchor, cls in classes.items():
        assert anchor in documented, f"configuration.md has no section {{ #{anchor} }}"
        expected = {f.name: field_default(f) for f in dataclasses.fields(cls)}
        check_documented(table_rows(documented[anchor]), expected, anchor, 2)
    schema_text = (DOCS / "data.md").read_text(encoding="utf-8").split("## The schema")[1]
    tables = re.split(r"\n\n(?=\|)", schema_text.split("\n## ")[0])
    by_class = {Schema: None, FeatureSpec: None}
    for table in tables:
        rows = table_rows(table)
        if "features" in rows:
            by_class[Schema] = rows
        elif "kind" in rows:
            by_class[FeatureSpec] = rows
    for cls, rows in by_class.items():
        assert rows is not None, f"data.md: no table of the {cls.__name__} keys"
        expected = {f.name: field_default(f) for f in dataclasses.fields(cls)}
        check_documented(rows, expected, f"schema ({cls.__name__})", 2)
