"""ARM-Net (Cai et al., "ARM-Net: Adaptive Relation Modeling Network for Structured Data",
SIGMOD 2021).

Exponential neurons model cross features of adaptive order: neuron o of head k computes, per
embedding dimension, exp(sum_f w_kof * e_f), i.e. the product over fields of (exp e_f)^w_kof, a
multiplicative interaction whose field weights (the order of each field in the cross feature)
are chosen per row by gated multi-head attention:

    gates  = alpha-entmax_f( <E_f W_k, q_ko> / sqrt(d) )    bilinear W_k [d, d], query q_ko [d]
    w_kof  = gates_kof * v_kof                               learned value v_ko [F]

The K*O neuron outputs [B, K*O, d] are batch-normalised and an MLP reads them (`hidden`); with
`dnn_hidden` set, a DNN over the concatenated field vectors is ensembled with it through a
learned linear combination of the two logits (initialised to their mean), as ARM-Net+.

Input layer: the model only reads `embedding(ids)` [B, F, d]. Mixed-width embeddings arrive
padded to width d with zeros; in the default log-space reading a zero dimension gives
exp(0) = 1 for every row, a constant the batch norm removes, so pruned dimensions are harmless.

Choices, and where this differs from the paper:
- `log_inputs=False` (default): the field vectors are read as the logarithms of the neuron inputs,
  so a neuron is exp(W . E), as in the authors' released code (models/armnet.py). The paper's
  equation exp(W . ln|E|) is `log_inputs=True` (|E| clamped at `eps` = 1e-7 first); it is the same
  model with a different parametrisation, but pruned (zero) dimensions then become ln(eps) = -16
  and can overflow exp, so it is not the default for searched input layers.
- Sparsity: alpha-entmax by bisection (`alpha`, default 1.7, the authors' default; 1.0 is softmax,
  2.0 sparsemax), with its exact gradient.
- Defaults: `num_heads=4` and `hidden=(300, 300)` are the authors' training-script defaults;
  `exp_neurons=32` is their Frappe setting (their MovieLens script uses 16 neurons and 1 head).
- ARM-Net+ in the paper gives the DNN branch its own embedding table; here both branches share the
  one input layer, so a search method sizes a single table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnis.data.schema import Schema
from dnis.errors import ConfigError
from dnis.models.base import Model
from dnis.models.layers import MLP
from dnis.models.registry import register_model


def _entmax_bisect(x: torch.Tensor, alpha: float, n_iter: int) -> torch.Tensor:
    """alpha-entmax over the last dimension, by bisection on the threshold tau (alpha > 1)."""
    power = 1.0 / (alpha - 1.0)
    z = x * (alpha - 1.0)
    top = z.max(dim=-1, keepdim=True).values
    lo = top - 1.0  # p(tau) sums to >= 1 here (the max entry alone gives 1)
    hi = top - (1.0 / z.shape[-1]) ** (alpha - 1.0)  # sums to <= 1 here
    for _ in range(n_iter):
        tau = (lo + hi) / 2
        above = torch.clamp(z - tau, min=0).pow(power).sum(dim=-1, keepdim=True) >= 1
        lo = torch.where(above, tau, lo)
        hi = torch.where(above, hi, tau)
    p = torch.clamp(z - lo, min=0).pow(power)
    return p / p.sum(dim=-1, keepdim=True)


class _EntmaxBisect(torch.autograd.Function):
    """Bisection forward, exact backward (the entmax Jacobian, not the unrolled bisection)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, alpha: float, n_iter: int
    ) -> torch.Tensor:
        p = _entmax_bisect(x, alpha, n_iter)
        ctx.alpha = alpha
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        g = torch.where(p > 0, p.pow(2.0 - ctx.alpha), torch.zeros_like(p))
        dx = grad * g
        dx = dx - g * (dx.sum(dim=-1, keepdim=True) / g.sum(dim=-1, keepdim=True))
        return dx, None, None


def entmax(x: torch.Tensor, alpha: float = 1.5, n_iter: int = 40) -> torch.Tensor:
    """alpha-entmax (Peters et al. 2019) over the last dimension: softmax at 1, sparsemax at 2.

    Without autograd (inference, tracing for export) it runs as plain tensor operations.
    """
    if alpha == 1.0:
        return torch.softmax(x, dim=-1)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _entmax_bisect(x, alpha, n_iter)
    return _EntmaxBisect.apply(x, alpha, n_iter)


class SparseRelationAttention(nn.Module):
    """Interaction weights [B, K, O, F] of K heads x O exponential neurons over F fields."""

    def __init__(
        self, num_fields: int, dim: int, num_heads: int, exp_neurons: int, alpha: float
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.scale = dim**-0.5
        self.bilinear = nn.Parameter(torch.empty(num_heads, dim, dim))
        self.query = nn.Parameter(torch.empty(num_heads, exp_neurons, dim))
        self.values = nn.Parameter(torch.empty(num_heads, exp_neurons, num_fields))
        for weight in (self.bilinear, self.query, self.values):
            nn.init.xavier_uniform_(weight, gain=1.414)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("bfx,kxy,koy->bkof", fields, self.bilinear, self.query)
        gates = entmax(scores * self.scale, self.alpha)
        return gates * self.values


@register_model("armnet")
class ARMNet(Model):
    """Adaptive Relation Modeling Network: gated exponential neurons, then an MLP.

    - `num_heads` (K, 4), `exp_neurons` (O per head, 32), `alpha` (entmax sparsity, 1.7).
    - `hidden` (300, 300), `dropout`: the MLP over the K*O*d neuron outputs.
    - `dnn_hidden` (default (): off): a DNN over the field vectors, ensembled (ARM-Net+).
    - `log_inputs` (False): read field vectors as log-space inputs (authors' code); True applies
      ln(|e| clamped at `eps`) first, as the paper's equation.
    """

    def __init__(
        self,
        schema: Schema,
        embedding: nn.Module,
        num_heads: int = 4,
        exp_neurons: int = 32,
        alpha: float = 1.7,
        hidden: Sequence[int] = (300, 300),
        dropout: float = 0.0,
        dnn_hidden: Sequence[int] = (),
        log_inputs: bool = False,
        eps: float = 1e-7,
    ) -> None:
        super().__init__(schema, embedding)
        if num_heads < 1 or exp_neurons < 1:
            raise ConfigError("ARMNet: num_heads and exp_neurons must be >= 1")
        if alpha < 1.0:
            raise ConfigError(f"ARMNet: alpha must be >= 1 (1 = softmax), got {alpha}")
        if eps <= 0:
            raise ConfigError(f"ARMNet: eps must be > 0, got {eps}")
        self.log_inputs = log_inputs
        self.eps = eps
        neurons = num_heads * exp_neurons
        self.relation = SparseRelationAttention(
            self.num_fields, self.dim, num_heads, exp_neurons, alpha
        )
        self.neuron_norm = nn.BatchNorm1d(neurons)
        self.mlp = MLP(neurons * self.dim, hidden, out_dim=1, dropout=dropout)
        self.dnn: MLP | None = None
        self.ensemble: nn.Linear | None = None
        if dnn_hidden:
            self.dnn = MLP(self.num_fields * self.dim, dnn_hidden, out_dim=1, dropout=dropout)
            self.ensemble = nn.Linear(2, 1)
            nn.init.constant_(self.ensemble.weight, 0.5)
            nn.init.zeros_(self.ensemble.bias)

    def neurons(self, fields: torch.Tensor) -> torch.Tensor:
        """Exponential neuron outputs [B, K*O, d] of field vectors [B, F, d]."""
        weights = self.relation(fields)  # [B, K, O, F]
        logs = fields.abs().clamp(min=self.eps).log() if self.log_inputs else fields
        out = torch.exp(torch.einsum("bfe,bkof->bkoe", logs, weights))
        return out.flatten(1, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fields = self.embedding(ids)
        neurons = self.neuron_norm(self.neurons(fields))
        score = self.mlp(neurons.flatten(1))
        if self.dnn is not None and self.ensemble is not None:
            score = self.ensemble(torch.cat([score, self.dnn(fields.flatten(1))], dim=1))
        return score.squeeze(1)
