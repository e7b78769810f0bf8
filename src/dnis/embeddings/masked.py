"""Element-sparse embedding tables for the pruning baselines (PEP, DSL).

- `SoftThresholdEmbedding`: PEP's search layer (Liu et al., ICLR 2021). The table V is dense and
  every lookup returns the soft-thresholded V_hat = sign(V) * relu(|V| - sigmoid(s)), with the
  learnable thresholds s shared at one of six granularities (the authors' `threshold_type`):
  `feature_dim` (one per entry, the paper's best), `feature` (one per row), `field_dim`, `field`,
  `dimension` and `global`. An entry is a kept parameter while |v| > sigmoid(s).
- `MaskedEmbedding`: a dense table whose entries outside a boolean mask are exactly zero and get
  no gradient, the training form of a fixed-budget sparse table (PEP's retraining, DSL). Its
  `num_parameters` counts the mask's entries and its `memory_bytes` are those of the CSR form it
  compacts to (`to_ragged`: float values, int16 dim indices, int32 row pointers), so a result
  reports what it would store, not the dense training buffer.
- `swap_embedding`: the same trained model around another embedding (e.g. the compact
  `RaggedEmbedding` of a `MaskedEmbedding`), dense weights copied.
- `width_report`: per field, how many entries every id keeps (mean/min/max, zero-width ids) and
  the mean per frequency block (what the report's heatmap draws).

Sequence padding rows (id 0 of a sequence field) are never read by a model, so no mask ever
keeps them and no count includes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import RaggedEmbedding
from dnis.errors import ConfigError

THRESHOLD_GRANULARITIES: tuple[str, ...] = (
    "feature_dim",
    "feature",
    "field_dim",
    "field",
    "dimension",
    "global",
)


def readable_rows(layout: FieldLayout) -> torch.Tensor:
    """bool [total_rows]: False at sequence padding rows (never read, never kept)."""
    readable = torch.ones(layout.total_rows, dtype=torch.bool)
    offsets = layout.field_offsets()
    readable[offsets[torch.tensor(layout.sequence_fields, dtype=torch.bool)]] = False
    return readable


def csr_bytes(nonzeros: int, rows: int, value_bytes: int = 4) -> int:
    """Bytes of a CSR table: values, one int16 dim index per value, int32 row pointers."""
    return nonzeros * (value_bytes + 2) + (rows + 1) * 4


class SoftThresholdEmbedding(FieldEmbedding):
    def __init__(
        self,
        layout: FieldLayout,
        dim: int,
        granularity: str = "feature_dim",
        threshold_init: float = -15.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__(layout, dim)
        if granularity not in THRESHOLD_GRANULARITIES:
            raise ConfigError(
                f"pep granularity must be one of {THRESHOLD_GRANULARITIES}, got {granularity!r}"
            )
        self.granularity = granularity
        rows, fields = layout.total_rows, layout.num_fields
        self.weight = nn.Parameter(torch.empty(rows, dim))
        nn.init.normal_(self.weight, std=init_std)
        shape = {
            "feature_dim": (rows, dim),
            "feature": (rows, 1),
            "field_dim": (fields, dim),
            "field": (fields, 1),
            "dimension": (1, dim),
            "global": (1, 1),
        }[granularity]
        self.threshold = nn.Parameter(torch.full(shape, float(threshold_init)))
        row_field = torch.repeat_interleave(
            torch.arange(fields), torch.tensor(layout.cardinalities)
        )
        self.register_buffer("row_field", row_field, persistent=False)
        self.register_buffer("readable", readable_rows(layout), persistent=False)

    def _threshold(self, rows: torch.Tensor | None) -> torch.Tensor:
        """sigmoid(s) broadcastable against the looked-up rows (all rows when None)."""
        g = torch.sigmoid(self.threshold)
        if self.granularity in ("feature_dim", "feature"):
            return g if rows is None else F.embedding(rows, g)
        if self.granularity in ("field_dim", "field"):
            fields = self.row_field if rows is None else self.row_field[rows]
            return F.embedding(fields, g)
        return g  # [1, dim] or [1, 1]: broadcasts

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        v = F.embedding(rows, self.weight)
        return torch.sign(v) * torch.relu(v.abs() - self._threshold(rows))

    @torch.no_grad()
    def kept(self) -> torch.Tensor:
        """bool [rows, dim]: the entries that survive the thresholds (padding rows excluded)."""
        return (self.weight.abs() > self._threshold(None)) & self.readable.unsqueeze(1)

    @torch.no_grad()
    def num_nonzero(self) -> int:
        return int(self.kept().sum())

    @torch.no_grad()
    def sparse_table(self) -> torch.Tensor:
        """V_hat of every row [rows, dim] (padding rows zeroed), detached."""
        v = self.weight
        table = torch.sign(v) * torch.relu(v.abs() - self._threshold(None))
        return table * self.readable.unsqueeze(1)

    @torch.no_grad()
    def mean_threshold(self) -> float:
        return float(torch.sigmoid(self.threshold).mean())

    def num_parameters(self) -> int:
        """The dense search layer: the table and the thresholds."""
        return self.weight.numel() + self.threshold.numel()


class MaskedEmbedding(FieldEmbedding):
    def __init__(
        self,
        layout: FieldLayout,
        dim: int,
        mask: torch.Tensor,
        weight: torch.Tensor | None = None,
        init_std: float = 0.01,
    ) -> None:
        """`mask` [rows, dim] (bool): the stored entries. The table starts as `weight * mask`
        (e.g. PEP's saved initial weights: the lottery-ticket re-initialisation), or as a normal
        draw of std `init_std` times the mask."""
        super().__init__(layout, dim)
        mask = mask.bool()
        if mask.shape != (layout.total_rows, dim):
            raise ValueError(f"mask must be [{layout.total_rows}, {dim}], got {list(mask.shape)}")
        readable = readable_rows(layout).to(mask.device)
        if bool((mask & ~readable.unsqueeze(1)).any()):
            raise ValueError("mask keeps entries of sequence padding rows, which are never read")
        if weight is None:
            weight = torch.empty(layout.total_rows, dim, device=mask.device)
            nn.init.normal_(weight, std=init_std)
        elif weight.shape != mask.shape:
            raise ValueError(f"weight must be [{layout.total_rows}, {dim}]")
        self.weight = nn.Parameter(weight.detach().to(mask.device) * mask)
        self.register_buffer("mask", mask)  # the structure: saved (and restored) with the weights
        # True for one forward/backward: lookups skip the mask multiply, so `weight.grad` is the
        # dense gradient (what DSL's regrowth ranks); values are unchanged because entries outside
        # the mask hold exact zeros.
        self.dense_grad = False

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        vectors = F.embedding(rows, self.weight)
        if self.dense_grad:
            return vectors
        return vectors * self.mask[rows].to(vectors.dtype)

    def num_parameters(self) -> int:
        return int(self.mask.sum())

    def memory_bytes(self) -> int:
        """Bytes of the compact CSR form (`to_ragged`), not of the dense training buffer."""
        return csr_bytes(self.num_parameters(), self.layout.total_rows, self.weight.element_size())

    def row_widths(self) -> torch.Tensor:
        """Stored entries of every row [rows]."""
        return self.mask.sum(dim=1)

    @torch.no_grad()
    def to_ragged(self) -> RaggedEmbedding:
        """The compact CSR embedding holding exactly the masked entries, on this table's device."""
        ragged = RaggedEmbedding(self.layout, self.dim, self.mask.cpu())
        ragged.to(self.weight.device)
        ragged.load_dense(self.weight * self.mask)
        return ragged


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a model's non-embedding state (what a model keeps around its embedding)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not k.startswith("embedding.")
    }


def swap_embedding(
    make_model: Callable[[FieldEmbedding], nn.Module],
    embedding: FieldEmbedding,
    state: dict[str, torch.Tensor],
) -> Any:
    """A model from `make_model` around `embedding`, its other weights loaded from `state` (a
    `dense_state`), on the embedding's device: e.g. a trained masked model made compact."""
    weights = next(embedding.parameters(), None)
    device = embedding.slot_offsets.device if weights is None else weights.device
    out = make_model(embedding).to(device)
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("embedding.") for k in missing):
        raise RuntimeError(f"models differ beyond their embedding: {missing} {unexpected}")
    return out


def width_report(
    widths: torch.Tensor, layout: FieldLayout, blocks: BlockLayout, names: Sequence[str]
) -> dict[str, Any]:
    """Per field: kept entries per id (mean, min, max, zero-width ids) and the block means.

    Padding rows of sequence fields are left out (they are never read)."""
    widths = widths.detach().cpu().long()
    readable = readable_rows(layout)
    offsets = layout.field_offsets().tolist()
    out: dict[str, Any] = {}
    for f, name in enumerate(names):
        start, count = offsets[f], layout.cardinalities[f]
        rows = torch.arange(start, start + count)
        w = widths[rows[readable[rows]]]
        out[name] = {
            "cardinality": count,
            "nonzeros": int(w.sum()),
            "mean_width": round(float(w.float().mean()), 3) if len(w) else 0.0,
            "min_width": int(w.min()) if len(w) else 0,
            "max_width": int(w.max()) if len(w) else 0,
            "zero_width_ids": int((w == 0).sum()),
            "block_mean_width": [
                round(float(widths[s : s + n].float().mean()), 3)
                for s, n in ((blocks.start[b], blocks.size[b]) for b in blocks.blocks_of(f))
            ],
        }
    return out
