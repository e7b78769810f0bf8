"""The searched structure as a value: an `EmbeddingPlan`, written as `plan-<budget>.json` beside
every search result; export rebuilds the compact embedding from it.

A plan says, per field, how many ids the field has (`rows`), how many rows it stores
(`stored_rows`: fewer when ids share rows or are dropped), the kept width of a row (`width`, the
mean where rows differ) and the parameters it stores, and per frequency block (where the embedding
has blocks) the block's first row, rows and kept width. `kind` names the embedding, `options` its
own parameters (and a field's `options` the field's):

    kind          embedding                what the plan holds beyond the widths
    full          FusedEmbedding           nothing: every id keeps `dim`
    block-mixed   BlockMixedEmbedding      per block: the dims it keeps (`dims`)
    ragged        RaggedEmbedding          per field: mean width; which dims each id keeps is
                                           stored with the weights (CSR buffers indptr, dims)
    masked        MaskedEmbedding          as ragged; the mask is stored with the weights
    hashed        HashedEmbedding          per field: buckets and hash coefficients a, b
    qr            QREmbedding              per field: the collision count m (0: a full table)
    multiplexed   MultiplexedEmbedding     the shared table's rows, probes, combine; per field:
                                           the hash coefficients a, b (one per probe)
    projected     ProjectedBlockEmbedding  per block: its table width (a projection to `dim`)
    kept-rows     KeptRowsEmbedding        per field: kept rows; which rows is stored with the
                                           weights (buffer kept)
    field-subset  FieldSubsetEmbedding     per field: kept (full width) or dropped
    quantized     QuantizedEmbedding       the storage `precision` (fp16, int8, int4; row-wise
                                           scale and bias stored with the weights)
    quantized-blocks
                  QuantizedBlockEmbedding  per block: the dims it keeps (`dims`); options:
                                           `precisions`, each block's storage precision
                                           (fp32, fp16, int8, int4) in block order

`plan_of(embedding)` describes a trained embedding; `build(plan, layout, state)` rebuilds the
module that `state` (its saved state dict, keys without the `embedding.` prefix) loads into. An
embedding class no kind knows gets a plan of kind `custom:<ClassName>`, which describes its fields
but cannot be rebuilt: `build` refuses it, naming the class. A new kind is one `register_kind`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.field_subset import FieldSubsetEmbedding
from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.gated import KeptRowsEmbedding
from dnis.embeddings.hashed import HashedEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.masked import MaskedEmbedding
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding, ragged_keep
from dnis.embeddings.multiplexed import MultiplexedEmbedding
from dnis.embeddings.projected import ProjectedBlockEmbedding
from dnis.embeddings.qr import QREmbedding, qr_rows
from dnis.embeddings.quantized import PRECISIONS, QuantizedEmbedding
from dnis.embeddings.quantized_blocks import QuantizedBlockEmbedding
from dnis.errors import DnisError
from dnis.io import write_json
from dnis.registry import Registry

PLAN_VERSION = 1
State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class BlockPlan:
    start: int  # first global row
    rows: int
    width: int  # kept width of each of its rows
    dims: tuple[int, ...] | None = None  # which of the `dim` output dims it keeps (block-mixed)


@dataclass(frozen=True)
class FieldPlan:
    name: str
    rows: int  # ids of the field (its cardinality)
    stored_rows: int  # rows it stores (0 for a table shared by all fields: see the plan's options)
    width: float  # kept width of a row, the mean where rows differ
    params: int  # parameters it stores
    blocks: tuple[BlockPlan, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EmbeddingPlan:
    kind: str
    dim: int  # the width every model reads (pruned dims read zero)
    params: int  # parameters of the whole embedding
    fields: tuple[FieldPlan, ...]
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rebuildable(self) -> bool:
        return self.kind in KINDS

    def to_json(self) -> dict[str, Any]:
        def block(b: BlockPlan) -> dict[str, Any]:
            out: dict[str, Any] = {"start": b.start, "rows": b.rows, "width": b.width}
            return out if b.dims is None else {**out, "dims": list(b.dims)}

        fields = [
            {"name": f.name, "rows": f.rows, "stored_rows": f.stored_rows, "width": f.width,
             "params": f.params, "blocks": [block(b) for b in f.blocks], "options": dict(f.options)}
            for f in self.fields
        ]  # fmt: skip
        return {"version": PLAN_VERSION, "kind": self.kind, "dim": self.dim,
                "params": self.params, "options": dict(self.options), "fields": fields}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EmbeddingPlan:
        """The plan of `to_json`'s mapping (KeyError, TypeError or ValueError when it is not)."""
        if data["version"] != PLAN_VERSION:
            raise ValueError(f"plan version {data['version']}, this dnis reads {PLAN_VERSION}")

        def block(b: Mapping[str, Any]) -> BlockPlan:
            dims = b.get("dims")
            dims = None if dims is None else tuple(int(d) for d in dims)
            return BlockPlan(int(b["start"]), int(b["rows"]), int(b["width"]), dims)

        fields = tuple(
            FieldPlan(str(f["name"]), int(f["rows"]), int(f["stored_rows"]), float(f["width"]),
                      int(f["params"]), tuple(block(b) for b in f["blocks"]), dict(f["options"]))
            for f in data["fields"]
        )  # fmt: skip
        return cls(str(data["kind"]), int(data["dim"]), int(data["params"]), fields,
                   dict(data["options"]))  # fmt: skip

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> EmbeddingPlan:
        """The plan in `path`, or a DnisError saying why not."""
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DnisError(
                f"{path} is not a readable embedding plan ({type(error).__name__}: {error}); "
                "rerun the search that wrote it"
            ) from None


@dataclass(frozen=True)
class Kind:
    """An embedding kind: its class, what its plan holds, and how a module is rebuilt from it."""

    name: str
    cls: type[FieldEmbedding]
    describe: Callable[[Any], tuple[list[FieldPlan], dict[str, Any]]]
    build: Callable[[EmbeddingPlan, FieldLayout, State], FieldEmbedding]


KINDS: Registry[Kind] = Registry("embedding kind")


def register_kind(
    name: str,
    cls: type[FieldEmbedding],
    describe: Callable[[Any], tuple[list[FieldPlan], dict[str, Any]]],
    build: Callable[[EmbeddingPlan, FieldLayout, State], FieldEmbedding],
) -> None:
    """Make embedding class `cls` (exactly that class, not its subclasses) plannable as `name`:
    `describe(embedding) -> (field plans, options)`, `build(plan, layout, state) -> module`."""
    KINDS.register(name, Kind(name, cls, describe, build))


def plan_of(embedding: FieldEmbedding) -> EmbeddingPlan:
    """The plan of a (trained) embedding module."""
    for kind in KINDS.values():
        if type(embedding) is kind.cls:
            fields, options = kind.describe(embedding)
            name = kind.name
            break
    else:  # described by its field sizes only; `build` refuses it
        layout = embedding.layout
        fields = [FieldPlan(n, rows, rows, float(embedding.dim), 0)
                  for n, rows in zip(layout.names, layout.cardinalities, strict=True)]  # fmt: skip
        name, options = f"custom:{type(embedding).__name__}", {}
    return EmbeddingPlan(name, embedding.dim, embedding.num_parameters(), tuple(fields), options)


def build(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    """The empty embedding module of `plan` over `layout`, which `state` loads into."""
    kind = KINDS.get(plan.kind)
    if kind is None:
        raise DnisError(
            f"an embedding of kind {plan.kind!r} cannot be rebuilt from its plan (known kinds: "
            f"{', '.join(KINDS)}); register it with dnis.search.plan.register_kind to export it"
        )
    found = [(f.name, f.rows) for f in plan.fields]
    expected = list(zip(layout.names, layout.cardinalities, strict=True))
    if found != expected:
        raise DnisError(
            f"the plan's fields {found} are not the run's encoded fields {expected} (the encoders "
            "changed after the search); rerun the search"
        )
    return kind.build(plan, layout, state)


def tensor(state: State, key: str, kind: str) -> torch.Tensor:
    """Buffer `key` of a saved embedding of `kind`, or a DnisError naming it."""
    if key not in state:
        raise DnisError(
            f"the saved weights of a {kind} embedding lack its buffer {key!r} (keys: "
            f"{sorted(state)[:6]}); the file is not the one the plan was written with: rerun"
        )
    return state[key].cpu()


# ---------------------------------------------------------------- field descriptions


def row_fields(layout: FieldLayout, widths: torch.Tensor) -> list[FieldPlan]:
    """Fields whose every row keeps its own width (`widths` [total_rows])."""
    widths = widths.detach().cpu().long()
    out, start = [], 0
    for name, rows in zip(layout.names, layout.cardinalities, strict=True):
        w = widths[start : start + rows]
        start += rows
        params = int(w.sum())
        out.append(FieldPlan(name, rows, int((w > 0).sum()), params / max(rows, 1), params))
    return out


def block_fields(
    layout: FieldLayout, blocks: BlockLayout, widths: Sequence[int], dim: int,
    dims: Sequence[tuple[int, ...]] | None = None, projected: bool = False,
) -> list[FieldPlan]:  # fmt: skip
    """Fields cut into blocks, block b keeping `widths[b]` (projected: plus a [w, dim] map)."""
    out = []
    for f, (name, rows) in enumerate(zip(layout.names, layout.cardinalities, strict=True)):
        plans = tuple(
            BlockPlan(blocks.start[b], blocks.size[b], int(widths[b]), dims and dims[b])
            for b in blocks.blocks_of(f)
        )
        stored = sum(b.rows * b.width for b in plans)
        params = stored + (sum(b.width for b in plans) * dim if projected else 0)
        kept = sum(b.rows for b in plans if b.width)
        out.append(FieldPlan(name, rows, kept, stored / max(rows, 1), params, plans))
    return out


def plan_blocks(plan: EmbeddingPlan) -> BlockLayout:
    """The block layout a plan's fields list (frequencies are not part of a plan: 0)."""
    entries = [(f, b) for f, fp in enumerate(plan.fields) for b in fp.blocks]
    return BlockLayout(
        tuple(f for f, _ in entries),
        tuple(b.start for _, b in entries),
        tuple(b.rows for _, b in entries),
        (0,) * len(entries),
    )


def same_fields(layout: FieldLayout, dim: int, width: Callable[[int, int], int]) -> list[FieldPlan]:
    """Fields storing `width(field, rows)` rows of `dim` each."""
    out = []
    for f, (name, rows) in enumerate(zip(layout.names, layout.cardinalities, strict=True)):
        stored = width(f, rows)
        out.append(FieldPlan(name, rows, stored, float(dim if stored else 0), stored * dim))
    return out


def with_options(fields: list[FieldPlan], options: Sequence[Mapping[str, Any]]) -> list[FieldPlan]:
    return [
        FieldPlan(f.name, f.rows, f.stored_rows, f.width, f.params, f.blocks, dict(o))
        for f, o in zip(fields, options, strict=True)
    ]


# ---------------------------------------------------------------- the built-in kinds


def _full(e: FusedEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    return same_fields(e.layout, e.dim, lambda f, rows: rows), {}


def _kept_dims(e: BlockMixedEmbedding | QuantizedBlockEmbedding) -> list[FieldPlan]:
    """Fields of an embedding whose blocks keep the dims of its `keep` [num_blocks, dim]."""
    keep = e.keep.cpu()
    dims = [tuple(int(d) for d in row.nonzero().flatten()) for row in keep]
    return block_fields(e.layout, e.blocks, keep.sum(1).tolist(), e.dim, dims)


def _block_mixed(e: BlockMixedEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    return _kept_dims(e), {}


def _plan_keep(plan: EmbeddingPlan, state: State) -> tuple[BlockLayout, torch.Tensor]:
    """The blocks and keep mask of a block-mixed plan, checked against the saved `keep`."""
    blocks = plan_blocks(plan)
    keep = torch.zeros(blocks.num_blocks, plan.dim, dtype=torch.bool)
    for b, block in enumerate(b for f in plan.fields for b in f.blocks):
        keep[b, list(block.dims or ())] = True
    saved = state.get("keep")
    if saved is not None and not torch.equal(saved.cpu().bool(), keep):
        raise DnisError("the saved weights keep other dims than the plan says; rerun the search")
    return blocks, keep


def _build_block_mixed(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    return BlockMixedEmbedding(layout, plan.dim, *_plan_keep(plan, state))


def _quantized_blocks(e: QuantizedBlockEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    return _kept_dims(e), {"precisions": e.block_precisions()}


def _build_quantized_blocks(
    plan: EmbeddingPlan, layout: FieldLayout, state: State
) -> FieldEmbedding:
    blocks, keep = _plan_keep(plan, state)
    precisions = [str(p) for p in plan_option(plan, "precisions")]
    if len(precisions) != blocks.num_blocks or not set(precisions) <= set(PRECISIONS):
        raise DnisError(
            f"the plan's precisions {precisions} are not one of {PRECISIONS} for each of its "
            f"{blocks.num_blocks} blocks; rerun the search"
        )
    module = QuantizedBlockEmbedding(layout, plan.dim, blocks, keep, precisions)
    saved = state.get("block_precision")
    if saved is not None and not torch.equal(saved.cpu(), module.block_precision):
        raise DnisError(
            "the saved weights store other block precisions than the plan says; rerun the search"
        )
    return module


def _ragged(e: RaggedEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    return row_fields(e.layout, e.widths()), {"structure": "weights: indptr, dims (CSR)"}


def _build_ragged(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    indptr, dims = tensor(state, "indptr", plan.kind), tensor(state, "dims", plan.kind)
    if indptr.numel() != layout.total_rows + 1:
        raise DnisError(
            f"the saved ragged table has {indptr.numel() - 1} rows but the run's encoders have "
            f"{layout.total_rows}; rerun the search"
        )
    return RaggedEmbedding(layout, plan.dim, ragged_keep(indptr, dims, layout.total_rows, plan.dim))


def _masked(e: MaskedEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    return row_fields(e.layout, e.row_widths()), {"structure": "weights: mask"}


def _build_masked(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    return MaskedEmbedding(layout, plan.dim, tensor(state, "mask", plan.kind))


def _hashed(e: HashedEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    buckets, a, b = e.rows.tolist(), e.a.tolist(), e.b.tolist()
    fields = same_fields(e.layout, e.dim, lambda f, rows: buckets[f])
    options = [{"buckets": buckets[f], "a": a[f], "b": b[f]} for f in range(len(fields))]
    return with_options(fields, options), {}


def _build_hashed(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    module = HashedEmbedding(layout, plan.dim, [f.options["buckets"] for f in plan.fields])
    module.a.copy_(torch.tensor([f.options["a"] for f in plan.fields]))
    module.b.copy_(torch.tensor([f.options["b"] for f in plan.fields]))
    return module


def _qr(e: QREmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    m = e.m.tolist()
    fields = same_fields(e.layout, e.dim, lambda f, rows: sum(qr_rows(rows, m[f])))
    return with_options(fields, [{"m": v} for v in m]), {}


def _build_qr(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    return QREmbedding(layout, plan.dim, [f.options["m"] for f in plan.fields])


def _multiplexed(e: MultiplexedEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    fields = [FieldPlan(n, rows, 0, float(e.dim), 0)
              for n, rows in zip(e.layout.names, e.layout.cardinalities, strict=True)]  # fmt: skip
    options = [{"a": a, "b": b} for a, b in zip(e.a.tolist(), e.b.tolist(), strict=True)]
    shared = {"rows": e.num_rows, "probes": e.probes, "combine": e.combine, "width": e.width}
    return with_options(fields, options), shared


def _build_multiplexed(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    o = plan.options
    module = MultiplexedEmbedding(layout, plan.dim, o["rows"], o["probes"], o["combine"])
    module.a.copy_(torch.tensor([f.options["a"] for f in plan.fields]))
    module.b.copy_(torch.tensor([f.options["b"] for f in plan.fields]))
    return module


def _projected(e: ProjectedBlockEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    return block_fields(e.layout, e.blocks, e.width_list, e.dim, projected=True), {}


def _build_projected(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    widths = [b.width for f in plan.fields for b in f.blocks]
    return ProjectedBlockEmbedding(layout, plan.dim, plan_blocks(plan), widths)


def _kept_rows(e: KeptRowsEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    widths = torch.zeros(e.layout.total_rows, dtype=torch.long)
    widths[e.kept.long().cpu()] = e.dim
    return row_fields(e.layout, widths), {"structure": "weights: kept (sorted global rows)"}


def _build_kept_rows(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    keep = torch.zeros(layout.total_rows, dtype=torch.bool)
    keep[tensor(state, "kept", plan.kind).long()] = True
    return KeptRowsEmbedding(layout, plan.dim, keep)


def _field_subset(e: FieldSubsetEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    keep = e.keep.tolist()
    fields = same_fields(e.layout, e.dim, lambda f, rows: rows if keep[f] else 0)
    return with_options(fields, [{"kept": k} for k in keep]), {}


def _build_field_subset(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    return FieldSubsetEmbedding(layout, plan.dim, [bool(f.options["kept"]) for f in plan.fields])


def _quantized(e: QuantizedEmbedding) -> tuple[list[FieldPlan], dict[str, Any]]:
    return same_fields(e.layout, e.dim, lambda f, rows: rows), {"precision": e.precision}


def _build_quantized(plan: EmbeddingPlan, layout: FieldLayout, state: State) -> FieldEmbedding:
    precision = str(plan_option(plan, "precision"))
    if precision not in PRECISIONS:
        raise DnisError(f"the plan's precision {precision!r} is not one of {PRECISIONS}")
    module = QuantizedEmbedding(layout, plan.dim, precision)
    codes, saved = module.codes, tensor(state, "codes", plan.kind)
    if saved.dtype != codes.dtype or saved.shape != codes.shape:
        raise DnisError(
            f"the saved codes ({saved.dtype}, {list(saved.shape)}) are not those of a {precision} "
            f"table ({codes.dtype}, {list(codes.shape)}); the file is not the one the plan was "
            "written with: rerun"
        )
    return module


def plan_option(plan: EmbeddingPlan, key: str) -> Any:
    """Option `key` of a plan, or a DnisError naming it."""
    if key not in plan.options:
        raise DnisError(
            f"the {plan.kind} plan lacks its option {key!r} (options: {sorted(plan.options)}); "
            "rerun the search that wrote it"
        )
    return plan.options[key]


register_kind("full", FusedEmbedding, _full, lambda p, layout, s: FusedEmbedding(layout, p.dim))
register_kind("block-mixed", BlockMixedEmbedding, _block_mixed, _build_block_mixed)
register_kind("ragged", RaggedEmbedding, _ragged, _build_ragged)
register_kind("masked", MaskedEmbedding, _masked, _build_masked)
register_kind("hashed", HashedEmbedding, _hashed, _build_hashed)
register_kind("qr", QREmbedding, _qr, _build_qr)
register_kind("multiplexed", MultiplexedEmbedding, _multiplexed, _build_multiplexed)
register_kind("projected", ProjectedBlockEmbedding, _projected, _build_projected)
register_kind("kept-rows", KeptRowsEmbedding, _kept_rows, _build_kept_rows)
register_kind("field-subset", FieldSubsetEmbedding, _field_subset, _build_field_subset)
register_kind("quantized", QuantizedEmbedding, _quantized, _build_quantized)
register_kind(
    "quantized-blocks", QuantizedBlockEmbedding, _quantized_blocks, _build_quantized_blocks
)
