"""DIN and ARM-Net around any input layer, and MovieLens's user-history feature for DIN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import dnis
from dnis.data.dataset import EncodedDataset, build_dataset
from dnis.data.movielens import BUNDLED, _ratings, load_latest_small, user_history
from dnis.data.readers import read_csv
from dnis.data.schema import FeatureSpec, Schema
from dnis.data.synthetic import load_synthetic
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.errors import ConfigError
from dnis.models.armnet import ARMNet, entmax
from dnis.models.din import DIN, Dice
from dnis.search.dnis import DnisConfig
from dnis.tasks import make_task
from dnis.train.trainer import TrainConfig, Trainer

SMALL_DIN = {"attention_hidden": (32,), "hidden": (32,)}
SMALL_ARM = {"num_heads": 2, "exp_neurons": 8, "hidden": (32,)}


# --------------------------------------------------------------------------- data


def behaviour_frame(n_rows: int = 8000, seed: int = 0) -> pd.DataFrame:
    """Candidate item, a 5-item history, a noise field; clicked iff the item is in the history."""
    rng = np.random.default_rng(seed)
    vocab = 30
    history = np.argsort(rng.random((n_rows, vocab)), axis=1)[:, :5]  # 5 distinct items
    lengths = rng.integers(1, 6, n_rows)  # 1..5 real items, the rest padding
    from_history = rng.random(n_rows) < 0.5
    pick = history[np.arange(n_rows), rng.integers(0, lengths)]
    item = np.where(from_history, pick, rng.integers(0, vocab, n_rows))
    inside = (history == item[:, None]) & (np.arange(5)[None, :] < lengths[:, None])
    label = inside.any(axis=1)
    label = np.where(rng.random(n_rows) < 0.05, ~label, label)  # a little label noise
    seqs = ["|".join(f"i{v}" for v in row[:k]) for row, k in zip(history, lengths, strict=True)]
    return pd.DataFrame(
        {
            "item": [f"i{v}" for v in item],
            "seen": seqs,
            "noise": rng.integers(0, 10, n_rows).astype(str),
            "label": label.astype(np.float32),
        }
    )


BEHAVIOUR_SCHEMA = Schema(
    features=(
        FeatureSpec("item"),
        FeatureSpec("history", kind="sequence", max_len=5, column="seen"),
        FeatureSpec("noise"),
    ),
    label="label",
)


@pytest.fixture(scope="module")
def behaviour() -> EncodedDataset:
    return build_dataset(behaviour_frame(), BEHAVIOUR_SCHEMA, "ctr", seed=0)


@pytest.fixture(scope="module")
def planted() -> EncodedDataset:
    return load_synthetic(task="ctr", n_rows=6000, ranks=(4, 2), noise_fields=1, vocab=50)


@pytest.fixture(scope="module")
def latest_history() -> EncodedDataset:
    return load_latest_small(task="ctr", history_len=5)


def fused(ds: EncodedDataset, dim: int = 8, seed: int = 0) -> FusedEmbedding:
    torch.manual_seed(seed)
    return FusedEmbedding(FieldLayout.from_dataset(ds), dim, init_std=0.1)


def train_auc(model: nn.Module, ds: EncodedDataset, epochs: int, lr: float = 3e-3) -> float:
    task = make_task(ds)
    config = TrainConfig(epochs=epochs, batch_size=256, lr=lr, patience=0)
    Trainer(model, task, config).fit()
    return task.evaluate(model, "test")["auc"]


# --------------------------------------------------------------------------- history feature


def brute_force_history(frame: pd.DataFrame, row: int, length: int) -> list[str]:
    """Items `row`'s user rated strictly before it, by (timestamp, file row), latest first."""
    user, stamp = frame["user"].iloc[row], frame["timestamp"].iloc[row]
    earlier = [
        (int(frame["timestamp"].iloc[j]), j)
        for j in np.flatnonzero(frame["user"].to_numpy() == user)
        if (int(frame["timestamp"].iloc[j]), j) < (int(stamp), row)
    ]
    earlier.sort(reverse=True)
    return [str(frame["item"].iloc[j]) for _, j in earlier[:length]]


def test_user_history_handmade_ties_and_order() -> None:
    frame = pd.DataFrame(
        {
            "user": [1, 2, 1, 1, 2, 1],
            "item": [10, 20, 11, 12, 21, 13],
            "timestamp": [5, 1, 3, 5, 0, 9],
        }
    )
    got = [[v for v in h if v is not None] for h in user_history(frame, 2)]
    # user 1 in (timestamp, row) order: row 2 (t3) -> row 0 (t5) -> row 3 (t5, later row) -> row 5
    assert got == [["11"], ["21"], [], ["10", "11"], [], ["12", "10"]]


def test_user_history_matches_brute_force_on_movielens() -> None:
    ratings = _ratings(
        read_csv(BUNDLED / "ratings.csv").rename(columns={"userId": "user", "movieId": "item"})
    )
    history = user_history(ratings, 20)
    assert len(history) == len(ratings) and history.index.equals(ratings.index)
    rng = np.random.default_rng(0)
    # random rows plus rows whose (user, timestamp) is shared with another rating (ties)
    tied = np.flatnonzero(ratings.duplicated(["user", "timestamp"], keep=False).to_numpy())
    rows = np.concatenate([rng.choice(len(ratings), 12, replace=False), tied[:4]])
    stamps = ratings["timestamp"].to_numpy()
    for row in rows:
        got = [v for v in history.iloc[row] if v is not None]
        assert got == brute_force_history(ratings, int(row), 20), row
        same_user = ratings["user"].to_numpy() == ratings["user"].iloc[row]
        later = ratings["item"].astype(str).to_numpy()[same_user & (stamps > stamps[row])]
        assert str(ratings["item"].iloc[row]) not in got and not set(later) & set(got)


def test_movielens_history_field(latest_history: EncodedDataset) -> None:
    ds = latest_history
    assert ds.schema.names[-1] == "history"
    spec = ds.schema["history"]
    assert spec.kind == "sequence" and spec.max_len == 5
    ids = ds.train.ids
    history = ids[:, ds.schema.slot_range("history")]
    assert (history[:, 0] > 0).float().mean() > 0.95  # most ratings have a previous one
    # each user rates a movie once, so no history holds the rating's own item
    item_vocab = np.array([""] + ds.encoder.fields[ds.schema.index("item")].vocabulary)
    history_vocab = np.array([""] + ds.encoder.fields[ds.schema.index("history")].vocabulary)
    items = item_vocab[ids[:, ds.schema.index("item")].numpy()]
    names = history_vocab[history.numpy()]
    known = items != ""
    assert not ((names == items[:, None]) & known[:, None]).any()


def test_movielens_history_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="history_len"):
        load_latest_small(task="ctr", history_length=5)
    with pytest.raises(ConfigError, match="positive integer"):
        load_latest_small(task="ctr", history_len=0)
    # the rating task has no history field; ctr keeps its fields when the option is absent
    assert load_latest_small(task="rating", history_len=5).schema.names == ["user", "item"]
    # a tiny folder in the ML-1M layout, through the registry (which checks options)
    ratings = "".join(
        f"{1 + i % 4}::{1 + i % 7}::{1 + i % 5}::{978300000 + i}\n" for i in range(40)
    )
    (tmp_path / "ratings.dat").write_text(ratings)
    (tmp_path / "movies.dat").write_text("".join(f"{m}::M{m} (1999)::Drama\n" for m in range(1, 8)))
    users = "".join(f"{u}::{'MF'[u % 2]}::25::{u}::{u}2345\n" for u in range(1, 5))
    (tmp_path / "users.dat").write_text(users)
    ds = dnis.data.load("movielens-1m", task="ctr", path=tmp_path, history_len=3)
    assert ds.schema.names[-1] == "history" and ds.schema["history"].max_len == 3


# --------------------------------------------------------------------------- DIN


def test_dice_formula_and_batch_of_one() -> None:
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.fill_(0.25)
    s = torch.tensor([[1.0, -2.0, 0.5]])
    dice.eval()
    p = torch.sigmoid(s / np.sqrt(1 + 1e-8))
    assert torch.allclose(dice(s), p * s + (1 - p) * 0.25 * s)
    dice.train()
    assert torch.isfinite(dice(s)).all()  # a batch of one falls back to the running statistics
    before = dice.running_mean.clone()
    dice(torch.randn(16, 3) + 5)
    assert (dice.running_mean > before).all()


def test_din_shapes_gradients(behaviour: EncodedDataset) -> None:
    model = DIN(behaviour.schema, fused(behaviour), **SMALL_DIN)
    ids, labels = behaviour.train.ids[:64], behaviour.train.labels[:64]
    assert (ids[:, behaviour.schema.slot_range("history")] == 0).any()  # padding present
    out = model(ids)
    assert out.shape == (64,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    nn.functional.binary_cross_entropy_with_logits(out, labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    grad = model.embedding.weight.grad.abs().sum(dim=1)
    history_rows = slice(behaviour.cardinalities[0], sum(behaviour.cardinalities[:2]))
    assert grad[history_rows][1:].sum() > 0  # real history rows get gradient
    assert grad[history_rows][0] == 0  # the padding row does not


@pytest.mark.parametrize("training", [False, True])
def test_din_ignores_padding_rows(behaviour: EncodedDataset, training: bool) -> None:
    model = DIN(behaviour.schema, fused(behaviour), **SMALL_DIN).train(training)
    ids = behaviour.train.ids[:128]
    with torch.no_grad():
        before = model(ids)
        pad = behaviour.cardinalities[0]  # row of the history field's id 0
        model.embedding.weight[pad] = torch.randn(8) * 100
        after = model(ids)
    assert torch.equal(before, after)


def test_din_history_changes_the_output(behaviour: EncodedDataset) -> None:
    model = DIN(behaviour.schema, fused(behaviour), **SMALL_DIN).eval()
    ids = behaviour.train.ids[:32].clone()
    slots = behaviour.schema.slot_range("history")
    other = ids.clone()
    other[:, slots] = torch.roll(ids[:, slots], 1, dims=0)
    other[:, slots.start] = (ids[:, slots.start] % 29) + 1  # at least the first item differs
    with torch.no_grad():
        assert not torch.allclose(model(ids), model(other))
    # no real history at all: the attention output is zero, the model still scores
    empty = ids.clone()
    empty[:, slots] = 0
    with torch.no_grad():
        assert torch.isfinite(model(empty)).all()
        assert torch.allclose(model.attend(empty, torch.randn(32, 8)), torch.zeros(32, 8))


def test_din_activations_and_errors(behaviour: EncodedDataset, ctr_data) -> None:
    for act in ("prelu", "relu"):
        model = DIN(behaviour.schema, fused(behaviour), attention_activation=act, activation=act)
        assert torch.isfinite(model(behaviour.train.ids[:8])).all()
    with pytest.raises(ConfigError, match="history_len"):
        DIN(ctr_data.schema, fused(ctr_data), item_field=ctr_data.schema.names[0])
    with pytest.raises(ConfigError, match="item_field='movie'"):
        DIN(behaviour.schema, fused(behaviour), item_field="movie")
    with pytest.raises(ConfigError, match="must be a sequence"):
        DIN(behaviour.schema, fused(behaviour), history_field="noise")
    with pytest.raises(ConfigError, match="activation"):
        DIN(behaviour.schema, fused(behaviour), activation="gelu")


def test_din_learns_membership_in_history(behaviour: EncodedDataset) -> None:
    model = DIN(behaviour.schema, fused(behaviour), **SMALL_DIN)
    # 0.88-0.93 over five initialisations; the threshold leaves room
    assert train_auc(model, behaviour, epochs=6, lr=1e-2) > 0.7


def test_din_on_movielens_with_history(latest_history: EncodedDataset) -> None:
    model = DIN(latest_history.schema, fused(latest_history, dim=8)).eval()
    with torch.no_grad():
        out = model(latest_history.valid.ids[:256])
    assert out.shape == (256,) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- ARM-Net


def test_entmax_is_a_sparse_distribution() -> None:
    x = torch.tensor([[3.0, 1.0, 0.2, -1.0], [0.0, 0.0, 0.0, 0.0]])
    for alpha in (1.0, 1.5, 1.7, 2.0):
        p = entmax(x, alpha)
        assert torch.allclose(p.sum(-1), torch.ones(2)) and (p >= 0).all()
        assert torch.allclose(p[1], torch.full((4,), 0.25))
    assert (entmax(x, 2.0)[0] == 0).sum() >= 2  # sparsemax zeroes the small scores
    x64 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: entmax(t, 1.5, 80), (x64,))


@pytest.mark.parametrize("params", [{}, {"dnn_hidden": (8,)}, {"log_inputs": True}])
def test_armnet_shapes_gradients(planted: EncodedDataset, params: dict) -> None:
    model = ARMNet(planted.schema, fused(planted), **SMALL_ARM, **params)
    ids, labels = planted.train.ids[:64], planted.train.labels[:64]
    out = model(ids)
    assert out.shape == (64,) and torch.isfinite(out).all()
    nn.functional.binary_cross_entropy_with_logits(out, labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    assert torch.isfinite(model(ids[:1])).all()  # one row in inference


def test_armnet_sequence_field_and_errors(sequence_data: EncodedDataset) -> None:
    model = ARMNet(sequence_data.schema, fused(sequence_data, dim=4), **SMALL_ARM)
    assert torch.isfinite(model(sequence_data.train.ids[:16])).all()
    with pytest.raises(ConfigError, match="alpha"):
        ARMNet(sequence_data.schema, fused(sequence_data), alpha=0.5)


def test_armnet_learns_planted_signal(planted: EncodedDataset) -> None:
    model = ARMNet(planted.schema, fused(planted), **SMALL_ARM)
    assert train_auc(model, planted, epochs=4) > 0.65  # 0.73-0.74 over three initialisations


# --------------------------------------------------------------------------- DNIS end to end


@pytest.mark.parametrize("name", ["din", "armnet"])
def test_dnis_end_to_end(name: str, behaviour: EncodedDataset, planted: EncodedDataset) -> None:
    ds, make = (
        (behaviour, lambda emb: DIN(ds.schema, emb, **SMALL_DIN))
        if name == "din"
        else (planted, lambda emb: ARMNet(ds.schema, emb, **SMALL_ARM))
    )
    result = dnis.search.dnis(
        make,
        ds,
        dim=8,
        budget=0.3,
        config=DnisConfig(num_blocks=2, warmup_epochs=0, search_epochs=1),
        train=TrainConfig(epochs=1, batch_size=512),
    )
    auc = result.metrics["test"]["auc"]
    assert np.isfinite(auc) and 0.0 <= auc <= 1.0
    assert result.embedding_params < 0.31 * sum(ds.cardinalities) * 8
