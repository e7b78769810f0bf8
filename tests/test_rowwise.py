"""RowwiseAdam (`train.optimizer: sparse_adam`) against `torch.optim.SparseAdam`, the sparse
lookup's per-row gradient sums, and `last_l2` taken only when read."""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn import functional

from dnis.data.dataset import EncodedDataset
from dnis.data.synthetic import load_synthetic
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.embeddings.fused import _SparseRowsLookup
from dnis.models import build
from dnis.tasks import make_task
from dnis.train import TrainConfig, Trainer
from dnis.train.rowwise import RowwiseAdam

ROWS, WIDTH = 40, 4


def tables(seed: int = 0) -> list[torch.nn.Parameter]:
    """A width-4 table and a width-1 table (the embedding's and the linear terms' shapes)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(ROWS, WIDTH, generator=generator)),
        torch.nn.Parameter(torch.randn(ROWS, 1, generator=generator)),
    ]


def groups(params: list[torch.nn.Parameter]) -> list[dict]:
    """Two groups with their own hyper-parameters."""
    return [
        {"params": [params[0]], "lr": 0.05},
        {"params": [params[1]], "lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6},
    ]


def batch_ids(step: int) -> torch.Tensor:
    """[batch, 3] ids with many repeats; rows 30-39 only in every third step, step 4 empty."""
    if step == 4:
        return torch.zeros(0, 3, dtype=torch.long)
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 12, (64, 3), generator=generator) ** 2 % 30  # skewed, repeated
    if step % 3 == 0:
        ids[:5, 2] = torch.randint(30, ROWS, (5,), generator=generator)
    return ids


def backward(params: list[torch.nn.Parameter], step: int, source: str) -> None:
    """Sparse gradients of both tables for the step's ids (step 2: the width-1 table unused, so
    its gradient is None). `lookup` gives FusedEmbedding's gradient (distinct, sorted rows),
    `embedding` torch's sparse embedding gradient (one row per slot, repeated, unsorted)."""
    ids = batch_ids(step)
    for p in params:
        p.grad = None
    loss = torch.zeros(())
    for k, p in enumerate(params):
        if step == 2 and k == 1:
            continue
        if source == "lookup":
            vectors = _SparseRowsLookup.apply(p, ids)  # FusedEmbedding's sparse lookup
        else:
            vectors = functional.embedding(ids, p, sparse=True)
        weights = torch.linspace(-1.0, 2.0, 3 * p.shape[1]).reshape(3, p.shape[1])
        loss = loss + (vectors * weights).sin().sum()
    loss.backward()


def saved_and_loaded(state: dict) -> dict:
    """An optimizer state through a checkpoint file, read as the trainer reads them."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same(ours: torch.optim.Optimizer, reference: torch.optim.Optimizer) -> None:
    """Parameters, moments and step counts equal to float tolerance."""
    ours_params = [p for g in ours.param_groups for p in g["params"]]
    ref_params = [p for g in reference.param_groups for p in g["params"]]
    for a, b in zip(ours_params, ref_params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
        sa, sb = ours.state[a], reference.state[b]
        assert set(sa) == set(sb)
        if sa:
            assert sa["step"] == sb["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("source", ["lookup", "embedding"])
@pytest.mark.parametrize("maximize", [False, True])
def test_rowwise_adam_equals_sparse_adam_through_a_checkpoint(source: str, maximize: bool) -> None:
    """Eight steps with repeated ids, rows absent for steps, a table without gradient in one step
    and an empty batch in another; after step 3 the state goes through a checkpoint and a fresh
    RowwiseAdam on a fresh copy of the tables resumes from it, against SparseAdam uninterrupted."""
    ours, reference = tables(), tables()
    opt = RowwiseAdam(groups(ours), maximize=maximize)
    ref = torch.optim.SparseAdam(groups(reference), maximize=maximize)
    start = [p.detach().clone() for p in ours]
    for step in range(8):
        if step == 4:  # resume: new tables holding the weights, a new optimizer, the saved state
            state = saved_and_loaded(opt.state_dict())
            ours = [torch.nn.Parameter(p.detach().clone()) for p in ours]
            opt = RowwiseAdam(groups(ours), maximize=maximize)
            opt.load_state_dict(state)
        backward(ours, step, source)
        backward(reference, step, source)
        opt.step()
        ref.step()
        assert_same(opt, ref)
    assert opt.state[ours[0]]["step"] == 8 and opt.state[ours[1]]["step"] == 7  # None in step 2
    moved = (ours[0].detach() != start[0]).any(dim=1)
    touched = torch.zeros(ROWS, dtype=torch.bool)
    touched[torch.cat([batch_ids(step).reshape(-1) for step in range(8)])] = True
    assert torch.equal(moved, touched) and not touched.all()  # rows never in a batch stay


def test_rowwise_and_sparse_adam_load_each_others_state() -> None:
    """The same state_dict layout: a run checkpointed under SparseAdam resumes under RowwiseAdam
    (and back) and continues as SparseAdam would."""
    ours, reference = tables(), tables()
    ref = torch.optim.SparseAdam(groups(reference))
    for step in range(3):
        backward(reference, step, "embedding")
        ref.step()
    with torch.no_grad():
        for a, b in zip(ours, reference, strict=True):
            a.copy_(b)
    opt = RowwiseAdam(groups(ours))
    opt.load_state_dict(saved_and_loaded(ref.state_dict()))
    back = torch.optim.SparseAdam(groups(tables()))
    back.load_state_dict(saved_and_loaded(opt.state_dict()))
    assert back.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    for step in range(3, 6):
        backward(ours, step, "lookup")
        backward(reference, step, "lookup")
        opt.step()
        ref.step()
        assert_same(opt, ref)


def test_rowwise_adam_refuses_what_sparse_adam_refuses() -> None:
    table = torch.nn.Parameter(torch.randn(5, 2))
    with pytest.raises(ValueError, match="learning rate"):
        RowwiseAdam([table], lr=0.0)
    with pytest.raises(ValueError, match="beta"):
        RowwiseAdam([table], betas=(0.9, 1.0))
    opt = RowwiseAdam([table])
    table.grad = torch.ones(5, 2)
    with pytest.raises(RuntimeError, match="dense gradients"):
        opt.step()
    table.grad = torch.ones(5, 2).to_sparse()  # element-sparse, not row-sparse
    with pytest.raises(RuntimeError, match="row-sparse"):
        opt.step()


@pytest.fixture(scope="module")
def ctr() -> EncodedDataset:
    return load_synthetic(task="ctr", n_rows=3000, vocab=200, seed=3)


def deepfm(dataset: EncodedDataset):
    torch.manual_seed(0)
    embedding = FusedEmbedding(FieldLayout.from_dataset(dataset), 8, init_std=0.05)
    return build("deepfm", dataset.schema, embedding, hidden=(16,))


def test_trainer_sparse_adam_equals_torch_sparse_adam(ctr: EncodedDataset) -> None:
    """Two epochs of `train.optimizer: sparse_adam` give the weights that torch's SparseAdam in
    RowwiseAdam's place gives (the optimizer the option used before)."""
    config = TrainConfig(optimizer="sparse_adam", batch_size=256, lr=0.01, embedding_l2=1e-4)
    states = []
    for swap in (False, True):
        model = deepfm(ctr)
        trainer = Trainer(model, make_task(ctr), config)
        assert isinstance(trainer.optimizer.sparse, RowwiseAdam)
        if swap:
            params = trainer.optimizer.sparse.param_groups[0]["params"]
            trainer.optimizer.sparse = torch.optim.SparseAdam(params, lr=config.lr)
        for epoch in (1, 2):
            trainer.train_epoch(epoch)
        states.append(model.state_dict())
    for key, value in states[0].items():
        torch.testing.assert_close(value, states[1][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("dim", [1, 5])
def test_sparse_lookup_sums_each_rows_slots_in_slot_order(dim: int) -> None:
    """The per-row sums equal an `index_add_` over the slots in their order, bit for bit."""
    layout = FieldLayout(("a", "b", "c"), (50, 20, 9), (0, 1, 2), (False,) * 3, (False,) * 3)
    table = FusedEmbedding(layout, dim, sparse=True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, n, (500,), generator=generator) for n in (50, 20, 9)])
    ids = ids.T.contiguous() // torch.tensor([5, 2, 1])  # skewed: many repeats
    weights = torch.randn(500, 3, dim, generator=generator)
    (table(ids) * weights).sum().backward()
    rows = (ids + table.slot_offsets).reshape(-1)
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    expected = torch.zeros(len(unique), dim).index_add_(0, inverse, weights.reshape(-1, dim))
    grad = table.weight.grad
    assert torch.equal(grad._indices()[0], unique)
    assert torch.equal(grad._values(), expected)


# ----------------------------------------------------------------------------------- last_l2


def eager_l2(embedding, ids: torch.Tensor) -> torch.Tensor:
    vectors = embedding.lookup(ids + embedding.slot_offsets)
    weights = embedding.pooling.slot_weights(ids, vectors.dtype)
    squared = vectors.pow(2).sum(dim=-1)
    if weights is not None:
        squared = squared * weights
    return squared.sum() / ids.shape[0]


@pytest.mark.parametrize("data", ["ctr", "sequence_data"])
def test_last_l2_is_taken_when_read(data: str, ctr: EncodedDataset, request) -> None:
    dataset = ctr if data == "ctr" else request.getfixturevalue("sequence_data")
    embedding = FusedEmbedding(FieldLayout.from_dataset(dataset), 4, init_std=0.3)
    ids = dataset.train.ids[:50]
    embedding.train()
    fields = embedding(ids)
    l2 = embedding.last_l2
    torch.testing.assert_close(l2, eager_l2(embedding, ids))
    assert embedding.last_l2 is l2  # computed once
    (fields.sum() + l2).backward()  # differentiable, with the lookup's graph
    assert embedding.weight.grad is not None
    embedding.eval()
    embedding(ids)
    assert embedding.last_l2 is l2  # evaluation leaves it
    if data == "ctr":  # without sequences the field vectors are the looked-up vectors
        embedding.train()
        fields = embedding(ids)
        fields.mul_(2.0)  # changed in place before the read: refused, not taken on other values
        with pytest.raises(RuntimeError, match="in place"):
            embedding.last_l2  # noqa: B018


@pytest.mark.parametrize("l2", [0.0, 1e-3])
def test_trainer_takes_last_l2_only_with_embedding_l2(ctr: EncodedDataset, l2: float) -> None:
    model = deepfm(ctr)
    config = TrainConfig(optimizer="sparse_adam", batch_size=512, lr=0.01, embedding_l2=l2)
    trainer = Trainer(model, make_task(ctr), config)
    trainer.train_epoch(1)
    taken = model.embedding._l2_of is None  # read (and so computed) in the last step
    assert taken == (l2 > 0)
