"""Top-k recommendation: BPR loss with sampled negatives; full-ranking Recall@K and NDCG@K per user.

Protocol (as LightGCN and RecBole evaluate): every evaluated user (one with at least one held-out
interaction in the split) ranks every item once, with the items the user already interacted with
masked (training items for validation; training and validation items for test) and the OOV item
(id 0) never recommended. With T the user's held-out items and the top K of that ranking:

    Recall@K = |top-K ∩ T| / |T|,   NDCG@K = DCG@K / IDCG@K,
    DCG@K = sum over top-K positions p (0-based) holding an item of T of 1 / log2(p + 2),
    IDCG@K = sum_{p < min(|T|, K)} 1 / log2(p + 2),

averaged over the evaluated users (so a user with ten test items weighs as much as a user with
one). A held-out item is never masked, even if the user also had it in training (validation), so a
repeated interaction can be found. A held-out item unseen in training (OOV, id 0) counts in |T| but
can never be hit. Repeated (user, item) rows of a split count once; OOV rows each count (their
items are distinct for all the encoding knows). With one held-out item per user (leave-last-out)
these are the usual hit rate and 1 / log2(rank + 2).

Ties: the top K is `torch.topk`'s, so among items of equal score at the K-th place the order
torch.topk returns decides which make the cut (unspecified, and it may differ between CPU and GPU).
Scores of a trained model rarely tie; with tied scores a held-out item may be counted in or out.

Users are scored in chunks, so the user x item matrix is never held whole: a chunk holds
`row_budget // items` users (at least one user's full item list). Models that score by a dot
product (a `factors` method: MF, BPR-MF) score a chunk as one matrix product with every item's
factors, computed once per evaluation; any other model scores every (user, item) pair of the chunk
with its forward pass, the other fields of the pair taken from the user's first held-out row.
Masking and the top K run where the model's weights are (only [users, K] comes back).

Under torchrun each rank takes a contiguous run of whole chunks of users; the per-user values
are gathered in user order and averaged on every rank, so every rank gets one process's metrics.
Users are told apart by their encoded id: users unseen in training all map to the OOV user 0
and are evaluated as that one user.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from dnis import distributed
from dnis.data.dataset import EncodedDataset
from dnis.models.base import Model
from dnis.tasks.base import Task, model_device
from dnis.tasks.metrics import per_user_ranking_metrics

KS: tuple[int, ...] = (10, 20)


class History:
    """Each user's items as CSR (indptr over user ids): known items for masking during ranking,
    or a split's held-out items. `rows[j]` is the input position of the j-th CSR entry."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor, num_users: int) -> None:
        order = torch.argsort(users, stable=True)
        self.rows = order
        self.items = items[order]
        self.counts = torch.bincount(users[order], minlength=num_users)
        self.indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(self.counts, 0)])

    def pairs(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row in `users`, item) for every item of the given users, vectorised."""
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts
        rows = torch.repeat_interleave(torch.arange(len(users)), lengths)
        first = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
        return rows, self.items[first + torch.arange(int(lengths.sum()))]


@dataclass
class HeldOut:
    """A split's held-out items per evaluated user."""

    users: torch.Tensor  # [U] evaluated user ids, ascending
    template: torch.Tensor  # [U] each user's first row in the split (its other fields score it)
    relevant: torch.Tensor  # [U] |T|: distinct known held-out items plus OOV rows
    items: History  # the held-out (user, item) pairs as CSR


class TopKTask(Task):
    name = "topk"
    metric = "ndcg@20"  # LightGCN's convention (Recall@20, NDCG@20), as the grids report it
    higher_is_better = True

    def __init__(self, dataset: EncodedDataset, row_budget: int = 1 << 20) -> None:
        super().__init__(dataset)
        schema = dataset.schema
        assert schema.user is not None and schema.item is not None
        self.user_slot = schema.slot_range(schema.user).start
        self.item_slot = schema.slot_range(schema.item).start
        self.num_users = dataset.cardinalities[schema.index(schema.user)]
        self.num_items = dataset.cardinalities[schema.index(schema.item)]
        self.row_budget = row_budget
        train, valid = dataset.train.ids, dataset.valid.ids
        self.seen = {
            "valid": self._history(train),
            "test": self._history(torch.cat([train, valid])),
        }
        self._held: dict[str, HeldOut] = {}

    def _history(self, ids: torch.Tensor) -> History:
        return History(ids[:, self.user_slot], ids[:, self.item_slot], self.num_users)

    def held_out(self, split: str) -> HeldOut:
        """The split's held-out items grouped by user (built once per split)."""
        if split not in self._held:
            ids = self.dataset.split(split).ids
            users, items = ids[:, self.user_slot].long(), ids[:, self.item_slot].long()
            history = History(users, items, self.num_users)
            evaluated = torch.nonzero(history.counts).squeeze(1)
            known = items != 0
            distinct = torch.unique(users[known] * self.num_items + items[known])
            relevant = torch.bincount(distinct // self.num_items, minlength=self.num_users)
            relevant += torch.bincount(users[~known], minlength=self.num_users)
            self._held[split] = HeldOut(
                users=evaluated,
                template=history.rows[history.indptr[evaluated]],
                relevant=relevant[evaluated],
                items=history,
            )
        return self._held[split]

    def loss(self, model: Model, ids, labels, generator) -> torch.Tensor:
        """BPR: -log sigmoid(s(u, i) - s(u, j)), j drawn uniformly from all items (ids 1..n-1).

        As in Rendle et al., a sampled j may be one of the user's own positives; with thousands
        of items that is rare and keeps sampling free of per-user Python.
        """
        negatives = ids.clone()
        negatives[:, self.item_slot] = torch.randint(
            1, self.num_items, (len(ids),), generator=generator
        )
        scores = model(torch.cat([ids, negatives]).to(model_device(model)))
        positive, negative = scores[: len(ids)], scores[len(ids) :]
        return -F.logsigmoid(positive - negative).mean()

    @torch.no_grad()
    def evaluate(self, model: Model, split: str, batch_size: int = 8192) -> dict[str, float]:
        """Recall@K and NDCG@K (K in KS) averaged over the split's users; "users" counts them.

        `batch_size` is unused: users are chunked by `row_budget` user x item scores."""
        users, values = self.per_user(model, split)
        metrics: dict[str, float] = {}
        if len(values):
            names = [f"{m}@{k}" for k in KS for m in ("recall", "ndcg")]
            metrics = dict(zip(names, values.mean(dim=0).tolist(), strict=True))
        metrics["users"] = float(len(users))
        return metrics

    @torch.no_grad()
    def per_user(self, model: Model, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(evaluated user ids [U] ascending, float64 [U, 2 * len(KS)] per-user values with
        columns recall@K, ndcg@K for K in KS). Under torchrun every rank scores its run of
        users and gets every user's values."""
        data = self.dataset.split(split).ids
        held = self.held_out(split)
        was_training = model.training
        model.eval()
        chunk = max(1, self.row_budget // self.num_items)
        seen = self.seen[split]
        first, last = distributed.eval_range(len(held.users), chunk)  # this rank's users
        items = self._item_factors(model, data[:1]) if len(held.users) else None
        values = []
        for start in range(first, last, chunk):
            part = slice(start, min(start + chunk, last))
            _, hit = self._top(model, data, held, part, seen, items)
            values.append(per_user_ranking_metrics(hit.cpu(), held.relevant[part], KS))
        model.train(was_training)
        local = torch.cat(values) if values else torch.zeros(0, 2 * len(KS), dtype=torch.float64)
        return held.users, distributed.gather(local)

    def _item_factors(self, model: Model, template: torch.Tensor) -> torch.Tensor | None:
        """Every item's side of a model that scores by a dot product (`factors`, e.g. MF and
        BPR-MF), computed once per evaluation: [items, k]; None for any other model."""
        if not hasattr(model, "factors"):
            return None
        rows = template.repeat(self.num_items, 1)
        rows[:, self.item_slot] = torch.arange(self.num_items)
        device = model_device(model)
        return torch.cat(
            [
                model.factors(rows[s : s + 65536].to(device))[1]
                for s in range(0, self.num_items, 65536)
            ]
        )

    def _scores(self, model: Model, rows: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        """[len(rows), items] scores of every item for each row's user, on the model's device.

        With the items' factors (`_item_factors`) one matrix product (4 bytes per user-item
        pair); otherwise every (user, item) pair goes through the model."""
        device = model_device(model)
        if items is not None:
            return model.factors(rows.to(device))[0] @ items.T
        grid = rows.repeat_interleave(self.num_items, dim=0)
        grid[:, self.item_slot] = torch.arange(self.num_items).repeat(len(rows))
        return model(grid.to(device)).view(len(rows), self.num_items)

    def _top(
        self,
        model: Model,
        data: torch.Tensor,
        held: HeldOut,
        part: slice,
        seen: History,
        items: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(item ids [U, k], hit [U, k]) of the top k = min(max(KS), items) of users `part`."""
        users = held.users[part]
        scores = self._scores(model, data[held.template[part]], items)
        device = scores.device
        h_rows, h_items = held.items.pairs(users)
        known = h_items != 0  # an OOV held-out item is never ranked: a miss
        h_rows, h_items = h_rows[known].to(device), h_items[known].to(device)
        kept = scores[h_rows, h_items]  # held-out items keep their score even if seen before
        s_rows, s_items = seen.pairs(users)
        scores[s_rows.to(device), s_items.to(device)] = float("-inf")
        scores[h_rows, h_items] = kept
        scores[:, 0] = float("-inf")  # the OOV item is not a recommendation
        k = min(max(KS), self.num_items)
        values, top = torch.topk(scores, k, dim=1)
        # membership of each (user, top item) in the held-out pairs, by a sorted search
        keys = torch.sort(h_rows * self.num_items + h_items).values
        wanted = torch.arange(len(users), device=device).unsqueeze(1) * self.num_items + top
        if len(keys):
            where = torch.searchsorted(keys, wanted).clamp_(max=len(keys) - 1)
            hit = keys[where] == wanted
        else:
            hit = torch.zeros_like(top, dtype=torch.bool)
        return top, hit & (values != float("-inf"))  # a masked item never counts
