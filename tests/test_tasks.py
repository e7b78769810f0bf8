"""Tasks: metrics against brute force, rating clipping, and the top-k full-ranking protocol."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dnis.data.dataset import EncodedDataset, build_dataset
from dnis.data.schema import FeatureSpec, Schema
from dnis.tasks import CTRTask, RatingTask, TopKTask, make_task
from dnis.tasks.metrics import (
    auc,
    logloss,
    mae,
    per_user_ranking_metrics,
    ranking_metrics,
    rmse,
)
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
    """The old per-row definition: each held-out row's 0-based rank among the unmasked items,
    ties counted in its favour (an OOV item ranks last). With one held-out item per user (leave-
    last-out) `ranking_metrics` of these ranks is the per-user protocol's value."""
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


def brute_user_metrics(
    ds: EncodedDataset, table: torch.Tensor, split: str, ties: str = "none"
) -> dict[str, float]:
    """The per-user protocol in plain Python: each user with held-out items sorts the items it has
    not seen (held-out items always count as unseen; never the OOV item 0) by score, and Recall@K,
    NDCG@K are averaged over users. `ties`: "none" (the table must have none where it matters),
    "best" (held-out items first among equal scores) or "worst" (last)."""
    known = [ds.train.ids] + ([ds.valid.ids] if split == "test" else [])
    seen: dict[int, set[int]] = {}
    for part in known:
        for u, i in part.tolist():
            seen.setdefault(u, set()).add(i)
    held: dict[int, set[int]] = {}
    oov: dict[int, int] = {}
    for u, i in ds.split(split).ids.tolist():
        held.setdefault(u, set())
        if i == 0:
            oov[u] = oov.get(u, 0) + 1
        else:
            held[u].add(i)
    sums = {f"{m}@{k}": 0.0 for k in (10, 20) for m in ("recall", "ndcg")}
    for u, items in held.items():
        relevant = len(items) + oov.get(u, 0)
        candidates = [
            i for i in range(1, ds.cardinalities[1]) if i in items or i not in seen.get(u, set())
        ]
        side = {"none": 0, "best": -1, "worst": 1}[ties]
        ranked = sorted(candidates, key=lambda i: (-float(table[u, i]), side * (i in items), i))
        for k in (10, 20):
            positions = [p for p, i in enumerate(ranked[:k]) if i in items]
            dcg = sum(1 / math.log2(p + 2) for p in positions)
            idcg = sum(1 / math.log2(p + 2) for p in range(min(relevant, k)))
            sums[f"recall@{k}"] += len(positions) / relevant
            sums[f"ndcg@{k}"] += dcg / idcg
    return {**{key: value / len(held) for key, value in sums.items()}, "users": float(len(held))}


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
def test_leave_last_out_equals_the_per_row_definition(
    topk_data: EncodedDataset, split: str
) -> None:
    """One held-out item per user: the per-user metrics are the old per-row hit rate and
    1 / log2(rank + 2), averaged over the same rows, and the per-user brute force."""
    ids = topk_data.split(split).ids
    assert len(ids[:, 0].unique()) == len(ids)  # leave-last-out: one row per user
    table = random_table(topk_data, seed=1)  # continuous scores: no ties
    metrics = TopKTask(topk_data).evaluate(TableScorer(table), split)
    per_row = ranking_metrics(torch.tensor(brute_ranks(topk_data, table, split)), (10, 20))
    for key, value in per_row.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert metrics == pytest.approx(brute_user_metrics(topk_data, table, split), abs=1e-12)
    assert metrics["users"] == len(ids)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_tied_scores_fall_between_the_best_and_worst_tie_orders(
    topk_data: EncodedDataset, split: str
) -> None:
    """With ties, torch.topk's order decides which tied items make the cut: each metric lies
    between held-out-first and held-out-last, and the first is the old rank rule (ties counted in
    the held-out item's favour)."""
    table = random_table(topk_data, seed=1, distinct=3)
    metrics = TopKTask(topk_data).evaluate(TableScorer(table), split)
    best = brute_user_metrics(topk_data, table, split, ties="best")
    worst = brute_user_metrics(topk_data, table, split, ties="worst")
    per_row = ranking_metrics(torch.tensor(brute_ranks(topk_data, table, split)), (10, 20))
    for key in per_row:
        assert best[key] == pytest.approx(per_row[key], abs=1e-12)
        assert worst[key] - 1e-12 <= metrics[key] <= best[key] + 1e-12, key
    assert worst != best  # the ties matter here


PAIRS = Schema(features=(FeatureSpec("user"), FeatureSpec("item")), user="user", item="item")


def multi_item_data(seed: int = 0, n_users: int = 14, n_items: int = 40) -> EncodedDataset:
    """A pre-split dataset with 1-4 test and 1-3 validation items per user (drawn from all items,
    so some repeat a training or validation item), a repeated test row, two test items unseen in
    training, one user without test items and one without validation items."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    parts["train"] = [("anchor", f"i{k}") for k in range(n_items)]  # every item in training
    first: dict[int, int] = {}
    for u in range(n_users):
        train = rng.choice(n_items, int(rng.integers(2, 9)), replace=False)
        first[u] = int(train[0])
        parts["train"] += [(f"u{u}", f"i{k}") for k in train]
        for split, low, high in (("valid", 1, 4), ("test", 1, 5)):
            if (split, u) in (("test", 0), ("valid", 1)):
                continue
            drawn = rng.integers(0, n_items, int(rng.integers(low, high)))
            parts[split] += [(f"u{u}", f"i{k}") for k in drawn]
    parts["test"] += [("u2", "unseen-a"), ("u2", f"i{first[2]}"), ("u3", "unseen-b")]
    parts["test"] += [(f"u{n_users - 1}", "i0")] * 2  # a repeated row
    frames = {split: pd.DataFrame(rows, columns=["user", "item"]) for split, rows in parts.items()}
    return build_dataset(frames, PAIRS, "topk")


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("budget", [1 << 20, 41, 130])
def test_several_held_out_items_per_user_match_brute_force(split: str, budget: int) -> None:
    ds = multi_item_data()
    table = random_table(ds, seed=5)
    scorer = TableScorer(table)
    metrics = TopKTask(ds, row_budget=budget).evaluate(scorer, split)
    assert metrics == pytest.approx(brute_user_metrics(ds, table, split), abs=1e-12)
    users = ds.split(split).ids[:, 0]
    assert metrics["users"] == len(users.unique()) < len(users)  # users, not rows
    assert scorer.max_rows <= max(budget, ds.cardinalities[1])  # at least one user per chunk


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
    metrics = TopKTask(topk_data).evaluate(TableScorer(worst), split)
    assert metrics == pytest.approx(brute_user_metrics(topk_data, worst, split), abs=1e-12)
    assert metrics["recall@10"] < 1.0


@pytest.mark.parametrize("split", ["valid", "test"])
def test_oracle_ranking_finds_every_held_out_item(split: str) -> None:
    """Every held-out item scored above all others: recall = NDCG = 1 for each user with at most
    K held-out items, all known; a user's OOV held-out item is a miss that still counts in
    |held-out| and in the ideal DCG."""
    ds = multi_item_data()
    task = TopKTask(ds)
    users, values = task.per_user(TableScorer(oracle_table(ds, split)), split)
    ids = ds.split(split).ids
    assert users.tolist() == sorted(ids[:, 0].unique().tolist())
    for row, u in enumerate(users.tolist()):
        items = ids[ids[:, 0] == u, 1]
        known, oov = len(set(items[items > 0].tolist())), int((items == 0).sum())
        assert 1 <= known + oov <= 10
        ideal = sum(1 / math.log2(p + 2) for p in range(known + oov))
        found = sum(1 / math.log2(p + 2) for p in range(known))
        want = [known / (known + oov), found / ideal] * 2
        assert values[row].tolist() == pytest.approx(want, abs=1e-12), u
    assert (values < 1).any() == (split == "test")  # the test split holds two OOV items


def test_hand_made_multi_item_metrics() -> None:
    """Users with 2-3 test items at hand-placed ranks; training and validation items scored on
    top (masked for test), the OOV item scored above everything (never recommended)."""
    items = [f"p{k}" for k in range(1, 31)]
    frames = {
        "train": [("anchor", i) for i in items]
        + [("a", "p1"), ("a", "p2"), ("b", "p3"), ("c", "p4")],
        "valid": [("a", "p3"), ("b", "p4"), ("c", "p5")],
        "test": [("a", "p5"), ("a", "p6"), ("b", "p1"), ("b", "p2"), ("b", "p7")]
        + [("c", "p6"), ("c", "new")],
    }
    ds = build_dataset(
        {s: pd.DataFrame(rows, columns=["user", "item"]) for s, rows in frames.items()},
        PAIRS,
        "topk",
    )
    user_id = dict(
        zip(
            "abc",
            ds.encoder.fields[0].transform(pd.Series(list("abc")))[:, 0].tolist(),
            strict=True,
        )
    )
    item_id = dict(
        zip(items, ds.encoder.fields[1].transform(pd.Series(items))[:, 0].tolist(), strict=True)
    )
    # each user's ranking, best first: its known items, then the test items at these 0-based
    # positions among the rest (the rest in name order)
    placed = {
        "a": (["p1", "p2", "p3"], {"p5": 1, "p6": 14}),
        "b": (["p3", "p4"], {"p1": 0, "p2": 9, "p7": 25}),
        "c": (["p4", "p5"], {"p6": 12}),
    }
    table = torch.zeros(ds.cardinalities[0], ds.cardinalities[1])
    table[:, 0] = 1000.0
    for user, (known, at) in placed.items():
        rest = [i for i in items if i not in known and i not in at]
        for item, position in sorted(at.items(), key=lambda pair: pair[1]):
            rest.insert(position, item)
        for score, item in enumerate(reversed(known + rest)):
            table[user_id[user], item_id[item]] = float(score)
    d = [1 / math.log2(p + 2) for p in range(20)]
    want = {  # per user: recall@10, ndcg@10, recall@20, ndcg@20
        "a": [1 / 2, d[1] / (d[0] + d[1]), 1.0, (d[1] + d[14]) / (d[0] + d[1])],
        "b": [2 / 3, (d[0] + d[9]) / sum(d[:3]), 2 / 3, (d[0] + d[9]) / sum(d[:3])],
        "c": [0.0, 0.0, 1 / 2, d[12] / (d[0] + d[1])],  # "new" is OOV: a miss, but counted
    }
    for budget in (1 << 20, 31):  # one chunk, or one user per chunk
        task = TopKTask(ds, row_budget=budget)
        users, values = task.per_user(TableScorer(table), "test")
        assert users.tolist() == sorted(user_id[u] for u in "abc")
        for user, expected in want.items():
            row = users.tolist().index(user_id[user])
            assert values[row].tolist() == pytest.approx(expected, abs=1e-12), user
        metrics = task.evaluate(TableScorer(table), "test")
        columns = zip(*want.values(), strict=True)
        means = [sum(column) / 3 for column in columns]
        assert [metrics[k] for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20")] == (
            pytest.approx(means, abs=1e-12)
        )
        assert metrics["users"] == 3.0
    # validation masks only the training items: each validation item is right behind them
    valid = TopKTask(ds).evaluate(TableScorer(table), "valid")
    assert valid == pytest.approx(
        {"recall@10": 1.0, "ndcg@10": 1.0, "recall@20": 1.0, "ndcg@20": 1.0, "users": 3.0}
    )
    # without masking the validation items, a's p5 would be third, not second
    assert brute_user_metrics(ds, table, "test") == pytest.approx(
        TopKTask(ds).evaluate(TableScorer(table), "test"), abs=1e-12
    )


def test_seen_items_are_masked(topk_data: EncodedDataset) -> None:
    """Training items scored above the target do not push it down."""
    table = oracle_table(topk_data, "valid")
    for u, i in topk_data.train.ids.tolist():
        table[u, i] = 100.0
    metrics = TopKTask(topk_data).evaluate(TableScorer(table), "valid")
    assert metrics["recall@10"] == 1.0 and metrics["ndcg@10"] == pytest.approx(1.0)


def test_seen_and_valid_items_are_masked_for_several_held_out_items() -> None:
    """Training (and, for test, validation) items scored above everything do not push the
    held-out items down, except a held-out item the user also had before: it keeps its score."""
    ds = multi_item_data()
    for split, known in (("valid", ["train"]), ("test", ["train", "valid"])):
        table = oracle_table(ds, split)
        for part in known:
            for u, i in ds.split(part).ids.tolist():
                table[u, i] = max(float(table[u, i]), 100.0)  # a repeated held-out item too
        metrics = TopKTask(ds).evaluate(TableScorer(table), split)
        assert metrics == pytest.approx(brute_user_metrics(ds, table, split), abs=1e-12)
        perfect = TopKTask(ds).evaluate(TableScorer(oracle_table(ds, split)), split)
        assert metrics == pytest.approx(perfect, abs=1e-12)


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
    held = task.held_out("test")
    every = slice(0, len(held.users))
    fast = task._top(model, rows, held, every, task.seen["test"], items)
    slow = task._top(model, rows, held, every, task.seen["test"], None)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert task._item_factors(TableScorer(random_table(topk_data)), rows[:1]) is None


def test_per_user_ranking_metrics_by_hand() -> None:
    hit = torch.zeros(3, 20, dtype=torch.bool)
    hit[0, [0, 2]] = True  # 2 of 2 held-out items, at positions 0 and 2
    hit[1, [11]] = True  # 1 of 3, only in the top 20
    relevant = torch.tensor([2, 3, 1])  # user 2 found nothing
    got = per_user_ranking_metrics(hit, relevant, (10, 20))
    d = [1 / math.log2(p + 2) for p in range(20)]
    want = [
        [1.0, (d[0] + d[2]) / (d[0] + d[1]), 1.0, (d[0] + d[2]) / (d[0] + d[1])],
        [0.0, 0.0, 1 / 3, d[11] / sum(d[:3])],
        [0.0, 0.0, 0.0, 0.0],
    ]
    for row, expected in zip(got.tolist(), want, strict=True):
        assert row == pytest.approx(expected, abs=1e-12)
    # fewer ranked positions than K (fewer items than K): the cut is what there is
    assert per_user_ranking_metrics(hit[:, :5], relevant, (10, 20))[0].tolist() == pytest.approx(
        want[0], abs=1e-12
    )
