"""Crash tests with real processes: SIGKILL of the trainer after the hand-off, SIGKILL of the daemon mid-write.

Everything is real: the daemon is ``python -m ckptd serve`` started by the client's embedded mode, the
staging slab is a sealed memfd of the trainer, the checkpoint is written to disk, and the processes die by
SIGKILL. A memfd has no name in /dev/shm: once the trainer and the daemon let go of it, the kernel frees it.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptd import protocol as proto
from client import CheckpointClient, CheckpointError, find_latest_checkpoint, verify_checkpoint

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "trainer_script.py"


import trainer_script as trainer  # noqa: E402 - tests/client is on sys.path (pytest rootdir-less modules)


def _endpoint_lock_free(endpoint: str) -> bool:
    """True when no process holds the daemon's endpoint lock (a daemon removes it as it exits)."""
    try:
        fd = os.open(trainer.lock_path(endpoint), os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def _poll(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def _read_marker(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(trainer.MARKER):
                return line
    finally:
        sel.close()
    raise AssertionError(f"the trainer did not report save_async returning within {timeout} s (rc={proc.poll()})")


def _segments_of(pid: int) -> dict[int, set[str]]:
    """Who still holds or maps a slab that process ``pid`` created (nobody, once it and the daemon are done)."""
    return trainer.memfd_slabs(pid)


def test_checkpoint_handed_off_still_commits_after_trainer_sigkill(endpoint, output_dir, tmp_path):
    step, seed, blob_mb = 7, 3, 160
    ckpt = output_dir / "checkpoints" / f"checkpoint-{step}"
    log = tmp_path / "trainer.stderr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", proto.ENDPOINT_ENV: endpoint}
    cmd = [sys.executable, str(SCRIPT), "--out", str(output_dir), "--step", str(step)]
    cmd += ["--seed", str(seed), "--blob-mb", str(blob_mb)]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        try:
            line = _read_marker(proc, timeout=90)
        except AssertionError:
            proc.kill()
            proc.wait()
            raise AssertionError(f"trainer failed; stderr:\n{log.read_text()[-4000:]}") from None
        committed_before_kill = ckpt.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)  # reap it now: a zombie still answers kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert f"step={step}" in line
    assert not committed_before_kill, "the save committed before the trainer died; the test proved nothing"
    daemon_pid = trainer.daemon_pid(endpoint)
    assert daemon_pid is not None and daemon_pid != proc.pid, "the trainer should have started its own daemon"

    # The daemon outlives the trainer and commits what was handed over.
    assert _poll(ckpt.is_dir, timeout=60), f"checkpoint-{step} was never committed after the trainer died"
    result = verify_checkpoint(ckpt)
    assert result, str(result)
    assert find_latest_checkpoint(output_dir) == ckpt
    assert not list((output_dir / "checkpoints").glob(".tmp-*"))

    # Its content is the snapshot save_async took (the trainer overwrote its tensors right after).
    expected_model, expected_blob = trainer.build_state(seed, blob_mb)
    model, blob = trainer.build_state(seed + 100, 1)
    # The dead trainer's lease names a process that is gone: taken over at once, with a warning.
    with pytest.warns(RuntimeWarning, match="no longer running"):
        client = CheckpointClient(output_dir, trainer.components(model, blob), endpoint=endpoint)
    with client:
        assert client.load("latest") == ckpt
    for k, v in expected_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(blob.tensor, expected_blob.tensor)
    assert blob.note == expected_blob.note

    # The dead trainer's slab is freed once the daemon lets go of it (no name anywhere to leak), and the
    # daemon exits on its own once idle.
    assert _poll(lambda: not _segments_of(proc.pid), timeout=15), _segments_of(proc.pid)
    assert trainer.shm_files(proc.pid) == []
    assert _poll(lambda: trainer.process_gone(daemon_pid), timeout=30), "the embedded daemon did not exit when idle"
    assert _endpoint_lock_free(endpoint)
    assert not Path(proto.ipc_path(endpoint)).exists()


def test_daemon_sigkilled_mid_write_aborts_that_save_and_next_save_commits(endpoint, output_dir):
    output_dir.mkdir(parents=True)
    free = shutil.disk_usage(output_dir).free
    big_mb = 512 if free > 8 * 2**30 else 256
    # The slab is shared memory (a memfd), which containers often keep small, like /dev/shm.
    shm_free_mb = shutil.disk_usage("/dev/shm").free // 2**20
    if shm_free_mb < 3 * big_mb:
        big_mb = max(32, shm_free_mb // 3)
    assert free > 4 * big_mb * 2**20, f"not enough free space under {output_dir} for this test"
    root = output_dir / "checkpoints"

    model, blob = trainer.build_state(1, 1)
    with CheckpointClient(output_dir, trainer.components(model, blob), endpoint=endpoint) as client:
        ckpt1 = client.save_async(1).wait(60)
        assert ckpt1 == root / "checkpoint-1"
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}
        saved_blob = blob.tensor.clone()

        # Grow the state so that the write of step 2 takes a while, and change it.
        blob.tensor = torch.ones(big_mb * 2**20 // 4)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        daemon_pid = trainer.daemon_pid(endpoint)
        assert daemon_pid is not None and daemon_pid != os.getpid()
        h2 = client.save_async(2)
        # Kill the daemon in the middle of the write: once its first file appears in the temp dir.
        assert _poll(lambda: any(p.is_file() for p in root.glob(".tmp-checkpoint-2-*/*")), 30, 0.002), (
            "the daemon never started writing step 2"
        )
        assert not (root / "checkpoint-2").exists(), "step 2 committed before the daemon could be killed"
        os.kill(daemon_pid, signal.SIGKILL)
        stale = [p for p in root.glob(".tmp-checkpoint-2-*") if p.is_dir()]
        assert len(stale) == 1, "the killed transaction has no temp dir"

        t0 = time.monotonic()
        with pytest.raises(CheckpointError, match="step 2 was abandoned and can never commit"):
            h2.wait(timeout=60)
        assert time.monotonic() - t0 < 10, "the dead daemon was noticed too late"
        assert h2.done()
        assert trainer.process_gone(daemon_pid)
        assert not (root / "checkpoint-2").exists()
        # The rank vetoed the save it gave up on: its temp dir is gone at once (only the dead daemon's owner
        # record is left, for the next daemon's sweep).
        assert not stale[0].exists()
        assert find_latest_checkpoint(output_dir) == ckpt1

        # A fresh client resumes from checkpoint-1, bit-exact.
        model_b, blob_b = trainer.build_state(2, 1)
        with CheckpointClient(output_dir, trainer.components(model_b, blob_b), endpoint=endpoint) as other:
            assert other.load("latest") == ckpt1
        for k, v in saved_model.items():
            assert torch.equal(model_b.state_dict()[k], v), k
        assert torch.equal(blob_b.tensor, saved_blob)

        # Training goes on: the next save reaches a new daemon and commits; the dead daemon's owner record goes.
        blob.tensor = torch.full((1000,), 3.0)
        ckpt3 = client.save_async(3).wait(60)
        assert ckpt3 == root / "checkpoint-3"
        assert verify_checkpoint(ckpt3)
        assert trainer.daemon_pid(endpoint) != daemon_pid
        names = trainer.entries(root)
        assert [n for n in names if not n.endswith(".veto")] == ["checkpoint-1", "checkpoint-3"]
        # The record of the veto stays until step 2's deadline has passed (then a sweep removes it).
        assert [n for n in names if n.endswith(".veto")] == [stale[0].name + ".veto"]

    model_c, blob_c = trainer.build_state(4, 1)
    with CheckpointClient(output_dir, trainer.components(model_c, blob_c), endpoint=endpoint) as client:
        assert client.load("latest") == ckpt3
    assert torch.equal(blob_c.tensor, torch.full((1000,), 3.0))
    for k, v in model.state_dict().items():
        assert torch.equal(model_c.state_dict()[k], v), k


def test_two_saves_handed_over_back_to_back_both_commit_after_trainer_sigkill(endpoint, output_dir, tmp_path):
    """Both saves were handed over before the kill; the second reads the same slab as the first, so the
    daemon must keep the dead trainer's slab mapped until no transaction uses it (then unlink it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", proto.ENDPOINT_ENV: endpoint}
    cmd = [sys.executable, str(SCRIPT), "--out", str(output_dir), "--step", "7", "--then-step", "8"]
    cmd += ["--seed", "5", "--blob-mb", "96"]
    log = tmp_path / "trainer.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        line = _read_marker(proc, timeout=90)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "step=8" in line, log.read_text()[-2000:]
    root = output_dir / "checkpoints"
    assert _poll(lambda: (root / "checkpoint-8").is_dir(), timeout=60), sorted(p.name for p in root.iterdir())
    for step in (7, 8):
        result = verify_checkpoint(root / f"checkpoint-{step}")
        assert result, str(result)
    assert find_latest_checkpoint(output_dir) == root / "checkpoint-8"
    assert _poll(lambda: not _segments_of(proc.pid), timeout=15), _segments_of(proc.pid)
    assert trainer.shm_files(proc.pid) == []
