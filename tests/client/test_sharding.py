"""The geometry of SHARDED pieces (client/sharding.py): runs that place a piece in its full tensor's bytes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from client.sharding import Piece, piece_runs


def apply_runs(runs: list[list[int]], slab: bytes, file: bytearray) -> None:
    """What the daemon does with a region's runs (ckptd/writer.py), on in-memory buffers."""
    for file_off, slab_off, run_len, count, stride in runs:
        for i in range(count):
            src = slab_off + i * run_len
            file[file_off + i * stride : file_off + i * stride + run_len] = slab[src : src + run_len]


@st.composite
def tensor_and_piece(draw: st.DrawFn) -> tuple[tuple[int, ...], Piece]:
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    offsets, sizes = [], []
    for n in shape:
        lo = draw(st.integers(0, n - 1))
        hi = draw(st.integers(lo + 1, n))
        offsets.append(lo)
        sizes.append(hi - lo)
    return shape, Piece(tuple(offsets), tuple(sizes))


@settings(max_examples=300, deadline=None)
@given(tensor_and_piece(), st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8]))
def test_runs_put_every_byte_of_a_piece_at_its_row_major_offset_and_nothing_else(case, dtype) -> None:
    shape, piece = case
    full = torch.arange(int(torch.tensor(shape).prod().item()) if shape else 1).to(dtype).reshape(shape)
    index = tuple(slice(o, o + s) for o, s in zip(piece.offsets, piece.shape, strict=True))
    local = full[index].contiguous()
    header = 24  # the full tensor's data starts after some header bytes
    slab_lead = 8  # and the piece after some slab bytes
    slab = bytes(slab_lead) + local.reshape(-1).view(torch.uint8).numpy().tobytes()
    file = bytearray(b"\xee" * (header + full.numel() * full.element_size()))
    runs = piece_runs(shape, full.element_size(), piece, header, slab_lead)
    apply_runs(runs, slab, file)
    got = torch.frombuffer(bytearray(file[header:]), dtype=torch.uint8)
    # The piece's bytes are exactly where the full tensor keeps them...
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[index] = True
    item = full.element_size()
    want = full.reshape(-1).view(torch.uint8).reshape(-1, item)
    got = got.reshape(-1, item)
    flat_mask = mask.reshape(-1)
    assert torch.equal(got[flat_mask], want[flat_mask])
    # ...and no other byte of the file was touched.
    assert bool((got[~flat_mask] == 0xEE).all())
    assert file[:header] == b"\xee" * header
    assert sum(r[2] * r[3] for r in runs) == local.numel() * item


def test_a_shard0_piece_is_one_run_and_a_shard1_piece_one_strided_record() -> None:
    assert piece_runs((33, 10), 4, Piece((27, 0), (6, 10)), 100, 0) == [[100 + 27 * 40, 0, 240, 1, 240]]
    assert piece_runs((4, 6), 2, Piece((0, 3), (4, 3)), 0, 16) == [[6, 16, 6, 4, 12]]


def test_an_empty_piece_has_no_runs() -> None:
    assert piece_runs((3, 4), 4, Piece((3, 0), (0, 4)), 0, 0) == []
