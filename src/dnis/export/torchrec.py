"""TorchRec hand-off: the searched structure as TorchRec table configs plus the compact weights.

`dnis export RUN_DIR --format torchrec [--budget B]` writes

    <output>/
      torchrec_tables.json  a list of tables, each a dict with exactly the fields of TorchRec's
                            `EmbeddingBagConfig` (name, num_embeddings, embedding_dim,
                            feature_names, pooling: "SUM" | "MEAN", data_type: "FP32" | "FP16" |
                            "INT8" | "INT4", TorchRec's `DataType` names) plus a `dnis` dict that
                            routes encoded ids to (table, row) and the table's columns back to the
                            model
      weights.pt            torch.save({"<table>.weight": tensor, ...}), per table as its data
                            type stores it (Weights below); TorchRec's EmbeddingBagCollection names
                            an FP32 or FP16 table's weight "embedding_bags.<table>.weight"
      dense.pt              torch.save(every other weight of the model, keyed as in the model)
      row_ids.pt            only for tables that hold some of their ids' rows (a kept-rows run):
                            torch.save({"<table>": int32 [num_embeddings]}), the encoded id of
                            every row (Routing below)
      encoders.json         the run's fitted encoders (raw values -> encoded ids)
      config.yaml           the run's resolved config
      manifest.json         as for the other formats (sha256 of every file, parameter counts, the
                            check), plus manifest["torchrec"]: every field's blocks, pruned ones too,
                            each module's bytes, and the layout of every data type it holds

Tables. A search run of block granularity (`BlockMixedEmbedding`, or `QuantizedBlockEmbedding`
of `--method dnis-precision`, whose blocks each keep their own precision) gives one table per
(field, frequency block) of width > 0, named `<field>__b<k>`; a train run (`FusedEmbedding`) or a
quantized uniform table (`QuantizedEmbedding`, `--method int8 | int4`) gives one table per field
named `<field>`, of the full width. So does an OutRank field selection (`FieldSubsetEmbedding`,
`--method outrank`), for the fields it keeps; a dropped field gets no table (its ids read 0), as
a pruned block. An OptFS run (`KeptRowsEmbedding`, `--method optfs`) gives one full-width table
per field `<field>` holding only the rows it kept (a field that kept none gets no table), with
the ids those rows hold in row_ids.pt. The per-id width-1 weights some models keep beside the
input layer (the linear terms of FM, DeepFM, AutoInt and biased MF, module `linear.weights`) become one
table per field too, `<field>__linear_weights`, so every per-id weight goes to TorchRec and
dense.pt holds only the dense layers. Names keep [A-Za-z0-9_] (other characters become _); every
table is read by one feature of the same name.

Weights. What weights.pt holds for a table `t` of n rows, by its data_type:

    FP32  t.weight  float32 [n, embedding_dim]
    FP16  t.weight  float16 [n, embedding_dim]
    INT8  t.weight  uint8 [n, embedding_dim]: the codes;
          t.weight_qscale, t.weight_qbias  float16 [n, 1]: the row's scale and bias
    INT4  t.weight  uint8 [n, embedding_dim / 2]: two codes a byte, column 2j in the low nibble;
          t.weight_qscale, t.weight_qbias  float16 [n, 1]

and value j of row r is `code[r, j] * scale[r] + bias[r]`, in float32 (`dequantize_rows`). These are
the module's own stored bytes, unchanged: dnis quantizes row-wise with an fp16 scale and bias
(`dnis.embeddings.quantized`), which is the row layout of TorchRec's quantized
`EmbeddingBagCollection` (`torchrec.quant.embedding_modules`, FBGEMM's
`IntNBitTableBatchedEmbeddingBagsCodegen`): per row the codes and a 4-byte `scale_shift`, the fp16
scale then the fp16 bias (FBGEMM's `FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`; not the fp32
scale and bias of the `Fused8BitRowwise` ops). `TorchRecTables.quantized_weights()` gives that
collection's `table_name_to_quantized_weights` argument: per table (t.weight, scale_shift =
cat([t.weight_qscale, t.weight_qbias], 1) viewed as uint8 [n, 4]) for INT8/INT4, and
(t.weight viewed as uint8, None) for FP16/FP32. FBGEMM packs int4 at byte granularity, so it
needs an even embedding_dim: an INT4 table of odd width w is exported with embedding_dim w + 1,
the extra column being the zero-code nibble each row already stores (its value is the row's
bias, not 0): `padding_columns` says so and the routing drops it. In memory FBGEMM also pads every
row to `row_alignment` bytes (16 by default); the files hold the rows unpadded.

Bytes. `manifest["torchrec"]["modules"][path]["bytes"]` counts the table tensors of weights.pt
(codes or values, scales and biases): exactly the rows' `row_bytes`. "memory_bytes" is the
module's own `memory_bytes()`, which also counts the state-dict entries that are structure, not
rows, listed with their bytes in "structure_bytes" (`keep`: one byte per block and dim, and for a
QuantizedBlockEmbedding `block_precision`: one byte per block); the export writes those as each
table's kept_dims and data_type. So bytes + sum(structure_bytes) == memory_bytes. A
FieldSubsetEmbedding's structure is `keep` (a byte per field), a KeptRowsEmbedding's `kept` (its
int32 index, 4 bytes per kept row: what row_ids.pt holds, split by field).

Routing, the `dnis` dict of a table. Encoded ids are frequency-sorted per field, so block k of a
field holds its ids [id_start, id_end). In an encoded row (what the encoders' `transform`
returns), the ids in the field's slots [slot_start, slot_start + slots) that fall in that range go
to the table at row id - id_start; a sequence field's padding id 0 (`padding_id`) is dropped,
while id 0 of any other field is its learned out-of-vocabulary row. A table whose `row_ids` names
row_ids.pt (a kept-rows table: id_start 0, id_end the field's cardinality) holds only some ids:
row r holds encoded id `row_ids.pt[<table>][r]` (ascending, so a binary search finds an id's row),
and an id not listed has no row: it is dropped from the bag like padding (TorchRec has no
missing-id value), which adds the zero vector the model reads for it. Column j < len(kept_dims) of
the table is dim kept_dims[j] of the module's width-`dim` field vector (the last
`padding_columns` columns, if any, are dropped), which is

    sum over the field's tables of (its pooled output scattered into kept_dims)
    divided by the field's number of ids (at least 1) when `divide_by_count`

A single-valued field sends its one id to one table, so the others pool empty bags (zeros). A
sequence field pooled by mean is exported with pooling MEAN when one table holds all its ids;
when its ids are spread over several blocks, or its table lacks rows for some of them (kept
rows), its tables are SUM-pooled with divide_by_count, since the model's mean counts every id of
the field but padding (a dropped id too) and a bag's mean counts only the ids in the bag. A block
the search pruned to width 0 has no table (TorchRec tables need a width): its ids give zero
vectors.

RaggedEmbedding (element granularity) is refused: every id keeps its own set of dims, so even the
ids of one width keep different dims, and fixed-width tables would need a column index per row.
Search with `search.granularity: block` to hand the result to TorchRec.

TorchRec is not needed to export or to check: `TorchRecTables` rebuilds the input layer from the
written files with plain torch (`embedding_bag` per table over its dequantized rows and the rule
above), and the export is refused unless it equals the model on every id and on a batch of
encoded rows. TorchRec is not a dnis extra: `pip install torchrec` pulls `fbgemm-gpu`, a CUDA build
tied to one torch version, which does not load beside a CPU torch or another version; see the
README for a combination that works.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.field_subset import FieldSubsetEmbedding
from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.gated import KeptRowsEmbedding
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding
from dnis.embeddings.quantized import (
    QuantizedEmbedding,
    dequantize_rows,
    is_integer,
)
from dnis.embeddings.quantized_blocks import QuantizedBlockEmbedding
from dnis.errors import DnisError
from dnis.export.folder import (
    FORMATS,
    MANIFEST,
    ExportResult,
    build_manifest,
    read_manifest,
    staged,
    write_run_files,
)
from dnis.export.source import RunModel
from dnis.export.traceable import example_ids
from dnis.io import write_json
from dnis.train.checkpoint import safe_load

FILENAME = FORMATS["torchrec"]
WEIGHTS = "weights.pt"
DENSE = "dense.pt"
ROW_IDS = "row_ids.pt"  # {table: int32 sorted encoded ids}: the tables whose rows skip ids
INPUT = "embedding"  # the model's searched input layer
CHECK_ROWS = 257  # encoded rows pooled through the tables by the export's check
CHECK_TOLERANCE = 1e-5  # max |tables - model| the export accepts (float32 sums in another order)
CHUNK = 1 << 16  # ids compared per lookup in the every-id check
# a dnis storage precision -> TorchRec's DataType name (torchrec.modules.embedding_configs)
DATA_TYPES = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8", "int4": "INT4"}
PRECISION_OF = {name: precision for precision, name in DATA_TYPES.items()}
SCALE, BIAS = "weight_qscale", "weight_qbias"  # "<table>.<SCALE>": TorchRec's split state-dict key
# weights.pt per data type (the module docstring says it in full); manifest["torchrec"]["layouts"]
LAYOUTS = {
    "FP32": "<table>.weight float32 [num_embeddings, embedding_dim]",
    "FP16": "<table>.weight float16 [num_embeddings, embedding_dim]; TorchRec's quantized "
    "EmbeddingBagCollection takes weight.view(torch.uint8) as its quantized weight",
    "INT8": "<table>.weight uint8 [num_embeddings, embedding_dim] codes; <table>.weight_qscale "
    "and <table>.weight_qbias float16 [num_embeddings, 1]; value = code * scale + bias in "
    "float32; TorchRec's quantized EmbeddingBagCollection (FBGEMM row-wise, fp16 scale and bias) "
    "takes (weight, cat([weight_qscale, weight_qbias], 1).view(torch.uint8))",
    "INT4": "<table>.weight uint8 [num_embeddings, embedding_dim / 2] codes, two a byte, column "
    "2j in the low nibble and 2j + 1 in the high one; <table>.weight_qscale and "
    "<table>.weight_qbias float16 [num_embeddings, 1]; value = code * scale + bias in float32; "
    "TorchRec's quantized EmbeddingBagCollection takes (weight, cat([weight_qscale, "
    "weight_qbias], 1).view(torch.uint8)); an odd width is exported one column wider "
    "(padding_columns: 1, the row's zero-code nibble, worth its bias), as FBGEMM packs int4 "
    "rows at byte granularity",
}
ROW_KEYS = ("weight", "values", "codes", "scale", "bias")  # state-dict entries holding rows
ROW_IDS_LAYOUT = (
    f"{ROW_IDS}: {{<table>: int32 [num_embeddings]}}, the ascending encoded ids of the field "
    "that the table's rows hold (row r holds id row_ids[r]); an id of the field not in it has "
    "no row, reads 0 and is left out of the KeyedJaggedTensor"
)


@dataclass
class Block:
    """A contiguous range of one field's encoded ids stored at one width."""

    field: int
    index: int  # k: its place among the field's blocks
    id_start: int
    id_end: int
    kept_dims: list[int]
    weight: torch.Tensor  # [rows, len(kept_dims)] values, or int8/int4 codes: uint8 [rows, bytes]
    precision: str = "fp32"  # how `weight` stores the rows: fp32, fp16, int8 or int4
    scale: torch.Tensor | None = None  # float16 [id_end - id_start] of an int8/int4 block
    bias: torch.Tensor | None = None
    # int32 [rows]: the sorted encoded ids the rows hold, where they are not all of
    # [id_start, id_end) (a KeptRowsEmbedding's kept rows); None: row r holds id id_start + r
    ids: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.id_end - self.id_start if self.ids is None else int(self.ids.numel())

    def drops(self, padding_id: int | None) -> bool:
        """Whether some id of [id_start, id_end) that the routing sends (not padding) has no row."""
        if self.ids is None:
            return False
        routed = self.id_end - self.id_start
        held = self.ids
        if padding_id is not None and self.id_start <= padding_id < self.id_end:
            routed -= 1
            held = held[held != padding_id]
        return int(held.numel()) < routed

    @property
    def table_dim(self) -> int:
        """The table's embedding_dim: the kept width, made even for int4 (FBGEMM packs bytes)."""
        width = len(self.kept_dims)
        return width + width % 2 if self.precision == "int4" else width

    @property
    def bytes(self) -> int:
        """Bytes of what the block stores: codes or values, and scales and biases."""
        parts = (self.weight, self.scale, self.bias)
        return sum(int(t.numel()) * t.element_size() for t in parts if t is not None)


def module_blocks(module: nn.Module, path: str) -> list[Block]:
    """The blocks of one per-id module, in row order; a DnisError for what has no table form."""
    if isinstance(module, RaggedEmbedding):
        raise DnisError(
            "a search of element granularity (RaggedEmbedding: every id keeps its own dims) does "
            "not map to TorchRec's fixed-width tables; run the search with "
            "`search.granularity: block` (one width per field and frequency block) and export "
            "that, or export this run with --format torchscript or onnx"
        )
    kinds = (
        FusedEmbedding
        | BlockMixedEmbedding
        | QuantizedEmbedding
        | QuantizedBlockEmbedding
        | FieldSubsetEmbedding
        | KeptRowsEmbedding
    )
    if not isinstance(module, kinds):
        raise DnisError(
            f"module {path!r} of the model is a {type(module).__name__}, which has no TorchRec "
            "export; only train runs (FusedEmbedding), DNIS block searches "
            "(BlockMixedEmbedding), quantized tables (QuantizedEmbedding of --method int8 or "
            "int4, QuantizedBlockEmbedding of --method dnis-precision), field selections "
            "(FieldSubsetEmbedding of --method outrank) and kept rows (KeptRowsEmbedding of "
            "--method optfs) can be exported as TorchRec tables"
        )
    layout = module.layout
    offsets = layout.field_offsets().tolist()
    if isinstance(module, QuantizedBlockEmbedding):
        return quantized_blocks(module, offsets)
    if isinstance(module, FieldSubsetEmbedding):
        return field_subset_blocks(module)
    if isinstance(module, KeptRowsEmbedding):
        return kept_rows_blocks(module, offsets)
    if isinstance(module, FusedEmbedding | QuantizedEmbedding):
        quantized = isinstance(module, QuantizedEmbedding)
        weight = (module.codes if quantized else module.weight).detach().cpu()
        scale = module.scale.cpu() if quantized and module.scale is not None else None
        bias = module.bias.cpu() if quantized and module.bias is not None else None
        precision = module.precision if quantized else "fp32"
        dims = list(range(module.dim))
        out = []
        for f, n in enumerate(layout.cardinalities):
            rows = slice(offsets[f], offsets[f] + n)
            field_scale = None if scale is None else scale[rows]
            field_bias = None if bias is None else bias[rows]
            out.append(Block(f, 0, 0, n, dims, weight[rows], precision, field_scale, field_bias))
        return out
    blocks, keep = module.blocks, module.keep.cpu()
    values = module.values.detach().cpu()
    out, base, seen = [], 0, [0] * layout.num_fields
    for b in range(blocks.num_blocks):
        field, start, size = blocks.field[b], blocks.start[b], blocks.size[b]
        kept = keep[b].nonzero().flatten().tolist()
        weight = values[base : base + size * len(kept)].view(size, len(kept))
        base += size * len(kept)
        first = start - offsets[field]
        out.append(Block(field, seen[field], first, first + size, kept, weight))
        seen[field] += 1
    return out


def quantized_blocks(module: QuantizedBlockEmbedding, offsets: list[int]) -> list[Block]:
    """A QuantizedBlockEmbedding's blocks, each its stored rows (codes, scale, bias) unchanged."""
    blocks, keep = module.blocks, module.keep.cpu()
    out, seen = [], [0] * module.layout.num_fields
    for k in range(blocks.num_blocks):
        field, start, size = blocks.field[k], blocks.start[k], blocks.size[k]
        kept = keep[k].nonzero().flatten().tolist()
        precision = module.precisions[k] if kept else "fp32"
        scale = bias = None
        if k in module.placement:  # stored: width > 0 and rows > 0
            step, unit, entry = module.placement[k]
            codes = getattr(module, f"codes_{precision}").detach().cpu()
            weight = codes[unit : unit + step * size].view(size, step)
            if is_integer(precision):
                scale = getattr(module, f"scale_{precision}").cpu()[entry : entry + size]
                bias = getattr(module, f"bias_{precision}").cpu()[entry : entry + size]
        else:  # nothing stored: an empty block of the width (a table of 0 rows if width > 0)
            weight = empty_rows(size, len(kept), precision)
            if is_integer(precision):
                scale = bias = torch.zeros(size, dtype=torch.float16)
        first = start - offsets[field]
        out.append(
            Block(field, seen[field], first, first + size, kept, weight, precision, scale, bias)
        )
        seen[field] += 1
    return out


def field_subset_blocks(module: FieldSubsetEmbedding) -> list[Block]:
    """One full-width block per field; a dropped field keeps no dims (no table, reads 0)."""
    weight, keep = module.weight.detach().cpu(), module.keep.cpu().tolist()
    compact = module.compact_offsets.cpu().tolist()
    out = []
    for f, n in enumerate(module.layout.cardinalities):
        if keep[f]:
            rows, dims = weight[compact[f] : compact[f] + n], list(range(module.dim))
        else:
            rows, dims = weight.new_zeros(n, 0), []
        out.append(Block(f, 0, 0, n, dims, rows))
    return out


def kept_rows_blocks(module: KeptRowsEmbedding, offsets: list[int]) -> list[Block]:
    """One full-width block per field holding only its kept rows, with the encoded ids they
    hold; a field that keeps no row keeps no dims (no table, reads 0)."""
    weight, kept = module.weight.detach().cpu(), module.kept.long().cpu()
    bounds = torch.searchsorted(kept, torch.tensor([*offsets, module.layout.total_rows]))
    out = []
    for f, n in enumerate(module.layout.cardinalities):
        first, last = int(bounds[f]), int(bounds[f + 1])  # kept is sorted: a field's are a run
        ids = (kept[first:last] - offsets[f]).to(torch.int32)
        dims = list(range(module.dim)) if last > first else []
        rows = weight[first:last] if dims else weight.new_zeros(0, 0)
        out.append(Block(f, 0, 0, n, dims, rows, ids=ids))
    return out


def empty_rows(rows: int, width: int, precision: str) -> torch.Tensor:
    """Zero rows as a block of `width` stores them at `precision`."""
    if precision == "int4":
        return torch.zeros(rows, (width + 1) // 2, dtype=torch.uint8)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.uint8)
    return torch.zeros(rows, width, dtype=dtype)


def per_id_modules(model: nn.Module) -> dict[str, FieldEmbedding]:
    """{path: module} of the model's per-id tables: its input layer first, then e.g. linear terms."""
    found = {INPUT: model.embedding}
    for path, module in model.named_modules():
        if isinstance(module, FieldEmbedding) and path.split(".")[0] != INPUT:
            found[path] = module
    return found


def safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"


def field_routes(run: RunModel) -> list[dict[str, Any]]:
    """Where each field's ids sit in an encoded row, and how the model pools them."""
    routes, slot = [], 0
    layout = run.model.embedding.layout
    for f, spec in enumerate(run.encoder.schema.features):
        sequence = spec.kind == "sequence"
        routes.append(
            {
                "field": spec.name,
                "field_index": f,
                "kind": spec.kind,
                "slot_start": slot,
                "slots": spec.width,
                "padding_id": 0 if sequence else None,
                "field_pooling": spec.pooling if sequence else "sum",
                "cardinality": layout.cardinalities[f],
            }
        )
        slot += spec.width
    return routes


def unique(names: list[str]) -> list[str]:
    """The names in order, a repeated one suffixed _1, _2, ... (never clashing with another)."""
    taken: set[str] = set()
    out = []
    for name in names:
        candidate, k = name, 0
        while candidate in taken:
            k += 1
            candidate = f"{name}_{k}"
        taken.add(candidate)
        out.append(candidate)
    return out


def structure_of(module: nn.Module) -> str:
    """How a module's rows become tables (`manifest["torchrec"]["modules"][path]["structure"]`)."""
    if isinstance(module, BlockMixedEmbedding | QuantizedBlockEmbedding):
        return "block"  # a table per field and frequency block
    if isinstance(module, FieldSubsetEmbedding):
        return "field-subset"  # a full-width table per kept field
    if isinstance(module, KeptRowsEmbedding):
        return "kept-rows"  # a full-width table per field of its kept rows, with their ids
    return "full"  # a full-width table per field


def table_name(field: str, path: str, structure: str, block: int) -> str:
    if path != INPUT:
        return f"{field}__{safe(path)}"
    return f"{field}__b{block}" if structure == "block" else field


def build_tables(
    run: RunModel,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(table configs, {"<table>.weight": tensor}, {table: row ids} of the tables that skip ids,
    manifest["torchrec"]) of a run's model."""
    routes = field_routes(run)
    fields = unique([safe(r["field"]) for r in routes])
    found = []  # (path, module, structure, blocks)
    for path, module in per_id_modules(run.model).items():
        found.append((path, module, structure_of(module), module_blocks(module, path)))
    names = iter(
        unique(
            [
                table_name(fields[b.field], path, structure, b.index)
                for path, _, structure, blocks in found
                for b in blocks
                if b.kept_dims
            ]
        )
    )  # unique even if a field is literally named "x__b0" beside a field "x"
    configs, weights, row_ids, modules = [], {}, {}, {}
    for path, module, structure, blocks in found:
        count = [0] * len(routes)
        for block in blocks:
            count[block.field] += 1
        listed = []
        for block in blocks:
            route, width = routes[block.field], len(block.kept_dims)
            name = next(names) if width else None
            mean = route["field_pooling"] == "mean"
            # TorchRec's MEAN divides by the ids in the bag: right when the field's ids all go
            # to this table; else SUM, divided by all the field's ids (dropped ones count)
            whole = count[block.field] == 1 and not block.drops(route["padding_id"])
            listed.append(
                {
                    "field": route["field"],
                    "field_index": block.field,
                    "block": block.index,
                    "id_start": block.id_start,
                    "id_end": block.id_end,
                    "width": width,
                    "stored_rows": block.rows if width else 0,
                    "table": name,
                    "data_type": DATA_TYPES[block.precision] if width else None,
                }
            )
            if name is None:
                continue
            configs.append(
                {
                    "name": name,
                    "num_embeddings": block.rows,
                    "embedding_dim": block.table_dim,
                    "feature_names": [name],
                    "pooling": "MEAN" if mean and whole else "SUM",
                    "data_type": DATA_TYPES[block.precision],
                    "dnis": {
                        "module": path,
                        **{k: v for k, v in route.items() if k != "cardinality"},
                        "block": block.index,
                        "num_blocks": count[block.field],
                        "id_start": block.id_start,
                        "id_end": block.id_end,
                        "row_ids": None if block.ids is None else ROW_IDS,
                        "dim": module.dim,
                        "kept_dims": block.kept_dims,
                        "padding_columns": block.table_dim - width,
                        "divide_by_count": mean and not whole,
                    },
                }
            )
            weights[f"{name}.weight"] = block.weight.contiguous().clone()
            if block.ids is not None:
                row_ids[name] = block.ids.clone()
            if block.scale is not None and block.bias is not None:
                weights[f"{name}.{SCALE}"] = block.scale.reshape(-1, 1).clone()
                weights[f"{name}.{BIAS}"] = block.bias.reshape(-1, 1).clone()
        state = module.state_dict()
        structure_bytes = {
            key: int(t.numel()) * t.element_size()
            for key, t in state.items()
            if not key.startswith(ROW_KEYS)
        }
        modules[path] = {
            "dim": module.dim,
            "structure": structure,
            "embedding": type(module).__name__,
            "parameters": sum(b.rows * len(b.kept_dims) for b in blocks),
            "bytes": sum(b.bytes for b in blocks),
            "memory_bytes": module.memory_bytes(),
            "structure_bytes": structure_bytes,
            "blocks": listed,
        }
    data_types = {c["data_type"] for c in configs}
    section = {
        "fields": routes,
        "modules": modules,
        "weights_key": "<table>.weight",
        "torchrec_state_dict_key": "embedding_bags.<table>.weight",
        "layouts": {name: text for name, text in LAYOUTS.items() if name in data_types},
    }
    if row_ids:
        section["row_ids"] = ROW_IDS_LAYOUT
    return configs, weights, row_ids, section


def dense_state(model: nn.Module, modules: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model's weights that are not in a table, keyed as in the model."""
    prefixes = tuple(f"{path}." for path in modules)
    return {
        key: value.detach().cpu().clone()
        for key, value in model.state_dict().items()
        if not key.startswith(prefixes)
    }


class TorchRecTables:
    """An export's tables with its routing rule, in plain torch: what a TorchRec user rebuilds.

    tables = TorchRecTables.read("runs/.../export-torchrec-0.25")
    vectors = tables.lookup(ids)            # encoded rows [B, S] -> field vectors [B, F, d]
    features = tables.features(ids)         # {feature: (values, lengths)}: a KeyedJaggedTensor
    vectors = tables.combine(pooled, ids)   # TorchRec's pooled {feature: [B, w]} -> [B, F, d]
    rows = tables.weight("user")            # a table's rows as served, float32 (dequantized)
    quantized = tables.quantized_weights()  # torchrec.quant's table_name_to_quantized_weights
    """

    def __init__(
        self,
        configs: list[dict[str, Any]],
        weights: Mapping[str, torch.Tensor],
        section: Mapping[str, Any],
        row_ids: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.configs = configs
        self.weights = dict(weights)
        self.section = section
        self.row_ids = dict(row_ids or {})  # row_ids.pt: the tables whose rows skip ids
        self._served: dict[str, torch.Tensor] = {}  # `weight`'s dequantized tables

    @classmethod
    def read(cls, folder: str | Path, verify: bool = True) -> TorchRecTables:
        """The tables of a torchrec export folder (with `verify`, every file's sha256 first)."""
        folder = Path(folder)
        manifest = read_manifest(folder, verify)
        if manifest["format"] != "torchrec":
            raise DnisError(f"{folder} is a {manifest['format']} export, not a torchrec one")
        return cls.from_files(folder, manifest["torchrec"])

    @classmethod
    def from_files(cls, folder: Path, section: Mapping[str, Any]) -> TorchRecTables:
        configs = json.loads((folder / FILENAME).read_text(encoding="utf-8"))
        weights = safe_load(folder / WEIGHTS)  # data only: a crafted file is refused, not run
        row_ids = safe_load(folder / ROW_IDS) if (folder / ROW_IDS).is_file() else {}
        return cls(configs, weights, section, row_ids)

    def tables(self, module: str = INPUT) -> list[dict[str, Any]]:
        return [c for c in self.configs if c["dnis"]["module"] == module]

    @property
    def num_fields(self) -> int:
        return len(self.section["fields"])

    def config(self, name: str) -> dict[str, Any]:
        found = [c for c in self.configs if c["name"] == name]
        if not found:
            raise KeyError(f"no table {name!r} in this export")
        return found[0]

    def weight(self, name: str) -> torch.Tensor:
        """Table `name`'s rows as they are served, float32 [num_embeddings, embedding_dim]:
        code * scale + bias (`dequantize_rows`) for INT8/INT4, the values for FP16/FP32."""
        if name in self._served:
            return self._served[name]
        config = self.config(name)
        data_type = config.get("data_type", "FP32")  # exports before data types were all FP32
        if data_type not in PRECISION_OF:
            raise DnisError(
                f"table {name!r} has data_type {data_type!r}; dnis reads {', '.join(PRECISION_OF)}"
            )
        precision = PRECISION_OF[data_type]
        scale, bias = self.weights.get(f"{name}.{SCALE}"), self.weights.get(f"{name}.{BIAS}")
        if is_integer(precision) and (scale is None or bias is None):
            raise DnisError(f"table {name!r} is {data_type} but weights.pt has no scale and bias")
        self._served[name] = dequantize_rows(
            self.weights[f"{name}.weight"],
            None if scale is None else scale.reshape(-1),
            None if bias is None else bias.reshape(-1),
            precision,
            config["embedding_dim"],
        )
        return self._served[name]

    def quantized_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """{table: (uint8 weight, uint8 scale_shift [n, 4] or None)}: the argument
        `table_name_to_quantized_weights` of TorchRec's quantized EmbeddingBagCollection
        (`torchrec.quant.embedding_modules`), every table in FBGEMM's row layout (the stored
        bytes reinterpreted, never requantized)."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for config in self.configs:
            name = config["name"]
            stored = self.weights[f"{name}.weight"].contiguous()
            scale = self.weights.get(f"{name}.{SCALE}")
            bias = self.weights.get(f"{name}.{BIAS}")
            if scale is None or bias is None:  # FP16 / FP32: the values' bytes
                out[name] = (stored.view(torch.uint8), None)
            else:  # INT8 / INT4: codes, then fp16 scale and fp16 bias per row
                scale_shift = torch.cat([scale.reshape(-1, 1), bias.reshape(-1, 1)], dim=1)
                out[name] = (stored, scale_shift.to(torch.float16).view(torch.uint8))
        return out

    def rows_of(
        self, table: Mapping[str, Any], ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, held) of encoded ids of the table's field (any shape): `held` where the table
        has a row for the id, `row` that row there. Row r holds id id_start + r, or, for a table
        with `row_ids`, id `row_ids[r]` (ids not listed have no row). Padding is not dropped here.
        """
        route = table["dnis"]
        held = (ids >= route["id_start"]) & (ids < route["id_end"])
        if route.get("row_ids") is None:  # exports before row_ids have none
            return ids - route["id_start"], held
        if table["name"] not in self.row_ids:
            raise DnisError(f"table {table['name']!r} routes by {ROW_IDS}, which lacks it")
        listed = self.row_ids[table["name"]].to(ids.dtype)
        if listed.numel() == 0:
            return torch.zeros_like(ids), torch.zeros_like(held)
        row = torch.searchsorted(listed, ids.contiguous()).clamp_max(listed.numel() - 1)
        return row, held & (listed[row] == ids)

    def features(
        self, ids: torch.Tensor, module: str = INPUT
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{feature name: (rows of its table, bag length of every batch row)} for encoded ids:
        an id the table has no row for (sequence padding, another block's, not kept) is left
        out of the bag."""
        out = {}
        for table in self.tables(module):
            route = table["dnis"]
            start = route["slot_start"]
            columns = ids[:, start : start + route["slots"]]
            rows, inside = self.rows_of(table, columns)
            if route["padding_id"] is not None:
                inside &= columns != route["padding_id"]
            values = rows[inside]  # row-major: batch rows stay in order
            out[table["feature_names"][0]] = (values, inside.sum(dim=1))
        return out

    def pool(self, ids: torch.Tensor, module: str = INPUT) -> dict[str, torch.Tensor]:
        """What an EmbeddingBagCollection returns per feature, with `embedding_bag` per table."""
        pooled = {}
        features = self.features(ids, module)
        for table in self.tables(module):
            feature = table["feature_names"][0]
            values, lengths = features[feature]
            offsets = torch.cumsum(lengths, 0) - lengths
            pooled[feature] = nn.functional.embedding_bag(
                values,
                self.weight(table["name"]),
                offsets,
                mode=table["pooling"].lower(),
            )
        return pooled

    def combine(
        self, pooled: Mapping[str, torch.Tensor], ids: torch.Tensor, module: str = INPUT
    ) -> torch.Tensor:
        """Field vectors [B, F, dim] from pooled table outputs {feature: [B, width]}."""
        dim = self.section["modules"][module]["dim"]
        out = torch.zeros(ids.shape[0], self.num_fields, dim)
        divide: dict[int, torch.Tensor] = {}
        for table in self.tables(module):
            route = table["dnis"]
            kept = torch.tensor(route["kept_dims"], dtype=torch.long)
            field = route["field_index"]
            columns = pooled[table["feature_names"][0]][:, : len(kept)]  # less padding_columns
            out[:, field].index_add_(1, kept, columns.float())
            if route["divide_by_count"] and field not in divide:
                start = route["slot_start"]
                columns = ids[:, start : start + route["slots"]]
                divide[field] = (columns != route["padding_id"]).sum(dim=1).clamp(min=1)
        for field, count in divide.items():
            out[:, field] /= count.unsqueeze(-1)
        return out

    def lookup(self, ids: torch.Tensor, module: str = INPUT) -> torch.Tensor:
        """The module's field vectors [B, F, dim] for encoded rows [B, S], from the tables."""
        return self.combine(self.pool(ids, module), ids, module)


def max_abs_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max()) if expected.numel() else 0.0


@torch.no_grad()
def check(run: RunModel, tables: TorchRecTables) -> tuple[float, int]:
    """(max |tables - model|, ids compared): every id of every table, then pooled encoded rows."""
    model = run.model.eval()
    modules = per_id_modules(model)
    worst, checked = 0.0, 0
    for path, module in modules.items():
        offsets = module.layout.field_offsets().tolist()
        by_field = {}
        for table in tables.tables(path):
            by_field.setdefault(table["dnis"]["field_index"], []).append(table)
        for entry in tables.section["modules"][path]["blocks"]:
            f = entry["field_index"]
            table = next(
                (t for t in by_field.get(f, []) if t["dnis"]["block"] == entry["block"]), None
            )
            if table is not None:  # the rows as served (dequantized), less padding columns
                kept = torch.tensor(table["dnis"]["kept_dims"], dtype=torch.long)
                weight = tables.weight(table["name"])[:, : len(kept)]
            for first in range(entry["id_start"], entry["id_end"], CHUNK):
                last = min(first + CHUNK, entry["id_end"])
                encoded = torch.arange(first, last)
                expected = module.lookup((encoded + offsets[f]).to(module.field_offsets.device))
                expected = expected.cpu()
                got = torch.zeros_like(expected)
                if table is not None:  # an id without a row (not kept) stays 0
                    rows, held = tables.rows_of(table, encoded)
                    got[held.nonzero(), kept] = weight[rows[held]]
                worst = max(worst, max_abs_diff(got, expected))
                checked += last - first
        ids = example_ids(module.layout, CHECK_ROWS, seed=1)
        expected = module(ids.to(module.field_offsets.device)).cpu()
        worst = max(worst, max_abs_diff(tables.lookup(ids, path), expected))
    return worst, checked


def export(run: RunModel, target: Path) -> ExportResult:
    """Write the TorchRec export of `run` to `target` (atomically)."""
    configs, weights, row_ids, section = build_tables(run)  # refuses what has no table form
    dense = dense_state(run.model, section["modules"])
    files = [FILENAME, WEIGHTS, DENSE, *([ROW_IDS] if row_ids else [])]
    with staged(target) as staging:
        write_json(staging / FILENAME, configs)
        torch.save(weights, staging / WEIGHTS)
        torch.save(dense, staging / DENSE)
        if row_ids:
            torch.save(row_ids, staging / ROW_IDS)
        write_run_files(run, staging)
        diff, checked = check(run, TorchRecTables.from_files(staging, section))
        if not diff <= CHECK_TOLERANCE:
            raise DnisError(
                f"the TorchRec tables of {run.run_dir} disagree with the model's embedding "
                f"(max difference {diff:.2e} > {CHECK_TOLERANCE:g}); please report it"
            )
        manifest = build_manifest(
            run,
            "torchrec",
            staging,
            files,
            embedding_bytes=section["modules"][INPUT][
                "bytes"
            ],  # what the input layer's tables hold
            check={"rows": CHECK_ROWS, "ids": checked, "max_abs_diff": diff},
        )
        manifest["parameters"]["tables"] = sum(m["parameters"] for m in section["modules"].values())
        manifest["torchrec"] = section
        write_json(staging / MANIFEST, manifest)
    return ExportResult(target, manifest)
