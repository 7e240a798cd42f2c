"""ckptd.ownership with real processes and real files: process identities judged by start time, temp-dir
owner records and sweeps, the commit veto racing a committer, and the output-dir lease. No mocks: a "dead"
owner is a process that really exited, a "live" one a process that really runs, another host a record that
really names one."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import secrets
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptd import format as fmt
from ckptd import ownership
from ckptd.ownership import Lease, LeaseHeld, LeaseLost, ProcessIdentity


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def live_process():
    proc = sleeper()
    yield proc
    stop(proc)


def dead_identity() -> ProcessIdentity:
    """The identity of a process that really ran and has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    who = ProcessIdentity.of_pid(proc.pid)
    stop(proc)
    assert who is not None
    return who


def elsewhere(who: ProcessIdentity, host: str = "node-b.cluster") -> ProcessIdentity:
    return dataclasses.replace(who, host=host)


def manifest_bytes(step: int, txn: str) -> bytes:
    return json.dumps({"format": fmt.FORMAT_VERSION, "step": step, "txn": txn}).encode()


# ------------------------------------------------------------------------------------------- identity


def test_identity_round_trips_and_judges_live_dead_reused_and_foreign_processes(live_process) -> None:
    me = ProcessIdentity.current()
    assert me.pid == os.getpid() and me.start_time > 0 and me.is_local()
    assert me.alive() is True
    assert ProcessIdentity.from_json(json.loads(json.dumps(me.to_json()))) == me

    other = ProcessIdentity.of_pid(live_process.pid)
    assert other is not None and other.alive() is True and not other.same_process(me)
    live_process.kill()
    # Killed but not yet reaped: a zombie holds nothing and counts as dead.
    deadline = time.monotonic() + 10
    while other.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert other.alive() is False
    live_process.wait()
    assert other.alive() is False
    assert ProcessIdentity.of_pid(live_process.pid) is None or ProcessIdentity.of_pid(live_process.pid) != other

    # This very pid with another start time: a reused pid is not the process that wrote a record.
    assert dataclasses.replace(me, start_time=me.start_time + 1).alive() is False
    # Another host, another boot, another pid namespace: cannot be judged here.
    assert elsewhere(me).alive() is None
    assert dataclasses.replace(me, boot_id="00000000-0000-0000-0000-000000000000").alive() is None
    assert dataclasses.replace(me, pid_ns=(me.pid_ns or 0) + 1).alive() is None

    with pytest.raises(ValueError, match="pid"):
        ProcessIdentity.from_json({"host": "h", "boot_id": "b", "pid": -1, "start_time": 3})


def test_job_id_is_explicit_then_slurm_then_torchelastic_then_this_process() -> None:
    assert ownership.current_job_id({"CKPTD_JOB_ID": "run-7", "SLURM_JOB_ID": "9"}) == "run-7"
    assert ownership.current_job_id({"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "2", "TORCHELASTIC_RUN_ID": "x"}) == (
        "slurm-9"
    )
    assert ownership.current_job_id({"TORCHELASTIC_RUN_ID": "abc/def ghi"}) == "torchelastic-abc_def_ghi"
    # torchrun's default rendezvous id "none" names no job.
    me = ProcessIdentity.current()
    assert ownership.current_job_id({"TORCHELASTIC_RUN_ID": "none"}) == f"pid-{me.host}-{me.pid}-{me.start_time}"
    long = ownership.current_job_id({"TORCHELASTIC_RUN_ID": "r" * 500})
    assert len(long) == 128 and long != ownership.current_job_id({"TORCHELASTIC_RUN_ID": "r" * 499})
    with pytest.raises(ValueError, match="CKPTD_JOB_ID"):
        ownership.current_job_id({"CKPTD_JOB_ID": "two words"})


# ----------------------------------------------------------------------------------------------- sweeps


def plant_temp(root: Path, step: int, owner: ProcessIdentity | None, deadline: float | None = None) -> Path:
    txn = secrets.token_hex(4)
    root.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        ownership.write_temp_owner(root, step, txn, owner, "job-a", deadline if deadline else time.time() + 300)
    temp = root / fmt.temp_dirname(step, txn)
    temp.mkdir()
    (temp / "w_state.safetensors").write_bytes(b"partial")
    return temp


def owner_record(temp: Path) -> Path:
    step, txn = fmt.parse_temp_dirname(temp.name)
    return temp.parent / fmt.temp_owner_name(step, txn)


def test_sweep_removes_only_what_a_provably_gone_owner_left(tmp_path: Path, live_process) -> None:
    out = tmp_path / "out"
    root = fmt.checkpoints_root(out)
    root.mkdir(parents=True)
    now = time.time()
    other_daemon = ProcessIdentity.of_pid(live_process.pid)
    assert other_daemon is not None

    dead_owner = plant_temp(root, 1, dead_identity())
    live_owner = plant_temp(root, 2, other_daemon)
    foreign_fresh = plant_temp(root, 3, elsewhere(other_daemon), deadline=now + 60)
    foreign_expired = plant_temp(root, 4, elsewhere(other_daemon), deadline=now - ownership.SWEEP_MARGIN_S - 5)
    live_in_this_daemon = plant_temp(root, 5, dead_identity())
    unowned_old = plant_temp(root, 6, None)
    old = now - ownership.SWEEP_MARGIN_S - 60
    os.utime(unowned_old, (old, old))
    unowned_new = plant_temp(root, 7, None)
    trash = root / fmt.trash_dirname(8, "abcd")
    trash.mkdir()
    (trash / "x").write_bytes(b"x")
    # Records whose temp dir is gone: the dead owner's goes, the live owner's stays (its mkdir may follow).
    orphan_dead = ownership.write_temp_owner(root, 9, "aa11", dead_identity(), "job-a", now + 300)
    orphan_live = ownership.write_temp_owner(root, 10, "bb22", other_daemon, "job-a", now + 300)
    # Tombstones: kept until their deadline has passed by the margin, whoever wrote them.
    tomb_live = root / fmt.temp_dirname(11, "cc33")
    tomb_live.write_bytes(ownership.OwnerRecord(dead_identity(), 11, "cc33", None, now + 30, "tombstone").to_bytes())
    tomb_dead = root / fmt.temp_dirname(12, "dd44")
    expired = now - ownership.SWEEP_MARGIN_S - 1
    tomb_dead.write_bytes(ownership.OwnerRecord(dead_identity(), 12, "dd44", None, expired, "tombstone").to_bytes())
    committed = root / "checkpoint-5"
    committed.mkdir()
    (committed / fmt.MANIFEST_NAME).write_bytes(manifest_bytes(5, "ee55"))
    (root / "notes.txt").write_text("not ours")

    live_txn = fmt.parse_temp_dirname(live_in_this_daemon.name)[1]
    removed = set(ownership.sweep_stale(out, {live_txn}, now=now))

    gone = {dead_owner, foreign_expired, unowned_old, trash, orphan_dead, tomb_dead}
    kept = {live_owner, foreign_fresh, live_in_this_daemon, unowned_new, orphan_live, tomb_live, committed}
    assert gone <= removed, sorted(p.name for p in gone - removed)
    for p in gone:
        assert not os.path.lexists(p), p
    for p in kept:
        assert p.exists(), p
    # A temp dir goes with its owner record; a kept one keeps it.
    assert not owner_record(dead_owner).exists() and not owner_record(foreign_expired).exists()
    assert owner_record(live_owner).exists() and owner_record(foreign_fresh).exists()
    assert (root / "notes.txt").exists()


def test_a_daemon_sweeps_its_own_leftovers_that_it_no_longer_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    root = fmt.checkpoints_root(out)
    me = ProcessIdentity.current()
    running = plant_temp(root, 1, me)
    leftover = plant_temp(root, 2, me)
    ownership.sweep_stale(out, {fmt.parse_temp_dirname(running.name)[1]})
    assert running.is_dir() and not leftover.exists() and not owner_record(leftover).exists()


SWEEPER = r"""
import os, sys, time, secrets, json
from pathlib import Path
from ckptd import format as fmt, ownership
out, rounds = Path(sys.argv[1]), int(sys.argv[2])
root = fmt.checkpoints_root(out)
me = ownership.ProcessIdentity.current()
lost = 0
for i in range(rounds):
    txn = secrets.token_hex(6)
    step = os.getpid() * 1000 + i
    ownership.write_temp_owner(root, step, txn, me, "job", time.time() + 300)
    temp = root / fmt.temp_dirname(step, txn)
    temp.mkdir()
    (temp / "part").write_bytes(b"x" * 100)
    ownership.sweep_stale(out, {txn})
    if not (temp / "part").exists():
        lost += 1
    (temp / "part").unlink(missing_ok=True)
    if temp.exists():
        temp.rmdir()
    ownership.remove_temp_owner(root, step, txn)
print(json.dumps({"lost": lost}))
"""


def test_two_daemons_sweeping_one_directory_never_remove_each_others_live_temp_dirs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fmt.checkpoints_root(out).mkdir(parents=True)
    procs = [
        subprocess.Popen([sys.executable, "-c", SWEEPER, str(out), "150"], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert results == [{"lost": 0}, {"lost": 0}]
    assert os.listdir(fmt.checkpoints_root(out)) == []


# ------------------------------------------------------------------------------------------------- veto


def test_veto_of_a_temp_dir_being_written_removes_it_so_the_rename_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    temp = plant_temp(fmt.checkpoints_root(out), 3, ProcessIdentity.current())
    step, txn = fmt.parse_temp_dirname(temp.name)
    (temp / fmt.MANIFEST_NAME).write_bytes(manifest_bytes(3, txn))  # written, not yet renamed
    assert ownership.veto_commit(out, 3, txn, time.time() + 60) is True
    assert not temp.exists()
    with pytest.raises(FileNotFoundError):
        os.rename(temp, fmt.checkpoints_root(out) / "checkpoint-3")
    assert not (fmt.checkpoints_root(out) / "checkpoint-3").exists()
    # A second rank's veto of the same save reports the same outcome and changes nothing.
    assert ownership.veto_commit(out, 3, txn, time.time() + 60) is True
    assert not os.path.lexists(temp)


def test_veto_before_the_temp_dir_exists_leaves_a_tombstone_that_the_daemon_cannot_mkdir_over(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    root = fmt.checkpoints_root(out)
    root.mkdir(parents=True)
    deadline = time.time() + 60
    assert ownership.veto_commit(out, 4, "ab12", deadline) is True
    temp = root / fmt.temp_dirname(4, "ab12")
    assert stat.S_ISREG(os.lstat(temp).st_mode)
    assert ownership.OwnerRecord.from_bytes(temp.read_bytes()).deadline == pytest.approx(deadline)
    with pytest.raises(FileExistsError):
        os.mkdir(temp)
    with pytest.raises(NotADirectoryError):
        (temp / "model.safetensors").write_bytes(b"x")
    # Kept while the deadline (plus the margin) has not passed, even by a sweep that does not know the txn.
    ownership.sweep_stale(out, set())
    assert temp.exists()
    ownership.sweep_stale(out, set(), now=deadline + ownership.SWEEP_MARGIN_S + 1)
    assert os.listdir(root) == []


def test_veto_after_the_commit_reports_it_committed_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    root = fmt.checkpoints_root(out)
    final = root / "checkpoint-6"
    final.mkdir(parents=True)
    (final / fmt.MANIFEST_NAME).write_bytes(manifest_bytes(6, "cafe01"))
    assert ownership.veto_commit(out, 6, "cafe01", time.time() + 60) is False
    assert not os.path.lexists(root / fmt.temp_dirname(6, "cafe01"))
    assert (final / fmt.MANIFEST_NAME).exists()


def test_veto_between_the_swap_and_the_trash_of_a_resave_reports_it_committed(tmp_path: Path) -> None:
    """Re-saving step 7: the daemon swapped its temp dir and checkpoint-7 (RENAME_EXCHANGE), so the temp
    path holds the OLD checkpoint. Renaming that away is the daemon's own next move: the save committed."""
    out = tmp_path / "out"
    root = fmt.checkpoints_root(out)
    final = root / "checkpoint-7"
    final.mkdir(parents=True)
    (final / fmt.MANIFEST_NAME).write_bytes(manifest_bytes(7, "beef02"))
    old = root / fmt.temp_dirname(7, "beef02")
    old.mkdir()
    (old / fmt.MANIFEST_NAME).write_bytes(manifest_bytes(7, "0ld0"))
    assert ownership.veto_commit(out, 7, "beef02", time.time() + 60) is False
    assert not old.exists()
    assert json.loads((final / fmt.MANIFEST_NAME).read_text())["txn"] == "beef02"


RACER = r"""
import ctypes, errno, json, os, random, shutil, sys, time
from pathlib import Path
from ckptd import format as fmt, ownership

me = ownership.ProcessIdentity.current()
libc = ctypes.CDLL(None, use_errno=True)


def exchange(a, b):
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def commit(root, step, txn, jitter):
    # What the daemon does, in its order, with pauses between the steps.
    temp, final = root / fmt.temp_dirname(step, txn), root / fmt.checkpoint_dirname(step)
    pause = lambda: time.sleep(random.random() * jitter)
    ownership.write_temp_owner(root, step, txn, me, "job", time.time() + 300)
    try:
        os.mkdir(temp)
    except FileExistsError:
        return "refused"
    try:
        pause()
        (temp / "w_state.safetensors").write_bytes(b"x" * 4096)
        pause()
        (temp / fmt.MANIFEST_NAME).write_text(json.dumps({"format": fmt.FORMAT_VERSION, "step": step, "txn": txn}))
        pause()
        try:
            os.rename(temp, final)
            return "committed"
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
                raise
        exchange(temp, final)
    except OSError as e:
        return "aborted " + errno.errorcode.get(e.errno, "?")
    pause()  # the point of no return is behind: the old checkpoint goes to the trash if still there
    try:
        trash = root / fmt.trash_dirname(step, "c" + txn)
        os.rename(temp, trash)
        shutil.rmtree(trash)
    except OSError:
        pass
    return "committed"


for line in sys.stdin:
    cmd = json.loads(line)
    root = Path(cmd["root"])
    while time.time() < cmd["start"]:
        time.sleep(0.0005)
    time.sleep(cmd["delay"])
    if cmd["role"] == "commit":
        result = commit(root, cmd["step"], cmd["txn"], cmd["jitter"])
    else:
        try:
            result = ownership.veto_commit(root.parent, cmd["step"], cmd["txn"], time.time() + 300)
        except OSError as e:
            result = "error " + str(e)
    print(json.dumps(result), flush=True)
"""


class Racer:
    """A long-lived worker process that runs one role per round when told (a committer or a vetoer)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RACER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def send(self, **cmd) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 30.0):
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "a racer did not answer"
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def test_veto_racing_a_committer_always_agrees_with_what_happened(tmp_path: Path) -> None:
    """Two ranks veto while a daemon-like committer runs, at random offsets into its steps. Whatever the
    interleaving: the vetoers agree with each other, they say "committed" exactly when checkpoint-<step>
    holds this save, the committer's "committed" means the same, and a re-saved step that did not commit
    keeps its old checkpoint intact."""
    root = fmt.checkpoints_root(tmp_path / "out")
    root.mkdir(parents=True)
    racers = [Racer() for _ in range(3)]
    rng = random.Random(1234)
    outcomes = {"committed": 0, "vetoed": 0}
    try:
        for rnd in range(60):
            resave = rnd % 3 == 0
            step = 0 if resave else rnd
            final = root / fmt.checkpoint_dirname(step)
            if resave and not final.exists():
                final.mkdir()
                (final / fmt.MANIFEST_NAME).write_bytes(manifest_bytes(0, "seed0"))
            before = json.loads((final / fmt.MANIFEST_NAME).read_text())["txn"] if resave else None
            txn = secrets.token_hex(6)
            start = time.time() + 0.05
            racers[0].send(role="commit", root=str(root), step=step, txn=txn, start=start, delay=0, jitter=0.004)
            for r in racers[1:]:
                r.send(role="veto", root=str(root), step=step, txn=txn, start=start, delay=rng.random() * 0.015)
            committer = racers[0].result()
            votes = [r.result() for r in racers[1:]]
            now_txn = json.loads((final / fmt.MANIFEST_NAME).read_text())["txn"] if final.exists() else None
            committed = now_txn == txn
            assert votes[0] == votes[1] == (not committed), (rnd, committer, votes, now_txn)
            assert (committer == "committed") == committed, (rnd, committer, votes)
            if resave and not committed:
                assert now_txn == before, f"round {rnd}: a vetoed re-save changed the old checkpoint"
            temp = root / fmt.temp_dirname(step, txn)
            assert not temp.is_dir(), f"round {rnd}: a temp dir survived its veto"
            outcomes["committed" if committed else "vetoed"] += 1
            for name in os.listdir(root):
                assert not fmt.is_trash_dirname(name) or name.startswith(".trash-checkpoint-0-c"), name
    finally:
        for r in racers:
            r.close()
    # The offsets are spread enough that both outcomes happen (the test would prove little otherwise).
    assert outcomes["committed"] > 0 and outcomes["vetoed"] > 0, outcomes


# ------------------------------------------------------------------------------------------------ lease


def test_lease_is_taken_on_a_fresh_dir_and_released_only_by_its_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lease = Lease.acquire(out, "job-a")
    rec = ownership.read_lease(out)
    me = ProcessIdentity.current()
    assert rec is not None and rec.job == "job-a" and rec.holder == me
    raw = json.loads(ownership.lease_path(out).read_text())
    assert {"job", "host", "boot_id", "pid", "start_time", "refreshed", "version"} <= set(raw)
    assert raw["pid"] == os.getpid() and raw["start_time"] == me.start_time
    assert sorted(os.listdir(fmt.checkpoints_root(out))) == [fmt.LEASE_NAME]  # no lock or temp file left
    before = rec.refreshed
    time.sleep(0.01)
    lease.refresh()
    assert ownership.read_lease(out).refreshed > before
    assert ownership.lease_allows(out, "job-a") and lease.release()
    assert ownership.read_lease(out) is None and not lease.release()


def test_another_live_job_is_refused_with_a_message_naming_the_holder(tmp_path: Path, live_process) -> None:
    out = tmp_path / "out"
    holder = ProcessIdentity.of_pid(live_process.pid)
    Lease.acquire(out, "train-llama", holder=holder)
    with pytest.raises(LeaseHeld) as err:
        Lease.acquire(out, "other-job")
    msg = str(err.value)
    assert "'train-llama'" in msg and f"pid {live_process.pid} on {holder.host}" in msg and "since" in msg
    assert "another output_dir" in msg and "stop that job" in msg and "CKPTD_JOB_ID=train-llama" in msg
    assert err.value.holder.job == "train-llama"
    assert not ownership.lease_allows(out, "other-job") and ownership.lease_allows(out, "train-llama")


def test_same_job_takes_over_at_once_from_a_live_earlier_process(tmp_path: Path, live_process) -> None:
    out = tmp_path / "out"
    old = Lease.acquire(out, "torchelastic-run1", holder=ProcessIdentity.of_pid(live_process.pid))
    new = Lease.acquire(out, "torchelastic-run1")
    assert ownership.read_lease(out).holder == ProcessIdentity.current()
    # The earlier holder learns it lost the lease, and cannot remove the new one.
    with pytest.raises(LeaseLost, match="torchelastic-run1"):
        old.refresh()
    assert not old.release()
    assert new.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "out"
    Lease.acquire(out, "crashed-job", holder=dead_identity())
    assert ownership.lease_allows(out, "new-job")
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="crashed-job.*no longer running"):
        Lease.acquire(out, "new-job")
    assert time.monotonic() - t0 < 2
    assert ownership.read_lease(out).job == "new-job"


def test_a_holder_on_another_host_counts_as_alive_until_its_lease_goes_stale(tmp_path: Path) -> None:
    out = tmp_path / "out"
    root = fmt.checkpoints_root(out)
    root.mkdir(parents=True)
    far = elsewhere(ProcessIdentity.current())
    fresh = ownership.LeaseRecord("job-b", far, time.time() - 5, time.time() - 5)
    ownership.lease_path(out).write_bytes(fresh.to_bytes())
    with pytest.raises(LeaseHeld, match="node-b.cluster"):
        Lease.acquire(out, "job-c")
    # Staleness is judged by the lease file's mtime on the file system's clock (the record's own times come
    # from the holder's clock, which may be skewed): a file unwritten past the timeout is stale...
    stale_at = time.time() - ownership.LEASE_TIMEOUT_S - 1
    ownership.lease_path(out).write_bytes(ownership.LeaseRecord("job-b", far, stale_at, stale_at).to_bytes())
    os.utime(ownership.lease_path(out), (stale_at, stale_at))
    assert ownership.lease_allows(out, "job-c")
    # ...and so is one dated past the timeout in the future (no refresh writes that; it must not be immortal).
    future = time.time() + ownership.LEASE_TIMEOUT_S + 60
    os.utime(ownership.lease_path(out), (future, future))
    assert ownership.lease_allows(out, "job-c")
    os.utime(ownership.lease_path(out), (stale_at, stale_at))
    with pytest.warns(RuntimeWarning, match="no longer running"):
        Lease.acquire(out, "job-c")


def test_an_unreadable_or_hostile_lease_file_does_not_block_or_hang(tmp_path: Path) -> None:
    out = tmp_path / "out"
    root = fmt.checkpoints_root(out)
    root.mkdir(parents=True)
    ownership.lease_path(out).write_bytes(b"{not json")
    assert ownership.read_lease(out) is None
    Lease.acquire(out, "job-d").release()
    os.mkfifo(ownership.lease_path(out))  # reading a FIFO would block forever
    assert ownership.read_lease(out) is None
    assert Lease.acquire(out, "job-d").job == "job-d"


LEASER = r"""
import json, sys, time
from ckptd import ownership
out, job, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
while time.time() < start:
    time.sleep(0.0005)
try:
    ownership.Lease.acquire(out, job)
    print("won", flush=True)
except ownership.LeaseHeld:
    print("held", flush=True)
sys.stdin.read()  # stay alive (holding) until the test is done with this round
"""


def test_two_jobs_starting_at_once_never_both_get_the_lease(tmp_path: Path) -> None:
    for rnd in range(6):
        out = tmp_path / f"out{rnd}"
        start = time.time() + 0.6
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", LEASER, str(out), f"job-{i}", str(start)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        try:
            answers = sorted(p.stdout.readline().strip() for p in procs)
        finally:
            for p in procs:
                p.stdin.close()
                p.wait(10)
        assert answers == ["held", "won"], (rnd, answers)


def test_rename_noreplace_never_replaces(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    with pytest.raises(OSError) as err:
        ownership._rename_noreplace(a, b)
    assert err.value.errno == errno.EEXIST and b.read_text() == "b" and a.read_text() == "a"
