"""Shared files written in regions by several ranks (SHARDED state): each rank places its distinct pieces
of a full-tensor safetensors file at their byte offsets, the daemon checks that the pieces add up, and the
commit checks and hashes the assembled file once.

Real daemons (``python -m ckptd serve``), real sealed memfd slabs, real files; the multi-node cases play the
follower the way tests/ckptd/test_multinode_daemon_edges.py and test_multinode_transactions.py do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptd import format as fmt
from ckptd import protocol as proto
from ckptd import transactions as tx
from ckptd import writer
from ckptd.protocol import CommitInfo, ComponentSpec, FileSpec, MsgType, PeerInfo, ProtocolError, TxnState
from tests.ckptd.harness import (
    Daemon,
    Harness,
    Shm,
    commit_info,
    global_file,
    new_txn,
    no_temp_or_trash,
    outcome,
    st_bytes,
    stage_req,
    wait_until,
    xxh3,
)
from tests.ckptd.test_multinode_daemon_edges import FakeFollower, job_keys, listen, public, start
from tests.ckptd.test_multinode_transactions import request as mn_request

pytestmark = pytest.mark.timeout(90)

SHARED = "optimizer_state.safetensors"
KEY = "optimizer"

# A piece of the file a rank writes: (file_offset, run_len, count, file_stride), in file coordinates.
Piece = tuple[int, int, int, int]


# ------------------------------------------------------------------------------------------ the file


@dataclasses.dataclass
class SharedFile:
    """A full-tensor safetensors file and how two ranks split it: rank 0 the header, the first columns of
    ``a`` (strided, one run per row) and the first half of ``b``; rank 1 the other columns and half."""

    tensors: dict[str, torch.Tensor]
    data: bytes
    pieces: dict[int, list[Piece]]


def shared_file() -> SharedFile:
    tensors = {
        "a": torch.arange(48, dtype=torch.float32).reshape(8, 6),
        "b": torch.arange(100, 110, dtype=torch.int64),
    }
    data = st_bytes(tensors)
    head = data[: fmt.header_span(data[:8], len(data))]
    _, layout = fmt.parse_safetensors_header(head, len(data))
    h = len(head)
    at = {e.name: h + e.begin for e in layout.entries}
    row = 6 * 4
    pieces = {
        0: [(0, h, 1, 0), (at["a"], 12, 8, row), (at["b"], 40, 1, 0)],
        1: [(at["a"] + 12, 12, 8, row), (at["b"] + 40, 8, 5, 8)],  # b: count 5, contiguous (stride == run_len)
    }
    assert sum(rl * c for r in pieces.values() for _, rl, c, _ in r) == len(data)
    return SharedFile(tensors, data, pieces)


def gather(data: bytes, pieces: list[Piece]) -> tuple[bytes, list[list[int]]]:
    """The slab bytes of ``pieces`` back to back, and their runs with slab offsets relative to 0."""
    blob, runs = bytearray(), []
    for fo, rl, count, stride in pieces:
        runs.append([fo, len(blob), rl, count, stride])
        for i in range(count):
            blob += data[fo + i * stride : fo + i * stride + rl]
    return bytes(blob), runs


def region_spec(shm: Shm, data: bytes, pieces: list[Piece], *, file_size: int | None = None) -> FileSpec:
    """This rank's regions of the shared file, staged into ``shm``."""
    blob, runs = gather(data, pieces)
    base = shm.put(blob)
    return FileSpec(
        path=SHARED,
        offset=base,
        length=len(blob),
        component=KEY,
        kind="region",
        file_size=len(data) if file_size is None else file_size,
        runs=[[fo, base + so, rl, c, st] for fo, so, rl, c, st in runs],
    )


def stage_two_ranks(
    harness: Harness,
    slabs: dict[int, Shm],
    out: Path,
    step: int,
    specs: dict[int, list[FileSpec]],
    info: CommitInfo,
) -> tuple[str, dict[int, tuple[MsgType, dict]]]:
    """Rank 1 stages first, then rank 0 (with the commit info); returns the txn and each rank's outcome."""
    txn = new_txn()
    peers = {r: harness.peer() for r in (0, 1)}
    for rank in (1, 0):
        shm = slabs[rank]
        req = stage_req(
            shm, out, step, specs[rank], txn=txn, rank=rank, expected=[0, 1], commit=info if rank == 0 else None
        )
        t, _, body = peers[rank].stage(req)
        assert t == MsgType.ACCEPTED, body
    return txn, {r: outcome(p, txn) for r, p in peers.items()}


@pytest.fixture
def slabs(harness: Harness) -> dict[int, Shm]:
    """One staging slab per rank."""
    return {r: harness.shm(256 * 1024) for r in (0, 1)}


def sharded(ranks: list[int]) -> ComponentSpec:
    return ComponentSpec(KEY, "sharded", ranks)


# ------------------------------------------------------------------------------------------ happy path


def test_two_ranks_interleave_strided_regions_into_one_committed_file(
    harness: Harness, daemon: Daemon, output_dir: Path, slabs: dict[int, Shm]
) -> None:
    f = shared_file()
    meta = st_bytes({"step": torch.tensor(7)})
    specs = {
        0: [region_spec(slabs[0], f.data, f.pieces[0]), global_file(slabs[0], "meta", meta)],
        1: [region_spec(slabs[1], f.data, f.pieces[1])],
    }
    info = commit_info(sharded([0, 1]), ComponentSpec("meta", "global", [0]))
    _, results = stage_two_ranks(harness, slabs, output_dir, 7, specs, info)
    for rank, (t, body) in results.items():
        assert t == MsgType.COMMITTED, (rank, body, daemon.log_text())
    final = Path(results[0][1]["path"])

    assert (final / SHARED).read_bytes() == f.data
    with safe_open(str(final / SHARED), framework="pt") as st:
        for name, tensor in f.tensors.items():
            assert torch.equal(st.get_tensor(name), tensor), name
    manifest = fmt.read_manifest(final)
    rec = manifest.files[SHARED]
    assert (rec.kind, rec.size, rec.checksum, rec.written_by) == ("safetensors", len(f.data), xxh3(f.data), 0)
    assert (rec.rank, rec.group_instance, rec.node, rec.file_size) == (None, None, None, None)
    comp = manifest.components[KEY]
    assert comp.sharing_pattern == "sharded" and comp.ranks == [0, 1] and comp.files == [SHARED]
    assert comp.size_bytes == len(f.data)
    raw = json.loads((final / fmt.MANIFEST_NAME).read_text())
    assert all("file_size" not in r for r in raw["files"].values()), raw["files"]
    assert fmt.verify_checkpoint(final)
    cli = subprocess.run(
        [sys.executable, "-m", "ckptd", "verify", str(final)], capture_output=True, text=True, timeout=60
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "checked and hashed 1 shared file(s)" in daemon.log_text()
    assert no_temp_or_trash(output_dir)


def test_a_rank_with_no_byte_of_the_file_to_write_sends_no_runs_and_is_not_a_writer(
    harness: Harness, daemon: Daemon, output_dir: Path, slabs: dict[int, Shm]
) -> None:
    """Rank 1's pieces are all written by rank 0 (contested pieces another rank holds too): its region spec
    has no runs, writes nothing, and the commit names rank 0 alone as the component's writer."""
    f = shared_file()
    everything = region_spec(slabs[0], f.data, [(0, len(f.data), 1, 0)])
    nothing = dataclasses.replace(region_spec(slabs[1], f.data, []), runs=[])
    _, results = stage_two_ranks(
        harness, slabs, output_dir, 2, {0: [everything], 1: [nothing]}, commit_info(sharded([0]))
    )
    for t, body in results.values():
        assert t == MsgType.COMMITTED, body
    final = Path(results[0][1]["path"])
    assert (final / SHARED).read_bytes() == f.data
    assert fmt.read_manifest(final).files[SHARED].written_by == 0
    assert fmt.verify_checkpoint(final)


# ------------------------------------------------------------------------------------------ refusals


def test_a_missing_contributor_is_refused_and_the_temp_dir_removed(
    harness: Harness, daemon: Daemon, output_dir: Path, slabs: dict[int, Shm]
) -> None:
    f = shared_file()
    specs = {
        0: [region_spec(slabs[0], f.data, f.pieces[0])],
        1: [region_spec(slabs[1], f.data, f.pieces[1][:1])],  # rank 1 forgot its half of b
    }
    txn, results = stage_two_ranks(harness, slabs, output_dir, 3, specs, commit_info(sharded([0, 1])))
    missing = 40
    for t, body in results.values():
        assert t == MsgType.ABORTED, body
        reason = body["reason"]
        assert SHARED in reason and f"received {len(f.data) - missing} bytes from ranks [0, 1]" in reason, reason
        assert f"file_size of {len(f.data)} bytes" in reason and "missing or incomplete" in reason, reason
    wait_until(lambda: no_temp_or_trash(output_dir), 5, "removal of the aborted temp dir")
    assert not (output_dir / "checkpoints" / "checkpoint-3").exists()


def test_ranks_that_disagree_on_the_file_size_are_refused(
    harness: Harness, daemon: Daemon, output_dir: Path, slabs: dict[int, Shm]
) -> None:
    f = shared_file()
    specs = {
        0: [region_spec(slabs[0], f.data, f.pieces[0])],
        1: [region_spec(slabs[1], f.data, f.pieces[1], file_size=len(f.data) + 8)],
    }
    _, results = stage_two_ranks(harness, slabs, output_dir, 4, specs, commit_info(sharded([0, 1])))
    for t, body in results.values():
        assert t == MsgType.ABORTED, body
        # Whichever rank writes second may already fail on the size the other gave the file; else the check
        # of every rank's record refuses it.
        reason = body["reason"]
        assert SHARED in reason and ("disagree on its size" in reason or "declares as its file_size" in reason), reason
    wait_until(lambda: no_temp_or_trash(output_dir), 5, "removal of the aborted temp dir")
    assert not (output_dir / "checkpoints" / "checkpoint-4").exists()


def test_an_assembled_file_whose_header_does_not_parse_aborts_the_commit(
    harness: Harness, daemon: Daemon, output_dir: Path, slabs: dict[int, Shm]
) -> None:
    f = shared_file()
    h = f.pieces[0][0][1]
    bad = bytearray(f.data)
    bad[8:h] = b"{" + b" " * (h - 9)  # rank 0's header: the right length, not JSON
    specs = {
        0: [region_spec(slabs[0], bytes(bad), f.pieces[0])],
        1: [region_spec(slabs[1], f.data, f.pieces[1])],
    }
    _, results = stage_two_ranks(harness, slabs, output_dir, 5, specs, commit_info(sharded([0, 1])))
    for t, body in results.values():
        assert t == MsgType.ABORTED, body
        assert "commit failed" in body["reason"] and "not a valid safetensors file" in body["reason"], body
        assert SHARED in body["reason"] and "ranks [0, 1]" in body["reason"], body
    wait_until(lambda: no_temp_or_trash(output_dir), 5, "removal of the aborted temp dir")
    assert not (output_dir / "checkpoints" / "checkpoint-5").exists()


def test_a_header_that_does_not_cover_the_file_aborts_the_commit(
    harness: Harness, daemon: Daemon, output_dir: Path, slabs: dict[int, Shm]
) -> None:
    """A header that parses but describes less data than the file holds (a tensor left out)."""
    f = shared_file()
    short = st_bytes({"a": f.tensors["a"]})  # header without b: the data would end 80 bytes early
    h_short = fmt.header_span(short[:8], len(short))
    h = f.pieces[0][0][1]
    assert h_short <= h
    header = short[:8] + short[8:h_short] + b" " * (h - h_short)  # padded to the same header length
    header = (h - 8).to_bytes(8, "little") + header[8:]
    bad = header + f.data[h:]
    specs = {
        0: [region_spec(slabs[0], bad, f.pieces[0])],
        1: [region_spec(slabs[1], f.data, f.pieces[1])],
    }
    _, results = stage_two_ranks(harness, slabs, output_dir, 6, specs, commit_info(sharded([0, 1])))
    for t, body in results.values():
        assert t == MsgType.ABORTED, body
        assert "not a valid safetensors file" in body["reason"] and "data covers" in body["reason"], body
    wait_until(lambda: no_temp_or_trash(output_dir), 5, "removal of the aborted temp dir")


def test_the_daemon_answers_overlapping_runs_with_an_error_and_writes_nothing(
    harness: Harness, daemon: Daemon, output_dir: Path, slabs: dict[int, Shm]
) -> None:
    f = shared_file()
    spec = region_spec(slabs[0], f.data, f.pieces[0])
    spec.runs.append(list(spec.runs[1]))  # the strided run of a, twice
    req = stage_req(slabs[0], output_dir, 8, [spec], commit=commit_info(sharded([0])))
    t, _, body = harness.peer().stage(req)
    assert t == MsgType.ERROR and "overlap in the file" in body["message"], body
    assert not (output_dir / "checkpoints").exists() or no_temp_or_trash(output_dir)


# ------------------------------------------------------------------------------------------ protocol


def spec_body(**change) -> dict:
    body = {
        "path": SHARED,
        "offset": 100,
        "length": 100,
        "component": KEY,
        "kind": "region",
        "file_size": 1000,
        "runs": [[0, 100, 50, 1, 0], [200, 150, 10, 5, 20]],  # [200, 290) in the file, slab [150, 200)
    }
    body.update(change)
    return body


def test_a_valid_region_spec_parses_and_round_trips() -> None:
    spec = proto.parse_file_spec(spec_body(), segment_size=4096)
    assert spec.kind == "region" and spec.file_size == 1000 and spec.runs == spec_body()["runs"]
    shm = Shm(4096)
    try:
        req = stage_req(shm, "/data/run", 1, [spec])
    finally:
        shm.close()
    _, _, body = proto.unpack(proto.pack_stage(req, 1))
    assert proto.parse_stage(body).files == [spec]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"runs": [[0, 100, 50, 1, 0], [40, 150, 10, 1, 0]]}, "runs 0 and 1 overlap in the file"),
        ({"runs": [[200, 150, 10, 5, 20], [250, 100, 10, 1, 0]]}, "overlap in the file"),  # inside a stride gap
        ({"runs": [[0, 99, 10, 1, 0]]}, "outside the spec's range [100, 200)"),
        ({"runs": [[0, 150, 10, 6, 10]]}, "outside the spec's range"),  # count * run_len past the end
        ({"runs": [[995, 100, 10, 1, 0]]}, "beyond its file_size 1000"),
        ({"runs": [[0, 100, 10, 3, 496]]}, "beyond its file_size 1000"),  # 0 + 2*496 + 10 = 1002
        ({"runs": [[0, 100, 0, 1, 0]]}, "run_len >= 1 and count >= 1"),
        ({"runs": [[0, 100, 10, 0, 10]]}, "run_len >= 1 and count >= 1"),
        ({"runs": [[0, 100, 10, 2, 5]]}, "file_stride 5 below its run_len 10"),
        ({"runs": [[0, 100, 10, 1]]}, "five non-negative integers"),
        ({"runs": [[0, 100, -1, 1, 0]]}, "five non-negative integers"),
        ({"runs": [[0, 100, True, 1, 0]]}, "five non-negative integers"),
        ({"runs": [[0, 100, 2**63, 1, 0]]}, "five non-negative integers"),
        ({"runs": None}, "a list of runs"),
        ({"runs": "0,100,10,1,0"}, "a list of runs"),
        ({"file_size": None}, "'file_size'"),
        ({"file_size": 4}, "'file_size'"),
        ({"rank": 0}, "no rank, group_instance or node"),
        ({"node": 1}, "no rank, group_instance or node"),
        ({"kind": "safetensors"}, "belong to kind 'region' only"),
        ({"kind": "safetensors", "runs": None}, "belong to kind 'region' only"),
        ({"path": fmt.MODEL_INDEX_NAME}, "does not match its name"),
        ({"length": 5000}, "beyond the 4096-byte segment"),
    ],
)
def test_a_bad_region_spec_is_refused_saying_what_is_wrong(change: dict, why: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(why)):
        proto.parse_file_spec(spec_body(**change), segment_size=4096)


def test_the_runs_of_one_part_are_bounded_in_total(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proto, "MAX_RUNS_PER_PART", 3)
    shm = Shm(4096)
    try:
        ok = proto.parse_file_spec(spec_body(), 4096)
        other = dataclasses.replace(ok, path="model-00001-of-00001.safetensors", component="model")
        req = stage_req(shm, "/data/run", 1, [ok, other])
        _, _, body = proto.unpack(proto.pack_stage(req, 1))
        with pytest.raises(ProtocolError, match="exceed what is left of the 3-run limit of one part"):
            proto.parse_stage(body)
        body["files"] = body["files"][:1]
        assert len(proto.parse_stage(body).files) == 1
    finally:
        shm.close()


def region_record(
    rank: int, size: int, file_size: int = 1000, *, txn: str | None = None, runs: list[list[int]] | None = None, **kw
) -> fmt.FileRecord:
    """A share of SHARED; with ``txn``, its coverage fingerprint is that of ``runs`` (default: one run of
    ``size`` bytes starting where rank ``rank``'s equal share would), as a daemon computes it."""
    cover = 0
    if txn is not None:
        runs = runs if runs is not None else [[rank * size, 0, size, 1, size]]
        cover = fmt.coverage_fingerprint(runs, fmt.coverage_key(txn))
    return fmt.FileRecord(
        SHARED, size, fmt.format_coverage(cover), KEY, kind="region", written_by=rank, file_size=file_size, **kw
    )


def test_a_followers_region_records_parse_and_two_ranks_may_share_a_path() -> None:
    recs = [dataclasses.asdict(region_record(2, 400)), dataclasses.asdict(region_record(3, 600))]
    prep = proto.parse_prepared({"txn": "mn1", "node": 1, "ino": 5, "files": recs})
    assert [r.written_by for r in prep.files] == [2, 3] and prep.files[0] == region_record(2, 400)
    with pytest.raises(ProtocolError, match="same path twice"):
        proto.parse_prepared({"txn": "mn1", "node": 1, "ino": 5, "files": [recs[0], recs[0]]})


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"checksum": "xxh3-128:00"}, "holds its coverage fingerprint"),
        ({"file_size": None}, "'file_size'"),
        ({"size": 1001}, "does not fit its file_size"),
        ({"size": 0}, "does not fit its file_size"),
        ({"rank": 2}, "no rank, group_instance or node"),
        ({"kind": "safetensors", "checksum": "xxh3-128:00"}, "belongs to region records only"),
    ],
)
def test_a_broken_region_record_in_a_vote_is_refused(change: dict, why: str) -> None:
    rec = {**dataclasses.asdict(region_record(2, 400)), **change}
    with pytest.raises(ProtocolError, match=re.escape(why)):
        proto.parse_prepared({"txn": "mn1", "node": 1, "ino": 5, "files": [rec]})


def test_a_manifest_never_holds_a_region_record(tmp_path: Path) -> None:
    rec = fmt.FileRecord(SHARED, 10, xxh3(b"x" * 10), KEY)
    manifest = fmt.Manifest(fmt.FORMAT_VERSION, "/x/checkpoint-1", 1, "t", 1, fmt.now_timestamp(), {}, {SHARED: rec})
    raw = json.loads(manifest.to_json())
    assert "file_size" not in raw["files"][SHARED]
    assert fmt.parse_manifest(manifest.to_json()) == manifest
    for bad in ({"kind": "region"}, {"file_size": 10}):
        forged = json.loads(manifest.to_json())
        forged["files"][SHARED].update(bad)
        with pytest.raises(fmt.FormatError, match="never a manifest entry"):
            fmt.parse_manifest(json.dumps(forged).encode())
    with pytest.raises(ValueError, match="cannot be written into a manifest"):
        dataclasses.replace(manifest, files={SHARED: region_record(0, 10, 10)}).to_json()


# ------------------------------------------------------------------------------------------ writer


def test_write_regions_extends_never_shrinks_and_refuses_links_and_larger_files(
    harness: Harness, tmp_path: Path
) -> None:
    f = shared_file()
    shm = harness.shm(64 * 1024)
    specs = {r: region_spec(shm, f.data, f.pieces[r]) for r in (0, 1)}
    seg = writer.open_segment(shm.name, os.getpid(), shm.fd, shm.ino, shm.size)
    try:
        d = tmp_path / "temp"
        d.mkdir()
        key = fmt.coverage_key("t")
        done = [writer.write_regions(seg, specs[r], d, key) for r in (1, 0)]  # rank 1 first: it extends the file
        assert [o.size for o in done] == [specs[1].length, specs[0].length]
        # Each share's fingerprint is in its checksum field, and together they cover the file exactly once.
        prints = [fmt.parse_coverage(o.checksum) for o in done]
        assert sum(prints) % fmt.COVER_PRIME == fmt.full_coverage(len(f.data), key)
        for o in done:
            writer.fsync_and_close(o)
        assert (d / SHARED).read_bytes() == f.data
        (d / SHARED).unlink()
        (d / SHARED).symlink_to(tmp_path / "elsewhere")
        with pytest.raises(OSError) as e:
            writer.write_regions(seg, specs[0], d, key)
        assert not (tmp_path / "elsewhere").exists(), e.value
        (d / SHARED).unlink()
        (d / SHARED).write_bytes(b"\0" * (len(f.data) + 1))
        with pytest.raises(OSError, match="more than the"):
            writer.write_regions(seg, specs[0], d, key)
        os.mkfifo(d / "fifo.safetensors")
        with pytest.raises(OSError):
            writer.write_regions(seg, dataclasses.replace(specs[0], path="fifo.safetensors"), d, key)
    finally:
        seg.close()


# ------------------------------------------------------------------------------------------ multi-node


def test_a_followers_region_shares_are_counted_by_the_leader_daemon(harness: Harness, tmp_path: Path) -> None:
    """Node 0 (a real leader daemon) holds rank 0, node 1 (played by the test) rank 1: both write regions of
    one shared file in the shared temp dir, and node 1's vote reports its share."""
    f = shared_file()
    d = start(harness)
    rank = harness.peer(d.endpoint)
    rank.hello()
    job, keys = "regions-job", job_keys()
    address = listen(rank, job, keys)
    follower = FakeFollower(harness.ctx, address, keys)
    try:
        follower.hello()
        out, step = tmp_path / "out", 9
        info = CommitInfo(
            [sharded([0, 1])],
            {"world_size": 2, "nnodes": 2, "node_of_rank": [0, 1], "groups": {}},
            {},
            torch.__version__,
            None,
        )
        results = {}
        for label, pieces in (("short", f.pieces[1][:1]), ("full", f.pieces[1])):
            txn = new_txn()
            shm = harness.shm(64 * 1024)
            req = stage_req(shm, out, step, [region_spec(shm, f.data, f.pieces[0])], txn=txn, commit=info, job=job)
            req = dataclasses.replace(req, world_size=2, peer=PeerInfo(0, 2, address, **public(keys)))
            t, _, body = rank.stage(req)
            assert t == MsgType.ACCEPTED, body
            follower.join(txn, step)
            temp = fmt.checkpoints_root(out) / fmt.temp_dirname(step, txn)
            blob, runs = gather(f.data, pieces)
            fd = os.open(temp / SHARED, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                if os.fstat(fd).st_size < len(f.data):
                    os.ftruncate(fd, len(f.data))
                for fo, so, rl, count, stride in runs:
                    for i in range(count):
                        os.pwrite(fd, blob[so + i * rl : so + (i + 1) * rl], fo + i * stride)
                os.fsync(fd)
            finally:
                os.close(fd)
            rec = region_record(1, len(blob), len(f.data), txn=txn, runs=runs)
            follower.send(
                MsgType.P_PREPARED, txn=txn, node=1, ino=os.lstat(temp).st_ino, files=[dataclasses.asdict(rec)]
            )
            results[label] = (txn, outcome(rank, txn, 15))
        t, body = results["short"][1]
        assert t == MsgType.ABORTED and f"received {len(f.data) - 40} bytes from ranks [0, 1]" in body["reason"], body
        t, body = results["full"][1]
        assert t == MsgType.COMMITTED, (body, d.log_text())
        final = Path(body["path"])
        assert (final / SHARED).read_bytes() == f.data
        rec = fmt.read_manifest(final).files[SHARED]
        assert (rec.size, rec.checksum, rec.written_by) == (len(f.data), xxh3(f.data), 0)
        assert fmt.verify_checkpoint(final)
    finally:
        follower.close()


def test_the_leader_transaction_counts_and_hashes_its_followers_region_shares(tmp_path: Path) -> None:
    """The state machine alone, as in test_multinode_transactions.py: ranks 0-1 on node 0, 2-3 on node 1,
    four shares of one shared file."""
    data = shared_file().data
    n = len(data)
    cuts = [0, n // 4, n // 2, 3 * n // 4, n]
    size = [cuts[i + 1] - cuts[i] for i in range(4)]
    info = CommitInfo(
        [sharded([0, 1, 2, 3])], {"world_size": 4, "nnodes": 2, "node_of_rank": [0, 0, 1, 1]}, {}, None, None
    )

    def leader(txn: str, vote_sizes: list[int], vote_file_size: int = n) -> tx.Transaction:
        t = tx.Transaction.open(mn_request(tmp_path, 0, 0, txn=txn))
        t.join(mn_request(tmp_path, 0, 0, txn=txn, commit=info), b"r0")
        t.join(mn_request(tmp_path, 1, 0, txn=txn), b"r1")
        t.root.mkdir(parents=True, exist_ok=True)
        t.temp_dir.mkdir()
        t.temp_ino = os.lstat(t.temp_dir).st_ino
        (t.temp_dir / SHARED).write_bytes(data)  # what the four writers put there together

        def share(rank: int, nbytes: int, file_size: int = n) -> fmt.FileRecord:
            return region_record(rank, nbytes, file_size, txn=txn, runs=[[cuts[rank], 0, nbytes, 1, nbytes]])

        for rank, part in t.parts.items():
            part.records.append(share(rank, size[rank]))
            t.part_durable(part)
        vote = proto.Prepared(
            t.txn,
            1,
            t.temp_ino,
            tuple(share(r, s, vote_file_size) for r, s in zip((2, 3), vote_sizes, strict=True)),
        )
        t.remote_prepared(vote, "sock", b"f1")
        return t

    t = leader("ok", size[2:])
    assert t.try_prepare(), t.reason
    t.begin_commit()
    result = t.commit()
    assert result.renamed, result.error
    rec = fmt.read_manifest(t.final_dir).files[SHARED]
    assert (rec.kind, rec.size, rec.checksum, rec.written_by) == ("safetensors", n, xxh3(data), 0)

    t = leader("short", [size[2], size[3] - 1])
    assert not t.try_prepare() and f"received {n - 1} bytes from ranks [0, 1, 2, 3]" in (t.reason or ""), t.reason

    t = leader("disagree", size[2:], vote_file_size=n + 1)
    assert not t.try_prepare()
    assert "disagree on its size (rank 0: " in (t.reason or "") and f"rank 3: {n + 1} bytes" in t.reason, t.reason

    t = leader("truncated", size[2:])
    assert t.try_prepare()
    os.truncate(t.temp_dir / SHARED, n - 1)
    t.begin_commit()
    result = t.commit()
    assert not result.renamed and f"its share of the shared file {SHARED}, which is of {n} bytes" in result.error


@pytest.mark.parametrize(
    ("records", "why"),
    [
        (
            [region_record(0, 500), fmt.FileRecord(SHARED, 8, "xxh3-128:" + "0" * 32, KEY, written_by=1)],
            "both as a whole file (by rank 1) and in regions of a shared file (by ranks [0])",
        ),
        ([region_record(0, 500), region_record(0, 500)], "rank(s) [0] sent regions of the shared file"),
        ([region_record(0, 500), region_record(1, 500, 1001)], "disagree on its size"),
        ([region_record(0, 500), dataclasses.replace(region_record(1, 500), component="x")], "different components"),
        ([region_record(0, 600), region_record(1, 500)], "received 1100 bytes from ranks [0, 1]"),
        ([region_record(0, 600), region_record(1, 500)], "regions overlap"),
        ([region_record(0, 500)], "received 500 bytes from ranks [0], expected exactly its file_size of 1000"),
    ],
)
def test_shares_of_a_shared_file_that_cannot_make_it_are_named(records: list[fmt.FileRecord], why: str) -> None:
    assert why in (tx.shared_file_problem(records) or ""), tx.shared_file_problem(records)


def test_shares_that_add_up_are_accepted_beside_whole_files() -> None:
    whole = fmt.FileRecord("w_state.safetensors", 8, "xxh3-128:" + "0" * 32, "w", written_by=0)
    assert tx.shared_file_problem([region_record(1, 400), whole, region_record(0, 600)]) is None


def test_a_follower_region_record_still_counts_as_a_writer_of_its_component(tmp_path: Path) -> None:
    t = tx.Transaction.open(mn_request(tmp_path, 0, 0))
    t.join(mn_request(tmp_path, 0, 0, commit=CommitInfo([sharded([0, 1, 2, 3])], {}, {}, None, None)), b"r0")
    t.join(mn_request(tmp_path, 1, 0), b"r1")
    t.root.mkdir(parents=True)
    t.temp_dir.mkdir()
    t.temp_ino = os.lstat(t.temp_dir).st_ino
    for rank, part in t.parts.items():
        part.records.append(region_record(rank, 500, txn=t.txn))
        t.part_durable(part)
    # Node 1's ranks 2 and 3 hold no piece of this file, yet the commit names them as writers.
    t.remote_prepared(proto.Prepared(t.txn, 1, t.temp_ino, ()), "sock", b"f1")
    assert not t.try_prepare() and "written by ranks [0, 1], the commit names [0, 1, 2, 3]" in (t.reason or "")
    assert t.state == TxnState.ABORTING
