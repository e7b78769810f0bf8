"""AutoDim's search-time input layer: every field holds one candidate table per width.

For candidate width c_m, every row owns a c_m-wide vector (one [rows, c_m] table per candidate,
or, with `weight_sharing`, the first c_m dims of one [rows, max c_m] table). Field f maps its
candidate-m vector to the model width with its own linear layer `e @ W[f, m] + b[f, m]`,
optionally followed (`batch_norm`) by a batch norm without affine parameters, per field,
candidate and output dim, that makes the candidates' magnitudes comparable. The field's vector
is `scale[f] * sum_m p[f, m] * [BN](e_m W[f, m] + b[f, m])`. `scale` [fields, dim] is learned and
shared by the candidates (so they stay comparable); it starts at `init_std` with batch norm, so
the model first sees vectors of an ordinary embedding's size (unit-variance field vectors would
swamp an FM's pairwise products), and at 1 without. p[f] is a Gumbel-softmax sample of the
field's architecture weights `alpha[f]` at temperature `temperature` while training (a plain
softmax of alpha at that temperature in eval mode), or the uniform 1/M during warm-up.

A batch (`forward`) knows each slot's field, so the whole mixture is one matmul over the
candidates' concatenated vectors with per-slot weights: batch norm is an affine map per (field,
output dim), so it folds into those weights and a shift, its statistics taken from each candidate's
per-field mean and covariance (`_folded`), so no [B, slots, dim] tensor is built per candidate.
A lookup of arbitrary rows (`lookup`, e.g. all items of a field) uses one `embedding_bag` per
candidate instead: `e W[f, m]` is a weighted sum of field f's projection rows (per-sample weights
e), so no [rows, c_m, dim] tensor is built. Python loops run over the few candidates only, never
over rows or fields.
Batch statistics are per field, over the rows the batch looks up (sequence padding excluded).
`last_l2` (the trainer's `embedding_l2` term) is taken on the stored candidate vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.layout import FieldLayout


class MultiWidthEmbedding(FieldEmbedding):
    def __init__(
        self,
        layout: FieldLayout,
        dim: int,
        candidates: Sequence[int],
        *,
        init_std: float = 0.01,
        batch_norm: bool = True,
        weight_sharing: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        """`candidates`: distinct widths in [1, dim], sorted ascending."""
        super().__init__(layout, dim)
        widths = [int(c) for c in candidates]
        if not widths or widths != sorted(set(widths)) or widths[0] < 1 or widths[-1] > dim:
            raise ValueError(
                f"candidates must be distinct ascending widths in [1, {dim}], got {widths}"
            )
        self.candidates = tuple(widths)
        self.batch_norm = batch_norm
        self.weight_sharing = weight_sharing
        self.momentum = momentum
        self.eps = eps
        rows, fields, count = layout.total_rows, layout.num_fields, len(widths)
        if weight_sharing:
            self.tables = nn.ParameterList([nn.Parameter(torch.empty(rows, widths[-1]))])
        else:
            self.tables = nn.ParameterList([nn.Parameter(torch.empty(rows, c)) for c in widths])
        # projection m: rows f * c_m + j hold W[f, m][j]; one bias row per field
        self.projections = nn.ParameterList(
            [nn.Parameter(torch.empty(fields * c, dim)) for c in widths]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(fields, dim)) for _ in widths])
        self.scale = nn.Parameter(torch.empty(fields, dim))
        self.alpha = nn.Parameter(torch.zeros(fields, count))  # equal architecture weights
        self.register_buffer("running_mean", torch.zeros(count, fields, dim))
        self.register_buffer("running_var", torch.ones(count, fields, dim))
        sequence = torch.tensor(layout.sequence_fields, dtype=torch.bool)
        self.register_buffer("sequence_field", sequence, persistent=False)
        self.temperature = 1.0
        self._raw_l2 = torch.zeros(())
        self.warmup = False  # True: fixed uniform weights 1/M, no sampling
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.01) -> None:
        """Tables ~ N(0, std); projections Xavier-normal (as the Hetu reference); biases 0;
        the output scale `std` with batch norm (1 without: the tables are already that small)."""
        self.scale.fill_(std if self.batch_norm else 1.0)
        for table in self.tables:
            nn.init.normal_(table, std=std)
        for c, projection in zip(self.candidates, self.projections, strict=True):
            nn.init.normal_(projection, std=math.sqrt(2.0 / (c + self.dim)))
        for bias in self.biases:
            bias.zero_()
        self.alpha.zero_()
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def mixture_weights(self) -> torch.Tensor:
        """p [fields, candidates]: what each candidate contributes to its field's vector."""
        if self.warmup:
            return torch.full_like(self.alpha, 1.0 / self.alpha.shape[1])
        logits = torch.log_softmax(self.alpha, dim=1)
        if self.training:
            uniform = torch.rand_like(logits).clamp(1e-10, 1.0 - 1e-7)
            logits = logits - torch.log(-torch.log(uniform))
        return torch.softmax(logits / self.temperature, dim=1)

    def probabilities(self) -> torch.Tensor:
        """softmax(alpha) [fields, candidates]: the architecture weights the selection reads."""
        return torch.softmax(self.alpha.detach(), dim=1)

    def _table(self, m: int) -> torch.Tensor:
        if self.weight_sharing:
            return self.tables[0][:, : self.candidates[m]]
        return self.tables[m]

    def _normalize(self, m: int, x: torch.Tensor, field: torch.Tensor, real: torch.Tensor):
        """Batch norm of candidate m's projected rows x [N, dim] (a lookup of arbitrary rows),
        statistics per (field, output dim) over the `real` rows. A batch takes `_folded`."""
        if not self.training:
            mean, var = self.running_mean[m][field], self.running_var[m][field]
            return (x - mean) / torch.sqrt(var + self.eps)
        fields = self.layout.num_fields
        weight = real.to(x.dtype).unsqueeze(1)
        count = torch.zeros(fields, dtype=x.dtype, device=x.device).index_add_(
            0, field, real.to(x.dtype)
        )
        denominator = count.clamp(min=1.0).unsqueeze(1)
        mean = torch.zeros(fields, self.dim, dtype=x.dtype, device=x.device)
        mean = mean.index_add(0, field, x * weight) / denominator
        centred = x - mean[field]
        var = torch.zeros_like(mean).index_add(0, field, centred.pow(2) * weight) / denominator
        self._update_running(m, mean, var, count)
        return centred / torch.sqrt(var[field] + self.eps)

    @torch.no_grad()
    def _update_running(
        self, m: int, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
    ) -> None:
        """Momentum update of candidate m's running statistics, for fields the batch saw."""
        seen = (count > 0).unsqueeze(1)
        unbiased = var * (count / (count - 1).clamp(min=1.0)).unsqueeze(1)
        step = self.momentum
        self.running_mean[m] = torch.where(
            seen, (1 - step) * self.running_mean[m] + step * mean, self.running_mean[m]
        )
        self.running_var[m] = torch.where(
            seen, (1 - step) * self.running_var[m] + step * unbiased, self.running_var[m]
        )

    def _weights(self, m: int) -> torch.Tensor:
        """W[:, m] as [fields, c_m, dim]."""
        return self.projections[m].view(self.layout.num_fields, self.candidates[m], self.dim)

    def _mixture(self, rows: torch.Tensor, slot_field: torch.Tensor | None = None) -> torch.Tensor:
        """Mixed vectors [*rows.shape, dim]. With `slot_field` [S], `rows` is a batch [B, S] whose
        slot s belongs to field slot_field[s]: projections are then per-slot batched matmuls."""
        field = self.fields_of(rows) if slot_field is None else slot_field.expand_as(rows)
        # sequence padding (id 0 of a sequence field) is never read by a model: keep it out of
        # the batch statistics and the L2 term
        real = ~(self.sequence_field[field] & (rows == self.field_offsets[field]))
        p = self.mixture_weights()
        p = p[field] if slot_field is None else p[slot_field]  # [..., M] or [S, M]
        vectors = [self._table(m)[rows] for m in range(len(self.candidates))]
        if self.training:
            self._raw_l2 = sum((v.pow(2).sum(dim=-1) * real).sum() for v in vectors)
        if slot_field is not None:
            return self._folded(vectors, slot_field, real, p)
        out = None
        for m, width in enumerate(self.candidates):
            # a weighted sum of the field's projection rows, no [N, c, dim]
            j = torch.arange(width, device=rows.device)
            index = field.reshape(-1, 1) * width + j
            projected = functional.embedding_bag(
                index,
                self.projections[m],
                per_sample_weights=vectors[m].reshape(-1, width),
                mode="sum",
            ).view(*rows.shape, self.dim)
            projected = projected + self.biases[m][field]
            if self.batch_norm:
                normalized = self._normalize(
                    m, projected.reshape(-1, self.dim), field.reshape(-1), real.reshape(-1)
                )
                projected = normalized.view_as(projected)
            term = p[..., m].unsqueeze(-1) * projected
            out = term if out is None else out + term
        assert out is not None
        return out * self.scale[field]

    def _folded(
        self, vectors: list[torch.Tensor], slot_field: torch.Tensor, real: torch.Tensor,
        p: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The batch path: the mixture as one matmul over the concatenated candidates.

        Batch norm is an affine map per (field, output dim), so `scale * sum_m p_m * BN(v_m W_m
        + b_m)` equals `v @ W' + c'` with v the candidates' vectors side by side, W' the
        projections times p_m * scale / std_m, and c' what the biases and means leave. The
        statistics of v_m W_m + b_m come from v_m's per-field mean and covariance (two-pass, on
        [fields, c_m, c_m]), never from a [B, slots, dim] tensor per candidate; the result, its
        gradients and the running statistics equal the per-candidate batch norm's."""
        scale = self.scale[slot_field]  # [S, dim]
        weights, offset = [], 0.0
        for m, v in enumerate(vectors):
            weight = self._weights(m)  # [fields, c, dim]
            factor = p[:, m].unsqueeze(1) * scale  # [S, dim]
            shift = self.biases[m][slot_field]
            if self.batch_norm:
                mean, var = self._projected_moments(m, v, weight, slot_field, real)  # [fields, dim]
                factor = factor * torch.rsqrt(var + self.eps)[slot_field]
                shift = shift - mean[slot_field]
            weights.append(weight[slot_field] * factor.unsqueeze(1))  # [S, c, dim]
            offset = offset + shift * factor
        out = torch.einsum("bsk,skd->bsd", torch.cat(vectors, dim=-1), torch.cat(weights, dim=1))
        return out + offset

    def _projected_moments(
        self, m: int, v: torch.Tensor, weight: torch.Tensor, slot_field: torch.Tensor,
        real: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Per-field mean and (biased) variance of candidate m's projected vectors [fields, dim]
        over the batch's real rows (training, running statistics updated) or the running ones."""
        if not self.training:
            return self.running_mean[m], self.running_var[m]
        fields = self.layout.num_fields
        w = real.to(v.dtype)  # [B, S]
        count = torch.zeros(fields, dtype=v.dtype, device=v.device).index_add_(
            0, slot_field, w.sum(0)
        )
        denominator = count.clamp(min=1.0).unsqueeze(1)
        total = torch.einsum("bs,bsc->sc", w, v)
        v_mean = torch.zeros(fields, v.shape[-1], dtype=v.dtype, device=v.device)
        v_mean = v_mean.index_add(0, slot_field, total) / denominator  # [fields, c]
        centred = v - v_mean[slot_field]
        second = torch.einsum("bsj,bsk->sjk", centred * w.unsqueeze(-1), centred)
        covariance = torch.zeros(fields, *second.shape[1:], dtype=v.dtype, device=v.device)
        covariance = covariance.index_add(0, slot_field, second) / denominator.unsqueeze(2)
        bias = self.biases[m] * (count > 0).to(v.dtype).unsqueeze(1)  # 0 for unseen fields
        mean = torch.einsum("fc,fcd->fd", v_mean, weight) + bias
        var = torch.einsum("fjd,fjk,fkd->fd", weight, covariance, weight)
        self._update_running(m, mean, var, count)
        return mean, var

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        return self._mixture(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = self._mixture(ids + self.slot_offsets, self.pooling.slot_fields)
        weights = self.pooling.slot_weights(ids, vectors.dtype)
        if self.training:  # L2 on the stored candidate vectors, not on their mixture
            self.last_l2 = self._raw_l2 / ids.shape[0]
        return self.pooling(vectors, weights)

    def num_parameters(self) -> int:
        """Candidate tables, projections, biases and the output scale (alpha excluded)."""
        tensors = [*self.tables, *self.projections, *self.biases, self.scale]
        return sum(t.numel() for t in tensors)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """What the model step updates (alpha has its own optimizer)."""
        return [*self.tables, *self.projections, *self.biases, self.scale]
