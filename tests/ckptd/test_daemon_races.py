"""Races and resource bounds of the daemon, each found by a fresh-context review of issue 5's change and
reproduced against real daemon processes before it was fixed: an abort that froze the loop, a dead job's
save that blocked its successor, a temp dir removed by a daemon that did not make it, a job-less save
past a live lease, a tombstone renamed into place, commit work holding back writes, a huge message, a
double release, an incomplete component. The ranks are hand-driven (tests/ckptd/harness.py).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch

from ckptd import format as fmt
from ckptd import ownership
from ckptd import protocol as proto
from ckptd import transactions as tx
from ckptd.protocol import ComponentSpec, FileSpec, MsgType, StageRequest
from tests.ckptd.harness import (
    Harness,
    Peer,
    commit_info,
    entries,
    global_file,
    new_txn,
    outcome,
    rank_file,
    st_bytes,
    stage_req,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


def drain(peer: Peer, seconds: float) -> list:
    """Everything the peer has received (inbox included) within ``seconds`` from now."""
    got = list(peer.inbox)
    peer.inbox.clear()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m = peer._recv(0.05)
        if m is not None:
            got.append(m)
    return got


_CHILD = """
import fcntl, os, sys, time
fd = os.memfd_create("ckptd-review-child", os.MFD_ALLOW_SEALING)
os.ftruncate(fd, int(sys.argv[1]))
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
print(fd, os.fstat(fd).st_ino, flush=True)
time.sleep(600)
"""


def child_slab(size: int, data: bytes) -> tuple[subprocess.Popen, int, int]:
    """Another process (a rank of a job that will be killed) holding a sealed memfd slab with ``data`` at 0."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(size)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    fd_s, ino_s = proc.stdout.readline().split()
    fd = os.open(f"/proc/{proc.pid}/fd/{fd_s}", os.O_RDWR)
    try:
        mm = mmap.mmap(fd, size)
        mm[: len(data)] = data
        mm.close()
    finally:
        os.close(fd)
    return proc, int(fd_s), int(ino_s)


# ------------------------------------------------------------------------------------------------------------
# 1. An ABORT request is served inline: the loop waits for the transaction's writes to drain (and its cleanup,
#    queued on the one-thread commit pool) before it reads the next message of ANY client.


def test_an_abort_request_does_not_stop_the_daemon_answering_other_clients(harness: Harness, output_dir: Path) -> None:
    daemon = harness.start(env={"CKPTD_TEST_FAULTS": "after_file_write=stall"})  # a slow disk: 3 s per file
    r0, aborter, other = harness.peer(), harness.peer(), harness.peer()
    s0 = harness.shm()
    info = commit_info(ComponentSpec("opt", "per_rank", [0, 1]))
    req = stage_req(
        s0,
        output_dir,
        1,
        [rank_file(s0, "opt", 0, st_bytes({"m": torch.ones(4)}))],
        expected=[0, 1],
        commit=info,
        timeout_s=30,
    )
    assert r0.stage(req)[0] == MsgType.ACCEPTED
    wait_until(lambda: "injected fault: stall at after_file_write" in daemon.log_text(), 5, "the write to stall")
    # Rank 1 gives up and asks for an abort (what CheckpointClient does when its own stage fails).
    aborter.sock.send(proto.pack(MsgType.ABORT, 1, txn=req.txn, reason="rank 1: staging failed"))
    time.sleep(0.3)  # the daemon has read the ABORT by now
    t0 = time.monotonic()
    t, _, _ = other.request(MsgType.STATUS, timeout_s=10)
    waited = time.monotonic() - t0
    assert t == MsgType.STATUS_REPORT
    kind, body = outcome(r0, req.txn)
    assert kind == MsgType.ABORTED, body
    # Another job's rank (or this job's heartbeat) waited for a stranger's write to drain.
    assert waited < 1.0, f"STATUS took {waited:.1f} s: the daemon stopped reading messages during an abort"


# ------------------------------------------------------------------------------------------------------------
# 2. A job killed mid hand-over leaves an OPEN transaction that keeps the output dir for its (dead) job until
#    the deadline: the job started again at once (a new torchrun --standalone launch, mp.spawn: a new job id)
#    holds the lease, yet every save is refused.


@pytest.mark.parametrize("new_job", ["job-b", "job-a"], ids=["new-job-id", "same-job-id"])
def test_a_restarted_job_can_save_at_once_after_the_old_job_died_mid_hand_over(
    harness: Harness, output_dir: Path, new_job: str
) -> None:
    harness.start()
    data = st_bytes({"m": torch.ones(4)})
    old_rank0, fd, ino = child_slab(1 << 16, data)
    try:
        ownership.Lease.acquire(output_dir, "job-a", holder=ownership.ProcessIdentity.of_pid(old_rank0.pid))
        spec = FileSpec(fmt.component_filename("opt", "per_rank", rank=0), 0, len(data), "opt", rank=0)
        old = StageRequest(
            txn=new_txn(),
            output_dir=str(output_dir),
            step=40,
            rank=0,
            world_size=2,
            expected_ranks=[0, 1],
            timeout_s=60.0,
            pid=old_rank0.pid,
            segment="ckptd-review-child",
            segment_fd=fd,
            segment_ino=ino,
            segment_size=1 << 16,
            files=[spec],
            commit=commit_info(ComponentSpec("opt", "per_rank", [0, 1])),
            job="job-a",
        )
        a = harness.peer()
        assert a.stage(old)[0] == MsgType.ACCEPTED
    finally:
        old_rank0.kill()  # the whole old job dies before its rank 1 hands over
        old_rank0.wait()
    # The new launch takes the lease at once (its holder is provably dead), as issue 5 requires.
    if new_job == "job-a":
        ownership.Lease.acquire(output_dir, new_job)
    else:
        with pytest.warns(RuntimeWarning):
            ownership.Lease.acquire(output_dir, new_job)
    b = harness.peer()
    shm = harness.shm()
    deadline = time.monotonic() + 5
    while True:
        req = stage_req(
            shm,
            output_dir,
            41,
            [global_file(shm, "weights", st_bytes({"w": torch.ones(2)}))],
            commit=commit_info(ComponentSpec("weights", "global", [0])),
            job=new_job,
        )
        t, _, body = b.stage(req)
        if t == MsgType.ACCEPTED or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert t == MsgType.ACCEPTED, body
    kind, body = outcome(b, req.txn)  # 10 s; the dead save's deadline is 60 s away
    assert kind == MsgType.COMMITTED, body


# ------------------------------------------------------------------------------------------------------------
# 3. A save whose temp dir name is taken makes the daemon "clean up" a directory it never created: another live
#    daemon's temp dir (rmtree) and its owner record (overwritten first, then removed).


def test_a_daemon_never_removes_a_temp_dir_it_did_not_create(harness: Harness, endpoint: str, output_dir: Path) -> None:
    harness.start()
    other = endpoint.replace(".sock", "-2.sock")
    harness.start(endpoint=other)
    r0, r1, stray = harness.peer(), harness.peer(), harness.peer(other)
    s0, s1, s2 = harness.shm(), harness.shm(), harness.shm()
    info = commit_info(ComponentSpec("opt", "per_rank", [0, 1]))
    txn = new_txn()
    req0 = stage_req(
        s0,
        output_dir,
        4,
        [rank_file(s0, "opt", 0, st_bytes({"m": torch.zeros(4)}))],
        txn=txn,
        expected=[0, 1],
        commit=info,
        timeout_s=30,
    )
    assert r0.stage(req0)[0] == MsgType.ACCEPTED
    root = output_dir / "checkpoints"
    temp = f".tmp-checkpoint-4-{txn}"
    wait_until(lambda: temp in entries(root), 5, "the live temp dir")
    owner_before = (root / fmt.temp_owner_name(4, txn)).read_bytes()
    # The same transaction reaches a second daemon (a misrouted rank, a second simulated node).
    dup = stage_req(
        s2,
        output_dir,
        4,
        [global_file(s2, "weights", st_bytes({"w": torch.ones(2)}))],
        txn=txn,
        commit=commit_info(ComponentSpec("weights", "global", [0])),
    )
    assert stray.stage(dup)[0] == MsgType.ACCEPTED
    kind, body = outcome(stray, txn)
    assert kind == MsgType.ABORTED and "already exists" in body["reason"], body
    assert temp in entries(root), "the second daemon removed the first daemon's live temp dir"
    assert (root / fmt.temp_owner_name(4, txn)).read_bytes() == owner_before, "its owner record was rewritten"
    req1 = stage_req(
        s1,
        output_dir,
        4,
        [rank_file(s1, "opt", 1, st_bytes({"m": torch.ones(4)}))],
        txn=txn,
        rank=1,
        expected=[0, 1],
        timeout_s=30,
    )
    assert r1.stage(req1)[0] == MsgType.ACCEPTED
    kind, body = outcome(r0, txn)
    assert kind == MsgType.COMMITTED, body


# ------------------------------------------------------------------------------------------------------------
# 4. The lease is checked before the rename only when the stage names a job: a job-less stage commits (and
#    applies retention) in an output dir another live job holds.


def test_a_save_without_a_job_cannot_commit_into_a_dir_another_live_job_holds(
    harness: Harness, output_dir: Path
) -> None:
    harness.start()
    ownership.Lease.acquire(output_dir, "job-a")  # held by this (live) process
    peer = harness.peer()
    shm = harness.shm()
    info = commit_info(ComponentSpec("weights", "global", [0]))
    for step in (1, 2):  # job-a's own checkpoints
        req = stage_req(
            shm,
            output_dir,
            step,
            [global_file(shm, "weights", st_bytes({"w": torch.ones(2)}))],
            commit=info,
            job="job-a",
        )
        assert peer.stage(req)[0] == MsgType.ACCEPTED
        assert outcome(peer, req.txn)[0] == MsgType.COMMITTED
    info = commit_info(ComponentSpec("weights", "global", [0]))
    info.save_total_limit = 1
    req = stage_req(shm, output_dir, 10**12, [global_file(shm, "weights", st_bytes({"w": torch.ones(2)}))], commit=info)
    assert req.job is None
    t, _, body = peer.stage(req)
    if t == MsgType.ACCEPTED:
        kind, body = outcome(peer, req.txn)
    names = entries(output_dir / "checkpoints")
    # Today: committed, and its retention removed both of job-a's checkpoints.
    assert {"checkpoint-1", "checkpoint-2"} <= names, (t, body, names)
    assert f"checkpoint-{10**12}" not in names, (t, body, names)


# ------------------------------------------------------------------------------------------------------------
# 7. One stage message of MAX_FILES_PER_PART file entries is parsed on the event loop: the daemon answers no
#    one for many seconds (longer than a rank's 15 s heartbeat timeout on a loaded node), before it even
#    finds that the slab cannot be opened.


def test_one_huge_stage_message_does_not_stop_the_daemon_answering(harness: Harness, output_dir: Path) -> None:
    harness.start()
    hostile, other = harness.peer(), harness.peer()
    other.hello()
    n = min(proto.MAX_FILES_PER_PART, 1_000_000)  # as many as one message may carry (60 MB < MAX_MESSAGE_BYTES)
    files = [{"path": f"w{i}_state.safetensors", "offset": 0, "length": 8, "component": "w"} for i in range(n)]
    body = {
        "txn": new_txn(),
        "output_dir": str(output_dir),
        "step": 1,
        "rank": 0,
        "world_size": 1,
        "expected_ranks": [0],
        "timeout_s": 10.0,
        "pid": os.getpid(),
        "segment": "ckptd-nothing",
        "segment_fd": 1 << 30,  # no such fd: the stage is refused, but only after every file was parsed
        "segment_ino": 1,
        "segment_size": 4096,
        "files": files,
    }
    frame = msgpack.packb({"v": 1, "type": "stage", "id": 1, **body}, use_bin_type=True)
    assert len(frame) <= proto.MAX_MESSAGE_BYTES
    del files, body
    hostile.send_raw(frame)
    time.sleep(1.0)  # the daemon has the message by now
    t0 = time.monotonic()
    t, _, _ = other.request(MsgType.STATUS, timeout_s=60)
    waited = time.monotonic() - t0
    assert t == MsgType.STATUS_REPORT
    reply = hostile.wait(lambda m: m[1] == 1, "the stage's reply", 60)
    assert reply[0] == MsgType.ERROR, reply
    assert not (output_dir / "checkpoints").exists() or entries(output_dir / "checkpoints") == set()
    assert waited < 2.0, f"STATUS took {waited:.1f} s while the daemon parsed one message"


# ------------------------------------------------------------------------------------------------------------
# 5. A part whose write succeeded but whose fsync failed gets "released" twice.


def test_a_part_is_released_exactly_once_when_its_fsync_fails(harness: Harness, output_dir: Path) -> None:
    harness.start(env={"CKPTD_TEST_FAULTS": "before_file_fsync=eio"})
    peer = harness.peer()
    shm = harness.shm()
    info = commit_info(ComponentSpec("weights", "global", [0]))
    req = stage_req(shm, output_dir, 1, [global_file(shm, "weights", st_bytes({"w": torch.ones(2)}))], commit=info)
    assert peer.stage(req)[0] == MsgType.ACCEPTED
    kind, body = outcome(peer, req.txn)
    assert kind == MsgType.ABORTED and "EIO" in body["reason"], body
    released = [m for m in drain(peer, 1.0) if m[0] == MsgType.RELEASED and m[2].get("txn") == req.txn]
    # (one RELEASED may already have been consumed by outcome()'s wait into the inbox; drain() counts the inbox)
    assert len(released) == 1, released


# ------------------------------------------------------------------------------------------------------------
# 6. The refusal check intersects a component's writers with expected_ranks: a single-node daemon commits a
#    PER_RANK component that names rank 1 as a writer although rank 1 wrote nothing (it "is on another node",
#    but this version has no multi-node commit). The result verifies and is "latest".


def test_a_component_whose_writer_rank_sent_nothing_is_refused_even_outside_expected_ranks(
    harness: Harness, output_dir: Path
) -> None:
    harness.start()
    peer = harness.peer()
    shm = harness.shm()
    info = commit_info(ComponentSpec("opt", "per_rank", [0, 1]))
    req = stage_req(shm, output_dir, 1, [rank_file(shm, "opt", 0, st_bytes({"m": torch.ones(4)}))], commit=info)
    req = dataclasses.replace(req, world_size=2)  # expected_ranks stays [0]
    t, _, body = peer.stage(req)
    if t == MsgType.ACCEPTED:
        kind, body = outcome(peer, req.txn)
        assert kind == MsgType.ABORTED, (body, fmt.verify_checkpoint(output_dir / "checkpoints" / "checkpoint-1"))
    assert not (output_dir / "checkpoints" / "checkpoint-1").exists()


# ------------------------------------------------------------------------------------------------------------
# 8. The inode check before the rename is a check-then-act: between ``lstat(temp)`` and ``rename(temp, final)``
#    a veto can leave a tombstone (a regular file) at the temp name (rank A renamed the temp dir away and was
#    killed before recording its outcome; rank B's veto then finds no temp dir and puts a tombstone there). The
#    rename moves the tombstone to ``checkpoint-<step>``; the daemon reports COMMITTED and applies retention,
#    which deletes every real checkpoint under save_total_limit=1. Driven in-process at the exact window.


def _prepared_on_disk(output_dir: Path, step: int) -> tx.Transaction:
    txn = f"r{step}x"
    info = commit_info(ComponentSpec("w", "global", [0]))
    req = StageRequest(
        txn=txn,
        output_dir=str(output_dir),
        step=step,
        rank=0,
        world_size=1,
        expected_ranks=[0],
        timeout_s=30.0,
        pid=os.getpid(),
        segment="ckptd-test",
        segment_fd=3,
        segment_ino=1,
        segment_size=4096,
        files=[],
        commit=info,
    )
    t = tx.Transaction.open(req)
    t.join(req, b"r0")
    t.root.mkdir(parents=True, exist_ok=True)
    t.temp_dir.mkdir()
    t.temp_ino = t.temp_dir.stat().st_ino
    data = fmt.build_safetensors_layout([]).header
    (t.temp_dir / "w_state.safetensors").write_bytes(data)
    t.parts[0].records.append(
        fmt.FileRecord("w_state.safetensors", len(data), fmt.checksum_bytes(data), "w", written_by=0)
    )
    t.part_durable(t.parts[0])
    assert t.try_prepare()
    return t


def test_a_tombstone_that_appears_between_the_inode_check_and_the_rename_never_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first = _prepared_on_disk(out, 1)
    first.begin_commit()
    first.finish_commit(first.commit())
    assert first.state.value == "committed"

    t = _prepared_on_disk(out, 3)
    t.commit_info.save_total_limit = 1
    real_os = os

    class RacingOs:
        def __getattr__(self, name: str):
            return getattr(real_os, name)

        @staticmethod
        def rename(src, dst):
            if Path(src) == t.temp_dir and Path(dst) == t.final_dir and real_os.path.isdir(src):
                # Rank A's veto: the temp dir goes to a trash name; A is killed before it records "vetoed".
                real_os.rename(src, t.root / ".trash-checkpoint-3-vA")
                # Rank B's veto: no temp dir -> a tombstone, so that "the daemon's later mkdir fails".
                assert ownership.veto_commit(out, 3, t.txn, t.deadline_unix) is True
                assert real_os.path.isfile(src)
            return real_os.rename(src, dst)

    monkeypatch.setattr(tx, "os", RacingOs())
    t.begin_commit()
    result = t.commit()
    monkeypatch.undo()
    t.finish_commit(result)
    if t.state.value == "committed":
        t.apply_retention(1)
        t.empty_trash()
    names = entries(out / "checkpoints")
    assert not result.renamed, (result, names, (out / "checkpoints" / "checkpoint-3").is_file())
    assert "checkpoint-1" in names


# ------------------------------------------------------------------------------------------------------------
# 9. Every directory step of every save (prepare_dir: mkdir of the temp dir) is queued on the ONE commit thread,
#    behind other saves' commits, retention and trash removal (rmtree of a whole old checkpoint). A save in
#    another output dir cannot write a byte, so its rank's slab is not released (back-pressure on training),
#    until that unrelated work is done.


@pytest.mark.parametrize("same_dir", [True, False], ids=["same-output-dir", "other-output-dir"])
def test_a_saves_writes_are_not_held_back_by_retention(harness: Harness, tmp_path: Path, same_dir: bool) -> None:
    daemon = harness.start(env={"CKPTD_TEST_FAULTS": "retention=stall"})  # a slow delete of an old checkpoint
    peer, other = harness.peer(), harness.peer()
    shm, shm2 = harness.shm(), harness.shm()
    out_a = tmp_path / "a"
    out_b = out_a if same_dir else tmp_path / "b"
    for step, limit in ((1, None), (2, 1)):
        info = commit_info(ComponentSpec("weights", "global", [0]))
        info.save_total_limit = limit
        req = stage_req(shm, out_a, step, [global_file(shm, "weights", st_bytes({"w": torch.ones(2)}))], commit=info)
        assert peer.stage(req)[0] == MsgType.ACCEPTED
    wait_until(lambda: "injected fault: stall at retention" in daemon.log_text(), 5, "retention to stall")
    info = commit_info(ComponentSpec("weights", "global", [0]))
    req = stage_req(shm2, out_b, 3, [global_file(shm2, "weights", st_bytes({"w": torch.ones(2)}))], commit=info)
    t0 = time.monotonic()
    assert other.stage(req)[0] == MsgType.ACCEPTED
    other.notice(MsgType.RELEASED, req.txn)
    waited = time.monotonic() - t0
    assert outcome(other, req.txn)[0] == MsgType.COMMITTED
    assert waited < 1.0, f"the slab of a save in {out_b} was released only after {waited:.1f} s"
