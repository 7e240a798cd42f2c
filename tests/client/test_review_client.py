"""Review of the rank side of issue 5 (client/): defects found by attacking the slab hand-off, the veto,
the lease and read-only clients with real processes (standalone ``python -m ckptd serve`` daemons,
SIGSTOP/SIGKILL, subprocess trainers, fork).

Every test reproduces one defect and is marked ``xfail(strict=True)`` until the authors fix it (a fix
turns it into an XPASS, which fails CI on purpose: then drop the marker).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import trainer_script as trainer
from test_crash import SCRIPT, _read_marker
from test_frozen_daemon import StepState, daemon_in_flight, start_daemon
from trainer_script import memfd_slabs

from ckptd import format as fmt
from ckptd import ownership
from ckptd import protocol as proto
from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent

REPO = Path(__file__).resolve().parents[2]
BIG_MB = 192  # large enough that the daemon is still writing when it is frozen right after the hand-off
NO_JOB_ENV = ("CKPTD_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def _no_job_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in NO_JOB_ENV:
        monkeypatch.delenv(k, raising=False)


def _stop_quietly(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        os.kill(daemon.pid, signal.SIGCONT)
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)


def _freeze_in_flight(daemon: subprocess.Popen, root: Path, step: int) -> None:
    """SIGSTOP the daemon; skip (never pass) the test if the save committed before the freeze."""
    os.kill(daemon.pid, signal.SIGSTOP)
    if (root / fmt.checkpoint_dirname(step)).is_dir():
        os.kill(daemon.pid, signal.SIGCONT)
        pytest.skip(f"step {step} committed before the daemon could be frozen; the test proves nothing")


# ------------------------------------------------------------------------------------------ handle.done()


@pytest.mark.xfail(strict=True, reason="review: handle.done() blocks up to heartbeat_timeout_s on a frozen daemon")
def test_done_never_blocks_while_the_daemon_is_frozen(endpoint, output_dir, tmp_path) -> None:
    """``SaveHandle.done()`` is documented (and DESIGN §3) as non-blocking, for a training loop that polls it
    every step. It calls ``_progress(0.0)``, which sends a heartbeat QUERY once the last one is 2 s old and
    then waits up to ``heartbeat_timeout_s`` (15 s by default) for the reply: with a frozen daemon (SIGSTOP,
    a stuck event loop), one ``done()`` call stalls training for the whole heartbeat timeout."""
    daemon = start_daemon(endpoint, tmp_path / "daemon.log")
    root = fmt.checkpoints_root(output_dir)
    state = StepState(BIG_MB)
    client = CheckpointClient(
        output_dir, [StateComponent("state", state, SharingPattern.GLOBAL)], endpoint=endpoint, heartbeat_timeout_s=6.0
    )
    try:
        state.fill(1)
        client.save_async(1).wait(60)
        state.fill(2)
        handle = client.save_async(2)
        _freeze_in_flight(daemon, root, 2)
        time.sleep(2.5)  # past the heartbeat interval, min(2 s, heartbeat_timeout_s / 3)
        t0 = time.monotonic()
        handle.done()
        took = time.monotonic() - t0
        assert took < 1.0, f"handle.done() blocked the training loop for {took:.1f} s"
    finally:
        _stop_quietly(daemon)
        client.close(wait=False)


# ------------------------------------------------------------------------------ an orphaned save handle

HOSTILE_NESTING = 200_000  # json.loads raises RecursionError on it (a 200 kB file)


@pytest.mark.xfail(
    strict=True, reason="review: _abandon pops handles before the veto; a non-OSError leaves them orphaned"
)
def test_a_handle_given_up_on_raises_checkpoint_error_even_when_the_veto_itself_blows_up(
    endpoint, output_dir, tmp_path
) -> None:
    """``_abandon`` pops every handle out of ``_inflight`` first, then vetoes them one by one, catching only
    OSError. Anything else out of ``veto_commit`` (here a RecursionError from ``json.loads`` of a deeply
    nested ``checkpoint-5/checkpoint_manifest.json``, which ``_committed`` reads; equally a TypeError from a
    ``.veto`` record with ``"version": null``, or Ctrl-C while the veto waits on its flock) escapes raw from
    ``handle.wait()`` and leaves the handles unsettled but no longer in flight. Then ``handle.wait()`` without
    a timeout spins forever at 100 % CPU (``_progress`` returns at once when nothing is in flight), with a
    timeout it raises TimeoutError "still in flight" forever, and ``client.wait()`` returns [] as if every
    save had committed."""
    daemon = start_daemon(endpoint, tmp_path / "daemon.log")
    root = fmt.checkpoints_root(output_dir)
    (root / "checkpoint-5").mkdir(parents=True)
    (root / "checkpoint-5" / fmt.MANIFEST_NAME).write_text("[" * HOSTILE_NESTING)
    state = StepState(BIG_MB)
    client = CheckpointClient(
        output_dir, [StateComponent("state", state, SharingPattern.GLOBAL)], endpoint=endpoint, heartbeat_timeout_s=2.0
    )
    try:
        state.fill(5)
        handle = client.save_async(5)  # a re-save of step 5, whose old checkpoint is unreadable
        os.kill(daemon.pid, signal.SIGSTOP)
        if not (root / "checkpoint-5" / fmt.MANIFEST_NAME).read_text().startswith("[[[["):
            pytest.skip("step 5 committed before the daemon could be frozen; the test proves nothing")
        with pytest.raises(CheckpointError):
            handle.wait(60)
        with pytest.raises(CheckpointError):
            handle.wait(5)
        with pytest.raises(CheckpointError):
            client.wait(5)
    finally:
        _stop_quietly(daemon)
        client.close(wait=False)


# ---------------------------------------------------------------------------------------------- leases


LEASE_PROBE = r"""
import sys
from ckptd import ownership
try:
    ownership.Lease.acquire(sys.argv[1], "another-job").release()
    print("acquired")
except ownership.LeaseHeld as e:
    print("held")
"""


@pytest.mark.xfail(strict=True, reason="review: closing one of two clients of a process releases the lease both share")
def test_closing_a_second_client_of_this_process_keeps_the_first_clients_lease(
    endpoint, output_dir, monkeypatch
) -> None:
    """Two CheckpointClients of one process on one output dir share one job id (per process, or the same
    ``CKPTD_JOB_ID``) and so one lease record: the second ``acquire`` sees its own process and rewrites it. A
    helper that opens a client to load (or to run an eval) and closes it calls ``Lease.release``, which
    removes the record because it names this job and process, while the training client is still writing.
    Until the training client's next refresh (up to 30 s), another job can take the output dir; from then
    on the training client's saves fail with LeaseLost and its handed-off ones are refused at commit."""
    _no_job_env(monkeypatch)
    model, blob = trainer.build_state(0, 1)
    training = CheckpointClient(output_dir, trainer.components(model, blob), endpoint=endpoint)
    try:
        training.save_async(1).wait(60)
        model2, blob2 = trainer.build_state(0, 1)
        with CheckpointClient(output_dir, trainer.components(model2, blob2), endpoint=endpoint) as helper:
            assert helper.load("latest") is not None
        lease = ownership.read_lease(output_dir)
        assert lease is not None and lease.holder.pid == os.getpid(), "the training client's lease is gone"
        probe = subprocess.run(
            [sys.executable, "-c", LEASE_PROBE, str(output_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert probe.stdout.strip() == "held", f"another job took a live job's output dir: {probe.stdout}"
    finally:
        training.close()


def _start_trainer(out: Path, step: int, endpoint: str, log: Path, blob_mb: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", proto.ENDPOINT_ENV: endpoint}
    for k in NO_JOB_ENV:
        env.pop(k, None)
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--step", str(step), "--blob-mb", str(blob_mb)]
    with open(log, "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)


RESTART = r"""
import sys, time
import trainer_script as trainer
from client import CheckpointClient
model, blob = trainer.build_state(1, 1)
client = CheckpointClient(sys.argv[1], trainer.components(model, blob))  # endpoint from $CKPTD_ENDPOINT
print("READY", flush=True)
time.sleep(600)  # a live restarted trainer (its own first save comes later)
"""


def _start_restart(out: Path, endpoint: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", proto.ENDPOINT_ENV: endpoint, "PYTHONPATH": f"{REPO}:{SCRIPT.parent}"}
    for k in NO_JOB_ENV:
        env.pop(k, None)
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-c", RESTART, str(out)], stdout=subprocess.PIPE, stderr=err, text=True, env=env
        )


@pytest.mark.xfail(
    strict=True,
    reason="review: a restarted plain trainer's new lease makes the daemon abort its dead predecessor's save",
)
def test_a_save_handed_off_before_a_kill_9_still_lands_when_the_trainer_restarts_at_once(
    endpoint, output_dir, tmp_path
) -> None:
    """DESIGN §1: the daemon "keeps going if the trainer dies after the hand-off, so a checkpoint that was
    handed over still lands". Without CKPTD_JOB_ID/Slurm/torchrun the job id is per process
    (``pid-<host>-<pid>-<start>``). A trainer killed with kill -9 right after ``save_async`` and restarted at
    once (the issue's own scenario) takes the lease over from its provably dead predecessor under a NEW job
    id; the daemon's ``lease_allows`` check before the rename then refuses the predecessor's save ("now
    belongs to job pid-..."), which is aborted although nobody else ever wrote the output dir. Here the
    daemon is frozen for the restart to make the order certain; in real life a large save simply takes longer
    to write than the restart takes to build its client."""
    daemon = start_daemon(endpoint, tmp_path / "daemon.log")
    root = fmt.checkpoints_root(output_dir)
    first = second = None
    try:
        first = _start_trainer(output_dir, 1, endpoint, tmp_path / "first.log", blob_mb=256)
        _read_marker(first, timeout=120)  # save_async(1) returned: handed off
        _freeze_in_flight(daemon, root, 1)
        first.kill()
        first.wait(10)
        second = _start_restart(output_dir, endpoint, tmp_path / "second.log")
        deadline = time.monotonic() + 60
        while True:  # the restart takes the lease first thing, then waits for the (frozen) daemon
            lease = ownership.read_lease(output_dir)
            if lease is not None and lease.holder.pid == second.pid:
                break
            assert time.monotonic() < deadline and second.poll() is None, (tmp_path / "second.log").read_text()
            time.sleep(0.05)
        os.kill(daemon.pid, signal.SIGCONT)
        assert second.stdout is not None and second.stdout.readline().strip() == "READY", (
            tmp_path / "second.log"
        ).read_text()[-2000:]
        deadline = time.monotonic() + 120
        while daemon_in_flight(endpoint):
            assert time.monotonic() < deadline, daemon_in_flight(endpoint)
            time.sleep(0.1)
        log = (tmp_path / "daemon.log").read_text()
        assert (root / "checkpoint-1").is_dir(), f"the handed-off save of step 1 was lost: {log[-1500:]}"
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        _stop_quietly(daemon)


# ------------------------------------------------------------------------------------------- read_only


@pytest.mark.xfail(strict=True, reason="review: a read_only client still needs (and starts) a daemon to load")
def test_a_read_only_client_loads_without_a_daemon(endpoint, output_dir, monkeypatch) -> None:
    """``read_only=True`` means "load only", yet construction still runs ``_ensure_daemon`` on every rank:
    local rank 0 spawns an embedded daemon with ``--output-dir`` (whose start-up sweep then deletes entries in
    the directory it was only meant to read) and every rank waits up to ``daemon_start_timeout_s`` for one.
    Where no daemon can be reached (here: the cluster-wide ``CKPTD_ENDPOINT`` is a tcp:// endpoint and this
    eval box has no CURVE keys), loading a committed checkpoint fails although ``load`` never talks to a
    daemon."""
    model, blob = trainer.build_state(3, 1)
    with CheckpointClient(output_dir, trainer.components(model, blob), endpoint=endpoint) as writer:
        writer.save_async(7).wait(60)
    monkeypatch.delenv("CKPTD_KEYS", raising=False)
    model2, blob2 = trainer.build_state(4, 1)
    with CheckpointClient(
        output_dir,
        trainer.components(model2, blob2),
        endpoint="tcp://127.0.0.1:9",
        read_only=True,
        daemon_start_timeout_s=3,
    ) as reader:
        assert reader.load("latest") == fmt.checkpoints_root(output_dir) / "checkpoint-7"
    assert torch.equal(blob2.tensor, blob.tensor)


# ---------------------------------------------------------------------------------------------- memory


@pytest.mark.xfail(
    strict=True, reason="review: forked children inherit every slab (fd and mapping): replaced slabs stay in RAM"
)
def test_a_forked_child_does_not_keep_a_replaced_slab_in_memory(endpoint, output_dir) -> None:
    """A slab is a memfd mapped MAP_SHARED, without MADV_DONTFORK and without an at-fork hook: every child
    forked after it exists (DataLoader workers, forked once per epoch by default; multiprocessing pools)
    inherits both the fd and the mapping. When the client replaces the slab (state grew) or abandons it (a
    frozen daemon), the memory is not freed: the child still holds it, for as long as it lives, although no
    one will ever read it again. "When both processes let go, the kernel frees the memory" needs a third."""
    state = StepState(16)
    client = CheckpointClient(output_dir, [StateComponent("state", state, SharingPattern.GLOBAL)], endpoint=endpoint)
    child = None
    try:
        state.fill(1)
        client.save_async(1).wait(60)
        old = {s.name for s in client._slabs}
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
        child.start()
        state.big = torch.zeros(64 * 2**20 // 4)  # the state grew: the next save needs a bigger slab
        state.fill(2)
        client.save_async(2).wait(60)
        assert not old & {s.name for s in client._slabs}, "the slab was not replaced; the test proves nothing"
        held = memfd_slabs(os.getpid()).get(child.pid, set())
        assert not held & old, f"the forked child (pid {child.pid}) still holds the replaced slab(s) {held & old}"
    finally:
        if child is not None:
            child.kill()
            child.join(10)
        client.close()


# ------------------------------------------------------------------------------------------ preemption

PREEMPTED = r"""
import os, signal, sys, time
import torch
from client import CheckpointClient, SharingPattern, StateComponent


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


state = State(int(sys.argv[2]))
client = CheckpointClient(sys.argv[1], [StateComponent("state", state, SharingPattern.GLOBAL)], heartbeat_timeout_s=2.0)
client.install_preemption_handler(timeout_s=60)
state.fill(4)
client.save_async(4).wait(60)
client.preemption_point(4)
state.fill(5)
handle = client.save_async(5)
print("HANDED", flush=True)
while not handle.done():  # the test freezes the daemon: this rank gives up on step 5
    time.sleep(0.1)
print("GAVE_UP", handle.error is not None, flush=True)
sys.stdin.readline()  # the daemon is thawed: a healthy daemon from here on
os.kill(os.getpid(), signal.SIGTERM)  # the cluster's preemption notice
client.preemption_point(5)  # the step boundary: the emergency save of step 5 happens here
print("NOT EXITED", flush=True)
"""


@pytest.mark.xfail(
    strict=True, reason="review: the emergency save is skipped when the step was handed off, even if it never committed"
)
def test_the_emergency_save_is_not_skipped_for_a_step_whose_save_failed(endpoint, output_dir, tmp_path) -> None:
    """``_emergency_save`` skips the step when ``step == self._last_handed_off`` ("already saved"), but a
    hand-off is not a commit: a save of that step that was abandoned (frozen daemon), aborted (disk full) or
    vetoed still counts as saved, so the job exits on preemption without any checkpoint of its last step
    although the daemon is healthy again. Under torchrun the same per-rank test is worse: ``_last_handed_off``
    can differ between ranks (rank 1's hand-off timed out, rank 0's did not), so one rank skips the emergency
    save and exits while the other enters its snapshot all-gather alone."""
    daemon = start_daemon(endpoint, tmp_path / "daemon.log")
    root = fmt.checkpoints_root(output_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", proto.ENDPOINT_ENV: endpoint, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", PREEMPTED, str(output_dir), str(BIG_MB)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "trainer.log", "w"),  # noqa: SIM115 - closed with the process
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "HANDED", (tmp_path / "trainer.log").read_text()[-2000:]
        _freeze_in_flight(daemon, root, 5)
        assert proc.stdout.readline().split() == ["GAVE_UP", "True"], (tmp_path / "trainer.log").read_text()[-2000:]
        os.kill(daemon.pid, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(120) == 128 + signal.SIGTERM, (tmp_path / "trainer.log").read_text()[-2000:]
        log = (tmp_path / "trainer.log").read_text()
        assert (root / "checkpoint-5").is_dir(), f"the job exited without saving step 5: {log[-1500:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        _stop_quietly(daemon)


FORKS_A_HELPER = r"""
import os, sys
import trainer_script as trainer
from ckptd import ownership
from client import CheckpointClient

model, blob = trainer.build_state(0, 1)
client = CheckpointClient(sys.argv[1], trainer.components(model, blob))  # endpoint from $CKPTD_ENDPOINT
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a forked helper (say, an eval) that ends normally: the interpreter runs atexit
os.waitpid(pid, 0)
lease = ownership.read_lease(sys.argv[1])
print("HOLDER", lease.holder.pid if lease else None, os.getpid(), flush=True)
client.close()
"""


@pytest.mark.xfail(
    strict=True, reason="review: a forked child's normal exit releases the parent's lease (inherited finalizer)"
)
def test_a_forked_child_exiting_normally_leaves_the_parents_lease_alone(endpoint, output_dir, tmp_path) -> None:
    """The lease finalizer (``weakref.finalize(self, _release_lease, ...)``, registered with atexit) is
    inherited by ``os.fork()`` children; one that exits through the interpreter runs it, and
    ``Lease.release`` only checks that the record names the lease's own holder (the parent), not that the
    caller IS that holder: the child deletes the live parent's lease, and another job can take the output
    dir until the parent's next refresh."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", proto.ENDPOINT_ENV: endpoint, "PYTHONPATH": f"{REPO}:{SCRIPT.parent}"}
    for k in NO_JOB_ENV:
        env.pop(k, None)
    res = subprocess.run(
        [sys.executable, "-c", FORKS_A_HELPER, str(output_dir)], capture_output=True, text=True, env=env, timeout=120
    )
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("HOLDER")), None)
    assert line is not None, res.stderr[-2000:]
    _, holder, parent = line.split()
    assert holder == parent, "the forked child's exit deleted the parent's lease"


PREEMPT_WORKER = r"""
import json, os, signal, sys, time
from pathlib import Path
import torch
import torch.distributed as dist
from ckptd.protocol import MsgType
from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent
from client.transport import DaemonUnavailable


class Data:
    def __init__(self, rank):
        self.t = torch.full((4,), float(rank))

    def state_dict(self):
        return {"t": self.t}

    def load_state_dict(self, s):
        self.t = s["t"]


out, results = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
outcome = {}
client = CheckpointClient(out, [StateComponent("data", Data(rank), SharingPattern.PER_RANK)])
client.install_preemption_handler(timeout_s=30)
client.save_async(4).wait(60)
client.preemption_point(4)
if rank == 1:  # rank 1's hand-off of step 5 gets no answer in time (a busy daemon); rank 0's does
    real = client._link.request

    def slow_daemon(msg_type, timeout_s, **kw):
        if msg_type == MsgType.STAGE:
            raise DaemonUnavailable("ckptd did not answer a stage request within 15 s (injected)")
        return real(msg_type, timeout_s, **kw)

    client._link.request = slow_daemon
try:
    client.save_async(5)
    outcome["save5"] = "handed off"
except CheckpointError as e:
    outcome["save5"] = "failed: " + str(e)[:200]  # the documented answer: training goes on
if rank == 1:
    client._link.request = real
if rank == 0:
    os.kill(os.getpid(), signal.SIGTERM)  # the cluster's preemption notice
t0 = time.monotonic()
try:
    client.preemption_point(5)
    outcome["exit"] = None
except SystemExit as e:
    outcome["exit"] = e.code
except BaseException as e:
    outcome["exit"] = type(e).__name__ + ": " + str(e)[:300]
outcome["seconds"] = time.monotonic() - t0
results.mkdir(parents=True, exist_ok=True)
(results / f"rank{rank}.json").write_text(json.dumps(outcome))
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.xfail(
    strict=True,
    reason="review: ranks decide the emergency save on their own _last_handed_off; one enters an all-gather alone",
)
def test_under_torchrun_ranks_agree_on_the_emergency_save_after_a_hand_off_failed_on_one_rank(
    endpoint, tmp_path
) -> None:
    """Step 5's hand-off fails on rank 1 only (the daemon did not answer it in time); rank 1 raises
    CheckpointError, catches it and trains on, as the docs say it may; rank 0 returned a handle. SIGTERM
    arrives and both ranks reach ``preemption_point(5)``: rank 0 sees ``5 == _last_handed_off`` and skips
    the emergency save ("already saved": it was aborted), then exits; rank 1 never handed step 5 off, so it
    starts ``_save_async(5)`` and its snapshot all-gather waits for a rank that is gone. Rank 1 has no
    watchdog (it got no signal itself), so it ends only by a gloo error or by torchrun killing it."""
    worker = tmp_path / "preempt_worker.py"
    worker.write_text(PREEMPT_WORKER)
    out, results = tmp_path / "out", tmp_path / "results"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", proto.ENDPOINT_ENV: endpoint, "PYTHONPATH": str(REPO)}
    for k in NO_JOB_ENV:
        env.pop(k, None)
    proc = subprocess.Popen(
        [*cmd, str(out), str(results)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    res = {r: json.loads(p.read_text()) for r in (0, 1) if (p := results / f"rank{r}.json").exists()}
    assert set(res) == {0, 1}, f"a rank never came back from preemption_point: {res}\n{output[-3000:]}"
    assert "failed" in res[1]["save5"] and res[0]["save5"] == "handed off", res
    for r in (0, 1):
        assert res[r]["exit"] == 128 + signal.SIGTERM and res[r]["seconds"] < 30, (r, res[r])


# ------------------------------------------------------------------------------- two jobs start at once


@pytest.mark.xfail(
    strict=True,
    reason="review: the embedded child that lost the endpoint race exits later and a healthy save is vetoed",
)
def test_a_save_is_not_vetoed_when_the_embedded_daemon_that_lost_the_start_race_exits(
    endpoint, output_dir, tmp_path, monkeypatch
) -> None:
    """Two jobs start on one node with the same (default) endpoint: both leaders find no daemon and start
    one; one wins the endpoint lock, the other child exits with code 2 once it gets that far. The loser's
    ``ensure_daemon`` returns on the first answered ping, which the WINNER gave, and keeps ``process`` =
    its own child, which is still starting. When that child then exits (code 2), ``_progress`` reads
    ``embedded_alive() is False`` as "our daemon died" and abandons and vetoes every save in flight, which
    the live winner was writing fine. (The WELCOME reply names the daemon's pid: compare it with the child.)
    Here the child's start is slowed with ``sleep`` so that the order is certain."""
    import client.transport as transport

    real_start = transport.start_embedded_daemon

    def slow_child(ep: str, out: Path | None = None) -> subprocess.Popen:
        proc = real_start(ep, out)  # the real command line, started 5 s late
        proc.kill()
        proc.wait()
        cmd = " ".join(f"'{a}'" for a in proc.args)
        return subprocess.Popen(
            ["sh", "-c", f"sleep 5; exec {cmd}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    monkeypatch.setattr(transport, "start_embedded_daemon", slow_child)
    winner = subprocess.Popen(  # the other job's daemon, starting at the same moment (2 s to answer)
        ["sh", "-c", f"sleep 2; exec '{sys.executable}' -m ckptd serve --endpoint '{endpoint}'"],
        stdout=open(tmp_path / "winner.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    root = fmt.checkpoints_root(output_dir)
    state = StepState(BIG_MB)
    client = CheckpointClient(output_dir, [StateComponent("state", state, SharingPattern.GLOBAL)], endpoint=endpoint)
    try:
        child = client._link.process
        if child is None or child.poll() is not None:
            pytest.skip("the other daemon answered the first ping: no child was started; the test proves nothing")
        state.fill(1)
        handle = client.save_async(1)
        _freeze_in_flight(winner, root, 1)
        assert child.wait(30) == 2, "the slow child should have lost the endpoint to the running daemon"
        os.kill(winner.pid, signal.SIGCONT)
        assert handle.wait(60) == root / "checkpoint-1"
    finally:
        client.close(wait=False)
        _stop_quietly(winner)
