"""DIN: Deep Interest Network (Zhou et al., "Deep Interest Network for Click-Through Rate
Prediction", KDD 2018).

The candidate item attends over the user's behaviour sequence through a *local activation unit*:
for every history position, an MLP reads [h, e, h - e, h * e] (h the history item's vector, e the
candidate's) and outputs an unnormalised weight (no softmax, as in the paper, so the sum of
weights keeps the intensity of the user's interest). The weighted sum of history vectors replaces
the history field's pooled vector; it and every other field's vector go through an MLP.

Input layer: the model only reads its embedding through the interface. Field vectors come from
`embedding(ids)`; the history's per-position vectors from `embedding.lookup(rows)` of the history
slots' global rows, so DNIS's soft selection, compact mixed-width tables, hashing etc. are in
effect for the attention too. Mixed-width embeddings return rows padded to width d with zeros, so
every vector here has width d; a pruned dimension is 0 in h and e alike and so contributes 0 to
h - e and h * e.

Choices, where this differs from or goes beyond the paper:
- One candidate field (`item_field`) and one behaviour field (`history_field`); the paper
  concatenates goods, shop and category ids per position.
- Padding (id 0 of the history field) never enters the activation unit: it runs on the real
  positions only, so Dice's batch statistics are over real positions and the output does not
  depend on what the padding row holds. A history with no real item contributes a zero vector.
- Dice follows the paper: p = sigmoid((s - E[s]) / sqrt(Var[s] + eps)), eps = 1e-8, batch
  statistics in training and running averages (momentum 0.01) at inference, no affine
  transform inside the sigmoid; a batch of one uses the running statistics.
- The paper's mini-batch aware regularisation is not included (use `TrainConfig.embedding_l2`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnis.data.schema import Schema
from dnis.errors import ConfigError
from dnis.models.base import Model
from dnis.models.registry import register_model

ACTIVATIONS: tuple[str, ...] = ("dice", "prelu", "relu")


class Dice(nn.Module):
    """Data-adaptive activation (DIN): out = p * s + (1 - p) * alpha * s, p = sigmoid(BN(s)).

    Works on [N, C] inputs, with its own per-channel statistics (no affine parameters in the
    normalisation) and a learned `alpha` per channel, initialised to 0 (Dice starts as a smooth,
    data-centred ReLU).
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.01) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if self.training and s.shape[0] > 1:
            mean = s.mean(dim=0)
            var = s.var(dim=0, unbiased=False)
            with torch.no_grad():
                unbiased = var * (s.shape[0] / (s.shape[0] - 1))
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((s - mean) / torch.sqrt(var + self.eps))
        return p * s + (1 - p) * self.alpha * s


def activation_layer(name: str, width: int) -> nn.Module:
    if name == "dice":
        return Dice(width)
    if name == "prelu":
        return nn.PReLU(width)
    if name == "relu":
        return nn.ReLU()
    raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_mlp(
    in_dim: int, hidden: Sequence[int], activation: str, dropout: float = 0.0
) -> nn.Sequential:
    """Linear -> activation (Dice / PReLU / ReLU) -> Dropout stacks, then a Linear to 1 output."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), activation_layer(activation, width)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


@register_model("din")
class DIN(Model):
    """Deep Interest Network: attention of the candidate item over the behaviour sequence.

    - `item_field`: the candidate item's field (any field with one vector per row).
    - `history_field`: a sequence field of the same kind of items (e.g. MovieLens's ``history``,
      from ``data.load("movielens-latest-small", task="ctr", history_len=20)``). Its own pooled
      vector is replaced by the attention output.
    - `attention_hidden`, `attention_activation`: the local activation unit's MLP (80, 40, Dice).
    - `hidden`, `activation`, `dropout`: the prediction MLP (200, 80, Dice) over all fields.
    """

    def __init__(
        self,
        schema: Schema,
        embedding: nn.Module,
        item_field: str = "item",
        history_field: str = "history",
        attention_hidden: Sequence[int] = (80, 40),
        attention_activation: str = "dice",
        hidden: Sequence[int] = (200, 80),
        activation: str = "dice",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(schema, embedding)
        layout = embedding.layout
        for role, name in (("item_field", item_field), ("history_field", history_field)):
            if name not in layout.names:
                hint = (
                    " (for MovieLens, load the ctr task with history_len=20)"
                    if role == "history_field"
                    else ""
                )
                raise ConfigError(
                    f"DIN: {role}={name!r} is not a field of the data{hint}; "
                    f"fields are {list(layout.names)}"
                )
        if item_field == history_field:
            raise ConfigError("DIN: item_field and history_field must be different fields")
        self.item_index = layout.index(item_field)
        self.history_index = layout.index(history_field)
        if not layout.sequence_fields[self.history_index]:
            raise ConfigError(
                f"DIN: history_field {history_field!r} must be a sequence field (kind: sequence)"
            )
        if layout.sequence_fields[self.item_index]:
            raise ConfigError(f"DIN: item_field {item_field!r} must not be a sequence field")
        for name in (attention_activation, activation):
            if name not in ACTIVATIONS:
                raise ConfigError(f"DIN: activation must be one of {ACTIVATIONS}, got {name!r}")
        slots = [s for s, f in enumerate(layout.slot_fields) if f == self.history_index]
        self.register_buffer("history_slots", torch.tensor(slots), persistent=False)
        self.register_buffer(
            "history_position", torch.tensor([self.history_index]), persistent=False
        )
        d = self.dim
        self.attention = activation_mlp(4 * d, attention_hidden, attention_activation)
        self.mlp = activation_mlp(layout.num_fields * d, hidden, activation, dropout)

    def attend(self, ids: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """Attention-weighted sum of the history vectors [B, d] for candidates [B, d]."""
        history_ids = ids[:, self.history_slots]  # [B, L]
        rows = history_ids + self.embedding.slot_offsets[self.history_slots]
        history = self.embedding.lookup(rows)  # [B, L, d]
        real = history_ids != 0
        query = candidate.unsqueeze(1).expand_as(history)
        h, e = history[real], query[real]  # [N real positions, d]
        weights = history.new_zeros(history_ids.shape)
        if h.shape[0] > 0:
            unit_in = torch.cat([h, e, h - e, h * e], dim=-1)
            weights = weights.masked_scatter(real, self.attention(unit_in).squeeze(-1))
        history = history.masked_fill(~real.unsqueeze(-1), 0.0)
        return torch.einsum("bl,bld->bd", weights, history)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fields = self.embedding(ids)  # [B, F, d]
        interest = self.attend(ids, fields[:, self.item_index])
        fields = fields.index_copy(1, self.history_position, interest.unsqueeze(1))
        return self.mlp(fields.flatten(1)).squeeze(1)
