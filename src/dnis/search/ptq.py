"""`int8`, `int4`: post-training quantization of the uniform model; `int8-qat`, `int4-qat`: the
same trained quantization-aware. The byte-budget baselines.

A budget here is a share of the full-width fp32 embedding's bytes (`budget` of 4 * rows * dim
bytes, or a count > 1 of parameters, 4 bytes each): the bytes a deployment stores, which is the
unit these methods compete in (`compare.budget_unit: bytes`). Per budget:

1. Width. The widest uniform width w <= dim whose quantized row, codes plus its fp16 scale and
   bias (`row_bytes`: int8 w + 4 bytes, int4 ceil(w / 2) + 4), fits the budget's bytes per row.
   Every row of every field gets w, as the uniform baseline gives every field the same width.
2. Train. The model around a fp32 `FusedEmbedding` of width w, under the job's train config:
   early-stopped on validation like every method.
   The `-qat` methods train it with every looked-up row served quantized at the precision
   (`FakeQuantFused`: straight-through rounding), so the model learns around the rounding: the
   control that tells what dnis-precision's search adds beyond quantization-aware training.
3. Quantize. Its table, row by row, to the precision (`QuantizedEmbedding.from_table`); the dense
   layers stay fp32. PTQ does not fine-tune. The quantized model is evaluated on valid and test
   once (the trained model is not evaluated on test).

A result's `before` holds the trained model's validation metrics (for PTQ at fp32: what the
quantization cost), `dims[field]` its width and precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.masked import dense_state, swap_embedding
from dnis.embeddings.quantized import QuantizedEmbedding, fake_quantize, row_bytes, widest_row
from dnis.errors import BudgetError
from dnis.search.methods import Options, register_method
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, Job


@dataclass
class PtqOptions(Options):
    """The options of `int8` and `int4` (`compare.options.<method>`)."""

    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(self.init_std > 0, "init_std", "must be > 0")


def ptq_width(job: Job, budget: float, precision: str) -> int:
    """The widest uniform width whose quantized rows fit the budget's bytes."""
    per_row = job.target_bytes(budget) / job.layout.total_rows
    width = widest_row(per_row, precision, job.dim)
    if width < 1:
        raise BudgetError(
            f"{precision} needs {row_bytes(1, precision)} bytes a row for width 1 (scale and bias "
            f"included), the budget {budget} gives {per_row:.2f}"
        )
    return width


class FakeQuantFused(FusedEmbedding):
    """A uniform table whose lookup serves every row as `precision` stores it, with the gradient
    of the identity (straight-through rounding): quantization-aware training. Its rows are
    quantized by their own range, as `QuantizedEmbedding.from_table` stores them."""

    def __init__(self, layout: FieldLayout, dim: int, init_std: float, precision: str) -> None:
        super().__init__(layout, dim, init_std)
        self.precision = precision

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        vectors = super().lookup(rows)
        return fake_quantize(vectors.reshape(-1, self.dim), self.precision).view_as(vectors)


def uniform_quantized(
    job: Job, options: PtqOptions, precision: str, aware: bool = False
) -> list[SearchResult]:
    """Per budget: the uniform model at the widest width that fits, trained (`aware`: serving
    its rows quantized all along), then stored quantized and evaluated once on valid and test."""
    results = []
    for budget in job.budgets:
        width = ptq_width(job, budget, precision)
        table = FakeQuantFused if aware else FusedEmbedding
        extra = (precision,) if aware else ()
        trained = job.fit(partial(table, job.layout, width, options.init_std, *extra), test=False)
        before = {"valid": trained.valid}  # as trained: fp32 (PTQ) or quantized (QAT)
        quantized = QuantizedEmbedding.from_table(job.layout, trained.embedding.weight, precision)
        model = swap_embedding(job.make_model, quantized, dense_state(trained.model))
        task, batch = job.task, job.train.eval_batch_size
        valid, test = task.evaluate(model, "valid", batch), task.evaluate(model, "test", batch)
        trained.model, trained.embedding = model, quantized
        trained.valid, trained.test = valid, test
        dims = {name: {"block_dims": [width], "precision": precision} for name in job.layout.names}
        results.append(job.result(budget, trained, dims, before=before, unit="bytes"))
    return results


@register_method("int8", PtqOptions, unit="bytes")
def int8_method(job: Job, options: PtqOptions) -> list[SearchResult]:
    """The uniform model, quantized to int8 rows (fp16 scale and bias) after training."""
    return uniform_quantized(job, options, "int8")


@register_method("int4", PtqOptions, unit="bytes")
def int4_method(job: Job, options: PtqOptions) -> list[SearchResult]:
    """The uniform model, quantized to packed int4 rows (fp16 scale and bias) after training."""
    return uniform_quantized(job, options, "int4")


@register_method("int8-qat", PtqOptions, unit="bytes")
def int8_qat_method(job: Job, options: PtqOptions) -> list[SearchResult]:
    """The uniform model trained quantization-aware at int8, stored at int8."""
    return uniform_quantized(job, options, "int8", aware=True)


@register_method("int4-qat", PtqOptions, unit="bytes")
def int4_qat_method(job: Job, options: PtqOptions) -> list[SearchResult]:
    """The uniform model trained quantization-aware at int4, stored at int4."""
    return uniform_quantized(job, options, "int4", aware=True)
