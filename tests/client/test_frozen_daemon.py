"""A daemon frozen (SIGSTOP) under saves in flight, then thawed (SIGCONT): no committed checkpoint may ever
hold another step's bytes (issue 5, defect 1).

Before the fix, a rank that gave up on a frozen daemon reused its staging slab for the next save while the
daemon still owned the first one: thawed, the daemon committed ``checkpoint-2`` holding step 3's bytes, and
``ckptd verify`` passed it. Now a rank that gives up abandons the slab to the daemon for good and vetoes
the commit on disk. Everything here is real: a standalone ``python -m ckptd serve``, a sealed-memfd slab,
signals, files; every tensor is filled with its step, and every committed checkpoint is read back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from trainer_script import daemon_pid, memfd_slabs, process_gone

from ckptd import format as fmt
from ckptd.protocol import MsgType
from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent, verify_checkpoint
from client.transport import DaemonLink

HEARTBEAT_TIMEOUT_S = 2.0  # the client's give-up time for an unanswered daemon (default 15 s)
STATE_MB = 192  # large enough that the daemon is still writing when it is frozen


class StepState:
    """Tensors that all hold the step they were saved at."""

    def __init__(self, mb: int) -> None:
        self.big = torch.zeros(mb * 2**20 // 4)
        self.small = torch.zeros(1000, dtype=torch.float64)
        self.step = 0

    def fill(self, step: int) -> None:
        self.big.fill_(float(step))
        self.small.fill_(float(step))
        self.step = step

    def state_dict(self) -> dict:
        return {"big": self.big, "small": self.small, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.big, self.small, self.step = state["big"], state["small"], state["step"]


def start_daemon(endpoint: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, "--nice", "0"],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    link = DaemonLink(endpoint)
    try:
        deadline = time.monotonic() + 60
        while not link.ping(1.0):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
    finally:
        link.close()
    return proc


def daemon_in_flight(endpoint: str) -> list:
    link = DaemonLink(endpoint)
    try:
        return list(link.request(MsgType.STATUS, 10.0).body["in_flight"])
    finally:
        link.close()


def committed_steps_hold_their_own_bytes(root: Path) -> dict[int, str]:
    """Every committed checkpoint, opened with safetensors: each tensor must hold only its step's value."""
    found = {}
    for info in fmt.scan_checkpoints(root.parent)[0]:
        result = verify_checkpoint(info.path)
        assert result, f"ckptd verify fails on {info.path}: {result}"
        for name in sorted(os.listdir(info.path)):
            if not name.endswith(".safetensors"):
                continue
            with safe_open(str(info.path / name), "pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    lo, hi = (float(v) for v in torch.aminmax(t.to(torch.float64)))
                    assert lo == hi == float(info.step), (
                        f"{info.path.name}/{name}:{key} holds values in [{lo}, {hi}], not only step {info.step}"
                    )
        found[info.step] = info.path.name
    return found


@pytest.mark.parametrize("freeze_at", ["hand_off", "mid_write"])
def test_frozen_daemon_never_commits_a_save_holding_another_steps_bytes(
    endpoint, output_dir, tmp_path, freeze_at
) -> None:
    """``hand_off``: frozen right after accepting step 2 (its temp dir may not exist yet: the rank's veto
    leaves a tombstone). ``mid_write``: frozen once step 2's first file is in its temp dir (the veto renames
    the temp dir away under the daemon's open files)."""
    log = tmp_path / "daemon.log"
    daemon = start_daemon(endpoint, log)
    root = fmt.checkpoints_root(output_dir)
    state = StepState(STATE_MB)
    comps = [StateComponent("state", state, SharingPattern.GLOBAL)]
    client = CheckpointClient(output_dir, comps, endpoint=endpoint, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    stopped = False
    try:
        assert daemon_pid(endpoint) == daemon.pid
        state.fill(1)
        client.save_async(1).wait(60)

        state.fill(2)
        h2 = client.save_async(2)
        if freeze_at == "mid_write":
            deadline = time.monotonic() + 30
            while not any(p.is_file() for p in root.glob(".tmp-checkpoint-2-*/*")):
                assert time.monotonic() < deadline and not (root / "checkpoint-2").exists(), "step 2 never wrote"
                time.sleep(0.002)
        os.kill(daemon.pid, signal.SIGSTOP)
        stopped = True
        assert not (root / "checkpoint-2").exists(), "step 2 committed before the freeze; the test proves nothing"

        # The rank gives up on step 2 after the heartbeat timeout, saying the save can never commit.
        t0 = time.monotonic()
        with pytest.raises(CheckpointError, match="step 2 was abandoned and can never commit"):
            h2.wait(60)
        assert time.monotonic() - t0 < 10 * HEARTBEAT_TIMEOUT_S

        # Training goes on while the daemon is still frozen: step 3's bytes go into a NEW slab, and its
        # hand-off fails (the daemon cannot answer), again without any chance of a later commit.
        state.fill(3)
        with pytest.raises(CheckpointError, match="step 3"):
            client.save_async(3).wait(60)
        state.fill(4)  # what the trainer's tensors hold when the daemon wakes up
    finally:
        if stopped:
            os.kill(daemon.pid, signal.SIGCONT)

    try:
        # The thawed daemon finds the saves vetoed: step 2's temp dir is gone, step 3's is a tombstone (or
        # its slab is closed); it must settle without committing either.
        deadline = time.monotonic() + 60
        while daemon_in_flight(endpoint):
            assert time.monotonic() < deadline, f"ckptd still has saves in flight: {daemon_in_flight(endpoint)}"
            time.sleep(0.2)
        time.sleep(0.5)  # a commit finishing right now would show up below
        steps = committed_steps_hold_their_own_bytes(root)
        assert sorted(steps) == [1], f"a save the rank gave up on was committed: {steps}"

        # A later save commits, from a fresh slab, and loads back bit-exact.
        state.fill(5)
        assert client.save_async(5).wait(60) == root / "checkpoint-5"
        assert 5 in committed_steps_hold_their_own_bytes(root)
        fresh = StepState(STATE_MB)
        reader_comps = [StateComponent("state", fresh, SharingPattern.GLOBAL)]
        with CheckpointClient(output_dir, reader_comps, endpoint=endpoint, read_only=True) as reader:
            assert reader.load("latest") == root / "checkpoint-5"
        assert fresh.step == 5 and torch.all(fresh.big == 5.0) and torch.all(fresh.small == 5.0)
    finally:
        client.close()
        daemon.terminate()
        daemon.wait(30)
    # Every slab of this process, the abandoned ones included, is gone once the daemon has let go.
    assert process_gone(daemon.pid)
    assert memfd_slabs(os.getpid()) == {}, memfd_slabs(os.getpid())
