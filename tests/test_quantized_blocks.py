"""QuantizedBlockEmbedding: every frequency block keeps its own dims at its own precision.

One module mixes every precision over three fields: int4 blocks of odd widths (7, 1, 5), int8
blocks of widths 7 and 2, an fp16 block, fp32 blocks of width 0 and 4; the last int4 and int8
blocks are narrower than their precision's widest, so their rows' windows end where they end. A block's served
values are checked against row-wise quantizing its kept values by hand (`quantize_rows`, then
`dequantize_rows`); pruned dims read exactly 0 and fp32 blocks the table itself. Its bytes are
the rows' `row_bytes` plus `keep` and the precision codes, the plan rebuilds it with a strict
load, and TorchScript tracing and ONNX export (onnxruntime) serve what the eager module serves.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.quantized import PRECISIONS, dequantize_rows, quantize_rows, row_bytes
from dnis.embeddings.quantized_blocks import QuantizedBlockEmbedding
from dnis.errors import DnisError
from dnis.search.plan import EmbeddingPlan, build, plan_of

ONNX_REASON = "ONNX export is tested with the optional extra: pip install -e '.[onnx]'"
TOLERANCE = 1e-5
DIM = 7
CARDINALITIES = (9, 1, 14)
# block: (field, first row, rows, precision, kept width)
BLOCKS = [
    (0, 0, 3, "int4", 7),
    (0, 3, 3, "int8", 7),
    (0, 6, 3, "fp16", 3),
    (1, 9, 1, "fp32", 0),
    (2, 10, 2, "int4", 1),
    (2, 12, 5, "fp32", 4),
    (2, 17, 4, "int8", 2),
    (2, 21, 3, "int4", 5),
]
MIXED = [b[3] for b in BLOCKS]


def layout_of(cardinalities) -> FieldLayout:
    names = tuple(f"f{k}" for k in range(len(cardinalities)))
    flags = (False,) * len(names)
    return FieldLayout(names, tuple(cardinalities), tuple(range(len(names))), flags, flags)


LAYOUT = layout_of(CARDINALITIES)
LAYOUT_BLOCKS = BlockLayout(
    tuple(b[0] for b in BLOCKS), tuple(b[1] for b in BLOCKS), tuple(b[2] for b in BLOCKS), (0,) * 8
)


def keep_of(widths, seed: int = 0) -> torch.Tensor:
    """[blocks, DIM]: block k keeps widths[k] dims drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(widths), DIM, dtype=torch.bool)
    for k, width in enumerate(widths):
        keep[k, torch.randperm(DIM, generator=generator)[:width]] = True
    return keep


KEEP = keep_of([b[4] for b in BLOCKS])


def dense_table(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.total_rows, DIM, generator=generator) * 0.3


def module_of(precisions, keep: torch.Tensor = KEEP) -> QuantizedBlockEmbedding:
    return QuantizedBlockEmbedding.from_dense(
        LAYOUT, DIM, LAYOUT_BLOCKS, keep, precisions, dense_table()
    )


def served_by_hand(precisions, keep: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Every block's kept values quantized row-wise at its precision, zeros elsewhere."""
    out = torch.zeros_like(table)
    for k, (_, start, rows, _, _) in enumerate(BLOCKS):
        kept = table[start : start + rows][:, keep[k]]
        codes, scale, bias = quantize_rows(kept, precisions[k])
        values = dequantize_rows(codes, scale, bias, precisions[k], kept.shape[1])
        out[start : start + rows, keep[k]] = values
    return out


@pytest.mark.parametrize("precisions", [MIXED] + [[p] * 8 for p in PRECISIONS], ids=str)
def test_served_values_are_the_kept_values_quantized_row_wise(precisions):
    module = module_of(precisions)
    table = dense_table()
    served = module.dequantized()
    assert torch.equal(served, served_by_hand(precisions, KEEP, table))
    assert bool((served[~KEEP[LAYOUT_BLOCKS.row_block()]] == 0).all())  # pruned dims exactly 0
    for k, (_, start, rows, _, width) in enumerate(BLOCKS):
        block = served[start : start + rows]
        if precisions[k] == "fp32":
            assert torch.equal(block[:, KEEP[k]], table[start : start + rows][:, KEEP[k]])
        elif precisions[k] in ("int8", "int4") and width > 1:  # really quantized
            assert not torch.equal(block[:, KEEP[k]], table[start : start + rows][:, KEEP[k]])
    assert module.block_precisions() == list(precisions)
    assert module.dims_per_block() == [b[4] for b in BLOCKS]
    assert module.num_parameters() == sum(rows * width for _, _, rows, _, width in BLOCKS)


def test_a_batch_with_rows_from_every_block_reads_their_served_rows():
    module = module_of(MIXED).eval()  # eval, with autograd on
    served = module.dequantized()
    generator = torch.Generator().manual_seed(4)
    firsts = torch.tensor([b[1] for b in BLOCKS])
    lasts = firsts + torch.tensor([b[2] for b in BLOCKS]) - 1
    rows = torch.cat([lasts, torch.randint(0, LAYOUT.total_rows, (65,), generator=generator)])
    rows = torch.cat([rows, firsts]).view(9, 9)
    assert set(LAYOUT_BLOCKS.row_block()[rows].flatten().tolist()) == set(range(8))
    vectors = module.lookup(rows)
    assert vectors.shape == (9, 9, DIM) and not vectors.requires_grad
    assert torch.equal(vectors, served[rows])
    # through the FieldEmbedding interface: per-field ids of three one-slot fields
    ids = torch.stack([torch.randint(0, c, (32,), generator=generator) for c in CARDINALITIES], 1)
    expected = served[ids + LAYOUT.field_offsets()]
    assert torch.equal(module(ids), expected)


def test_memory_bytes_is_each_blocks_row_bytes_plus_keep_and_precision_codes():
    module = module_of(MIXED)
    # rows_k * row_bytes(w_k, p_k) over the blocks (width 0: nothing, not even a scale), plus
    # `keep` (one byte per bool, [8, DIM]) and the precision codes (one uint8 per block)
    rows_bytes = sum(rows * row_bytes(width, p) for _, _, rows, p, width in BLOCKS)
    int4 = 3 * (4 + 4) + 2 * (1 + 4) + 3 * (3 + 4)  # ceil(w / 2) code bytes + scale + bias
    int8 = 3 * (7 + 4) + 4 * (2 + 4)
    assert rows_bytes == int4 + int8 + 3 * 3 * 2 + 5 * 4 * 4  # + fp16, fp32 (block 3: width 0)
    expected = rows_bytes + 8 * DIM + 8
    assert module.memory_bytes() == expected
    state = module.state_dict()
    assert sum(t.numel() * t.element_size() for t in state.values()) == expected
    assert list(module.parameters()) == []
    assert set(state) == {"keep", "block_precision", "codes_fp32", "codes_fp16", "codes_int8",
                          "scale_int8", "bias_int8", "codes_int4", "scale_int4", "bias_int4"}  # fmt: skip
    assert state["scale_int8"].numel() == 3 + 4  # one per stored row
    assert state["codes_int4"].numel() == 3 * 4 + 2 * 1 + 3 * 3  # ceil(w / 2) bytes a row


def test_blocks_of_width_zero_store_nothing():
    keep = torch.zeros(8, DIM, dtype=torch.bool)
    module = module_of(MIXED, keep)
    assert set(module.state_dict()) == {"keep", "block_precision"}
    assert module.memory_bytes() == 8 * DIM + 8
    assert torch.equal(module.lookup(torch.arange(24)), torch.zeros(24, DIM))


def test_the_plan_rebuilds_the_module_with_a_strict_load():
    module = module_of(MIXED)
    plan = plan_of(module)
    assert plan.kind == "quantized-blocks" and plan.options == {"precisions": MIXED}
    blocks = [b for f in plan.fields for b in f.blocks]
    assert [b.dims for b in blocks] == [tuple(row.nonzero().flatten().tolist()) for row in KEEP]
    assert plan.params == module.num_parameters()
    plan = EmbeddingPlan.from_json(json.loads(json.dumps(plan.to_json())))
    state = module.state_dict()
    rebuilt = build(plan, LAYOUT, state)
    assert isinstance(rebuilt, QuantizedBlockEmbedding)
    assert not torch.equal(rebuilt.dequantized(), module.dequantized())  # empty until loaded
    rebuilt.load_state_dict(state, strict=True)
    rows = torch.randint(0, LAYOUT.total_rows, (5, 11), generator=torch.Generator().manual_seed(2))
    assert torch.equal(rebuilt.lookup(rows), module.lookup(rows))
    assert rebuilt.memory_bytes() == module.memory_bytes()
    # weights saved with other precisions than the plan's are refused
    other = dict(state, block_precision=torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(DnisError, match="precisions"):
        build(plan, LAYOUT, other)


class Lookup(nn.Module):
    """A model that only reads the embedding: ids [B, 3] -> field vectors [B, 3, DIM]."""

    def __init__(self, embedding: QuantizedBlockEmbedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids) * 2.0


def example_ids(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randint(0, c, (batch,), generator=generator) for c in CARDINALITIES], 1
    )


@pytest.mark.parametrize("precisions", [MIXED, ["int4"] * 8], ids=str)
def test_a_trace_serves_what_the_eager_module_serves(precisions):
    model = Lookup(module_of(precisions)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings
        traced = torch.jit.trace(model, (example_ids(16, 0),))
    fresh = example_ids(301, 7)
    assert torch.equal(traced(fresh), model(fresh))


def test_the_onnx_export_serves_what_the_eager_module_serves(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason=ONNX_REASON)
    onnx = pytest.importorskip("onnx", reason=ONNX_REASON)
    model = Lookup(module_of(MIXED)).eval()
    path = tmp_path / "lookup.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example_ids(16, 0),),
            str(path),
            dynamo=False,
            input_names=["ids"],
            output_names=["vectors"],
            dynamic_axes={"ids": {0: "batch"}, "vectors": {0: "batch"}},
            opset_version=17,
        )
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fresh = example_ids(301, 7)
    (served,) = session.run(["vectors"], {"ids": fresh.numpy()})
    expected = model(fresh).detach().numpy()
    assert served.shape == expected.shape
    np.testing.assert_allclose(served, expected, atol=TOLERANCE, rtol=0)
