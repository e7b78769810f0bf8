"""Top-k recommendation: BPR loss with sampled negatives; full-ranking Recall@K and NDCG@K.

Protocol: each user's last interaction is the test item and the one before the validation item
(leave-last-out split). Every item is ranked for every evaluated user, with the items the user
already interacted with masked (training items for validation; training and validation items for
test). Scores are computed in chunks of users, so the user x item matrix is never held whole (a chunk
holds at least one user's full item list, so `row_budget` below the item count means one user).
Models that score by a dot product (a `factors` method: MF, BPR-MF) score a chunk as one matrix
product with every item's factors, computed once per evaluation; any other model scores every
(user, item) pair of the chunk with its forward pass.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from dnis import distributed
from dnis.data.dataset import EncodedDataset
from dnis.models.base import Model
from dnis.tasks.base import Task, model_device
from dnis.tasks.metrics import ranking_metrics

KS: tuple[int, ...] = (10, 20)


class History:
    """Each user's known items as CSR (indptr over user ids), for masking during ranking."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor, num_users: int) -> None:
        order = torch.argsort(users, stable=True)
        self.items = items[order]
        counts = torch.bincount(users[order], minlength=num_users)
        self.indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])

    def pairs(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row in `users`, item) for every known item of the given users, vectorised."""
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts
        rows = torch.repeat_interleave(torch.arange(len(users)), lengths)
        first = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
        return rows, self.items[first + torch.arange(int(lengths.sum()))]


class TopKTask(Task):
    name = "topk"
    metric = "ndcg@10"
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

    def _history(self, ids: torch.Tensor) -> History:
        return History(ids[:, self.user_slot], ids[:, self.item_slot], self.num_users)

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
        data = self.dataset.split(split).ids
        was_training = model.training
        model.eval()
        chunk = max(1, self.row_budget // self.num_items)
        seen = self.seen[split]
        first, last = distributed.eval_range(len(data), chunk)  # under torchrun: this rank's users
        items = self._item_factors(model, data[:1]) if len(data) else None
        ranks = [
            self._ranks(model, data[s : min(s + chunk, last)], seen, items)
            for s in range(first, last, chunk)
        ]
        model.train(was_training)
        every = distributed.gather(torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long))
        metrics = ranking_metrics(every, KS) if len(every) else {}
        metrics["users"] = float(len(data))
        return metrics

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

    def _ranks(
        self, model: Model, rows: torch.Tensor, seen: History, items: torch.Tensor | None
    ) -> torch.Tensor:
        """0-based rank of each row's held-out item among all items (higher score = better).

        With the items' factors (`_item_factors`) the chunk's scores are one matrix product (4
        bytes per user-item pair); otherwise every (user, item) pair goes through the model.
        """
        users, targets = rows[:, self.user_slot], rows[:, self.item_slot]
        device = model_device(model)
        if items is not None:
            scores = (model.factors(rows.to(device))[0] @ items.T).cpu()
        else:
            grid = rows.repeat_interleave(self.num_items, dim=0)
            grid[:, self.item_slot] = torch.arange(self.num_items).repeat(len(rows))
            scores = model(grid.to(device)).cpu().view(len(rows), self.num_items)
        target_scores = scores.gather(1, targets.unsqueeze(1))
        r, items = seen.pairs(users)
        scores[r, items] = float("-inf")
        scores[:, 0] = float("-inf")  # the OOV item is not a recommendation
        ranks = (scores > target_scores).sum(dim=1)
        # an item unseen in training (OOV) cannot be ranked: count it as a miss
        return torch.where(targets == 0, torch.full_like(ranks, self.num_items), ranks)
