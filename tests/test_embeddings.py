"""FusedEmbedding: one table with per-field offsets, one gather, sequence pooling, sparse gradients."""

from __future__ import annotations

import pytest
import torch

from dnis.data.schema import FeatureSpec, Schema
from dnis.embeddings import FieldLayout, FusedEmbedding

SCHEMA = Schema(
    features=(
        FeatureSpec("user"),
        FeatureSpec("tags", kind="sequence", max_len=4, pooling="mean"),
        FeatureSpec("item"),
        FeatureSpec("words", kind="sequence", max_len=3, pooling="sum"),
        FeatureSpec("age", kind="numeric", buckets=5),
    )
)
CARDS = [7, 5, 11, 4, 6]


def layout() -> FieldLayout:
    return FieldLayout.from_schema(SCHEMA, CARDS)


def random_ids(n: int, seed: int = 0, padding: float = 0.4) -> torch.Tensor:
    """Ids for every slot of SCHEMA, with many zeros (padding in sequences, OOV elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    lay = layout()
    cols = []
    for field in lay.slot_fields:
        col = torch.randint(0, CARDS[field], (n,), generator=g)
        col[torch.rand(n, generator=g) < padding] = 0
        cols.append(col)
    return torch.stack(cols, dim=1)


def reference(emb: FusedEmbedding, ids: torch.Tensor) -> torch.Tensor:
    """Plain per-row, per-field Python: what the fused, vectorised forward must equal."""
    lay = emb.layout
    out = torch.zeros(len(ids), lay.num_fields, emb.dim, dtype=torch.float64)
    weight = emb.weight.detach().double()
    for b in range(len(ids)):
        slot = 0
        for f in range(lay.num_fields):
            width = lay.slot_fields.count(f)
            offset = sum(CARDS[:f])
            values = [int(v) for v in ids[b, slot : slot + width]]
            slot += width
            if not lay.sequence_fields[f]:
                out[b, f] = weight[offset + values[0]]  # id 0 is the OOV row, a real lookup
                continue
            real = [v for v in values if v != 0]
            if not real:
                continue  # all padding: zero vector
            total = sum(weight[offset + v] for v in real)
            out[b, f] = total / len(real) if lay.mean_pooled[f] else total
    return out


def test_layout_offsets_and_slots() -> None:
    lay = layout()
    assert lay.num_fields == 5 and lay.num_slots == 1 + 4 + 1 + 3 + 1
    assert lay.total_rows == sum(CARDS)
    assert lay.field_offsets().tolist() == [0, 7, 12, 23, 27]
    assert lay.slot_fields == (0, 1, 1, 1, 1, 2, 3, 3, 3, 4)
    assert lay.slot_offsets().tolist() == [0, 7, 7, 7, 7, 12, 23, 23, 23, 27]
    assert lay.sequence_fields == (False, True, False, True, False)
    assert lay.mean_pooled == (False, True, False, False, False)


def test_output_shape_and_single_table() -> None:
    emb = FusedEmbedding(layout(), dim=6)
    ids = random_ids(13)
    out = emb(ids)
    assert out.shape == (13, 5, 6)
    params = list(emb.parameters())
    assert len(params) == 1 and params[0].shape == (sum(CARDS), 6)
    assert emb.num_parameters() == sum(CARDS) * 6


def test_field_rows_are_slices_of_the_one_table() -> None:
    emb = FusedEmbedding(layout(), dim=3)
    start = 0
    for f, card in enumerate(CARDS):
        rows = emb.field_rows(f)
        assert rows.shape == (card, 3)
        assert torch.equal(rows, emb.weight[start : start + card])
        start += card


def test_lookup_of_id_k_in_field_f_is_row_offset_plus_k() -> None:
    lay = FieldLayout.from_schema(Schema(features=(FeatureSpec("a"), FeatureSpec("b"))), [4, 9])
    emb = FusedEmbedding(lay, dim=5)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(13, 5))
    for k in range(9):
        ids = torch.tensor([[k % 4, k]])
        out = emb(ids)
        assert torch.equal(out[0, 0], emb.weight[k % 4])
        assert torch.equal(out[0, 1], emb.weight[4 + k])
        assert torch.equal(out[0, 1], emb.field_rows(1)[k])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooling_matches_python_reference(seed: int) -> None:
    torch.manual_seed(seed)
    emb = FusedEmbedding(layout(), dim=4, init_std=1.0)
    ids = random_ids(50, seed=seed)
    got = emb(ids).double()
    torch.testing.assert_close(got, reference(emb, ids), rtol=1e-5, atol=1e-6)
    # eval mode gives the same vectors
    emb.eval()
    torch.testing.assert_close(emb(ids).double(), got)


def test_all_padding_sequence_is_zero_but_categorical_oov_is_a_real_row() -> None:
    emb = FusedEmbedding(layout(), dim=4, init_std=1.0)
    ids = torch.zeros(2, layout().num_slots, dtype=torch.long)
    out = emb(ids)
    for f in (1, 3):  # sequence fields: everything is padding
        assert torch.equal(out[:, f], torch.zeros(2, 4))
    for f, offset in ((0, 0), (2, 12), (4, 27)):  # categorical/numeric: id 0 = OOV row
        assert torch.equal(out[0, f], emb.weight[offset])
        assert out[0, f].abs().sum() > 0


def test_mean_pooling_ignores_padding_position() -> None:
    emb = FusedEmbedding(layout(), dim=2, init_std=1.0)
    ids = torch.zeros(2, layout().num_slots, dtype=torch.long)
    ids[0, 1:5] = torch.tensor([2, 3, 0, 0])
    ids[1, 1:5] = torch.tensor([0, 2, 0, 3])
    out = emb(ids)
    expected = (emb.weight[7 + 2] + emb.weight[7 + 3]) / 2
    torch.testing.assert_close(out[0, 1], expected)
    torch.testing.assert_close(out[1, 1], expected)


def test_gradients_reach_only_looked_up_rows() -> None:
    emb = FusedEmbedding(layout(), dim=3, init_std=1.0)
    ids = random_ids(6, seed=3)
    emb(ids).sum().backward()
    grad = emb.weight.grad
    assert grad is not None
    used = set()
    lay = layout()
    offsets = lay.slot_offsets()
    for b in range(len(ids)):
        for s, field in enumerate(lay.slot_fields):
            k = int(ids[b, s])
            if lay.sequence_fields[field] and k == 0:
                continue  # padding contributes nothing
            used.add(int(offsets[s]) + k)
    touched = {int(r) for r in torch.nonzero(grad.abs().sum(dim=1) > 0).flatten()}
    assert touched == used


def test_rejects_non_positive_dim() -> None:
    with pytest.raises(ValueError, match="dim"):
        FusedEmbedding(layout(), dim=0)


# BlockMixedEmbedding's windowed lookup (issue 20) against a plain reference: a dense table times
# the keep mask of each row's block.


def _random_blocks(total: int, count: int, seed: int):
    from dnis.embeddings.blocks import BlockLayout

    g = torch.Generator().manual_seed(seed)
    cuts = sorted((torch.randperm(total - 1, generator=g)[: count - 1] + 1).tolist())
    starts = [0, *cuts]
    sizes = [end - start for start, end in zip(starts, [*cuts, total], strict=True)]
    return BlockLayout((0,) * count, tuple(starts), tuple(sizes), (1,) * count)


def _block_mixed_case(seed: int, dim: int, count: int, p: float, shape: str):
    from dnis.embeddings.mixed import BlockMixedEmbedding

    lay = layout()
    blocks = _random_blocks(lay.total_rows, count, seed)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(count, dim, generator=g) < p
    if shape == "widest first":
        keep[0] = True
    elif shape == "widest last":
        keep[-1] = True
    elif shape == "empty blocks":
        keep[1::2] = False
    table = torch.randn(lay.total_rows, dim, generator=g)
    compact = BlockMixedEmbedding(lay, dim, blocks, keep)
    compact.load_dense(table)
    masked = table * keep[blocks.row_block()]
    dense = FusedEmbedding(lay, dim)
    with torch.no_grad():
        dense.weight.copy_(masked)
    return compact, dense, keep


CASES = [
    (seed, dim, count, p, shape)
    for seed, (dim, count, p) in enumerate([(8, 4, 0.5), (16, 7, 0.25), (5, 33, 0.6), (3, 1, 0.9)])
    for shape in ("random", "widest first", "widest last", "empty blocks")
]


@pytest.mark.parametrize(("seed", "dim", "count", "p", "shape"), CASES)
def test_block_mixed_lookup_equals_dense_times_keep_mask(
    seed: int, dim: int, count: int, p: float, shape: str
) -> None:
    compact, dense, _ = _block_mixed_case(seed, dim, count, p, shape)
    rows = torch.randint(0, layout().total_rows, (5, 9), generator=torch.Generator().manual_seed(1))
    rows[0, :] = torch.arange(9)
    rows[-1, :] = torch.arange(layout().total_rows - 9, layout().total_rows)
    expected = dense.weight.detach()[rows]
    ids = random_ids(40, seed=seed)
    for chunk in (compact.chunk, 3):  # one chunk, and chunks that split the batch
        compact.chunk = chunk
        with torch.no_grad():  # the eager inference path (strided windows, chunks)
            assert torch.equal(compact.lookup(rows), expected)
            torch.testing.assert_close(compact(ids), dense(ids), rtol=0, atol=1e-6)
    assert torch.equal(compact.lookup(rows), expected)  # the autograd path
    torch.testing.assert_close(compact(ids), dense(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("seed", "dim", "count", "p", "shape"), CASES[::3])
def test_block_mixed_gradients_reach_only_kept_entries_as_the_masked_dense_ones(
    seed: int, dim: int, count: int, p: float, shape: str
) -> None:
    compact, dense, keep = _block_mixed_case(seed, dim, count, p, shape)
    ids = random_ids(40, seed=seed)
    upstream = torch.randn(40, layout().num_fields, dim)
    (compact(ids) * upstream).sum().backward()
    (dense(ids) * upstream).sum().backward()
    index, weight = compact._row_index(torch.arange(layout().total_rows))
    kept = weight.bool()
    expected = torch.zeros_like(compact.values)
    expected[index[kept].long()] = dense.weight.grad[kept]  # pruned entries have no gradient
    torch.testing.assert_close(compact.values.grad, expected, rtol=0, atol=1e-6)


def test_block_mixed_storage_and_state_keys_are_the_saved_format() -> None:
    """values: every block's [rows, kept dims] table in block order, kept dims ascending; the
    state holds values and keep only, so files of earlier versions load unchanged."""
    from dnis.embeddings.mixed import BlockMixedEmbedding

    compact, dense, keep = _block_mixed_case(3, 6, 5, 0.5, "random")
    blocks = compact.blocks
    table = dense.weight.detach()
    parts = [
        table[start : start + size][:, keep[b]].reshape(-1)
        for b, (start, size) in enumerate(zip(blocks.start, blocks.size, strict=True))
    ]
    assert torch.equal(compact.values.detach(), torch.cat(parts))
    assert set(compact.state_dict()) == {"values", "keep"}
    reloaded = BlockMixedEmbedding(layout(), 6, blocks, keep)
    reloaded.load_state_dict(compact.state_dict())
    rows = torch.arange(layout().total_rows)
    with torch.no_grad():
        assert torch.equal(reloaded.lookup(rows), compact.lookup(rows))


def test_block_mixed_without_kept_dims_looks_up_zeros() -> None:
    from dnis.embeddings.mixed import BlockMixedEmbedding

    blocks = _random_blocks(layout().total_rows, 3, 0)
    compact = BlockMixedEmbedding(layout(), 4, blocks, torch.zeros(3, 4, dtype=torch.bool))
    assert compact.num_parameters() == 0
    assert torch.equal(compact(random_ids(5)), torch.zeros(5, layout().num_fields, 4))


@pytest.mark.parametrize(
    ("seed", "dim", "p", "shape"),
    [(seed, dim, p, shape) for seed, (dim, p) in enumerate([(8, 0.5), (16, 0.25), (5, 0.9)])
     for shape in ("random", "widest first", "widest last", "empty rows")],
)  # fmt: skip
def test_ragged_lookup_and_gradients_equal_the_dense_table_times_its_keep_mask(
    seed: int, dim: int, p: float, shape: str
) -> None:
    """The windowed lookup (windows of the widest row's width, the last ones ending where
    `values` ends) serves every row's kept entries in place, zeros elsewhere, on the eager path
    and the autograd path, and the gradient reaches exactly the kept entries."""
    from dnis.embeddings.mixed import RaggedEmbedding

    lay = layout()
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(lay.total_rows, dim, generator=g) < p
    if shape == "widest first":
        keep[0] = True
    elif shape == "widest last":
        keep[-1] = True
    elif shape == "empty rows":
        keep[::3] = False
    table = torch.randn(lay.total_rows, dim, generator=g)
    compact = RaggedEmbedding(lay, dim, keep)
    compact.load_dense(table)
    masked = table * keep
    rows = torch.randint(0, lay.total_rows, (5, 9), generator=g)
    rows[0, :] = torch.arange(9)
    rows[-1, :] = torch.arange(lay.total_rows - 9, lay.total_rows)  # the end-aligned windows
    with torch.no_grad():
        assert torch.equal(compact.lookup(rows), masked[rows])
    served = compact.lookup(rows)
    assert torch.equal(served, masked[rows])
    upstream = torch.randn(served.shape, generator=g)
    (served * upstream).sum().backward()
    dense_grad = torch.zeros_like(table).index_add_(0, rows.reshape(-1), upstream.view(-1, dim))
    owner, entry = compact._entries(torch.arange(lay.total_rows))
    expected = torch.zeros_like(compact.values)
    expected[entry] = dense_grad[owner, compact.dims[entry].long()]
    torch.testing.assert_close(compact.values.grad, expected, rtol=0, atol=1e-6)
