"""Robustness of the real daemon: a ``python -m ckptd serve`` process, real ZeroMQ DEALER sockets, real
/dev/shm segments laid out by hand, real files. No mocks.

Every receive polls with a timeout, so a daemon that hangs fails a test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from safetensors import safe_open

from ckptd import format as fmt
from ckptd import ownership
from ckptd import protocol as proto
from ckptd.protocol import ComponentSpec, FileSpec, MsgType
from tests.ckptd.harness import (
    COMMIT_TIMEOUT_S,
    START_TIMEOUT_S,
    Daemon,
    Harness,
    Peer,
    assert_alive_and_committing,
    commit_info,
    entries,
    global_file,
    global_save,
    new_txn,
    no_temp_or_trash,
    rank_file,
    st_bytes,
    stage_req,
    wait_until,
    xxh3,
)

pytestmark = pytest.mark.timeout(60)

# ------------------------------------------------------------------------------------------ 1. happy path


def test_hand_built_stage_commits_with_exact_manifest_and_readable_file(
    harness: Harness, daemon: Daemon, output_dir: Path
) -> None:
    peer = harness.peer()
    shm = harness.shm(1 << 20)
    tensors = {
        "layer.weight": torch.randn(16, 8, dtype=torch.float32),
        "layer.bias": torch.arange(8, dtype=torch.int64),
        "scale": torch.tensor(3.5, dtype=torch.float64),
    }
    data = st_bytes(tensors)
    spec = global_file(shm, "weights", data)
    assert spec.offset == 0
    req = stage_req(
        shm, output_dir, 42, [spec], commit=commit_info(ComponentSpec("weights", "global", [0]), metadata={"loss": 0.5})
    )

    t, _, body = peer.stage(req)
    assert t == MsgType.ACCEPTED, body
    assert body["txn"] == req.txn
    # Notifications come in order on the rank's socket: released before committed.
    first = peer.wait(lambda m: m[1] == 0, "first notification", COMMIT_TIMEOUT_S)
    assert first[0] == MsgType.RELEASED and first[2] == {"txn": req.txn, "rank": 0}, first
    committed = peer.notice(MsgType.COMMITTED, req.txn)
    final = output_dir / "checkpoints" / "checkpoint-42"
    assert committed == {"txn": req.txn, "step": 42, "path": str(final)}

    assert entries(output_dir / "checkpoints") == {"checkpoint-42"}
    assert entries(final) == {"checkpoint_manifest.json", "weights_state.safetensors"}
    manifest = json.loads((final / "checkpoint_manifest.json").read_text())
    assert manifest["format"] == fmt.FORMAT_VERSION
    assert manifest["step"] == 42 and manifest["txn"] == req.txn
    assert manifest["metadata"] == {"loss": 0.5}
    rec = manifest["files"]["weights_state.safetensors"]
    assert rec["size"] == len(data)
    assert rec["checksum"] == xxh3(data)
    assert manifest["components"]["weights"]["files"] == ["weights_state.safetensors"]
    assert manifest["components"]["weights"]["size_bytes"] == len(data)

    on_disk = (final / "weights_state.safetensors").read_bytes()
    assert on_disk == data
    with safe_open(str(final / "weights_state.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
    assert fmt.verify_checkpoint(final)


# ------------------------------------------------------------------------------------------ 2. garbage


GARBAGE: list[tuple[str, list[bytes], str]] = [
    ("random bytes", [b"\xc1" + random.Random(7).randbytes(200)], "not a msgpack message"),
    ("empty frame", [b""], "not a msgpack message"),
    ("truncated str32", [b"\xdb\xff\xff\xff\xff"], "not a msgpack message"),
    ("deeply nested arrays", [b"\x91" * 100_000 + b"\x00"], "not a msgpack message"),
    ("int map key", [msgpack.packb({1: 2})], "not a msgpack message"),
    ("msgpack int", [msgpack.packb(42)], "expected a msgpack map, got int"),
    ("msgpack list", [msgpack.packb([1, "hello"])], "expected a msgpack map, got list"),
    ("map without version", [msgpack.packb({"type": "hello", "id": 3, "pid": 1})], "protocol version None"),
    ("wrong version", [msgpack.packb({"v": 99, "type": "hello", "id": 3, "pid": 1})], "protocol version 99"),
    ("unknown type", [msgpack.packb({"v": 1, "type": "frobnicate", "id": 3})], "unknown message type 'frobnicate'"),
    ("type not a string", [msgpack.packb({"v": 1, "type": 5, "id": 3})], "unknown message type 5"),
    ("multi-frame", [proto.pack(MsgType.HELLO, 3, pid=1), b"extra"], "expected one message frame, got 2"),
    ("three frames", [b"a", b"b", b"c"], "expected one message frame, got 3"),
    ("huge id", [msgpack.packb({"v": 1, "type": "hello", "id": 2**64 - 1, "pid": 1})], "field 'id'"),
    ("negative id", [msgpack.packb({"v": 1, "type": "hello", "id": -1, "pid": 1})], "field 'id'"),
    ("bool id", [msgpack.packb({"v": 1, "type": "hello", "id": True, "pid": 1})], "field 'id'"),
    ("bool pid", [proto.pack(MsgType.HELLO, 0, pid=True)], "field 'pid'"),
    ("missing pid", [proto.pack(MsgType.HELLO, 0)], "field 'pid'"),
    ("bool txn", [proto.pack(MsgType.QUERY, 0, txn=True)], "field 'txn'"),
    ("released to daemon", [proto.pack(MsgType.RELEASED, 0, txn="abc", rank=0)], "sent by the daemon"),
    ("committed to daemon", [proto.pack(MsgType.COMMITTED, 0, txn="abc", step=1, path="/x")], "sent by the daemon"),
    ("error to daemon", [proto.pack(MsgType.ERROR, 0, message="hi")], "sent by the daemon"),
    ("stage body empty", [proto.pack(MsgType.STAGE, 0)], "field 'txn'"),
    ("stage unknown field", [proto.pack(MsgType.STAGE, 0, txn="a1", evil=1)], "unexpected field(s) ['evil']"),
    ("abort bad txn", [proto.pack(MsgType.ABORT, 0, txn="../x")], "field 'txn'"),
    ("abort reason not str", [proto.pack(MsgType.ABORT, 0, txn="a1", reason=7)], "field 'reason'"),
]


def test_garbage_on_the_socket_gets_error_replies_and_daemon_keeps_serving(
    harness: Harness, daemon: Daemon, output_dir: Path
) -> None:
    peer = harness.peer()
    for label, frames, expect in GARBAGE:
        peer.send_raw(*frames)
        t, req_id, body = peer.wait(lambda m: True, f"reply to {label}")
        assert t == MsgType.ERROR, (label, t, body)
        assert expect in body["message"], (label, body["message"])
        assert daemon.proc.poll() is None, f"daemon died on {label}:\n{daemon.log_text()}"

    # A stage with a bool where an int belongs names the field; so does a float step.
    shm = harness.shm(64 * 1024)
    base = proto.pack_stage(stage_req(shm, output_dir, 1, []), 0)
    for name, value in [("step", True), ("step", 1.5), ("rank", False), ("segment_size", "12"), ("pid", True)]:
        body = msgpack.unpackb(base)
        for k in ("v", "type", "id"):
            body.pop(k)
        body[name] = value
        t, _, reply = peer.stage_body(body)
        assert t == MsgType.ERROR and f"field {name!r}" in reply["message"], (name, reply)

    # A message over the size limit makes ZeroMQ drop that connection; the daemon goes on.
    big = harness.peer()
    big.send_raw(b"\x00" * (proto.MAX_MESSAGE_BYTES + 1))
    assert big._recv(0.5) is None
    big.close()
    harness.peers.remove(big)

    # Requests in flight from a socket that has gone away must not disturb the daemon either.
    gone = Peer(harness.ctx, harness.endpoint)
    gone.sock.send(proto.pack(MsgType.STATUS, 1))
    gone.close()

    assert_alive_and_committing(harness, daemon, output_dir, 5)
    assert entries(output_dir / "checkpoints") == {"checkpoint-5"}


# ------------------------------------------------------------------------------------------ 3. hostile stages


def test_hostile_stage_requests_are_rejected_and_write_nothing_outside_the_txn_dir(
    harness: Harness, daemon: Daemon, output_dir: Path, tmp_path: Path
) -> None:
    peer = harness.peer()
    shm = harness.shm(64 * 1024)
    data = st_bytes({"w": torch.ones(4, dtype=torch.float32)})
    off = shm.put(data)
    small = harness.shm(4096)  # real, but smaller than the requests below claim
    unsealed = harness.shm(64 * 1024, sealed=False)  # could be truncated under the daemon: SIGBUS
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"\x00" * (64 * 1024))
    plain_fd = os.open(victim, os.O_RDONLY)  # a regular file, not a memfd: cannot be sealed
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: the daemon must not wait
    fifo_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    closed_fd = os.open(victim, os.O_RDONLY)
    os.close(closed_fd)

    def seg(fd: int, **kw: Any) -> dict[str, Any]:
        return {"segment_fd": fd, "segment_ino": os.fstat(fd).st_ino, **kw}

    comp = commit_info(ComponentSpec("weights", "global", [0]))

    def spec(
        path: str = "weights_state.safetensors", offset: int = off, length: int = len(data), **kw: Any
    ) -> FileSpec:
        return FileSpec(path=path, offset=offset, length=length, component="weights", **kw)

    cases: list[tuple[str, dict[str, Any], str]] = [
        ("parent path", {"files": [spec("../evil.safetensors")]}, "is not a checkpoint file name"),
        ("absolute path", {"files": [spec("/abs.safetensors")]}, "is not a checkpoint file name"),
        ("sub directory", {"files": [spec("sub/x_state.safetensors")]}, "is not a checkpoint file name"),
        ("manifest name", {"files": [spec(fmt.MANIFEST_NAME)]}, "is not a checkpoint file name"),
        ("range beyond segment", {"files": [spec(offset=shm.size - 16)]}, "beyond the 65536-byte segment"),
        ("range overflow", {"files": [spec(offset=2**62, length=2**62)]}, "beyond the 65536-byte segment"),
        ("same path twice", {"files": [spec(), spec()]}, "names the same path twice"),
        ("index kind mismatch", {"files": [spec(kind="index")]}, "does not match its name"),
        ("segment with slash", {"segment": "ckptd-x/../../etc/passwd"}, "field 'segment'"),
        ("segment with slash only", {"segment": "ckptd-a/b"}, "field 'segment'"),
        ("segment without prefix", {"segment": "psm_1234"}, "field 'segment'"),
        ("segment fd not open", {"segment_fd": closed_fd}, "cannot open the staging slab"),
        ("segment inode differs", {"segment_ino": shm.ino + 1}, "the request names"),
        ("segment smaller than claimed", seg(small.fd, segment_size=64 * 1024), "holds 4096 bytes"),
        ("segment not sealed", seg(unsealed.fd), "not sealed against shrinking"),
        ("segment is a plain file", seg(plain_fd), "not sealed against shrinking"),
        ("segment is a FIFO", seg(fifo_fd), "is not a memfd"),
        ("segment is a directory", seg(dir_fd), "is not a memfd"),
        ("relative output_dir", {"output_dir": "rel/out"}, "must be an absolute path"),
        ("expected ranks without me", {"expected": [1], "rank": 0}, "field 'expected_ranks'"),
    ]
    try:
        for step, (label, kw, expect) in enumerate(cases, start=100):
            kw = dict(kw)
            req = stage_req(
                shm,
                kw.pop("output_dir", output_dir),
                step,
                kw.pop("files", [spec()]),
                commit=comp,
                timeout_s=30.0,  # a transaction this leaves open would show below, not time out first
                **kw,
            )
            if req.rank not in req.expected_ranks:
                req.world_size = 2
            t, _, body = peer.stage(req)
            assert t == MsgType.ERROR, (label, t, body)
            assert expect in body["message"], (label, body["message"])
            # Rejected means rejected: no transaction left open, nothing on disk.
            t, _, status = peer.request(MsgType.STATUS)
            assert status["in_flight"] == [], (label, status["in_flight"])
            assert entries(output_dir / "checkpoints") == set(), (label, entries(output_dir / "checkpoints"))
            assert entries(output_dir) <= {"checkpoints"}, label
    finally:
        for fd in (plain_fd, fifo_fd, dir_fd):
            os.close(fd)

    assert victim.read_bytes() == b"\x00" * (64 * 1024)
    assert entries(daemon.cwd) == set(), "the daemon wrote into its working directory"
    for p in (
        output_dir / "evil.safetensors",
        output_dir / "checkpoints" / "evil.safetensors",
        Path("/abs.safetensors"),
    ):
        assert not p.exists(), p

    # Ranges whose bytes are not a valid safetensors file pass validation of the message, so they are
    # accepted, then the transaction aborts before anything is committed.
    zeros = shm.put(b"\x00" * 4096)
    truncated = shm.put(data[: len(data) - 4])
    trailing = shm.put(data + b"junkjunk")
    bad_files = [
        ("zeros", spec(offset=zeros, length=4096), "safetensors"),
        ("truncated", spec(offset=truncated, length=len(data) - 4), "safetensors data covers"),
        ("trailing bytes", spec(offset=trailing, length=len(data) + 8), "safetensors data covers"),
        ("too short", spec(offset=zeros, length=5), "cannot hold a safetensors header"),
    ]
    for step, (label, bad, expect) in enumerate(bad_files, start=200):
        req = stage_req(shm, output_dir, step, [bad], commit=comp)
        t, _, body = peer.stage(req)
        assert t == MsgType.ACCEPTED, (label, body)
        reason = peer.notice(MsgType.ABORTED, req.txn)["reason"]
        assert expect in reason and "weights_state.safetensors" in reason, (label, reason)
        t, _, state = peer.request(MsgType.QUERY, txn=req.txn)
        assert state["state"] == "aborted" and state["path"] is None, state
        wait_until(lambda: entries(output_dir / "checkpoints") == set(), 5, f"{label}: temp dir removal")
        assert entries(output_dir) <= {"checkpoints"}, label

    # An output_dir that cannot hold a checkpoints dir (it lies below a regular file) aborts the save.
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    req = stage_req(shm, blocker / "out", 300, [spec()], commit=comp)
    assert peer.stage(req)[0] == MsgType.ACCEPTED
    reason = peer.notice(MsgType.ABORTED, req.txn)["reason"]
    assert "Not a directory" in reason, reason
    assert blocker.read_text() == "x"

    assert_alive_and_committing(harness, daemon, output_dir, 7)
    assert entries(output_dir / "checkpoints") == {"checkpoint-7"}
    assert entries(output_dir) == {"checkpoints"}
    assert entries(daemon.cwd) == set()


# ------------------------------------------------------------------------------------------ 4. multi-rank


def test_multi_rank_txn_commits_only_with_every_part_and_aborts_naming_the_missing_rank(
    harness: Harness, daemon: Daemon, output_dir: Path
) -> None:
    r0, r1 = harness.peer(), harness.peer()
    s0, s1 = harness.shm(256 * 1024), harness.shm(256 * 1024)
    t0 = {"m": torch.full((32,), 1.0)}
    t1 = {"m": torch.full((32,), 2.0)}
    info = commit_info(ComponentSpec("opt", "per_rank", [0, 1]))

    # Step 1: rank 0 stages alone; nothing commits until rank 1 arrives.
    txn = new_txn()
    d0, d1 = st_bytes(t0), st_bytes(t1)
    req0 = stage_req(s0, output_dir, 1, [rank_file(s0, "opt", 0, d0)], txn=txn, expected=[0, 1], commit=info)
    assert r0.stage(req0)[0] == MsgType.ACCEPTED
    r0.notice(MsgType.RELEASED, txn)
    time.sleep(0.5)
    t, _, state = r0.request(MsgType.QUERY, txn=txn)
    assert state["state"] == "open", state
    assert not (output_dir / "checkpoints" / "checkpoint-1").exists()
    assert r0._recv(0.05) is None, "rank 0 heard something before rank 1 staged"
    req1 = stage_req(s1, output_dir, 1, [rank_file(s1, "opt", 1, d1)], txn=txn, rank=1, expected=[0, 1])
    assert r1.stage(req1)[0] == MsgType.ACCEPTED
    path0 = r0.notice(MsgType.COMMITTED, txn)["path"]
    path1 = r1.notice(MsgType.COMMITTED, txn)["path"]
    final = output_dir / "checkpoints" / "checkpoint-1"
    assert path0 == path1 == str(final)
    assert fmt.verify_checkpoint(final)
    assert (final / "opt_state_rank_0.safetensors").read_bytes() == d0
    assert (final / "opt_state_rank_1.safetensors").read_bytes() == d1
    manifest = fmt.read_manifest(final)
    assert manifest.files["opt_state_rank_1.safetensors"].written_by == 1
    assert manifest.components["opt"].files == ["opt_state_rank_0.safetensors", "opt_state_rank_1.safetensors"]

    # Step 2: rank 1 never stages; the transaction aborts after its timeout, naming rank 1.
    txn2 = new_txn()
    req0 = stage_req(
        s0, output_dir, 2, [rank_file(s0, "opt", 0, d0)], txn=txn2, expected=[0, 1], commit=info, timeout_s=1.5
    )
    started = time.monotonic()
    assert r0.stage(req0)[0] == MsgType.ACCEPTED
    r0.notice(MsgType.RELEASED, txn2)
    temp = output_dir / "checkpoints" / fmt.temp_dirname(2, txn2)
    wait_until(temp.exists, 2, "the temp dir of the open transaction")
    reason = r0.notice(MsgType.ABORTED, txn2, timeout_s=6)["reason"]
    waited = time.monotonic() - started
    assert 1.4 <= waited < 4.0, waited
    assert "[1]" in reason and "timeout" in reason, reason
    wait_until(lambda: not temp.exists(), 3, "removal of the aborted temp dir")
    assert r1._recv(0.1) is None, "rank 1 never staged txn2, so it gets no notification"
    assert entries(output_dir / "checkpoints") == {"checkpoint-1"}
    assert fmt.verify_checkpoint(final)
    assert (final / "opt_state_rank_0.safetensors").read_bytes() == d0
    t, _, state = r1.request(MsgType.QUERY, txn=txn2)
    assert state["state"] == "aborted" and "[1]" in state["reason"], state
    # A late part of the aborted transaction is refused, not resurrected.
    late = stage_req(s1, output_dir, 2, [rank_file(s1, "opt", 1, d1)], txn=txn2, rank=1, expected=[0, 1])
    t, _, body = r1.stage(late)
    assert t == MsgType.ERROR and "already aborted" in body["message"], body
    assert not (output_dir / "checkpoints" / "checkpoint-2").exists()
    assert_alive_and_committing(harness, daemon, output_dir, 3)


def test_part_rejected_for_unreadable_segment_leaves_multi_rank_txn_to_time_out(
    harness: Harness, daemon: Daemon, output_dir: Path
) -> None:
    r0, r1 = harness.peer(), harness.peer()
    s0, s1 = harness.shm(64 * 1024), harness.shm(64 * 1024)
    info = commit_info(ComponentSpec("opt", "per_rank", [0, 1]))
    txn = new_txn()
    d1 = st_bytes({"m": torch.ones(4)})
    req1 = stage_req(s1, output_dir, 1, [rank_file(s1, "opt", 1, d1)], txn=txn, rank=1, expected=[0, 1], timeout_s=1.0)
    assert r1.stage(req1)[0] == MsgType.ACCEPTED
    # Rank 0 is the last part and carries the commit info, but its segment is gone: rejected, and the
    # transaction must stay waiting for it (not count it as in), so that the timeout still ends it.
    req0 = stage_req(
        s0,
        output_dir,
        1,
        [rank_file(s0, "opt", 0, d1)],
        txn=txn,
        expected=[0, 1],
        commit=info,
        timeout_s=1.0,
        segment_ino=s0.ino + 1,  # rank 0 replaced its slab: the request is stale
    )
    t, _, body = r0.stage(req0)
    assert t == MsgType.ERROR and "the request names" in body["message"], body
    reason = r1.notice(MsgType.ABORTED, txn, timeout_s=5)["reason"]
    assert "[0]" in reason, reason
    wait_until(lambda: entries(output_dir / "checkpoints") == set(), 3, "removal of the temp dir")
    assert_alive_and_committing(harness, daemon, output_dir, 2)


# ------------------------------------------------------------------------------------------ 5. write errors


FSIZE_LIMIT = 64 * 1024


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def test_write_error_efbig_aborts_cleanly_and_keeps_earlier_checkpoint(harness: Harness, output_dir: Path) -> None:
    daemon = harness.start(preexec_fn=_limit_file_size)
    peer = harness.peer()
    shm = harness.shm(1 << 20)
    first, first_data = global_save(peer, shm, output_dir, 1, {"w": torch.arange(64, dtype=torch.float32)})
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    big = st_bytes({"w": torch.randn(4 * FSIZE_LIMIT // 4, dtype=torch.float32)})
    assert len(big) > FSIZE_LIMIT
    req = stage_req(
        shm,
        output_dir,
        2,
        [global_file(shm, "weights", big)],
        commit=commit_info(ComponentSpec("weights", "global", [0])),
    )
    t, _, body = peer.stage(req)
    assert t == MsgType.ACCEPTED, body
    peer.notice(MsgType.RELEASED, req.txn)
    reason = peer.notice(MsgType.ABORTED, req.txn)["reason"]
    assert "File too large" in reason or "EFBIG" in reason or "Errno 27" in reason, reason
    assert "rank 0" in reason, reason
    wait_until(lambda: no_temp_or_trash(output_dir), 5, "removal of the temp dir")
    assert entries(output_dir / "checkpoints") == {"checkpoint-1"}
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert fmt.verify_checkpoint(first)
    t, _, status = peer.request(MsgType.STATUS)
    assert status["aborts"] == 1 and status["in_flight"] == [] and status["last_commit"] == str(first)
    assert_alive_and_committing(harness, daemon, output_dir, 3)


def test_slab_cannot_be_truncated_under_a_write_so_the_daemon_cannot_die_of_sigbus(
    harness: Harness, output_dir: Path
) -> None:
    """A same-user process that shrank a mapped slab mid-write used to kill the daemon with SIGBUS (and every
    save in flight on the node). The daemon now reads only memfds sealed against shrinking: the truncation
    itself fails, the save commits, and an unsealed slab is refused before any byte is read."""
    daemon = harness.start()
    peer = harness.peer()
    size = 64 << 20
    shm = harness.shm(size)
    n = size - 4096
    layout = fmt.build_safetensors_layout([("w", "U8", [n])])
    shm.put(layout.header)
    spec = FileSpec("weights_state.safetensors", 0, layout.file_size, "weights")
    req = stage_req(shm, output_dir, 1, [spec], commit=commit_info(ComponentSpec("weights", "global", [0])))
    t, _, body = peer.stage(req)
    assert t == MsgType.ACCEPTED, body
    with pytest.raises(PermissionError):
        os.ftruncate(shm.fd, 0)
    with pytest.raises(PermissionError):
        os.truncate(f"/proc/{os.getpid()}/fd/{shm.fd}", 0)  # what another process of the user would do
    assert Path(peer.notice(MsgType.COMMITTED, req.txn)["path"]).name == "checkpoint-1"
    assert daemon.proc.poll() is None
    unsealed = harness.shm(1 << 20, sealed=False)
    unsealed.put(layout.header[:0] or st_bytes({"w": torch.ones(2)}))
    req = stage_req(
        unsealed,
        output_dir,
        2,
        [global_file(unsealed, "weights", st_bytes({"w": torch.ones(2)}))],
        commit=commit_info(ComponentSpec("weights", "global", [0])),
    )
    t, _, body = peer.stage(req)
    assert t == MsgType.ERROR and "not sealed against shrinking" in body["message"], body


# ------------------------------------------------------------------------------------------ 6. stale dirs


def _dead_process() -> ownership.ProcessIdentity:
    """The identity of a process that has exited (its pid may be reused; its start time cannot be)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    me = ownership.ProcessIdentity.of_pid(proc.pid)
    proc.wait()
    assert me is not None
    return me


def _plant_stale(output_dir: Path) -> tuple[Path, bytes]:
    """A temp dir whose owner died (with its owner record), a trash dir, a committed checkpoint, look-alikes;
    and a temp dir of a live owner (this test process) that no sweep may touch."""
    root = output_dir / "checkpoints"
    for name in (".tmp-checkpoint-7-deadbeef", ".trash-checkpoint-3-abcd", ".tmp-checkpoint-8-a11ve"):
        (root / name).mkdir(parents=True)
        (root / name / "weights_state.safetensors").write_bytes(b"partial")
    ownership.write_temp_owner(root, 7, "deadbeef", _dead_process(), None, time.time() + 300)
    ownership.write_temp_owner(root, 8, "a11ve", ownership.ProcessIdentity.current(), None, time.time() + 300)
    kept = root / "checkpoint-5"
    kept.mkdir()
    content = b"committed bytes that nobody may touch"
    (kept / "weights_state.safetensors").write_bytes(content)
    # Look-alikes that are not ours to delete.
    (root / ".tmp-other").mkdir()
    (root / "notes.txt").write_text("keep")
    return kept, content


LIVE_TEMP = (".tmp-checkpoint-8-a11ve", ".tmp-checkpoint-8-a11ve.owner")


def test_daemon_start_with_output_dir_sweeps_stale_temp_and_trash_dirs(harness: Harness, output_dir: Path) -> None:
    kept, content = _plant_stale(output_dir)
    harness.start("--output-dir", str(output_dir))  # ready = it answered hello, after its start-up sweep
    assert entries(output_dir / "checkpoints") == {"checkpoint-5", ".tmp-other", "notes.txt", *LIVE_TEMP}
    assert (kept / "weights_state.safetensors").read_bytes() == content


def test_first_transaction_in_output_dir_sweeps_stale_temp_and_trash_dirs(
    harness: Harness, daemon: Daemon, output_dir: Path
) -> None:
    kept, content = _plant_stale(output_dir)
    assert ".tmp-checkpoint-7-deadbeef" in entries(output_dir / "checkpoints")  # not swept: not yet used
    peer = harness.peer()
    shm = harness.shm(64 * 1024)
    global_save(peer, shm, output_dir, 9, {"w": torch.ones(3)})
    assert entries(output_dir / "checkpoints") == {
        "checkpoint-5",
        "checkpoint-9",
        ".tmp-other",
        "notes.txt",
        *LIVE_TEMP,
    }
    assert (kept / "weights_state.safetensors").read_bytes() == content


# ------------------------------------------------------------------------------------------ 7. re-save


def test_resaving_an_existing_step_swaps_atomically_and_leaves_no_temp_or_trash(
    harness: Harness, daemon: Daemon, output_dir: Path
) -> None:
    peer = harness.peer()
    shm = harness.shm(1 << 20)
    path, old = global_save(peer, shm, output_dir, 3, {"w": torch.zeros(1000)})
    manifest = path / fmt.MANIFEST_NAME
    gaps: list[float] = []
    stop = threading.Event()

    def watch() -> None:  # the committed step must never vanish, not even for an instant
        while not stop.is_set():
            if not manifest.exists():
                gaps.append(time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for _ in range(3):
            path2, new = global_save(peer, shm, output_dir, 3, {"w": torch.randn(1000)})
    finally:
        stop.set()
        watcher.join(5)
    assert path2 == path
    assert not gaps, f"checkpoint-3 was missing {len(gaps)} times during the swap"
    assert (path / "weights_state.safetensors").read_bytes() == new != old
    assert fmt.read_manifest(path).files["weights_state.safetensors"].checksum == xxh3(new)
    assert fmt.verify_checkpoint(path)
    assert entries(output_dir / "checkpoints") == {"checkpoint-3"}


# ------------------------------------------------------------------------------------------ 8. one per endpoint


def test_second_daemon_on_same_endpoint_refuses_and_first_keeps_serving(
    harness: Harness, daemon: Daemon, output_dir: Path
) -> None:
    second = harness.start(wait_ready=False)
    try:
        rc = second.proc.wait(START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the second daemon did not exit")
    assert rc == 2, second.log_text()
    assert "another ckptd already serves" in second.log_text()
    assert os.path.exists(proto.ipc_path(harness.endpoint)), "the second daemon removed the live socket"
    assert_alive_and_committing(harness, daemon, output_dir, 1)


# ------------------------------------------------------------------------------------------ 9. status


def test_status_reports_pid_in_flight_bytes_written_and_last_commit(
    harness: Harness, daemon: Daemon, output_dir: Path
) -> None:
    peer = harness.peer()
    t, _, s = peer.request(MsgType.STATUS)
    assert t == MsgType.STATUS_REPORT
    assert s["pid"] == daemon.proc.pid
    assert s["in_flight"] == [] and s["bytes_written"] == 0 and s["last_commit"] is None and s["commits"] == 0

    shm = harness.shm(1 << 20)
    path, data = global_save(peer, shm, output_dir, 4, {"w": torch.ones(100)})
    t, _, s = peer.request(MsgType.STATUS)
    assert s["last_commit"] == str(path) and s["commits"] == 1
    assert s["bytes_written"] == len(data) and s["bytes_staged"] == len(data)
    assert s["in_flight"] == []

    txn = new_txn()
    data2 = st_bytes({"m": torch.ones(10)})
    req = stage_req(
        shm,
        output_dir,
        5,
        [rank_file(shm, "opt", 0, data2)],
        txn=txn,
        expected=[0, 1],
        commit=commit_info(ComponentSpec("opt", "per_rank", [0, 1])),
        timeout_s=30,
    )
    assert peer.stage(req)[0] == MsgType.ACCEPTED
    peer.notice(MsgType.RELEASED, txn)
    t, _, s = peer.request(MsgType.STATUS)
    [flight] = s["in_flight"]
    assert flight["txn"] == txn and flight["step"] == 5 and flight["state"] == "open"
    assert flight["ranks_in"] == [0] and flight["ranks_expected"] == [0, 1]
    assert flight["output_dir"] == str(output_dir)
    assert flight["bytes_staged"] == flight["bytes_written"] == len(data2)  # written before `released`

    def total_written() -> int:  # the daemon-wide figure counts a part once it is fsynced
        return peer.request(MsgType.STATUS)[2]["bytes_written"]

    wait_until(lambda: total_written() == len(data) + len(data2), 5, "bytes_written to include the part")
    # An abort request is taken at once (the cleanup follows in the background) and reflected in status.
    t, _, state = peer.request(MsgType.ABORT, txn=txn, reason="test says stop")
    assert t == MsgType.TXN_STATE and state["state"] in ("aborting", "aborted"), state
    assert state["reason"] == "test says stop"
    assert peer.notice(MsgType.ABORTED, txn)["reason"] == "test says stop"
    t, _, s = peer.request(MsgType.STATUS)
    assert s["in_flight"] == [] and s["aborts"] == 1 and s["last_commit"] == str(path)
    wait_until(lambda: no_temp_or_trash(output_dir), 5, "removal of the aborted temp dir")


# ------------------------------------------------------------------------------------------ 10. exit


def test_sigterm_makes_idle_daemon_exit_zero_and_remove_its_socket(harness: Harness, daemon: Daemon) -> None:
    sock_path = proto.ipc_path(harness.endpoint)
    assert os.path.exists(sock_path)
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        rc = daemon.proc.wait(5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"daemon ignored SIGTERM:\n{daemon.log_text()}")
    assert rc == 0, daemon.log_text()
    assert time.monotonic() - started < 5
    assert not os.path.exists(sock_path)


def test_idle_exit_daemon_exits_by_itself_without_clients(harness: Harness) -> None:
    d = harness.start("--idle-exit", "1")
    started = time.monotonic()
    try:
        rc = d.proc.wait(8)
    except subprocess.TimeoutExpired:
        pytest.fail(f"daemon with --idle-exit 1 did not exit:\n{d.log_text()}")
    assert rc == 0, d.log_text()
    assert time.monotonic() - started >= 0.5
    assert not os.path.exists(proto.ipc_path(harness.endpoint))
