"""One writing job per output dir (issue 5, defect 3), with real trainers: subprocesses and torchrun.

- A second job on an output dir that a live job writes gets a CheckpointError at ``CheckpointClient(...)``
  naming the holder; a read-only client may still load from it.
- A job killed with kill -9 and started again at once (a new process on the same host) takes over without
  waiting for any lease to expire.
- Under torchrun, a launch with the holder's rendezvous id (``TORCHELASTIC_RUN_ID``, the same job: an
  elastic restart) takes over at once even while the earlier process still runs; another id is refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trainer_script as trainer
from test_crash import SCRIPT, _read_marker

from ckptd import format as fmt
from ckptd import ownership
from ckptd import protocol as proto
from client import CheckpointClient, CheckpointError

WORKER = Path(__file__).with_name("dist_worker.py")


def start_trainer(out: Path, step: int, endpoint: str, log: Path, **env: str | None) -> subprocess.Popen:
    """trainer_script.py: builds a client (taking the lease), saves ``step``, then trains until killed.
    ``env`` entries set (or, with None, remove) environment variables of the trainer."""
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--step", str(step), "--blob-mb", "4"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", proto.ENDPOINT_ENV: endpoint}
    for k, v in env.items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    with open(log, "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=full_env)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_a_second_job_is_refused_at_construction_naming_the_holder(endpoint, output_dir, tmp_path, monkeypatch):
    holder = start_trainer(output_dir, 1, endpoint, tmp_path / "holder.log", CKPTD_JOB_ID="train-a")
    try:
        _read_marker(holder, timeout=90)
        lease = ownership.read_lease(output_dir)
        assert lease is not None and lease.job == "train-a" and lease.holder.pid == holder.pid

        monkeypatch.setenv("CKPTD_JOB_ID", "train-b")
        model, blob = trainer.build_state(9, 1)
        t0 = time.monotonic()
        with pytest.raises(CheckpointError) as err:
            CheckpointClient(output_dir, trainer.components(model, blob), endpoint=endpoint)
        assert time.monotonic() - t0 < 10
        msg = str(err.value)
        assert "'train-a'" in msg and f"pid {holder.pid} on {socket.gethostname()}" in msg, msg
        assert "another output_dir" in msg and "CKPTD_JOB_ID=train-a" in msg, msg
        # Nothing changed hands: the lease still names the live holder.
        assert ownership.read_lease(output_dir).holder.pid == holder.pid

        # Reading is not writing: a read-only client loads what the holder committed.
        committed = fmt.checkpoints_root(output_dir) / "checkpoint-1"
        deadline = time.monotonic() + 60
        while not committed.is_dir():
            assert time.monotonic() < deadline, "the holder's save never committed"
            time.sleep(0.05)
        with CheckpointClient(output_dir, trainer.components(model, blob), endpoint=endpoint, read_only=True) as c:
            assert c.load("latest") == committed
            with pytest.raises(CheckpointError, match="read_only=True"):
                c.save_async(2)
        assert ownership.read_lease(output_dir).holder.pid == holder.pid
    finally:
        kill(holder)


def test_a_job_killed_with_sigkill_and_started_again_takes_over_at_once(endpoint, output_dir, tmp_path):
    env = {"CKPTD_JOB_ID": None, "SLURM_JOB_ID": None, "TORCHELASTIC_RUN_ID": None}
    first = start_trainer(output_dir, 1, endpoint, tmp_path / "first.log", **env)
    try:
        _read_marker(first, timeout=90)
    finally:
        kill(first)
    dead = ownership.read_lease(output_dir)
    assert dead is not None and dead.holder.pid == first.pid and dead.holder.alive() is False
    assert dead.job.startswith("pid-")

    # Started again at once: a new process (a new per-process job id) on the same host.
    log = tmp_path / "second.log"
    second = start_trainer(output_dir, 2, endpoint, log, **env)
    try:
        line = _read_marker(second, timeout=90)
        assert "step=2" in line
        assert ownership.read_lease(output_dir).holder.pid == second.pid
    finally:
        kill(second)
    text = log.read_text()
    assert "taking over the lease" in text and "no longer running" in text, text[-2000:]
    root = fmt.checkpoints_root(output_dir)
    deadline = time.monotonic() + 60
    while not (root / "checkpoint-2").is_dir():
        assert time.monotonic() < deadline, "the restarted job's save never committed"
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_job(run_id: str, out: Path, results: Path, endpoint: str) -> dict[int, dict]:
    """2 ranks under torchrun with an explicit rendezvous id (which torchrun passes on to every worker as
    TORCHELASTIC_RUN_ID); --standalone would make up a random one."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", f"--rdzv-id={run_id}"]
    cmd += [str(WORKER), "lease", str(out), str(results)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", proto.ENDPOINT_ENV: endpoint}
    env.pop("CKPTD_JOB_ID", None)
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r: json.loads((results / f"lease_rank{r}.json").read_text()) for r in range(2)}


def test_torchrun_with_the_holders_run_id_takes_over_at_once_and_another_run_id_is_refused(
    endpoint, output_dir, tmp_path
):
    # The holder: a live process of job "torchelastic-elastic-7" (an earlier worker that still runs).
    holder = start_trainer(
        output_dir, 1, endpoint, tmp_path / "holder.log", TORCHELASTIC_RUN_ID="elastic-7", CKPTD_JOB_ID=None
    )
    try:
        _read_marker(holder, timeout=90)
        assert ownership.read_lease(output_dir).job == "torchelastic-elastic-7"

        # Another job: both ranks are refused at construction, with the holder named.
        other = torchrun_job("elastic-8", output_dir, tmp_path / "r8", endpoint)
        for r in (0, 1):
            assert not other[r]["ok"] and "'torchelastic-elastic-7'" in other[r]["error"], other[r]
            assert f"pid {holder.pid}" in other[r]["error"]
        assert other[0]["error"] == other[1]["error"]

        # The same job (a restart with the same rendezvous id): taken over at once, though the holder runs.
        same = torchrun_job("elastic-7", output_dir, tmp_path / "r7", endpoint)
        for r in (0, 1):
            assert same[r]["ok"], same[r]
            assert same[r]["job"] == "torchelastic-elastic-7" and same[r]["seconds"] < 30
            assert same[r]["path"] == same[r]["loaded"] == str(fmt.checkpoints_root(output_dir) / "checkpoint-10")
        assert holder.poll() is None, "the holder must still run: this was no dead-holder takeover"
    finally:
        kill(holder)
