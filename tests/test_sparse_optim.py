"""Sparse-gradient optimizers: `train.optimizer: sparse_adam | adagrad`.

sparse_adam: the plain id tables (the model's FusedEmbedding and the linear terms' width-1 table)
look rows up sparsely and are updated by RowwiseAdam (SparseAdam's update; tests/test_rowwise.py
compares the two), every other weight by Adam; embeddings that cannot make sparse gradients fall
back to dense (Adam). Adagrad takes sparse gradients itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dnis.app.config import Config, parse
from dnis.app.train import train
from dnis.data.dataset import EncodedDataset
from dnis.data.synthetic import load_synthetic
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.mixed import BlockMixedEmbedding
from dnis.embeddings.soft_selection import SoftSelectionEmbedding
from dnis.errors import BudgetError, ConfigError, DnisError
from dnis.models import build
from dnis.search import methods
from dnis.search.methods import METHODS
from dnis.tasks import make_task
from dnis.train import Progress, TrainConfig, Trainer
from dnis.train.checkpoint import load_checkpoint
from dnis.train.rowwise import RowwiseAdam
from dnis.train.trainer import SparseDenseOptimizer, make_optimizer


class Killed(Exception):
    pass


class KillAfter(Progress):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_end(self, record: dict) -> None:
        if record["epoch"] == self.epoch:
            raise Killed(f"killed after epoch {self.epoch}")


@pytest.fixture(scope="module")
def fm_data() -> EncodedDataset:
    return load_synthetic(task="ctr", n_rows=8000, vocab=100, seed=1)


def model_on(dataset: EncodedDataset, name: str = "fm", embedding=None, **params):
    torch.manual_seed(0)
    embedding = embedding or FusedEmbedding(FieldLayout.from_dataset(dataset), 8, init_std=0.05)
    return build(name, dataset.schema, embedding, **params)


def one_step(model, dataset: EncodedDataset, config: TrainConfig):
    """Forward/backward of one training batch the way the trainer does it; returns the trainer."""
    trainer = Trainer(model, make_task(dataset), config)
    ids, labels = dataset.train.ids[:256], dataset.train.labels[:256]
    loss = trainer.task.loss(model, ids, labels, torch.Generator().manual_seed(0))
    loss = loss + config.embedding_l2 * model.embedding.last_l2
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return trainer, ids


def test_sparse_adam_reaches_adams_auc(fm_data: EncodedDataset) -> None:
    aucs = {}
    for name in ("adam", "sparse_adam"):
        model = model_on(fm_data)
        config = TrainConfig(epochs=4, batch_size=256, lr=0.01, patience=0)
        result = Trainer(model, make_task(fm_data), config).fit()
        aucs[name] = result.valid["auc"]
    assert aucs["adam"] > 0.6, aucs  # the data has signal, so the comparison means something
    assert abs(aucs["sparse_adam"] - aucs["adam"]) < 0.02, aucs


@pytest.mark.parametrize("optimizer", ["sparse_adam", "adagrad"])
def test_tables_get_sparse_gradients_of_the_batch_rows_only(
    fm_data: EncodedDataset, optimizer: str
) -> None:
    model = model_on(fm_data, "deepfm", hidden=(8,))
    config = TrainConfig(optimizer=optimizer, lr=0.01, embedding_l2=1e-3)
    trainer, ids = one_step(model, fm_data, config)
    table = model.embedding.weight
    assert table.grad is not None and table.grad.is_sparse
    assert model.linear.weights.weight.grad.is_sparse  # the width-1 linear-terms table too
    for name, p in model.named_parameters():
        if p is not table and p is not model.linear.weights.weight:
            assert not p.grad.is_sparse, name
    touched = set(table.grad.coalesce().indices()[0].tolist())
    assert touched == set((ids + model.embedding.slot_offsets).unique().tolist())
    before = table.detach().clone()
    trainer.optimizer.step()
    untouched = torch.ones(len(before), dtype=torch.bool)
    untouched[sorted(touched)] = False
    assert torch.equal(table.detach()[untouched], before[untouched])  # rows off the batch stay
    assert not torch.equal(table.detach()[~untouched], before[~untouched])


def test_sparse_lookup_gradient_equals_torchs_sparse_embedding() -> None:
    """Same values as `F.embedding(sparse=True)`, summed per distinct row already."""
    layout = FieldLayout(("a", "b"), (5, 7), (0, 1), (False, False), (False, False))
    torch.manual_seed(0)
    table = FusedEmbedding(layout, 3, init_std=0.5, sparse=True)
    ids = torch.tensor([[1, 2], [1, 6], [0, 2], [4, 2]])
    weights = torch.randn(4, 2, 3)
    (table(ids) * weights).sum().backward()
    ours = table.weight.grad
    reference = table.weight.detach().clone().requires_grad_()
    rows = ids + table.slot_offsets
    (torch.nn.functional.embedding(rows, reference, sparse=True) * weights).sum().backward()
    expected = reference.grad.coalesce()
    assert ours.is_sparse and ours._nnz() == expected._nnz() == 5  # one row per distinct id
    assert torch.equal(ours._indices(), expected.indices())  # sorted already
    torch.testing.assert_close(ours._values(), expected.values())
    with torch.no_grad():  # no gradient wanted: the plain gather
        torch.testing.assert_close(table(ids), torch.nn.functional.embedding(rows, reference))


def test_sparse_adam_splits_the_weights_between_two_optimizers(fm_data: EncodedDataset) -> None:
    model = model_on(fm_data, "deepfm", hidden=(8,))
    optimizer = make_optimizer(model, TrainConfig(optimizer="sparse_adam"))
    assert isinstance(optimizer, SparseDenseOptimizer)
    assert isinstance(optimizer.sparse, RowwiseAdam)
    assert isinstance(optimizer.dense, torch.optim.Adam)
    sparse = {id(p) for g in optimizer.sparse.param_groups for p in g["params"]}
    dense = {id(p) for g in optimizer.dense.param_groups for p in g["params"]}
    assert sparse == {id(model.embedding.weight), id(model.linear.weights.weight)}
    assert sparse | dense == {id(p) for p in model.parameters()} and not sparse & dense
    assert len(optimizer.param_groups) == 3


def test_dense_optimizers_switch_sparse_lookups_off(fm_data: EncodedDataset) -> None:
    model = model_on(fm_data)
    make_optimizer(model, TrainConfig(optimizer="sparse_adam"))
    assert model.embedding.sparse
    for name in ("adam", "sgd"):
        make_optimizer(model, TrainConfig(optimizer=name))
        assert not model.embedding.sparse and not model.linear.weights.sparse, name


def test_excluded_or_frozen_tables_stay_dense(fm_data: EncodedDataset) -> None:
    model = model_on(fm_data)
    model.linear.weights.weight.requires_grad_(False)
    config = TrainConfig(optimizer="sparse_adam")
    optimizer = make_optimizer(model, config, exclude=[model.embedding.weight])
    assert not model.embedding.sparse and not model.linear.weights.sparse
    assert optimizer.sparse is None  # nothing left for SparseAdam


def test_weight_decay_keeps_the_linear_terms_dense(fm_data: EncodedDataset) -> None:
    """Weight decay applies to the linear terms' table, and sparse updates cannot decay it."""
    model = model_on(fm_data)
    config = TrainConfig(optimizer="adagrad", lr=0.01, weight_decay=1e-4, epochs=1)
    trainer, _ = one_step(model, fm_data, config)
    assert model.embedding.weight.grad.is_sparse
    assert not model.linear.weights.weight.grad.is_sparse
    trainer.optimizer.step()  # Adagrad refuses weight decay on a sparse gradient: none here


def test_adagrad_sparse_equals_adagrad_dense(fm_data: EncodedDataset) -> None:
    """Adagrad leaves rows without gradient unchanged, so sparse lookups change nothing."""
    weights = []
    for sparse in (True, False):
        model = model_on(fm_data)
        config = TrainConfig(optimizer="adagrad", epochs=1, batch_size=512, lr=0.05)
        trainer = Trainer(model, make_task(fm_data), config)
        for module in model.modules():
            if isinstance(module, FusedEmbedding):
                module.sparse = sparse
        trainer.train_epoch(1)
        weights.append(model.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6)


def test_embeddings_without_sparse_lookups_fall_back_to_adam(fm_data: EncodedDataset) -> None:
    layout = FieldLayout.from_dataset(fm_data)
    size = layout.total_rows
    blocks = BlockLayout(field=(0,), start=(0,), size=(size,), frequency=(1,))
    for embedding in (
        SoftSelectionEmbedding(layout, 8, blocks),
        BlockMixedEmbedding(layout, 8, blocks, torch.ones(1, 8, dtype=torch.bool)),
    ):
        model = model_on(fm_data, embedding=embedding)
        config = TrainConfig(optimizer="sparse_adam", epochs=1, batch_size=512, lr=0.01)
        trainer, _ = one_step(model, fm_data, config)
        assert all(not p.grad.is_sparse for p in model.embedding.parameters() if p.grad is not None)
        assert model.linear.weights.weight.grad.is_sparse  # the linear terms still go sparse
        embedding_ids = {id(p) for p in model.embedding.parameters()}
        dense = {id(p) for g in trainer.optimizer.dense.param_groups for p in g["params"]}
        assert embedding_ids <= dense
        trainer.optimizer.step()
        trainer.train_epoch(1)


def test_resume_with_both_optimizer_states(fm_data: EncodedDataset, tmp_path: Path) -> None:
    config = TrainConfig(optimizer="sparse_adam", epochs=3, batch_size=512, lr=0.01, patience=0)
    model_a = model_on(fm_data, "deepfm", hidden=(8,), dropout=0.2)
    result_a = Trainer(model_a, make_task(fm_data), config, run_dir=tmp_path / "a").fit()

    model_b = model_on(fm_data, "deepfm", hidden=(8,), dropout=0.2)
    killed = Trainer(model_b, make_task(fm_data), config, tmp_path / "b", progress=KillAfter(1))
    with pytest.raises(Killed):
        killed.fit()
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["optimizer"]
    assert set(saved) == {"dense", "sparse"}
    assert saved["sparse"]["state"] and saved["dense"]["state"]  # both optimizers' moments

    model_b = model_on(fm_data, "deepfm", hidden=(8,), dropout=0.2)  # a fresh process
    result_b = Trainer(model_b, make_task(fm_data), config, run_dir=tmp_path / "b").fit(resume=True)
    assert result_b.valid == result_a.valid
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key


def test_optimizer_state_of_another_kind_is_refused(fm_data: EncodedDataset) -> None:
    model = model_on(fm_data)
    adam = make_optimizer(model, TrainConfig(optimizer="adam"))
    sparse = make_optimizer(model, TrainConfig(optimizer="sparse_adam"))
    with pytest.raises(DnisError, match="sparse_adam"):
        sparse.load_state_dict(adam.state_dict())


@pytest.mark.parametrize(
    ("name", "hint"), [("sparseadam", "sparse_adam"), ("Adam", "adam"), ("adgrad", "adagrad")]
)
def test_unknown_optimizer_gets_a_did_you_mean(name: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=f"Did you mean '{hint}'"):
        TrainConfig(optimizer=name)


def test_config_run_with_sparse_adam(tmp_path: Path, tiny_config_dict) -> None:
    data = tiny_config_dict(tmp_path / "runs", train={"optimizer": "sparse_adam"})
    config = parse(Config, data, where="test")
    result = train(config)
    final = json.loads((result.run_dir / "final.json").read_text())
    assert final["epochs_run"] == 3 and final["test"]["auc"] == final["test"]["auc"]  # not NaN
    assert set(load_checkpoint(result.run_dir / "checkpoint.pt")["optimizer"]) == {
        "dense",
        "sparse",
    }
    with pytest.raises(ConfigError, match="Did you mean 'sparse_adam'"):
        parse(Config, tiny_config_dict(tmp_path, train={"optimizer": "sparse-adam"}), where="t")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_sparse_adam_on_gpu(fm_data: EncodedDataset) -> None:
    model = model_on(fm_data, "deepfm", hidden=(8,)).cuda()
    config = TrainConfig(optimizer="sparse_adam", epochs=1, batch_size=512, lr=0.01, device="cuda")
    trainer = Trainer(model, make_task(fm_data), config)
    trainer.fit()
    assert model.embedding.weight.is_cuda
    assert trainer.optimizer.sparse.state[model.embedding.weight]["exp_avg"].is_cuda


def test_peer_throughput_benchmark_runs_small(tmp_path: Path) -> None:
    """benchmarks/throughput_peers.py end to end on a tiny set (the speed goals are judged by the
    full-size run): dnis and the hand-written loop measured, ratios printed, section written."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\n<!-- begin other -->\nkept\n<!-- end other -->\n")
    command = [sys.executable, str(root / "benchmarks" / "throughput_peers.py"), "--rows", "6000"]
    command += ["--vocab", "200", "--warmup", "1", "--sides", "dnis-sparse", "hand", "--out"]
    done = subprocess.run(
        [*command, str(out)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    page = out.read_text()
    assert "kept" in page and "<!-- begin throughput -->" in page  # the other section survives
    assert "## Training throughput" in page
    assert "| dnis (sparse_adam) |" in page and "| hand-written loop (SparseAdam) |" in page
    assert "vs hand-written loop (SparseAdam)" in done.stdout


METHOD_OPTIONS = {
    "dnis": {"num_blocks": 2, "warmup_epochs": 0, "search_epochs": 1},
    "random": {"trials": 2, "trial_epochs": 1},
    "mde": {"temperatures": [0.3]},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_with_sparse_adam(name: str) -> None:
    """Search methods swap in embeddings of every kind: plain tables go sparse, the others fall
    back to Adam, and every method still searches and retrains."""
    ds = load_synthetic(task="ctr", n_rows=2000, ranks=(4, 2), noise_fields=1, vocab=40, seed=0)
    train_config = TrainConfig(epochs=1, batch_size=512, lr=3e-3, optimizer="sparse_adam")
    try:
        results = methods.method(name)(
            lambda e: build("deepfm", ds.schema, e, hidden=(8,)),
            ds,
            budgets=[0.5],
            dim=8,
            train=train_config,
            options=METHOD_OPTIONS.get(name, {}),
        )
    except BudgetError as error:
        pytest.skip(f"{name}: budget infeasible on the tiny set ({error})")
    assert all(torch.isfinite(torch.tensor(r.metrics["test"]["auc"])) for r in results)
