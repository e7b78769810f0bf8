"""Tasks: metrics against brute force, rating clipping, and the top-k full-ranking protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dnis.data.dataset import EncodedDataset
from dnis.tasks import CTRTask, RatingTask, TopKTask, make_task
from dnis.tasks.metrics import auc, logloss, mae, ranking_metrics, rmse
from dnis.tasks.topk import History

# ---------------------------------------------------------------- metrics


def brute_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    scores = rng.integers(0, 6, n).astype(np.float32)  # few distinct values: many ties
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    got = auc(torch.tensor(scores), torch.tensor(labels, dtype=torch.float32))
    assert got == pytest.approx(brute_auc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_auc_extremes_and_degenerate() -> None:
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert auc(torch.tensor([1.0, 1.0, 1.0, 1.0]), labels) == 0.5
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))


def test_logloss_rmse_mae_match_references() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100, generator=g) * 3
    labels = (torch.rand(100, generator=g) < 0.4).float()
    p = torch.sigmoid(logits.double())
    expected = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()
    assert logloss(logits, labels) == pytest.approx(float(expected), rel=1e-9)
    assert logloss(logits, labels) == pytest.approx(
        float(nn.functional.binary_cross_entropy(torch.sigmoid(logits), labels)), rel=1e-4
    )
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([1.5, 2.0, 1.0, 5.0])
    assert rmse(pred, target) == pytest.approx(math.sqrt((0.25 + 0 + 4 + 1) / 4))
    assert mae(pred, target) == pytest.approx((0.5 + 0 + 2 + 1) / 4)


def test_ranking_metrics_on_known_ranks() -> None:
    ranks = torch.tensor([0, 1, 9, 10, 19, 25])
    m = ranking_metrics(ranks, (10, 20))
    assert m["recall@10"] == pytest.approx(3 / 6)
    assert m["recall@20"] == pytest.approx(5 / 6)
    ndcg10 = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 6
    ndcg20 = ndcg10 + (1 / math.log2(12) + 1 / math.log2(21)) / 6
    assert m["ndcg@10"] == pytest.approx(ndcg10)
    assert m["ndcg@20"] == pytest.approx(ndcg20)


# ---------------------------------------------------------------- point-wise tasks


class Constant(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.full((len(ids),), self.value)


def test_rating_predictions_are_clipped_to_training_range(rating_data: EncodedDataset) -> None:
    task = make_task(rating_data)
    assert isinstance(task, RatingTask)
    low, high = float(rating_data.train.labels.min()), float(rating_data.train.labels.max())
    assert (task.low, task.high) == (low, high)
    target = rating_data.test.labels
    for value, clipped in ((1e6, high), (-1e6, low)):
        metrics = task.evaluate(Constant(value), "test")
        assert metrics["rmse"] == pytest.approx(rmse(torch.full_like(target, clipped), target))
        assert metrics["mae"] == pytest.approx(mae(torch.full_like(target, clipped), target))
    assert task.metric == "rmse" and not task.higher_is_better
    assert task.better(0.9, 1.0) and not task.better(1.1, 1.0)


def test_ctr_task_evaluates_whole_split(ctr_data: EncodedDataset, make_model) -> None:
    task = make_task(ctr_data)
    assert isinstance(task, CTRTask) and task.metric == "auc" and task.higher_is_better
    model = make_model(ctr_data, "fm", dim=4)
    small = task.evaluate(model, "valid", batch_size=7)  # batching must not change anything
    whole = task.evaluate(model, "valid", batch_size=100_000)
    assert small["auc"] == pytest.approx(whole["auc"], abs=1e-9)
    assert small["logloss"] == pytest.approx(whole["logloss"], rel=1e-6)
    with torch.no_grad():
        model.eval()
        logits = model(ctr_data.valid.ids)
    assert whole["auc"] == pytest.approx(auc(logits, ctr_data.valid.labels))


# ---------------------------------------------------------------- top-k


class TableScorer(nn.Module):
    """A fixed score for every (user, item): model(ids)[b] = table[user_b, item_b]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.max_rows = 0
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.max_rows = max(self.max_rows, len(ids))
        return self.table[ids[:, 0], ids[:, 1]]


def random_table(ds: EncodedDataset, seed: int = 0, distinct: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (ds.cardinalities[0], ds.cardinalities[1])
    if distinct is None:
        return torch.rand(shape, generator=g)
    return torch.randint(0, distinct, shape, generator=g).float()  # ties


def brute_ranks(ds: EncodedDataset, table: torch.Tensor, split: str) -> list[int]:
    known = [ds.train.ids] + ([ds.valid.ids] if split == "test" else [])
    seen: dict[int, set[int]] = {}
    for part in known:
        for u, i in part.tolist():
            seen.setdefault(u, set()).add(i)
    num_items = ds.cardinalities[1]
    ranks = []
    for u, target in ds.split(split).ids.tolist():
        if target == 0:
            ranks.append(num_items)
            continue
        better = 0
        for item in range(1, num_items):
            if item in seen.get(u, set()) or item == target:
                continue
            if table[u, item] > table[u, target]:
                better += 1
        ranks.append(better)
    return ranks


def test_history_pairs_are_each_users_items(topk_data: EncodedDataset) -> None:
    ids = topk_data.train.ids
    num_users = topk_data.cardinalities[0]
    history = History(ids[:, 0], ids[:, 1], num_users)
    expected: dict[int, list[int]] = {}
    for u, i in ids.tolist():
        expected.setdefault(u, []).append(i)
    query = torch.tensor([3, 1, 0, 3, num_users - 1, 5])
    rows, items = history.pairs(query)
    assert rows.shape == items.shape
    for r, u in enumerate(query.tolist()):
        got = sorted(items[rows == r].tolist())
        assert got == sorted(expected.get(u, [])), f"user {u}"
    empty_rows, empty_items = history.pairs(torch.tensor([0]))  # OOV user: nothing known
    assert len(empty_rows) == len(empty_items) == 0


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("distinct", [None, 3])
def test_full_ranking_matches_brute_force(
    topk_data: EncodedDataset, split: str, distinct: int | None
) -> None:
    table = random_table(topk_data, seed=1, distinct=distinct)
    task = TopKTask(topk_data)
    ranks = torch.tensor(brute_ranks(topk_data, table, split))
    metrics = task.evaluate(TableScorer(table), split)
    expected = ranking_metrics(ranks, (10, 20))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["users"] == len(topk_data.split(split))
    # the ranks themselves, not only their averages
    got = task._ranks(TableScorer(table), topk_data.split(split).ids, task.seen[split], None)
    assert got.tolist() == ranks.tolist()


@pytest.mark.parametrize("budget", [31, 40, 100, 1000])
def test_evaluation_respects_row_budget(topk_data: EncodedDataset, budget: int) -> None:
    table = random_table(topk_data, seed=2)
    reference = TopKTask(topk_data).evaluate(TableScorer(table), "test")
    scorer = TableScorer(table)
    metrics = TopKTask(topk_data, row_budget=budget).evaluate(scorer, "test")
    assert scorer.max_rows <= budget
    assert metrics == pytest.approx(reference)
    if budget < 12 * topk_data.cardinalities[1]:
        assert scorer.calls > 1  # it really was chunked


def oracle_table(ds: EncodedDataset, split: str, seed: int = 0) -> torch.Tensor:
    table = random_table(ds, seed=seed)
    for u, target in ds.split(split).ids.tolist():
        table[u, target] = 10.0
    return table


@pytest.mark.parametrize("split", ["valid", "test"])
def test_target_first_gives_perfect_metrics(topk_data: EncodedDataset, split: str) -> None:
    assert topk_data.cardinalities[1] > 20  # more items than K, so this is not trivial
    metrics = TopKTask(topk_data).evaluate(TableScorer(oracle_table(topk_data, split)), split)
    for k in (10, 20):
        assert metrics[f"recall@{k}"] == 1.0
        assert metrics[f"ndcg@{k}"] == pytest.approx(1.0)
    # and the opposite: the target scored below every unseen item ranks behind all of them
    worst = random_table(topk_data, seed=3)
    for u, target in topk_data.split(split).ids.tolist():
        worst[u, target] = -10.0
    task = TopKTask(topk_data)
    ranks = task._ranks(TableScorer(worst), topk_data.split(split).ids, task.seen[split], None)
    assert ranks.tolist() == brute_ranks(topk_data, worst, split)
    assert max(ranks.tolist()) > 10


def test_seen_items_are_masked(topk_data: EncodedDataset) -> None:
    """Training items scored above the target do not push it down."""
    table = oracle_table(topk_data, "valid")
    for u, i in topk_data.train.ids.tolist():
        table[u, i] = 100.0
    metrics = TopKTask(topk_data).evaluate(TableScorer(table), "valid")
    assert metrics["recall@10"] == 1.0 and metrics["ndcg@10"] == pytest.approx(1.0)


def test_oov_target_counts_as_a_miss(topk_data_with_new_item: EncodedDataset) -> None:
    """A held-out item never seen in training cannot be ranked: it is a miss, not an error."""
    ds = topk_data_with_new_item
    for split in ("valid", "test"):
        targets = ds.split(split).ids[:, 1]
        assert int((targets == 0).sum()) == 1
        metrics = TopKTask(ds).evaluate(TableScorer(oracle_table(ds, split)), split)
        n = len(targets)
        assert metrics["recall@20"] == pytest.approx((n - 1) / n)
        assert metrics["ndcg@10"] == pytest.approx((n - 1) / n)
        table = random_table(ds, seed=4)
        expected = ranking_metrics(torch.tensor(brute_ranks(ds, table, split)), (10, 20))
        assert TopKTask(ds).evaluate(TableScorer(table), split) == pytest.approx(
            {**expected, "users": float(n)}
        )


def test_topk_loss_is_bpr(topk_data: EncodedDataset, make_model) -> None:
    task = TopKTask(topk_data)
    model = make_model(topk_data, "bprmf", dim=4)
    ids = topk_data.train.ids[:16]
    loss = task.loss(model, ids, torch.ones(16), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    # same generator state -> same negatives -> same loss
    again = task.loss(model, ids, torch.ones(16), torch.Generator().manual_seed(0))
    assert float(loss.detach()) == float(again.detach())
    # at initialisation (scores ~ 0) BPR is about log 2
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=0.05)


@pytest.mark.parametrize("name", ["bprmf", "mf"])
def test_dot_product_models_rank_by_one_matrix_product_like_the_pairwise_path(
    topk_data: EncodedDataset, make_model, name: str
) -> None:
    """MF and BPR-MF expose `factors`: full ranking scores a chunk of users as one matrix product
    (biases folded into two extra columns), ranking every item as the pair-by-pair forward does."""
    model = make_model(topk_data, name, dim=6, seed=3)
    if name == "mf":  # non-zero biases, so the folded columns matter
        torch.nn.init.normal_(model.linear.weights.weight, std=0.5)
    model.eval()
    task = TopKTask(topk_data)
    rows = topk_data.split("test").ids
    user, item = model.factors(rows)
    assert torch.allclose((user * item).sum(1), model(rows), atol=1e-6)
    items = task._item_factors(model, rows[:1])
    assert items is not None and items.shape[0] == topk_data.cardinalities[1]
    fast = task._ranks(model, rows, task.seen["test"], items)
    slow = task._ranks(model, rows, task.seen["test"], None)
    assert torch.equal(fast, slow)
    assert task._item_factors(TableScorer(random_table(topk_data)), rows[:1]) is None
