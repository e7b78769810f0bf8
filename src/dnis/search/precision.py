"""`dnis-precision`: DNIS under a byte budget, choosing every block's width and storage precision.

A budget here is a share of the full-width fp32 embedding's bytes (as `int8`/`int4`'s, see
`dnis.search.ptq`). The pipeline (one search serves every budget):

1. Search. DNIS's warm-up and bilevel search (the `search:` options but those it sets itself,
   `PRECISION_FIXED`): a static schedule, since the gradual pruning phase prunes to parameter
   budgets, which a byte budget does not fix until the precisions are chosen.
2. Sensitivity. On the searched model (alpha folded into the table), block k's rows are served
   at precision p (row-wise quantized) while every other block stays fp32, and the validation
   metric is read: `sensitivity[k][p]`, the metric lost to storing block k at p (one evaluation
   per block and precision).
3. Allocation, per budget. For each tolerance t of `tolerances` (metric units), every block takes
   the cheapest allowed precision that loses at most t (the allowed one of most bits when none
   does); then dims are kept
   by descending score (alpha, ties by saliency, as DNIS ranks them) while the bytes fit: a kept
   dim of block k costs its rows at k's precision, and a block's first kept dim also its rows'
   scales and biases (int8/int4); int4 rows round up to whole bytes, and the module's fixed
   structure (`keep`, precision codes) comes off the budget first, so the stored bytes are
   within the budget exactly; a narrow int8/int4 block whose rows fp16 stores in no more bytes
   moves to fp16 (`undominated`) and the freed bytes are refitted. Every candidate, and one
   with every block at each allowed precision, is evaluated on validation as it would be
   served (pruned and quantized, not retrained): cheap precision where the searched model does
   not notice it, width where it does.
4. Quantization-aware fine-tuning of the `finalists` best candidates: the kept dims as a
   block-mixed table whose lookup serves every row quantized at its block's precision, with the
   gradient of the identity (straight-through rounding), from the searched weights,
   early-stopped on validation like every method. The finalist best on validation after
   fine-tuning is kept (before it, candidates often differ by less than the noise, and one that
   keeps more values recovers more in training).
5. Materialise: a `QuantizedBlockEmbedding` storing exactly those rows (int8 / packed int4 codes
   with fp16 scales and biases, fp16 or fp32 values), serving what the fine-tuned model served.

A result's `dims[field]` holds its blocks' widths and precisions; its `choice` the allocation
chosen, every candidate's validation metric and bytes, and the finalists' validation metric
after fine-tuning; `pruned` the chosen
allocation's validation metrics before fine-tuning; `before` the searched soft model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.masked import dense_state, swap_embedding
from dnis.embeddings.mixed import BlockMixedEmbedding
from dnis.embeddings.quantized import BITS, PRECISIONS, fake_quantize, row_bytes
from dnis.embeddings.quantized_blocks import QuantizedBlockEmbedding
from dnis.errors import BudgetError, ConfigError
from dnis.models.base import Model
from dnis.search.dnis import DnisConfig, SearchState, block_mixed, search
from dnis.search.methods import register_method
from dnis.search.prune import block_saliency
from dnis.search.result import SearchResult
from dnis.search.training import Job, block_report
from dnis.train.trainer import resolve_device


@dataclass
class PrecisionConfig(DnisConfig):
    """DNIS's search options, plus the precisions a block may be stored at and the tolerances
    (metric units, e.g. AUC or RMSE) the allocation tries (`compare.options.dnis-precision`)."""

    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    tolerances: list[float] = field(default_factory=lambda: [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    # how many of the best candidates (as served, before training) are fine-tuned; the best on
    # validation after fine-tuning is kept
    finalists: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.precisions) - set(PRECISIONS))
        if unknown or not self.precisions:
            raise ConfigError(
                f"precisions must be a non-empty list of {PRECISIONS}, got {self.precisions}"
            )
        if not all(t >= 0 for t in self.tolerances):  # refuses NaN too
            raise ConfigError(f"tolerances must be numbers >= 0, got {self.tolerances}")
        if self.granularity != "block":
            raise ConfigError("dnis-precision stores whole blocks: granularity must be block")
        if not isinstance(self.finalists, int) or self.finalists < 1:
            raise ConfigError(f"finalists must be an integer >= 1, got {self.finalists}")


def fake_quantize_rows(
    values: torch.Tensor, keep: torch.Tensor, codes: torch.Tensor
) -> torch.Tensor:
    """Rows [N, dim] as stored and served: each row's kept dims (`keep` [N, dim]) quantized
    row-wise at its precision (`codes` [N]: an index into PRECISIONS) by `fake_quantize`, the
    arithmetic a materialised `QuantizedBlockEmbedding` stores with, so it serves the same."""
    served = values
    for code, precision in enumerate(PRECISIONS):
        rows = (codes == code).nonzero().squeeze(1)
        if precision == "fp32" or len(rows) == 0:
            continue
        part = fake_quantize(values.index_select(0, rows), precision, keep.index_select(0, rows))
        served = served.index_copy(0, rows, part)
    return served


class FakeQuantBlockMixed(BlockMixedEmbedding):
    """A block-mixed table whose lookup serves each row as its block's precision stores it
    (quantization-aware training); `precision_codes` [num_blocks] index PRECISIONS."""

    def __init__(self, compact: BlockMixedEmbedding, precisions: list[str]) -> None:
        super().__init__(compact.layout, compact.dim, compact.blocks, compact.keep)
        codes = torch.tensor([PRECISIONS.index(p) for p in precisions], dtype=torch.long)
        self.register_buffer("precision_codes", codes, persistent=False)
        with torch.no_grad():
            self.values.copy_(compact.values)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        values = super().lookup(rows)
        flat = rows.reshape(-1)
        block = torch.searchsorted(self.block_start, flat, right=True) - 1
        served = fake_quantize_rows(
            values.reshape(-1, self.dim), self.keep[block], self.precision_codes[block]
        )
        return served.view_as(values)

    def dense(self) -> torch.Tensor:
        """Every row's stored values at full width, pruned dims 0, not quantized."""
        with torch.no_grad():
            rows = torch.arange(self.layout.total_rows, device=self.keep.device)
            return BlockMixedEmbedding.lookup(self, rows)


@dataclass
class Allocation:
    keep: torch.Tensor  # [num_blocks, dim] bool, the dims each block keeps
    precisions: list[str]  # per block
    stored_bytes: int  # bytes of the materialised module, fixed structure included
    label: str  # how it was chosen: "tolerance 0.001", "all int8"
    valid: dict[str, float] = field(default_factory=dict)  # as served, before fine-tuning


def fixed_bytes(state: SearchState) -> int:
    """Bytes a QuantizedBlockEmbedding of this search stores whatever it keeps (its structure)."""
    soft, blocks = state.embedding, state.blocks
    empty = torch.zeros(blocks.num_blocks, soft.dim, dtype=torch.bool)
    return QuantizedBlockEmbedding(
        soft.layout, soft.dim, blocks, empty, ["fp32"] * blocks.num_blocks
    ).memory_bytes()


def allocate_bytes(
    score: torch.Tensor, tiebreak: torch.Tensor, blocks: BlockLayout, precisions: list[str],
    budget: int,
) -> tuple[torch.Tensor, int]:  # fmt: skip
    """keep [num_blocks, dim]: dims by descending score (ties by `tiebreak`) while the blocks'
    stored bytes, at `precisions`, fit `budget`; and those bytes. A dim that does not fit is
    skipped and smaller blocks' dims are still tried, as DNIS's parameter pruning does."""
    order = torch.argsort(tiebreak.reshape(-1), descending=True, stable=True)
    order = order[torch.argsort(score.reshape(-1)[order], descending=True, stable=True)]
    dim = score.shape[1]
    sizes = list(blocks.size)
    widths = [0] * blocks.num_blocks
    keep = torch.zeros(blocks.num_blocks * dim, dtype=torch.bool)
    spent = 0
    for index in order.tolist():
        k = index // dim
        if sizes[k] == 0:
            continue
        cost = sizes[k] * (
            row_bytes(widths[k] + 1, precisions[k]) - row_bytes(widths[k], precisions[k])
        )
        if spent + cost <= budget:
            keep[index] = True
            widths[k] += 1
            spent += cost
    return keep.view(blocks.num_blocks, dim), spent


def cheapest(
    sensitivity: list[dict[str, float]], allowed: list[str], tolerance: float
) -> list[str]:
    """Per block, the allowed precision of fewest bits that loses at most `tolerance` (the
    allowed one of most bits when none does)."""
    by_bits = sorted(allowed, key=lambda p: BITS[p])
    out = []
    for lost in sensitivity:
        fits = [p for p in by_bits if p == "fp32" or lost[p] <= tolerance]
        out.append(fits[0] if fits else by_bits[-1])
    return out


def undominated(keep: torch.Tensor, precisions: list[str], allowed: list[str]) -> list[str]:
    """Each block's precision, or an allowed one of more bits whose rows are no larger at the
    block's width: below width 4, fp16 rows (2 bytes a value) are smaller than int8 rows (a
    byte a value plus 4 of scale and bias), and the same holds for int4 below width 3."""
    out = []
    for width, precision in zip(keep.sum(1).tolist(), precisions, strict=True):
        better = [p for p in allowed if BITS[p] >= BITS[precision]]
        out.append(min(better, key=lambda p: (row_bytes(width, p), -BITS[p])))
    return out


class Allocator:
    """The searched model, what storing each block at each precision costs it, and the
    evaluation of candidate allocations as served."""

    def __init__(self, job: Job, state: SearchState, config: PrecisionConfig) -> None:
        self.job, self.state, self.config = job, state, config
        soft = state.embedding
        self.table = soft.selected_weight().detach()
        saliency = block_saliency(self.table, state.blocks)
        self.score = saliency if config.rank == "saliency" else soft.alpha.detach().cpu()
        self.tiebreak = saliency
        self.dense = dense_state(state.model)
        self.fixed = fixed_bytes(state)
        blocks = state.blocks.num_blocks
        everything = torch.ones(blocks, soft.dim, dtype=torch.bool)
        self.base = self.served(everything, ["fp32"] * blocks)
        self.sensitivity = self._sensitivity(everything)

    def served(self, keep: torch.Tensor, precisions: list[str]) -> dict[str, float]:
        """Validation metrics of the searched model with `keep` at `precisions`, not retrained."""
        model = self.model(keep, precisions)
        return self.job.task.evaluate(model, "valid", self.job.train.eval_batch_size)

    def model(self, keep: torch.Tensor, precisions: list[str]) -> Model:
        """The searched model around a fake-quantized block table keeping `keep`."""
        state, config = self.state, self.config
        compact = block_mixed(state.embedding, state.blocks, keep, self.table, config.placement)
        embedding = FakeQuantBlockMixed(compact, precisions)
        model: Model = swap_embedding(self.job.make_model, embedding, self.dense)
        return model.to(resolve_device(self.job.train.device))

    def _sensitivity(self, everything: torch.Tensor) -> list[dict[str, float]]:
        metric, task = self.job.task.metric, self.job.task
        base = self.base[metric]
        sign = 1.0 if task.higher_is_better else -1.0
        model = self.model(everything, ["fp32"] * len(everything))
        codes = model.embedding.precision_codes
        out = []
        for k in range(len(everything)):
            lost = {}
            for precision in self.config.precisions:
                if precision == "fp32":
                    continue
                codes.zero_()
                codes[k] = PRECISIONS.index(precision)
                valid = task.evaluate(model, "valid", self.job.train.eval_batch_size)
                lost[precision] = sign * (base - valid[metric])
            out.append(lost)
        codes.zero_()
        return out

    def candidates(self, budget: int) -> list[Allocation]:
        """Every tolerance's allocation and every uniform precision's, fitted to `budget` bytes
        (none when even an empty table does not fit)."""
        space = budget - self.fixed
        if space < 0:
            return []
        blocks = self.state.blocks.num_blocks
        choices = {f"tolerance {t:g}": cheapest(self.sensitivity, self.config.precisions, t)
                   for t in self.config.tolerances}  # fmt: skip
        choices.update({f"all {p}": [p] * blocks for p in self.config.precisions})
        seen, out = set(), []
        for label, chosen in choices.items():
            keep, spent = self.fit(chosen, space)
            precisions = undominated(keep, chosen, self.config.precisions)
            if precisions != chosen:  # the bytes freed may buy more dims
                wider, more = self.fit(precisions, space)
                if wider.sum() >= keep.sum():
                    keep, spent = wider, more
                else:  # the same dims, in no more bytes than before
                    spent = sum(n * row_bytes(w, p) for n, w, p in
                                zip(self.state.blocks.size, keep.sum(1).tolist(), precisions,
                                    strict=True))  # fmt: skip
            key = (tuple(precisions), keep.numpy().tobytes())
            if key in seen or not keep.any():
                continue
            seen.add(key)
            out.append(Allocation(keep, precisions, self.fixed + spent, label))
        for allocation in out:
            allocation.valid = self.served(allocation.keep, allocation.precisions)
        return out

    def fit(self, precisions: list[str], space: int) -> tuple[torch.Tensor, int]:
        """The dims kept at `precisions` within `space` bytes, and the bytes they take."""
        return allocate_bytes(self.score, self.tiebreak, self.state.blocks, precisions, space)

    def ranked(self, candidates: list[Allocation]) -> list[Allocation]:
        """The candidates by their validation metric as served, best first (stable)."""
        task = self.job.task
        sign = -1.0 if task.higher_is_better else 1.0
        return sorted(candidates, key=lambda c: sign * c.valid[task.metric])

    def finetuned_best(
        self, candidates: list[Allocation]
    ) -> tuple[Allocation, Model, Any, dict[str, float]]:
        """The `finalists` best candidates as served, each fine-tuned; the one whose fine-tuned
        model is best on validation, that model, its fit, and every finalist's validation
        metric after fine-tuning (by label). Before fine-tuning candidates often differ by
        less than the noise, and one that keeps more values recovers more in training."""
        metric, task = self.job.task.metric, self.job.task
        best: tuple[Allocation, Model, Any] | None = None
        trained = {}
        for candidate in self.ranked(candidates)[: self.config.finalists]:
            model, fit = finetune(self.job, self, candidate)
            trained[candidate.label] = fit.valid[metric]
            if best is None or task.better(fit.valid[metric], best[2].valid[metric]):
                best = (candidate, model, fit)
        assert best is not None
        return (*best, trained)


def finetune(job: Job, allocator: Allocator, chosen: Allocation) -> tuple[Model, Any]:
    """The chosen allocation trained quantization-aware from the searched weights."""
    torch.manual_seed(job.train.seed)
    model = allocator.model(chosen.keep, chosen.precisions)
    if allocator.config.retrain == "scratch":
        model.embedding.reset_parameters()
    fit = job.phases.fit(model, job.task, job.train, phase="dnis-precision fine-tune epoch")
    return model, fit


def materialize(model: Model, chosen: Allocation, job: Job) -> Model:
    """The fine-tuned model around the quantized table that serves what it served."""
    embedding = model.embedding
    assert isinstance(embedding, FakeQuantBlockMixed)
    quantized = QuantizedBlockEmbedding.from_dense(
        embedding.layout, embedding.dim, embedding.blocks, embedding.keep.cpu(),
        chosen.precisions, embedding.dense().cpu(),
    )  # fmt: skip
    return swap_embedding(job.make_model, quantized, dense_state(model))


def allocation_report(chosen: Allocation, candidates: list[Allocation], metric: str) -> dict:
    return {
        "chosen": chosen.label,
        "candidates": [
            {"label": c.label, "bytes": c.stored_bytes, f"valid_{metric}": c.valid[metric]}
            for c in candidates
        ],
    }


# DNIS options dnis-precision sets itself: a static schedule (the gradual phase prunes to
# parameter budgets, which a byte budget does not fix before the precisions are chosen), the
# searched structure and placement (the candidates are scored with the searched dense weights,
# whose dims must line up with the table's), no gradual floor, and no uniform fallback (the
# byte allocation chooses among its own candidates on validation)
PRECISION_FIXED = ("budgets", "schedule", "structure", "placement", "min_width", "fallback")


@register_method(
    "dnis-precision", PrecisionConfig, fixed=PRECISION_FIXED, unit="bytes", search_section=True
)
def dnis_precision_method(job: Job, config: PrecisionConfig) -> list[SearchResult]:
    """One DNIS search; per byte budget, widths and precisions allocated, fine-tuned with
    quantization-aware training, and stored quantized."""
    config = replace(
        config, budgets=list(job.budgets), schedule="static", structure="searched",
        placement="searched", min_width=0.0, fallback="none",
    )  # fmt: skip
    root = job.phases.root
    state = search(
        job.make_model, job.dataset, dim=job.dim, config=config, train=job.train,
        run_dir=None if root is None else root / "search", resume=job.phases.resume,
        config_hash=job.phases.config_hash,
    )  # fmt: skip
    allocator = Allocator(job, state, config)
    names = job.dataset.schema.names
    results = []
    for budget in job.budgets:
        started = time.perf_counter()
        budget_bytes = job.target_bytes(budget)
        candidates = allocator.candidates(budget_bytes)
        if not candidates:
            raise BudgetError(
                f"dnis-precision cannot store any dim within {budget_bytes:,} bytes (its block "
                f"structure alone takes {allocator.fixed:,})"
            )
        chosen, model, fit, trained = allocator.finetuned_best(candidates)
        served = materialize(model, chosen, job)
        test = job.task.evaluate(served, "test", job.train.eval_batch_size)
        valid = job.task.evaluate(served, "valid", job.train.eval_batch_size)
        quantized = served.embedding
        dims: dict[str, Any] = block_report(quantized.dims_per_block(), state.blocks, names)
        for f, name in enumerate(names):
            dims[name]["block_precisions"] = [
                chosen.precisions[b] for b in state.blocks.blocks_of(f)
            ]
        results.append(
            SearchResult.of_model(
                job.method,
                job.task.metric,
                budget,
                job.full,
                served,
                dims,
                valid,
                test,
                before=state.before,
                pruned=chosen.valid,
                search_seconds=state.seconds,
                retrain_seconds=time.perf_counter() - started,
                train_epochs=len(fit.history),
                epoch_cap_hit=fit.capped,
                history=state.history,
                unit="bytes",
                choice={
                    **allocation_report(chosen, candidates, job.task.metric),
                    "trained_valid": fit.valid[job.task.metric],  # quantization-aware, in training
                    "finalists": trained,
                },
            )
        )
    return results
