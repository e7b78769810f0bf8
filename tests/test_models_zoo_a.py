"""AutoInt, DCN-V2 and FGCNN: shapes, gradients, sequence fields, learning, and DNIS end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dnis.data.dataset import EncodedDataset
from dnis.data.synthetic import load_synthetic
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding
from dnis.errors import ConfigError
from dnis.models import MODELS
from dnis.models.autoint import AutoInt
from dnis.models.dcn import CrossNetV2, DCNv2
from dnis.models.fgcnn import FGCNN, FeatureGeneration, pairwise_inner_products
from dnis.search import dnis, materialize, search
from dnis.search.dnis import DnisConfig
from dnis.search.prune import block_saliency, budget_params, prune_blocks, prune_elements
from dnis.tasks import make_task
from dnis.tasks.base import predict
from dnis.train import TrainConfig, Trainer

# small variants of every model (and of each option), so the whole file runs in seconds
VARIANTS: dict[str, tuple[type[nn.Module], dict]] = {
    "autoint": (AutoInt, {"attention_dim": 8, "num_layers": 2}),
    "autoint+": (
        AutoInt,
        {"attention_dim": 4, "num_layers": 1, "dnn_hidden": (16,), "use_linear": True},
    ),
    "dcnv2-stacked": (DCNv2, {"hidden": (32, 16)}),
    "dcnv2-parallel-lowrank": (DCNv2, {"structure": "parallel", "low_rank": 4, "hidden": (32,)}),
    "fgcnn": (FGCNN, {"hidden": (32,)}),  # the paper's conv stages, clamped to 5 fields
    "fgcnn-small": (
        FGCNN,
        {
            "channels": (4, 6),
            "kernel_heights": (3, 2),
            "pooling_sizes": (2, 3),
            "recombined_channels": (2, 1),
            "hidden": (32,),
        },
    ),
}
# one small variant per model for the slower (training) tests
LEARNERS = ("autoint", "dcnv2-parallel-lowrank", "fgcnn")


def make(dataset: EncodedDataset, variant: str, dim: int = 8, seed: int = 0, embedding=None):
    cls, params = VARIANTS[variant]
    torch.manual_seed(seed)
    if embedding is None:
        embedding = FusedEmbedding(FieldLayout.from_dataset(dataset), dim, init_std=0.1)
    return cls(dataset.schema, embedding, **params)


@pytest.fixture(scope="module")
def planted() -> EncodedDataset:
    return load_synthetic(task="ctr", n_rows=6000, ranks=(4, 2), noise_fields=1, vocab=50)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shape_finite_and_gradients(variant: str, ctr_data: EncodedDataset) -> None:
    model = make(ctr_data, variant, dim=6)
    ids = ctr_data.train.ids[:64]
    out = model(ids)
    assert out.shape == (64,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    loss = nn.functional.binary_cross_entropy_with_logits(out, ctr_data.train.labels[:64])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{variant}: {name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{variant}: {name} got an all-zero gradient"
    assert model.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_models_work_with_a_sequence_field(variant: str, sequence_data: EncodedDataset) -> None:
    layout = FieldLayout.from_dataset(sequence_data)
    assert layout.has_sequences
    model = make(sequence_data, variant, dim=4)
    ids = sequence_data.train.ids[:50]
    assert (ids[:, 2:5] == 0).any()  # some padding present
    out = model(ids)
    assert out.shape == (50,) and torch.isfinite(out).all()
    out.sum().backward()
    start = sum(sequence_data.cardinalities[:2])
    genres = model.embedding.weight.grad[start : start + sequence_data.cardinalities[2]]
    assert genres[1:].abs().sum() > 0  # the sequence field's real ids are trained
    assert torch.all(genres[0] == 0)  # its padding row never is


def test_models_read_only_through_the_embedding_interface(ctr_data: EncodedDataset) -> None:
    """A module with only `layout`, `dim` and `__call__` (no table) is enough to build on."""

    class Constant(nn.Module):
        def __init__(self, layout: FieldLayout, dim: int) -> None:
            super().__init__()
            self.layout, self.dim = layout, dim
            self.vector = nn.Parameter(torch.randn(layout.num_fields, dim))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.vector.expand(ids.shape[0], -1, -1)

    layout = FieldLayout.from_dataset(ctr_data)
    for variant in VARIANTS:
        model = make(ctr_data, variant, embedding=Constant(layout, 4))
        out = model(ctr_data.train.ids[:8])
        assert out.shape == (8,)
        out.sum().backward()
        assert model.embedding.vector.grad.abs().sum() > 0, variant


def test_cross_layer_formula_and_low_rank() -> None:
    torch.manual_seed(0)
    x0 = torch.randn(5, 6)
    cross = CrossNetV2(6, 2)
    expected = x0
    for layer in cross.layers:
        expected = x0 * (expected @ layer.weight.T + layer.bias) + expected
    torch.testing.assert_close(cross(x0), expected)
    low = CrossNetV2(6, 3, low_rank=2)
    assert sum(p.numel() for p in low.parameters()) == 3 * (6 * 2 + 2 * 6 + 6)
    # a zero entry of x0 stays zero through every layer (pruned dims stay pruned)
    x0[:, 1] = 0
    assert torch.all(low(x0)[:, 1] == 0)


def test_attention_is_vectorised_over_heads_and_matches_the_paper() -> None:
    """Head h of one interacting layer equals softmax(<W_Q e_m, W_K e_k>) W_V e_k, by hand."""
    from dnis.models.autoint import InteractingLayer

    torch.manual_seed(0)
    layer = InteractingLayer(in_dim=5, attention_dim=3, num_heads=2)
    x = torch.randn(4, 6, 5)
    wq, wk, wv = layer.qkv.weight.view(3, 2, 3, 5)  # [q/k/v, head, d', in]
    heads = []
    for h in range(2):
        q, k, v = x @ wq[h].T, x @ wk[h].T, x @ wv[h].T
        heads.append(torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v)
    expected = torch.relu(torch.cat(heads, dim=-1) + x @ layer.residual.weight.T)
    torch.testing.assert_close(layer(x), expected)


def test_fgcnn_generation_shapes_and_safe_pooling() -> None:
    # 3 fields: kernel 7 -> 3, pool 2 -> 1 row; later pools of 2 clamp to 1 (height never 0)
    gen = FeatureGeneration(3, 4, (14, 16, 18, 20), (7, 7, 7, 7), (2, 2, 2, 2), (3, 3, 3, 3))
    assert gen.counts == [3, 3, 3, 3]
    assert gen(torch.randn(2, 3, 4)).shape == (2, 12, 4)
    gen = FeatureGeneration(24, 4, (14, 16, 18, 20), (7, 7, 7, 7), (2, 2, 2, 2), (3, 3, 3, 3))
    assert gen.counts == [36, 18, 9, 3]  # Avazu-like: 24 -> 12 -> 6 -> 3 -> 1 rows
    one = FeatureGeneration(1, 4, (2,), (7,), (2,), (1,))
    assert one(torch.randn(2, 1, 4)).shape == (2, 1, 4)
    v = torch.randn(3, 4, 5)
    rows, cols = torch.triu_indices(4, 4, offset=1)
    products = pairwise_inner_products(v, rows * 4 + cols)
    assert products.shape == (3, 6)
    torch.testing.assert_close(products[:, 0], (v[:, 0] * v[:, 1]).sum(-1))
    torch.testing.assert_close(products[:, -1], (v[:, 2] * v[:, 3]).sum(-1))


def test_bad_hyper_parameters_are_refused(ctr_data: EncodedDataset) -> None:
    emb = FusedEmbedding(FieldLayout.from_dataset(ctr_data), 4)
    with pytest.raises(ConfigError, match="structure"):
        DCNv2(ctr_data.schema, emb, structure="serial")
    with pytest.raises(ConfigError, match="same length"):
        FGCNN(ctr_data.schema, emb, channels=(4, 4), kernel_heights=(3,))
    with pytest.raises(ConfigError):
        AutoInt(ctr_data.schema, emb, num_heads=0)


def test_defaults_follow_the_papers(ctr_data: EncodedDataset) -> None:
    emb = FusedEmbedding(FieldLayout.from_dataset(ctr_data), 4)
    auto = AutoInt(ctr_data.schema, emb)
    assert len(auto.interacting) == 3 and auto.interacting[0].num_heads == 2
    assert auto.interacting[0].attention_dim == 32 and auto.dnn is None and auto.linear is None
    dcn = DCNv2(ctr_data.schema, emb)
    assert len(dcn.cross.layers) == 3 and dcn.structure == "stacked"
    fgcnn = FGCNN(ctr_data.schema, emb, hidden=(8,))
    assert [c[1].out_channels for c in fgcnn.generation.convs] == [14, 16, 18, 20]


@pytest.mark.parametrize("key, cls", [("autoint", AutoInt), ("dcnv2", DCNv2), ("fgcnn", FGCNN)])
def test_registered_under_its_key(key: str, cls: type) -> None:
    if key not in MODELS:
        pytest.skip(f"{key!r} is not registered in dnis.models.MODELS yet")
    assert MODELS[key] is cls


@pytest.mark.parametrize("variant", LEARNERS)
def test_learns_a_planted_signal(variant: str, planted: EncodedDataset) -> None:
    model = make(planted, variant, dim=8)
    task = make_task(planted)
    config = TrainConfig(epochs=5, batch_size=256, lr=3e-3, patience=0)
    Trainer(model, task, config).fit()
    auc = task.evaluate(model, "test")["auc"]
    assert auc > 0.6, f"{variant}: test AUC {auc:.3f}"


SEARCH = DnisConfig(num_blocks=2, warmup_epochs=0, search_epochs=1, schedule="static")  # any budget
QUICK = TrainConfig(epochs=1, batch_size=512)


@pytest.mark.parametrize("variant", LEARNERS)
def test_dnis_runs_through_the_model(variant: str, planted: EncodedDataset) -> None:
    result = dnis(
        lambda emb: make(planted, variant, embedding=emb),
        planted,
        dim=8,
        budget=0.3,
        config=SEARCH,
        train=QUICK,
    )
    assert np.isfinite(result.metrics["test"]["auc"])
    assert isinstance(result.model.embedding, BlockMixedEmbedding)
    assert result.embedding_params <= budget_params(0.3, result.full_params)


@pytest.mark.parametrize("variant", LEARNERS)
def test_compact_embeddings_give_the_same_shapes_and_predictions(
    variant: str, planted: EncodedDataset
) -> None:
    """On BlockMixed / Ragged embeddings (padded to d) the model predicts like the masked soft one."""

    def factory(emb):
        return make(planted, variant, embedding=emb)

    state = search(factory, planted, dim=8, config=SEARCH, train=QUICK)
    ids = planted.valid.ids[:300]
    full_out = predict(state.model, ids)
    soft = state.embedding
    full = soft.weight.numel()
    dense = {k: v for k, v in state.model.state_dict().items() if not k.startswith("embedding.")}
    for granularity, cls in (("block", BlockMixedEmbedding), ("element", RaggedEmbedding)):
        compact = materialize(state, 0.3, DnisConfig(granularity=granularity))
        assert isinstance(compact, cls)
        assert compact(ids).shape == soft(ids).shape == (300, soft.layout.num_fields, 8)
        model = factory(compact)
        model.load_state_dict(dense, strict=False)
        got = predict(model, ids)
        assert got.shape == full_out.shape and torch.isfinite(got).all()
        saved = soft.state_dict()
        with torch.no_grad():
            if granularity == "block":
                saliency = block_saliency(soft.selected_weight(), state.blocks)
                keep = prune_blocks(soft.alpha, state.blocks, budget_params(0.3, full), saliency)
                soft.alpha.mul_(keep)
            else:
                keep = prune_elements(soft.selected_weight(), soft.layout, budget_params(0.3, full))
                soft.weight.mul_(keep)
        expected = predict(state.model, ids)
        soft.load_state_dict(saved)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
