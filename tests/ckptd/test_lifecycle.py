"""A transaction's life against a real daemon: the defects of issue 5 that live in the commit state machine.

Each test reproduces one defect as it was found (on the old daemon it fails) and proves the fix: an abort
during COMMITTING, a commit that cannot be a checkpoint, a transaction without a deadline, shutdown with
saves in flight, two jobs and two daemons on one output dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptd import format as fmt
from ckptd import ownership
from ckptd.protocol import ComponentSpec, MsgType
from tests.ckptd.harness import (
    Harness,
    Peer,
    Shm,
    commit_info,
    entries,
    global_file,
    global_save,
    new_txn,
    outcome,
    rank_file,
    st_bytes,
    stage_req,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def no_more_notices(peer: Peer, txn: str, seconds: float = 1.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m = peer._recv(0.1)
        assert m is None or m[2].get("txn") != txn or m[0] == MsgType.RELEASED, f"second outcome for {txn}: {m}"


def stage_global(peer: Peer, shm: Shm, output_dir: Path, step: int, **kw) -> str:
    info = commit_info(ComponentSpec("weights", "global", [0]))
    req = stage_req(
        shm, output_dir, step, [global_file(shm, "weights", st_bytes({"w": torch.ones(8)}))], commit=info, **kw
    )
    t, _, body = peer.stage(req)
    assert t == MsgType.ACCEPTED, body
    return req.txn


# ------------------------------------------------------------------------------ defect 4: abort in COMMITTING


def test_abort_during_committing_is_refused_and_the_rank_hears_only_committed(
    harness: Harness, output_dir: Path
) -> None:
    harness.start(env={"CKPTD_TEST_FAULTS": "before_rename=stall"})
    peer, aborter = harness.peer(), harness.peer()
    txn = stage_global(peer, harness.shm(), output_dir, 1)
    wait_until(lambda: aborter.request(MsgType.QUERY, txn=txn)[2]["state"] == "committing", 5, "COMMITTING")
    t, _, body = aborter.request(MsgType.ABORT, txn=txn, reason="a rank gave up")
    assert t == MsgType.TXN_STATE and body["state"] == "committing", body
    kind, body = outcome(peer, txn)
    assert kind == MsgType.COMMITTED, body
    no_more_notices(peer, txn)
    t, _, body = aborter.request(MsgType.ABORT, txn=txn, reason="too late")
    assert body["state"] == "committed" and body["path"].endswith("checkpoint-1"), body
    assert fmt.verify_checkpoint(output_dir / "checkpoints" / "checkpoint-1")


def test_sigterm_during_committing_lets_the_commit_finish_and_exits_cleanly(harness: Harness, output_dir: Path) -> None:
    daemon = harness.start(env={"CKPTD_TEST_FAULTS": "before_rename=stall"})
    peer = harness.peer()
    txn = stage_global(peer, harness.shm(), output_dir, 1)
    wait_until(lambda: peer.request(MsgType.QUERY, txn=txn)[2]["state"] == "committing", 5, "COMMITTING")
    daemon.proc.send_signal(signal.SIGTERM)
    kind, body = outcome(peer, txn)
    assert kind == MsgType.COMMITTED, body
    no_more_notices(peer, txn)
    assert daemon.proc.wait(10) == 0
    assert entries(output_dir / "checkpoints") == {"checkpoint-1"}


# ------------------------------------------------------------------------------ defect 2: one message wipes all


def test_a_commit_naming_no_component_is_refused_and_retention_deletes_nothing(
    harness: Harness, output_dir: Path
) -> None:
    harness.start()
    peer = harness.peer()
    shm = harness.shm()
    for step in (1, 2):
        global_save(peer, shm, output_dir, step, {"w": torch.full((4,), float(step))})
    before = {n: fmt.read_manifest(output_dir / "checkpoints" / n).txn for n in entries(output_dir / "checkpoints")}
    hostile = commit_info()
    hostile.save_total_limit = 1
    req = stage_req(shm, output_dir, 10**12, [], commit=hostile)
    t, _, body = peer.stage(req)
    assert t == MsgType.ERROR and "must name at least one component" in body["message"], body
    wait_until(lambda: not any(n.startswith(".") for n in entries(output_dir / "checkpoints")), 5, "cleanup")
    after = {n: fmt.read_manifest(output_dir / "checkpoints" / n).txn for n in entries(output_dir / "checkpoints")}
    assert after == before
    assert fmt.find_latest_checkpoint(output_dir) == output_dir / "checkpoints" / "checkpoint-2"


def test_a_component_missing_a_writers_file_is_refused(harness: Harness, output_dir: Path) -> None:
    harness.start()
    r0, r1 = harness.peer(), harness.peer()
    s0, s1 = harness.shm(), harness.shm()
    info = commit_info(ComponentSpec("opt", "per_rank", [0, 1]))
    txn = new_txn()
    data = st_bytes({"m": torch.ones(4)})
    req0 = stage_req(s0, output_dir, 1, [rank_file(s0, "opt", 0, data)], txn=txn, expected=[0, 1], commit=info)
    req1 = stage_req(s1, output_dir, 1, [], txn=txn, rank=1, expected=[0, 1])  # rank 1 wrote nothing
    assert r0.stage(req0)[0] == MsgType.ACCEPTED
    assert r1.stage(req1)[0] == MsgType.ACCEPTED
    kind, body = outcome(r0, txn)
    assert kind == MsgType.ABORTED and "written by ranks [0], the commit names [0, 1]" in body["reason"], body
    assert entries(output_dir / "checkpoints") == set()
    # A writer rank outside the world is refused too.
    req = stage_req(s0, output_dir, 2, [rank_file(s0, "opt", 0, data)], commit=info)
    assert r0.stage(req)[0] == MsgType.ACCEPTED
    kind, body = outcome(r0, req.txn)
    assert kind == MsgType.ABORTED and "outside world size 1" in body["reason"], body


# ------------------------------------------------------------------------------ defect 6: no deadline


def test_all_parts_in_but_no_commit_info_aborts_at_the_deadline_and_idle_exit_still_works(
    harness: Harness, output_dir: Path
) -> None:
    daemon = harness.start("--idle-exit", "1")
    peer = harness.peer()
    shm = harness.shm()
    req = stage_req(shm, output_dir, 1, [global_file(shm, "weights", st_bytes({"w": torch.ones(2)}))], timeout_s=1.0)
    t, _, body = peer.stage(req)
    assert t == MsgType.ACCEPTED, body
    kind, body = outcome(peer, req.txn, 5)
    assert kind == MsgType.ABORTED and "commit information" in body["reason"], body
    assert entries(output_dir / "checkpoints") == set()
    assert daemon.proc.wait(10) == 0  # idle exit: nothing in flight, no client


def test_a_hand_off_that_arrives_after_its_deadline_is_refused(harness: Harness, output_dir: Path) -> None:
    harness.start()
    peer = harness.peer()
    shm = harness.shm()
    info = commit_info(ComponentSpec("weights", "global", [0]))
    req = stage_req(shm, output_dir, 1, [global_file(shm, "weights", st_bytes({"w": torch.ones(2)}))], commit=info)
    req.deadline = time.time() - 1
    t, _, body = peer.stage(req)
    assert t == MsgType.ERROR and "after its deadline" in body["message"], body
    assert not (output_dir / "checkpoints").exists() or entries(output_dir / "checkpoints") == set()


# ------------------------------------------------------------------------------ shutdown with a grace period


def test_sigterm_refuses_new_saves_finishes_handed_over_ones_and_aborts_the_rest_after_grace(
    harness: Harness, output_dir: Path
) -> None:
    daemon = harness.start("--grace", "1.5")
    r0, r1 = harness.peer(), harness.peer()
    s0 = harness.shm()
    # A two-rank save whose rank 1 never comes: it can only end by the grace running out.
    info = commit_info(ComponentSpec("opt", "per_rank", [0, 1]))
    waiting = stage_req(
        s0,
        output_dir,
        5,
        [rank_file(s0, "opt", 0, st_bytes({"m": torch.ones(2)}))],
        expected=[0, 1],
        commit=info,
        timeout_s=60,
    )
    assert r0.stage(waiting)[0] == MsgType.ACCEPTED
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    t, _, body = r1.stage(stage_req(harness.shm(), output_dir / "other", 1, []))
    assert t == MsgType.ERROR and "shutting down" in body["message"], body
    t0 = time.monotonic()
    kind, body = outcome(r0, waiting.txn, 10)
    assert kind == MsgType.ABORTED and "grace" in body["reason"], body
    assert daemon.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    assert entries(output_dir / "checkpoints") == set()


# ------------------------------------------------------------------------------ defect 3: jobs and daemons


def test_a_second_job_cannot_write_an_output_dir_while_another_jobs_save_is_in_flight(
    harness: Harness, output_dir: Path
) -> None:
    harness.start()
    a, b = harness.peer(), harness.peer()
    sa, sb = harness.shm(), harness.shm()
    info = commit_info(ComponentSpec("opt", "per_rank", [0, 1]))
    first = stage_req(
        sa,
        output_dir,
        3,
        [rank_file(sa, "opt", 0, st_bytes({"m": torch.ones(2)}))],
        expected=[0, 1],
        commit=info,
        job="job-a",
        timeout_s=30,
    )
    assert a.stage(first)[0] == MsgType.ACCEPTED
    second = stage_req(sb, output_dir, 3, [global_file(sb, "weights", st_bytes({"w": torch.ones(2)}))], job="job-b")
    t, _, body = b.stage(second)
    assert t == MsgType.ERROR and "job-a" in body["message"] and "own output_dir" in body["message"], body


def test_a_starting_daemon_never_sweeps_another_live_daemons_temp_dir(
    harness: Harness, endpoint: str, output_dir: Path
) -> None:
    harness.start()
    r0, r1 = harness.peer(), harness.peer()
    s0, s1 = harness.shm(), harness.shm()
    info = commit_info(ComponentSpec("opt", "per_rank", [0, 1]))
    txn = new_txn()
    d0, d1 = st_bytes({"m": torch.zeros(4)}), st_bytes({"m": torch.ones(4)})
    req0 = stage_req(
        s0, output_dir, 4, [rank_file(s0, "opt", 0, d0)], txn=txn, expected=[0, 1], commit=info, timeout_s=30
    )
    assert r0.stage(req0)[0] == MsgType.ACCEPTED
    root = output_dir / "checkpoints"
    wait_until(lambda: f".tmp-checkpoint-4-{txn}" in entries(root), 5, "the live temp dir")
    # A second daemon on another endpoint starts over the same output dir, and sweeps it.
    other = endpoint.replace(".sock", "-2.sock")
    harness.start("--output-dir", str(output_dir), endpoint=other)
    assert f".tmp-checkpoint-4-{txn}" in entries(root)
    req1 = stage_req(s1, output_dir, 4, [rank_file(s1, "opt", 1, d1)], txn=txn, rank=1, expected=[0, 1], timeout_s=30)
    assert r1.stage(req1)[0] == MsgType.ACCEPTED
    kind, body = outcome(r0, txn)
    assert kind == MsgType.COMMITTED, body
    assert fmt.verify_checkpoint(root / "checkpoint-4")


def test_a_temp_dir_of_a_killed_daemon_is_swept_by_the_next_one_at_once(harness: Harness, output_dir: Path) -> None:
    daemon = harness.start()
    peer = harness.peer()
    s0 = harness.shm()
    info = commit_info(ComponentSpec("opt", "per_rank", [0, 1]))
    req = stage_req(
        s0,
        output_dir,
        2,
        [rank_file(s0, "opt", 0, st_bytes({"m": torch.ones(2)}))],
        expected=[0, 1],
        commit=info,
        timeout_s=300,
    )
    assert peer.stage(req)[0] == MsgType.ACCEPTED
    root = output_dir / "checkpoints"
    wait_until(lambda: f".tmp-checkpoint-2-{req.txn}" in entries(root), 5, "the temp dir")
    daemon.proc.kill()
    daemon.proc.wait(5)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptd", "gc", str(output_dir)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert entries(root) == set(), entries(root)
    owner = ownership.ProcessIdentity.of_pid(os.getpid())
    assert owner is not None and owner.alive()
