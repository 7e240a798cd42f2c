"""The opt-in preemption handler (``client.install_preemption_handler`` + ``client.preemption_point``): on
SIGTERM the save in flight commits, the current step is saved at the next step boundary ("emergency
save"), and the job exits. Real signals: subprocess trainers sent SIGTERM mid-loop, and this very process
signalling itself inside a client call."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptd import format as fmt
from ckptd import protocol as proto
from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent, verify_checkpoint

TRAINER = r"""
import logging, sys, time
import torch
from client import CheckpointClient, SharingPattern, StateComponent

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")


class State:
    def __init__(self, mb):
        self.big = torch.zeros(mb * 2**20 // 4)
        self.step = 0

    def fill(self, step):
        self.big.fill_(float(step))
        self.step = step

    def state_dict(self):
        return {"big": self.big, "step": self.step}

    def load_state_dict(self, s):
        self.big, self.step = s["big"], s["step"]


out, mb, mode, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
state = State(mb)
client = CheckpointClient(out, [StateComponent("state", state, SharingPattern.GLOBAL)])
client.install_preemption_handler(timeout_s=timeout)
step = 0
try:
    while step < 100_000:
        step += 1
        state.fill(step)  # a signal may land halfway through this "optimizer step"
        if step % 5 == 0:
            client.save_async(step)
            print(f"SAVED {step}", flush=True)
        if mode in ("points", "stuck"):
            client.preemption_point(step)
        if mode == "stuck" and step == 11:
            time.sleep(3600)  # e.g. a hung collective: no step boundary is ever reached again
        time.sleep(0.05)
finally:
    print("LOOP LEFT", flush=True)
"""


def read_line(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if not line:
                    break
                if re.search(pattern, line):
                    return line
    finally:
        sel.close()
    raise AssertionError(f"the trainer never printed {pattern!r} (rc={proc.poll()})")


def holds_step(ckpt: Path, step: int) -> None:
    result = verify_checkpoint(ckpt)
    assert result, str(result)
    from safetensors import safe_open

    with safe_open(str(ckpt / "state_state.safetensors"), "pt") as f:
        big = f.get_tensor("state.big")
    lo, hi = torch.aminmax(big)
    assert float(lo) == float(hi) == float(step), f"{ckpt.name} holds [{lo}, {hi}], not step {step}"


def run_until_signalled(output_dir: Path, endpoint: str, log: Path, mode: str, timeout_s: float = 60):
    """Start the trainer, SIGTERM it a few steps after it handed over the save of step 10; returns
    (exit code, its stdout after the signal, its log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", proto.ENDPOINT_ENV: endpoint}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", TRAINER, str(output_dir), "256", mode, str(timeout_s)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    try:
        read_line(proc, r"^SAVED 10$", timeout=120)
        time.sleep(0.15)  # a few more training steps: the current step is past 10
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(90)
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, rest, log.read_text()


IN_FLIGHT_10 = re.compile(r"waiting up to 60 s for \d save\(s\) in flight \(steps \[(\d+, )*10\]\)")


def test_sigterm_saves_the_current_step_at_the_next_step_boundary_after_the_save_in_flight_and_exits(
    endpoint, output_dir, tmp_path
) -> None:
    rc, rest, text = run_until_signalled(output_dir, endpoint, tmp_path / "trainer.log", "points")
    assert rc == 128 + signal.SIGTERM, f"exit code {rc}; log:\n{text[-3000:]}"
    assert "LOOP LEFT" in rest, "the job must exit through its finally blocks"
    assert "received SIGTERM" in text and "saving at the next preemption_point" in text, text[-3000:]
    # Step 10 was handed over but (as far as the trainer knew) not committed when the signal came.
    assert IN_FLIGHT_10.search(text), text[-3000:]
    m = re.search(r"emergency save of step (\d+) committed", text)
    assert m, text[-3000:]
    emergency = int(m.group(1))
    assert emergency > 10

    root = fmt.checkpoints_root(output_dir)
    holds_step(root / "checkpoint-10", 10)
    # Saved at a step boundary: the state is that of one step, never half of the next.
    holds_step(root / f"checkpoint-{emergency}", emergency)
    assert fmt.read_manifest(root / f"checkpoint-{emergency}").metadata == {"preempted": True}
    assert fmt.find_latest_checkpoint(output_dir) == root / f"checkpoint-{emergency}"
    assert not (root / fmt.LEASE_NAME).exists(), "the exiting job released the output dir"

    class Fresh:
        loaded: dict = {}

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            self.loaded = s

    fresh = Fresh()
    comps = [StateComponent("state", fresh, SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, endpoint=endpoint, read_only=True) as reader:
        assert reader.load("latest") == root / f"checkpoint-{emergency}"
    assert fresh.loaded["step"] == emergency and torch.all(fresh.loaded["big"] == float(emergency))


def test_sigterm_without_step_boundaries_commits_the_save_in_flight_and_exits(endpoint, output_dir, tmp_path):
    rc, rest, text = run_until_signalled(output_dir, endpoint, tmp_path / "trainer.log", "nopoints")
    assert rc == 128 + signal.SIGTERM and "LOOP LEFT" in rest, text[-3000:]
    assert IN_FLIGHT_10.search(text) and "emergency save" not in text, text[-3000:]
    root = fmt.checkpoints_root(output_dir)
    holds_step(root / "checkpoint-10", 10)
    assert fmt.find_latest_checkpoint(output_dir) == root / "checkpoint-10"


def test_a_loop_that_never_reaches_its_next_step_boundary_still_exits_after_the_timeout(endpoint, output_dir, tmp_path):
    t0 = time.monotonic()
    rc, _, text = run_until_signalled(output_dir, endpoint, tmp_path / "trainer.log", "stuck", timeout_s=3)
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert "no preemption_point was reached within 3 s" in text, text[-3000:]
    assert time.monotonic() - t0 < 60
    holds_step(fmt.checkpoints_root(output_dir) / "checkpoint-10", 10)


class SignalsItself:
    """State whose state_dict() delivers SIGTERM to this process when armed: the signal arrives inside
    save_async, where the handler must not run (it would re-enter the client); it runs as save_async returns."""

    def __init__(self) -> None:
        self.value = torch.zeros(16)
        self.armed = False

    def state_dict(self) -> dict:
        if self.armed:
            self.armed = False
            os.kill(os.getpid(), signal.SIGTERM)
        return {"v": self.value}

    def load_state_dict(self, s) -> None:
        self.value = s["v"]


def test_a_signal_inside_a_client_call_is_handled_as_the_call_returns(endpoint, output_dir) -> None:
    state = SignalsItself()
    previous = signal.getsignal(signal.SIGTERM)
    client = CheckpointClient(output_dir, [StateComponent("s", state, SharingPattern.GLOBAL)], endpoint=endpoint)
    try:
        client.install_preemption_handler(timeout_s=60)
        state.value.fill_(3.0)
        state.armed = True
        with pytest.raises(SystemExit) as exit_:
            client.save_async(3)
        assert exit_.value.code == 128 + signal.SIGTERM
        assert client.preempted
        # The save in whose middle the signal arrived was handed over, and committed before the exit.
        holds_value = verify_checkpoint(fmt.checkpoints_root(output_dir) / "checkpoint-3")
        assert holds_value, str(holds_value)
        # After the signal no new save starts, and the previous handler is back.
        with pytest.raises(CheckpointError, match="preemption signal was received"):
            client.save_async(5)
        assert signal.getsignal(signal.SIGTERM) == previous
    finally:
        signal.signal(signal.SIGTERM, previous)
        client.close()


def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step_with_one_emergency_save(
    endpoint, tmp_path
) -> None:
    from test_torchrun import torchrun

    out = tmp_path / "out"
    res = torchrun("preempt", out, tmp_path / "results", endpoint)
    assert res[0]["signalled"] and not res[1]["signalled"]
    for r in (0, 1):
        assert res[r]["exit"] == 128 + signal.SIGTERM and res[r]["step"] == 7, res[r]
    root = fmt.checkpoints_root(out)
    assert [c.step for c in fmt.scan_checkpoints(out)[0]] == [5, 7]
    ckpt = root / "checkpoint-7"
    assert verify_checkpoint(ckpt) and fmt.read_manifest(ckpt).metadata == {"preempted": True}
    assert {"data_state_rank_0.safetensors", "data_state_rank_1.safetensors"} <= set(os.listdir(ckpt))
