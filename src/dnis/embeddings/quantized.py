"""Quantized tables: rows stored at fp16, int8 or packed int4, dequantized in the lookup.

Row-wise affine quantization, as FBGEMM's and TorchRec's fused int8/int4 tables store them: each
row keeps its own `scale` and `bias` (fp16, 2 bytes each), and value j of the row is
`code_j * scale + bias` with `code_j` in 0 .. 2**bits - 1; `bias` is the row's minimum and
`scale` its range over 2**bits - 1, so both ends of the row are represented. int4 codes are packed
two to a byte (the even dim in the low nibble). A row of width w therefore stores

    fp32   4 w bytes            int8   w + 4 bytes
    fp16   2 w bytes            int4   ceil(w / 2) + 4 bytes

(`row_bytes`), and a module's `memory_bytes` (every tensor of its state dict) is that sum over its
rows, exactly. The codes are computed against the fp16-rounded scale and bias, the values the
lookup multiplies by, so quantizing is a nearest-code rounding of what is served.

The lookup gathers the rows' stored bytes (one gather per batch) and dequantizes only those rows;
under a trace or an ONNX export the int4 nibbles are split with float arithmetic (`floor`), as
opset 17 has no bit operations, and with `& 15` and `>> 4` otherwise (the same values).
"""

from __future__ import annotations

import math

import torch

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.windows import exporting

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
SCALE_BIAS_BYTES = 4  # an fp16 scale and an fp16 bias per row of an integer table


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def is_integer(precision: str) -> bool:
    return check_precision(precision) in ("int8", "int4")


def code_bytes(width: int, precision: str) -> int:
    """Bytes of one row's stored values (codes), without its scale and bias."""
    return math.ceil(width * BITS[check_precision(precision)] / 8)


def row_bytes(width: int, precision: str) -> int:
    """Bytes one row of `width` values stores at `precision`, scale and bias included."""
    if width == 0:
        return 0
    return code_bytes(width, precision) + (SCALE_BIAS_BYTES if is_integer(precision) else 0)


def widest_row(row_budget: float, precision: str, dim: int) -> int:
    """The widest width <= `dim` whose row fits `row_budget` bytes at `precision` (0: none)."""
    return max((w for w in range(1, dim + 1) if row_bytes(w, precision) <= row_budget), default=0)


def quantize_rows(
    table: torch.Tensor, precision: str, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`table` [n, w] as (codes, scale, bias): codes uint8 [n, code_bytes(w)] with fp16 scale
    and bias [n] for int8/int4, or the values themselves (fp16/fp32) with no scale or bias.
    `keep` [n, w] (bool): a row's range is that of its kept entries only (the others are not
    stored; their codes mean nothing), as a row of a block-mixed table is stored."""
    table = table.detach().float()
    if not is_integer(precision):
        return table.to(torch.float16 if precision == "fp16" else torch.float32), None, None
    levels = 2 ** BITS[precision] - 1
    if table.shape[1] == 0:
        low = high = table.new_zeros(table.shape[0])
    elif keep is None:
        low, high = table.min(dim=1).values, table.max(dim=1).values
    else:
        empty = ~keep.any(dim=1)
        low = table.masked_fill(~keep, float("inf")).min(dim=1).values.masked_fill(empty, 0.0)
        high = table.masked_fill(~keep, float("-inf")).max(dim=1).values.masked_fill(empty, 0.0)
    bias = low.to(torch.float16)
    scale = ((high - low) / levels).to(torch.float16)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(low))
    codes = torch.round((table - bias.float().unsqueeze(1)) / safe.unsqueeze(1))
    codes = codes.clamp_(0, levels).to(torch.uint8)
    if precision == "int4":
        if codes.shape[1] % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        codes = codes[:, 0::2] + 16 * codes[:, 1::2]
    return codes.contiguous(), scale, bias


def dequantize_rows(
    codes: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    precision: str,
    width: int,
) -> torch.Tensor:
    """float32 [..., width] values of gathered rows (`codes` [..., bytes], `scale`, `bias` [...])."""
    if scale is None or bias is None:
        return codes.float()
    if precision == "int4":
        if exporting():  # no bit ops in opset 17
            values = codes.float()
            high = torch.floor(values / 16)
            nibbles = torch.stack([values - 16 * high, high], dim=-1)
        else:  # the same nibbles, about 4x faster
            nibbles = torch.stack([codes & 15, codes >> 4], dim=-1)
        codes = nibbles.flatten(-2)[..., :width]
    # in place on the fresh float copy: no full-size temporaries (codes never carry a gradient)
    return codes.float().mul_(scale.float().unsqueeze(-1)).add_(bias.float().unsqueeze(-1))


def fake_quantize(
    table: torch.Tensor, precision: str, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """`table` [n, w] as its quantized rows would serve it, with the gradient of the identity
    (straight-through rounding): the forward of quantization-aware training. With `keep`
    (see `quantize_rows`), entries not kept are served as 0 (at fp32 too)."""
    if precision == "fp32":
        return table if keep is None else table * keep
    codes, scale, bias = quantize_rows(table, precision, keep)
    served = dequantize_rows(codes, scale, bias, precision, table.shape[1])
    if keep is not None:
        served = served * keep
    return served + (table - table.detach())  # exactly `served`, the gradient of the identity


class QuantizedEmbedding(FieldEmbedding):
    """Every field's rows at width `dim`, stored at one `precision` (a uniform table after
    post-training quantization). Saved: `codes` and, for int8/int4, `scale` and `bias`; nothing
    is trainable (`num_parameters` counts the stored values)."""

    def __init__(self, layout: FieldLayout, dim: int, precision: str) -> None:
        super().__init__(layout, dim)
        self.precision = check_precision(precision)
        rows = layout.total_rows
        if is_integer(precision):
            codes = torch.zeros(rows, code_bytes(dim, precision), dtype=torch.uint8)
            self.register_buffer("scale", torch.zeros(rows, dtype=torch.float16))
            self.register_buffer("bias", torch.zeros(rows, dtype=torch.float16))
        else:
            dtype = torch.float16 if precision == "fp16" else torch.float32
            codes = torch.zeros(rows, dim, dtype=dtype)
            self.scale = self.bias = None
        self.register_buffer("codes", codes)

    @classmethod
    def from_table(
        cls, layout: FieldLayout, table: torch.Tensor, precision: str
    ) -> QuantizedEmbedding:
        """The quantized twin of a trained [total_rows, dim] table."""
        if table.shape[0] != layout.total_rows:
            raise ValueError(f"table has {table.shape[0]} rows, the layout {layout.total_rows}")
        module = cls(layout, table.shape[1], precision).to(table.device)
        codes, scale, bias = quantize_rows(table, precision)
        module.codes.copy_(codes)
        if scale is not None and bias is not None:
            module.scale.copy_(scale)
            module.bias.copy_(bias)
        return module

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        codes = self.codes.index_select(0, flat)
        scale = None if self.scale is None else self.scale.index_select(0, flat)
        bias = None if self.bias is None else self.bias.index_select(0, flat)
        values = dequantize_rows(codes, scale, bias, self.precision, self.dim)
        return values.reshape(*rows.shape, self.dim)

    def dequantized(self) -> torch.Tensor:
        """The whole table as it is served, float32 [total_rows, dim]."""
        return dequantize_rows(self.codes, self.scale, self.bias, self.precision, self.dim)

    def num_parameters(self) -> int:
        return self.layout.total_rows * self.dim
