"""AutoInt and AutoInt+ (Song et al., "AutoInt: Automatic Feature Interaction Learning via
Self-Attentive Neural Networks", CIKM 2019).

Every field vector e_m (width d) goes through `num_layers` interacting layers. In each, head h
attends over all fields with psi(e_m, e_k) = <W_Q^h e_m, W_K^h e_k>, the head outputs (width d'
each) are concatenated, a projected residual W_Res e_m is added and ReLU applied:
e_m <- ReLU(concat_h sum_k softmax_k(psi) W_V^h e_k + W_Res e_m). The score is a linear layer over
the concatenation of the final field vectors. AutoInt+ adds a parallel feed-forward network over
the flattened field embeddings (`dnn_hidden`), and `use_linear` adds first-order terms.

Input layer: the model reads `embedding(ids) -> [B, F, d]` only. Mixed-width results of a search
(BlockMixedEmbedding, RaggedEmbedding) arrive padded to width d with zeros at pruned dims, so the
attention projections see equal widths (a pruned dim simply contributes nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dnis.data.schema import Schema
from dnis.errors import ConfigError
from dnis.models.base import Model
from dnis.models.layers import MLP, LinearTerms
from dnis.models.registry import register_model


class InteractingLayer(nn.Module):
    """One multi-head self-attention layer over fields: [B, F, in_dim] -> [B, F, heads * d'].

    All heads and fields are computed at once: one projection gives Q, K and V of every head, one
    `scaled_dot_product_attention` call attends over fields.
    """

    def __init__(
        self,
        in_dim: int,
        attention_dim: int,
        num_heads: int,
        residual: bool = True,
        scale_attention: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_dim = attention_dim
        self.out_dim = num_heads * attention_dim
        # W_Q, W_K, W_V of every head as one bias-free map (the paper's equations have no bias)
        self.qkv = nn.Linear(in_dim, 3 * self.out_dim, bias=False)
        self.residual = nn.Linear(in_dim, self.out_dim, bias=False) if residual else None
        # the paper's psi is the plain inner product; 1/sqrt(d') scaling is optional
        self.scale = None if scale_attention else 1.0
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, fields, _ = x.shape
        qkv = self.qkv(x).view(batch, fields, 3, self.num_heads, self.attention_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, F, d']
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        out = attended.transpose(1, 2).reshape(batch, fields, self.out_dim)
        if self.residual is not None:
            out = out + self.residual(x)
        return torch.relu(out)


@register_model("autoint")
class AutoInt(Model):
    """AutoInt (and AutoInt+ with `dnn_hidden`): self-attentive feature interactions.

    Consumes the padded view of mixed-width embeddings: every field vector has width d.
    """

    def __init__(
        self,
        schema: Schema,
        embedding: nn.Module,
        attention_dim: int = 32,  # d' per head; paper default 32
        num_heads: int = 2,  # paper default 2 heads
        num_layers: int = 3,  # paper default 3 interacting layers
        residual: bool = True,  # paper: residual connection with projection W_Res
        scale_attention: bool = False,  # paper: psi is the unscaled inner product
        attention_dropout: float = 0.0,  # dropout on attention weights (0 = off)
        dnn_hidden: Sequence[int] = (),  # AutoInt+ parallel DNN; () = plain AutoInt
        dnn_dropout: float = 0.0,
        use_linear: bool = False,  # add first-order terms (bias + one weight per id)
    ) -> None:
        super().__init__(schema, embedding)
        if attention_dim < 1 or num_heads < 1 or num_layers < 0:
            raise ConfigError("autoint: attention_dim and num_heads must be >= 1, num_layers >= 0")
        layers = []
        width = self.dim
        for _ in range(num_layers):
            layer = InteractingLayer(
                width, attention_dim, num_heads, residual, scale_attention, attention_dropout
            )
            layers.append(layer)
            width = layer.out_dim
        self.interacting = nn.ModuleList(layers)
        self.output = nn.Linear(self.num_fields * width, 1)
        self.dnn = (
            MLP(self.num_fields * self.dim, tuple(dnn_hidden), out_dim=1, dropout=dnn_dropout)
            if len(dnn_hidden)
            else None
        )
        self.linear = LinearTerms(embedding.layout) if use_linear else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fields = self.embedding(ids)  # [B, F, d]
        x = fields
        for layer in self.interacting:
            x = layer(x)
        score = self.output(x.flatten(1)).squeeze(1)
        if self.dnn is not None:
            score = score + self.dnn(fields.flatten(1)).squeeze(1)
        if self.linear is not None:
            score = score + self.linear(ids)
        return score
