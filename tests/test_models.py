"""Models built by name around an embedding they are given: shapes, gradients, FM maths, contract."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dnis.data.dataset import EncodedDataset
from dnis.embeddings import FieldLayout, FieldPooling, FusedEmbedding
from dnis.errors import ConfigError
from dnis.models import MODELS, build, model_params
from dnis.models.layers import fm_interaction
from dnis.registry import Registry

NAMES = ("mf", "bprmf", "neumf", "fm", "widedeep", "deepfm")
SMALL = {"neumf": {"hidden": (8, 4)}, "widedeep": {"hidden": (8,)}, "deepfm": {"hidden": (8, 4)}}


def params_for(name: str) -> dict:
    return dict(SMALL.get(name, {}))


def test_registry_has_every_model() -> None:
    assert set(NAMES) <= set(MODELS)
    assert MODELS["Wide&Deep"] is MODELS["widedeep"] and "DeepFM" in MODELS  # names are folded


def test_one_registry_registers_looks_up_suggests_and_iterates() -> None:
    things: Registry[object] = Registry("thing", normalize=str.lower, hint="(see the docs)")

    @things.register("Alpha")
    class Alpha:
        pass

    assert things.register("beta", 2) == 2
    assert things["ALPHA"] is Alpha and "alpha" in things and "gamma" not in things
    assert list(things) == ["alpha", "beta"] and len(things) == 2 and dict(things)["beta"] == 2
    assert things.get("gamma") is None
    with pytest.raises(
        ConfigError,
        match=r"unknown thing 'alpah'\. Did you mean 'alpha'\? Known: alpha, beta \(see",
    ):
        things["alpah"]
    loads: list[int] = []

    def load() -> None:  # the built-ins register on the first look, once
        loads.append(1)
        lazy.register("builtin", 1)

    lazy: Registry[int] = Registry("thing", load=load)
    assert not loads
    assert list(lazy) == ["builtin"] and lazy["builtin"] == 1 and loads == [1]


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_finite_and_gradients(
    name: str, ctr_data: EncodedDataset, make_model
) -> None:
    model = make_model(ctr_data, name, dim=6, **params_for(name))
    ids = ctr_data.train.ids[:64]
    out = model(ids)
    assert out.shape == (64,)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # a loss that depends on every output, with targets that are not what the model predicts
    loss = nn.functional.binary_cross_entropy_with_logits(out, ctr_data.train.labels[:64])
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} got an all-zero gradient"
    assert model.embedding.weight.grad is not None


@pytest.mark.parametrize("name", ["mf", "bprmf", "neumf"])
def test_user_item_models_read_only_two_fields(
    name: str, ctr_data: EncodedDataset, make_model
) -> None:
    """Without user/item roles in the schema, the first two fields are user and item."""
    model = make_model(ctr_data, name, dim=4, **params_for(name))
    model(ctr_data.train.ids[:64]).sum().backward()
    grad = model.embedding.weight.grad.abs().sum(dim=1)
    cards = ctr_data.cardinalities
    first_two = sum(cards[:2])
    assert grad[:first_two].sum() > 0
    assert torch.all(grad[first_two:] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_models_work_with_a_sequence_field(
    name: str, sequence_data: EncodedDataset, make_model
) -> None:
    layout = FieldLayout.from_dataset(sequence_data)
    assert layout.has_sequences
    assert sequence_data.train.ids.shape[1] == layout.num_slots == 1 + 1 + 3 + 1
    model = make_model(sequence_data, name, dim=4, **params_for(name))
    ids = sequence_data.train.ids[:50]
    assert (ids[:, 2:5] == 0).any()  # some padding present
    out = model(ids)
    assert out.shape == (50,) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.embedding.weight.grad is not None
    if name in ("fm", "widedeep", "deepfm"):
        genres = model.embedding.weight.grad[sum(sequence_data.cardinalities[:2]) :][
            : sequence_data.cardinalities[2]
        ]
        assert genres[1:].abs().sum() > 0  # the sequence field's real ids are trained
        assert torch.all(genres[0] == 0)  # its padding row never is


def test_build_refuses_unknown_hyper_parameter(ctr_data: EncodedDataset) -> None:
    emb = FusedEmbedding(FieldLayout.from_dataset(ctr_data), 4)
    with pytest.raises(ConfigError, match=r"(?i)did you mean 'hidden'"):
        build("deepfm", ctr_data.schema, emb, hiden=(8,))
    with pytest.raises(ConfigError, match="biased"):
        build("bprmf", ctr_data.schema, emb, biased=True)
    with pytest.raises(ConfigError, match=r"(?i)did you mean 'deepfm'"):
        build("deepfn", ctr_data.schema, emb)
    assert model_params("widedeep") == {"hidden": (400, 400, 400), "dropout": 0.0}


def test_fm_interaction_equals_brute_force_pairs() -> None:
    torch.manual_seed(0)
    fields = torch.randn(7, 5, 3, dtype=torch.float64)
    brute = torch.zeros(7, dtype=torch.float64)
    for i, j in itertools.combinations(range(5), 2):
        brute += (fields[:, i] * fields[:, j]).sum(dim=1)
    torch.testing.assert_close(fm_interaction(fields), brute)


def test_fm_interaction_gradient_equals_the_brute_force_pairs_gradient() -> None:
    torch.manual_seed(0)
    fields = torch.randn(7, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, dtype=torch.float64)
    (fm_interaction(fields) * weight).sum().backward()
    brute = fields.detach().clone().requires_grad_()
    pairs = sum(
        (brute[:, i] * brute[:, j]).sum(dim=1) for i, j in itertools.combinations(range(5), 2)
    )
    (pairs * weight).sum().backward()
    torch.testing.assert_close(fields.grad, brute.grad)
    assert torch.autograd.gradcheck(fm_interaction, (fields.detach().requires_grad_(),))


def test_fm_model_equals_its_formula(ctr_data: EncodedDataset, make_model) -> None:
    model = make_model(ctr_data, "fm", dim=5)
    with torch.no_grad():
        model.linear.weights.weight.normal_()
        model.linear.bias.fill_(0.3)
    ids = ctr_data.train.ids[:20]
    fields = model.embedding(ids).detach().double()
    layout = model.embedding.layout
    offsets = layout.slot_offsets()
    w = model.linear.weights.weight.detach().double()[:, 0]
    expected = []
    for b in range(len(ids)):
        value = 0.3 + sum(
            float(w[offsets[s] + ids[b, s]].detach()) for s in range(layout.num_slots)
        )
        for i, j in itertools.combinations(range(layout.num_fields), 2):
            value += float(fields[b, i] @ fields[b, j])
        expected.append(value)
    torch.testing.assert_close(model(ids).double(), torch.tensor(expected, dtype=torch.float64))


def test_mf_is_dot_product_plus_biases(ctr_data: EncodedDataset, make_model) -> None:
    model = make_model(ctr_data, "mf", dim=4)
    with torch.no_grad():
        model.linear.weights.weight.normal_()
        model.linear.bias.fill_(-0.2)
    ids = ctr_data.train.ids[:10]
    e = model.embedding.weight
    w = model.linear.weights.weight[:, 0]
    off = ctr_data.cardinalities[0]
    u, i = ids[:, 0], ids[:, 1] + off
    expected = (e[u] * e[i]).sum(1) + w[u] + w[i] - 0.2
    torch.testing.assert_close(model(ids), expected)
    bpr = make_model(ctr_data, "bprmf", dim=4)
    e = bpr.embedding.weight
    torch.testing.assert_close(bpr(ids), (e[u] * e[i]).sum(1))


class PerFieldEmbedding(nn.Module):
    """A different input layer with the same interface: one nn.Embedding per field."""

    def __init__(self, layout: FieldLayout, dim: int) -> None:
        super().__init__()
        self.layout = layout
        self.dim = dim
        self.tables = nn.ModuleList(nn.Embedding(c, dim) for c in layout.cardinalities)
        self.pooling = FieldPooling(layout)
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        slot_fields = self.layout.slot_fields
        vectors = torch.stack([self.tables[f](ids[:, s]) for s, f in enumerate(slot_fields)], dim=1)
        return self.pooling(vectors, self.pooling.slot_weights(ids, vectors.dtype))


@pytest.mark.parametrize("name", NAMES)
def test_a_foreign_embedding_module_replaces_fused(
    name: str, ctr_data: EncodedDataset, make_model
) -> None:
    fused_model = make_model(ctr_data, name, dim=4, **params_for(name))
    layout = FieldLayout.from_dataset(ctr_data)
    dummy = PerFieldEmbedding(layout, 4)
    other = build(name, ctr_data.schema, dummy, **params_for(name))
    # same weights everywhere: the dense part from the fused model, the tables from its slices
    dense = {k: v for k, v in fused_model.state_dict().items() if not k.startswith("embedding.")}
    missing, unexpected = other.load_state_dict(dense, strict=False)
    assert not unexpected
    assert all(k.startswith("embedding.") for k in missing)
    with torch.no_grad():
        for f, table in enumerate(dummy.tables):
            table.weight.copy_(fused_model.embedding.field_rows(f))
    fused_model.eval()
    other.eval()
    ids = ctr_data.test.ids[:32]
    out = other(ids)
    assert dummy.calls >= 1
    torch.testing.assert_close(out, fused_model(ids))
    out.sum().backward()
    assert any(t.weight.grad is not None and t.weight.grad.abs().sum() > 0 for t in dummy.tables)


def test_a_user_item_model_on_one_field_is_a_config_error():
    from dnis.data.synthetic import load_synthetic

    one = load_synthetic(task="rating", n_rows=300, ranks=(2,), noise_fields=0, vocab=10, seed=0)
    with pytest.raises(ConfigError, match="needs at least two fields"):
        build("mf", one.schema, FusedEmbedding(FieldLayout.from_dataset(one), 4))
