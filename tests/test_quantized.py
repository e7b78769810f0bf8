"""Quantized tables (fp16, int8, packed int4) and the int8/int4 post-training-quantization methods.

The row-wise quantization is checked by hand: the round trip is within half a step (plus the fp16
rounding of the bias), odd int4 widths and constant rows survive, fake quantization serves the
dequantized values with the identity's gradient, and a module's bytes are every tensor it saves,
`row_bytes` a row. `dnis search --method int8` and `--method int4` (DeepFM on the bundled
MovieLens latest-small CTR data, width 16, two byte budgets) then serve the end-to-end tests: the
saved plan and weights rebuild the quantized module with weights-only loading, the model file
holds the quantized bytes (not a densified table), and `dnis export` (TorchScript, ONNX) scores
raw values as the in-process quantized model does, to 1e-5.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import dnis.app.search as app_search
from dnis import models
from dnis.app.config import load_config
from dnis.cli import main
from dnis.data.encode import Encoder
from dnis.data.movielens import BUNDLED, hour_of_week, tag_lists, title_year
from dnis.data.readers import read_csv
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.quantized import (
    PRECISIONS,
    QuantizedEmbedding,
    dequantize_rows,
    fake_quantize,
    quantize_rows,
    row_bytes,
)
from dnis.export import load, read_manifest, torchscript
from dnis.export import onnx as onnx_format
from dnis.export.traceable import example_ids, traceable
from dnis.search.plan import EmbeddingPlan, build, plan_of
from dnis.search.result import budget_file

TOLERANCE = 1e-5
FORMATS = ("torchscript", "onnx")
ONNX_REASON = "ONNX export is tested with the optional extra: pip install -e '.[onnx]'"
DIM = 16
# bytes a row: 4 * 16 * budget = 8 and 12; int8 rows of width 4 and 8, int4 rows of 8 and 16
BUDGETS = [0.125, 0.1875]
WIDTHS = {"int8": [4, 8], "int4": [8, 16]}
METHODS = tuple(WIDTHS)
ALIGNMENT = 64  # torch.save pads every tensor's record to this many bytes


def need(fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason=ONNX_REASON)
        pytest.importorskip("onnx", reason=ONNX_REASON)


# ------------------------------------------------------------------------- rows, by hand


def stored_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("width", [1, 2, 7, 16, 33])
def test_the_round_trip_is_within_half_a_step(precision, width):
    generator = torch.Generator().manual_seed(width)
    table = torch.randn(50, width, generator=generator) * torch.rand(50, 1, generator=generator)
    table[0] = 3.0  # a constant row: scale 0, every value is the bias
    table[1] += 100.0  # far from zero: the bias's fp16 rounding is coarse
    codes, scale, bias = quantize_rows(table, precision)
    assert scale is not None and bias is not None
    assert codes.dtype == torch.uint8 and scale.dtype == bias.dtype == torch.float16
    levels = 255 if precision == "int8" else 15
    per_byte = 1 if precision == "int8" else 2
    assert codes.shape == (50, -(-width // per_byte))
    if precision == "int4":  # two codes a byte; an odd width leaves the last high nibble 0
        assert int(codes.max()) <= 255
        if width % 2:
            assert bool((codes[:, -1] < 16).all())
    values = dequantize_rows(codes, scale, bias, precision, width)
    assert values.shape == table.shape and values.dtype == torch.float32
    low = table.min(dim=1).values
    step = scale.float()
    bound = step / 2 + (bias.float() - low).abs() + 1e-6 * (1 + table.abs().amax(dim=1))
    error = (values - table).abs().amax(dim=1)
    assert bool((error <= bound).all()), (error - bound).max()
    # the bound is not vacuous: half a step is what the levels give the row's range
    high = table.max(dim=1).values
    assert torch.allclose(step, (high - low) / levels, rtol=2e-3, atol=1e-7)
    assert float(scale[0]) == 0.0 and bool((values[0] == 3.0).all())
    if width > 2:  # values between the row's ends really are rounded to coarse levels
        assert float(error[2:].max()) > 0.1 * float(step[2:].max() / 2)


def test_the_codes_are_the_nearest_levels_and_pack_low_nibble_first():
    table = torch.tensor([[0.0, 15.0, 1.0, 14.0, 7.4]])  # scale 1, bias 0: codes are the values
    codes, scale, bias = quantize_rows(table, "int4")
    assert float(scale) == 1.0 and float(bias) == 0.0
    assert codes.tolist() == [[0 + 16 * 15, 1 + 16 * 14, 7]]
    assert dequantize_rows(codes, scale, bias, "int4", 5).tolist() == [[0, 15, 1, 14, 7]]
    codes8, scale8, _ = quantize_rows(torch.tensor([[0.0, 255.0, 127.6]]), "int8")
    assert float(scale8) == 1.0 and codes8.tolist() == [[0, 255, 128]]


def test_float_precisions_store_the_values():
    table = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))
    codes, scale, bias = quantize_rows(table, "fp32")
    assert scale is None and bias is None and codes.dtype == torch.float32
    assert torch.equal(dequantize_rows(codes, scale, bias, "fp32", 7), table)
    codes, scale, bias = quantize_rows(table, "fp16")
    assert scale is None and bias is None and codes.dtype == torch.float16
    served = dequantize_rows(codes, scale, bias, "fp16", 7)
    assert torch.equal(served, table.half().float())
    assert float((served - table).abs().max()) <= 2**-11 * float(table.abs().max())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fake_quantize_serves_the_quantized_values_with_the_identity_gradient(precision):
    table = torch.randn(30, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
    served = fake_quantize(table, precision)
    expected = dequantize_rows(*quantize_rows(table, precision), precision, 5)
    assert torch.equal(served.detach(), expected)
    if precision in ("int8", "int4"):
        assert not torch.equal(served.detach(), table.detach())
    weight = torch.randn(30, 5, generator=torch.Generator().manual_seed(2))
    (served * weight).sum().backward()
    assert table.grad is not None and torch.equal(table.grad, weight)


def layout_of(cardinalities) -> FieldLayout:
    names = tuple(f"f{k}" for k in range(len(cardinalities)))
    flags = (False,) * len(names)
    return FieldLayout(names, tuple(cardinalities), tuple(range(len(names))), flags, flags)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dim", [1, 5, 16])
def test_memory_bytes_is_every_saved_tensor_and_row_bytes_a_row(precision, dim):
    layout = layout_of([7, 1, 12])
    table = torch.randn(layout.total_rows, dim, generator=torch.Generator().manual_seed(dim))
    module = QuantizedEmbedding.from_table(layout, table, precision)
    assert module.memory_bytes() == stored_bytes(module)
    assert module.memory_bytes() == layout.total_rows * row_bytes(dim, precision)
    assert list(module.parameters()) == []  # nothing trainable, nothing stored twice
    expected_keys = {"codes"} | ({"scale", "bias"} if precision in ("int8", "int4") else set())
    assert set(module.state_dict()) == expected_keys
    # the lookup is the dequantized table's rows
    rows = torch.tensor([[0, 19], [7, 3]])
    assert torch.equal(module.lookup(rows), module.dequantized()[rows])


def test_row_bytes_of_the_issue():
    assert row_bytes(16, "int4") == 8 + 4 == 12
    assert row_bytes(15, "int4") == 8 + 4  # packed: ceil(15 / 2) bytes of codes
    assert row_bytes(16, "int8") == 16 + 4
    assert row_bytes(16, "fp16") == 32 and row_bytes(16, "fp32") == 64
    assert row_bytes(0, "int4") == 0


# ------------------------------------------------------------------------- odd widths export


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("precision", ["int4", "int8", "fp16"])
def test_an_odd_width_quantized_model_exports_its_quantized_tensors(
    sequence_data, tmp_path, fmt, precision
):
    """DeepFM (with a mean-pooled sequence field) around a width-5 quantized table: the graph
    scores as the eager model and stores the codes, not a float table."""
    need(fmt)
    layout = FieldLayout.from_dataset(sequence_data)
    torch.manual_seed(0)
    table = torch.randn(layout.total_rows, 5) * 0.3
    embedding = QuantizedEmbedding.from_table(layout, table, precision)
    model = models.build("deepfm", sequence_data.schema, embedding, hidden=[8]).eval()
    graph = traceable(model)
    path = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    if fmt == "onnx":
        onnx_format.write(graph, example_ids(layout, 16, seed=0), path)
        runner = onnx_format.OnnxRunner(path)
    else:
        torchscript.write(graph, example_ids(layout, 16, seed=0), path)
        runner = torchscript.TorchScriptRunner(path)
    ids = example_ids(layout, 257, seed=3)
    with torch.no_grad():
        expected = model(ids).numpy()
    assert np.max(np.abs(runner(ids.numpy()) - expected)) <= TOLERANCE
    assert_graph_stores_codes(path, fmt, embedding)


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_the_onnx_file_follows_the_bytes(sequence_data, tmp_path, precision):
    """At a realistic table size (a million rows) the exported ONNX file is within 5% of the
    quantized embedding's bytes plus the dense part's (the graph itself adds a few KiB)."""
    need("onnx")
    small = FieldLayout.from_dataset(sequence_data)
    layout = dataclasses.replace(
        small, cardinalities=tuple(c * 50_000 for c in small.cardinalities)
    )
    table = torch.randn(layout.total_rows, 16, generator=torch.Generator().manual_seed(0))
    embedding = QuantizedEmbedding.from_table(layout, table, precision)
    model = models.build("deepfm", sequence_data.schema, embedding, hidden=[8]).eval()
    path = tmp_path / "model.onnx"
    onnx_format.write(traceable(model), example_ids(small, 16, seed=0), path)
    dense = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                if not k.startswith("embedding."))  # fmt: skip
    tensors = embedding.memory_bytes() + dense
    assert abs(path.stat().st_size - tensors) <= 0.05 * tensors, (path.stat().st_size, tensors)


def assert_graph_stores_codes(path, fmt: str, embedding: QuantizedEmbedding) -> None:
    """The graph file holds the embedding's saved tensors with their dtypes and shapes."""
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in embedding.state_dict().items()}
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu")
        found = {
            k.removeprefix("embedding."): (v.dtype, tuple(v.shape))
            for k, v in module.state_dict().items()
            if k.startswith("embedding.") and k.removeprefix("embedding.") in expected
        }
    else:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype

        graph = onnx.load(str(path)).graph
        found = {
            t.name.removeprefix("embedding."): (
                torch.from_numpy(np.zeros(0, dtype=tensor_dtype_to_np_dtype(t.data_type))).dtype,
                tuple(t.dims),
            )
            for t in graph.initializer
            if t.name.startswith("embedding.")
        }
        # no float initializer as large as the dequantized table
        rows, dim = embedding.layout.total_rows, embedding.dim
        assert all(int(np.prod(t.dims)) < rows * dim or t.data_type != 1 for t in graph.initializer)
    assert found == expected


# ------------------------------------------------------------------------- dnis search, export


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`dnis search --method int8` and `--method int4` of one config: per method its run folder,
    in-process results (a spy keeps what `search_run` returned to the CLI)."""
    root = tmp_path_factory.mktemp("quantized")
    config = {
        "name": "quantized",
        "seed": 0,
        "output_dir": str(root / "runs"),
        "dataset": {"name": "movielens-latest-small", "task": "ctr"},
        "model": {"name": "deepfm", "params": {"hidden": [16]}},
        "embedding": {"dim": DIM},
        "train": {"epochs": 1, "batch_size": 1024, "lr": 0.01, "patience": 0},
        "search": {"budgets": BUDGETS},
    }
    path = root / "quantized.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    out: dict[str, dict] = {}
    for method in METHODS:
        kept: dict[str, object] = {}
        real = app_search.search_run

        def spy(*args, real=real, kept=kept, **kwargs):
            kept["dataset"], kept["results"] = real(*args, **kwargs)
            return kept["dataset"], kept["results"]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(app_search, "search_run", spy)
            assert main(["search", "--config", str(path), "--method", method, "--quiet"]) == 0
        kept["run_dir"] = app_search.method_run_dir(load_config(path), method)
        out[method] = kept
    return out


def raw_frame(n_rows: int = 300, seed: int = 7) -> pd.DataFrame:
    """Raw MovieLens rows as a user scores them (the loader's ctr columns), unseen values mixed in."""
    ratings = read_csv(BUNDLED / "ratings.csv").rename(
        columns={"userId": "user", "movieId": "item"}
    )
    ratings = ratings.sample(n=n_rows, random_state=seed).reset_index(drop=True)
    movies = read_csv(BUNDLED / "movies.csv").rename(columns={"movieId": "item"})
    movies["year"] = title_year(movies["title"])
    tags = read_csv(BUNDLED / "tags.csv").rename(columns={"userId": "user", "movieId": "item"})
    frame = ratings.merge(movies[["item", "genres", "year"]], on="item", how="left")
    frame["hour_of_week"] = hour_of_week(frame["timestamp"].astype(np.int64))
    frame["user_tags"] = frame["user"].map(tag_lists(tags, "user"))
    frame["item_tags"] = frame["item"].map(tag_lists(tags, "item"))
    frame["user"], frame["item"] = frame["user"].astype(str), frame["item"].astype(str)
    frame.loc[0, ["user", "item", "genres", "year"]] = ["nobody", "new-item", "Unknown|Drama", None]
    return frame


def width_of(result) -> int:
    (width,) = {d["block_dims"][0] for d in result.dims.values()}
    return width


def test_each_budget_gets_the_widest_width_whose_rows_fit(runs):
    for method, run in runs.items():
        results = run["results"]
        assert [r.budget for r in results] == BUDGETS
        assert [width_of(r) for r in results] == WIDTHS[method]
        for result in results:
            embedding = result.model.embedding
            assert isinstance(embedding, QuantizedEmbedding) and embedding.precision == method
            rows, width = embedding.layout.total_rows, embedding.dim
            assert all(d["precision"] == method for d in result.dims.values())
            budget_bytes = result.budget * 4 * rows * DIM
            assert result.memory_bytes == embedding.memory_bytes() == stored_bytes(embedding)
            assert result.memory_bytes == rows * row_bytes(width, method) <= budget_bytes
            if width < DIM:
                assert rows * row_bytes(width + 1, method) > budget_bytes
            assert result.before["valid"] and result.metrics["test"]


def test_the_plan_rebuilds_the_module_from_weights_only_loading(runs):
    for method, run in runs.items():
        run_dir = run["run_dir"]
        encoder = Encoder.load(run_dir / "encoder.json")
        layout = FieldLayout.from_schema(encoder.schema, encoder.cardinalities)
        for result in run["results"]:
            plan = EmbeddingPlan.read(budget_file(run_dir, "plan", result.budget))
            assert plan == result.plan == plan_of(result.model.embedding)
            assert plan.kind == "quantized" and dict(plan.options) == {"precision": method}
            state = torch.load(
                budget_file(run_dir, "model", result.budget), map_location="cpu", weights_only=True
            )
            own = {k.removeprefix("embedding."): v for k, v in state.items()
                   if k.startswith("embedding.")}  # fmt: skip
            module = build(plan, layout, own)
            module.load_state_dict(own)  # strict: every saved tensor and nothing else
            assert isinstance(module, QuantizedEmbedding)
            assert (module.precision, module.dim) == (method, width_of(result))
            trained = result.model.embedding.state_dict()
            for key, tensor in module.state_dict().items():
                assert tensor.dtype == trained[key].dtype, key
                assert torch.equal(tensor, trained[key].cpu()), key
            assert torch.equal(module.dequantized(), result.model.embedding.dequantized().cpu())
            # and the whole model scores as the in-process one
            model = models.build("deepfm", encoder.schema, module, hidden=[16]).eval()
            model.load_state_dict(state)
            ids = example_ids(layout, 64, seed=5)
            with torch.no_grad():
                assert torch.equal(model(ids), result.model.cpu().eval()(ids))


def save_overhead(state: collections.OrderedDict) -> int:
    """torch.save's bytes around the tensors of a state dict: the same keys, dtypes and module
    metadata saved with empty tensors."""
    empty = collections.OrderedDict((k, torch.empty(0, dtype=v.dtype)) for k, v in state.items())
    empty._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    buffer = io.BytesIO()
    torch.save(empty, buffer)
    return len(buffer.getvalue())


def test_the_model_file_holds_the_quantized_bytes(runs):
    sizes: dict[tuple[str, int], int] = {}
    for method, run in runs.items():
        for result in run["results"]:
            path = budget_file(run["run_dir"], "model", result.budget)
            state = torch.load(path, map_location="cpu", weights_only=True)
            embedding = result.model.embedding
            dense = sum(v.numel() * v.element_size() for k, v in state.items()
                        if not k.startswith("embedding."))  # fmt: skip
            tensors = embedding.memory_bytes() + dense
            size = path.stat().st_size
            assert abs(size - tensors) <= 0.05 * tensors
            # tighter: beyond the tensors, only what an empty twin costs and record alignment
            padding = size - tensors - save_overhead(state)
            assert 0 <= padding <= ALIGNMENT * len(state), padding
            # a densified fp32 table would not fit
            assert size < dense + 4 * embedding.layout.total_rows * embedding.dim
            sizes[(method, embedding.dim)] = size
    # the same width (8): int4 rows are 4 bytes smaller than int8 rows, the rest is the same
    rows = runs["int4"]["results"][0].model.embedding.layout.total_rows
    assert sizes[("int4", 8)] < sizes[("int8", 8)]
    assert abs(sizes[("int8", 8)] - sizes[("int4", 8)] - 4 * rows) <= ALIGNMENT


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", METHODS)
def test_the_export_scores_as_the_in_process_quantized_model(runs, tmp_path, method, fmt):
    need(fmt)
    run = runs[method]
    frame = raw_frame()
    for result in run["results"]:
        export = tmp_path / f"export-{result.budget}"
        assert main(["export", str(run["run_dir"]), "--format", fmt, "--budget",
                     str(result.budget), "--output", str(export)]) == 0  # fmt: skip
        predictor = load(export, trust=True)
        assert predictor.backend == fmt
        ids = predictor.encode(frame)
        assert ids[0, 0] == 0 and ids[0, 1] == 0  # unseen user and item: the OOV ids
        model = result.model.cpu().eval()
        with torch.no_grad():
            expected = model(torch.from_numpy(ids)).numpy()
        got = predictor.raw(frame, batch_size=64)  # several batches, the last one partial
        assert got.shape == expected.shape == (len(frame),)
        assert np.max(np.abs(got - expected)) <= TOLERANCE, (method, fmt, result.budget)

        embedding = model.embedding
        manifest = read_manifest(export)
        assert manifest["embedding_bytes"] == embedding.memory_bytes() == result.memory_bytes
        assert manifest["budget"] == result.budget
        # the quantized table's values are buffers, not parameters: they count all the same
        params = manifest["parameters"]
        assert (
            params["embedding"]
            == result.embedding_params
            == embedding.layout.total_rows * (embedding.dim)
        )
        assert params["full_embedding"] == result.full_params
        dense = sum(p.numel() for p in model.parameters())
        assert params["other"] == dense and params["total"] == dense + params["embedding"]
        graph = export / manifest["model_file"]
        assert_graph_stores_codes(graph, fmt, embedding)
