"""FGCNN (Liu et al., "Feature Generation by Convolutional Neural Network for Click-Through Rate
Prediction", WWW 2019).

Feature generation: the field-embedding matrix [F, d] is an image of height F (fields) and width
d, one channel. Each of the stages i applies a (k_i x 1) convolution along the field axis ("same"
padding, tanh), a (p_i x 1) max pooling, and a recombination layer: a fully connected tanh layer
from the pooled maps [c_i, h_i, d] to r_i * h_i new feature vectors of width d. The next stage
convolves the pooled maps (not the recombined features).
Deep classifier (IPNN-style): raw field vectors and all generated vectors (N in total) give the
N (N - 1) / 2 pairwise inner products; those and the flattened vectors feed a ReLU MLP.

Small field counts: a kernel taller than the current height is clamped to the height, and a pool
taller than the height is clamped too (so the height never drops below 1).

Deviation from the paper, on purpose: the paper gives feature generation its own embedding table;
here both parts read the same field vectors, so the model has one searchable input layer (as in
NeuMF here).

Input layer: the model reads `embedding(ids) -> [B, F, d]` only. Mixed-width results of a search
arrive padded to width d with zeros at pruned dims; the (k x 1) kernels act on each embedding dim
independently, so the matrix keeps its [F, d] shape.
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


class FeatureGeneration(nn.Module):
    """CNN + recombination: field vectors [B, F, d] -> new feature vectors [B, num_new, d]."""

    def __init__(
        self,
        num_fields: int,
        dim: int,
        channels: Sequence[int],
        kernel_heights: Sequence[int],
        pooling_sizes: Sequence[int],
        recombined_channels: Sequence[int],
    ) -> None:
        super().__init__()
        self.dim = dim
        self.convs = nn.ModuleList()
        self.recombine = nn.ModuleList()
        self.counts: list[int] = []  # new feature vectors of each stage
        height, in_channels = num_fields, 1
        for out_channels, kernel, pool, recombined in zip(
            channels, kernel_heights, pooling_sizes, recombined_channels, strict=True
        ):
            kernel, pool = min(kernel, height), min(pool, height)
            pooled = height // pool
            self.convs.append(
                nn.Sequential(
                    # "same" padding along fields (an even kernel pads one more row below)
                    nn.ZeroPad2d((0, 0, (kernel - 1) // 2, kernel // 2)),
                    nn.Conv2d(in_channels, out_channels, (kernel, 1)),
                    nn.Tanh(),
                    nn.MaxPool2d((pool, 1)),
                )
            )
            self.recombine.append(
                nn.Sequential(
                    nn.Linear(out_channels * pooled * dim, recombined * pooled * dim), nn.Tanh()
                )
            )
            self.counts.append(recombined * pooled)
            height, in_channels = pooled, out_channels
        self.num_new = sum(self.counts)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        batch = fields.shape[0]
        x = fields.unsqueeze(1)  # [B, 1, F, d]
        new = []
        for conv, recombine, count in zip(self.convs, self.recombine, self.counts, strict=True):
            x = conv(x)  # [B, c_i, h_i, d]
            new.append(recombine(x.flatten(1)).view(batch, count, self.dim))
        return torch.cat(new, dim=1) if new else fields.new_zeros(batch, 0, self.dim)


def pairwise_inner_products(vectors: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """<v_i, v_j> for the pairs i < j of vectors [B, N, d] -> [B, P]; `pairs` = flat i * N + j.

    The pairs are a fixed buffer (not `triu_indices` per call) so the graph exports to ONNX.
    """
    gram = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, N, N]
    return gram.flatten(1).index_select(1, pairs)


@register_model("fgcnn")
class FGCNN(Model):
    """Feature generation by CNN, then an IPNN classifier over raw + generated features.

    Consumes the padded view of mixed-width embeddings: every field vector has width d.
    """

    def __init__(
        self,
        schema: Schema,
        embedding: nn.Module,
        channels: Sequence[int] = (14, 16, 18, 20),  # paper (best setting on Avazu)
        kernel_heights: Sequence[int] = (7, 7, 7, 7),  # paper: 7 x 1 kernels
        pooling_sizes: Sequence[int] = (2, 2, 2, 2),  # paper: 2 x 1 max pooling
        recombined_channels: Sequence[int] = (3, 3, 3, 3),  # paper: 3 new maps per stage
        hidden: Sequence[int] = (4096, 2048, 1024, 512),  # IPNN MLP, as in FuxiCTR's FGCNN
        dropout: float = 0.0,
    ) -> None:
        super().__init__(schema, embedding)
        stages = (channels, kernel_heights, pooling_sizes, recombined_channels)
        if len({len(s) for s in stages}) != 1:
            raise ConfigError(
                "fgcnn: channels, kernel_heights, pooling_sizes and recombined_channels need "
                f"the same length, got {[len(s) for s in stages]}"
            )
        if any(v < 1 for s in stages for v in s):
            raise ConfigError("fgcnn: channels, kernel heights, pool sizes must all be >= 1")
        self.generation = FeatureGeneration(
            self.num_fields, self.dim, channels, kernel_heights, pooling_sizes, recombined_channels
        )
        n = self.num_fields + self.generation.num_new
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("pairs", rows * n + cols, persistent=False)
        self.mlp = MLP(n * self.dim + n * (n - 1) // 2, tuple(hidden), out_dim=1, dropout=dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fields = self.embedding(ids)  # [B, F, d]
        vectors = torch.cat([fields, self.generation(fields)], dim=1)  # [B, N, d]
        features = torch.cat(
            [vectors.flatten(1), pairwise_inner_products(vectors, self.pairs)], dim=1
        )
        return self.mlp(features).squeeze(1)
