"""The daemon's byte path: a range of a real sealed-memfd slab becomes a file, with O_DIRECT or without."""

from __future__ import annotations

import os

import pytest

from ckptd import format as fmt
from ckptd import writer
from ckptd.protocol import FileSpec


@pytest.fixture
def segment():
    from tests.ckptd.harness import Shm

    size = 64 * 1024 * 1024
    shm = Shm(size)
    shm.mm[:] = os.urandom(size)
    seg = writer.open_segment(shm.name, os.getpid(), shm.fd, shm.ino, size)
    yield seg, shm.mm
    seg.close()
    shm.close()


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 40 * 1024 * 1024 + 123),  # aligned body spanning several chunks, unaligned tail
        (4096, 3 * 4096),  # aligned, no tail
        (8192, 100),  # smaller than one block
        (100, 5 * 4096 + 7),  # unaligned start: written through the page cache
    ],
)
def test_range_becomes_an_exact_file_with_its_checksum(tmp_path, segment, direct, offset, length):
    seg, mm = segment
    spec = FileSpec(path="x_state.safetensors", offset=offset, length=length, component="x")
    f = writer.write_range(seg, spec, tmp_path, direct=direct)
    writer.fsync_and_close(f)
    data = (tmp_path / "x_state.safetensors").read_bytes()
    assert data == mm[offset : offset + length]
    assert f.size == length
    assert f.checksum == fmt.checksum_bytes(data)
