"""Edges of the lease, the owner records and the veto, proven with real files and real processes.

- A released lease never comes back (a late refresh does nothing).
- Nothing at a fixed name (a FIFO at the old lease temp name) can hang a lease write; leftover lease temp
  files are swept.
- A stopped holder of the lease lock or of a save's veto lock makes others fail within a bounded time with
  an error naming the lock and its holder, never hang.
- Lease staleness is judged on the file system's clock: a remote holder that keeps refreshing is never
  taken over whatever its clock says, and a record dated in the future is not immortal.
- A takeover from a dead holder records it as a predecessor: its save handed over before it died is
  admitted beside the new job's and commits first (daemon-level, hand-driven ranks).
- Hostile owner/veto/lease record values are skipped, never a crash of a sweep, ``read_lease`` or acquire.
- A tombstone is never renamed into place as ``checkpoint-<step>``.
- A live holder hidden by ``/proc`` ``hidepid=2`` is not provably dead.

Each test was first written as a strict-xfail reproduction of a defect (issue 5 review) and passes since
the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ckptd import format as fmt
from ckptd import ownership
from ckptd import transactions as tx
from ckptd.format.names import lease_temp_name
from ckptd.ownership import Lease, LeaseHeld, LeaseLost, ProcessIdentity
from ckptd.protocol import ComponentSpec, FileSpec, MsgType, StageRequest
from tests.ckptd.harness import Harness, commit_info, global_file, new_txn, outcome, st_bytes, stage_req
from tests.ckptd.test_daemon_races import child_slab

REPO = Path(__file__).resolve().parents[2]


def _run_py(code: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; a hang becomes rc 124 (the child is killed, never left behind)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, 124, out, err)


def _root(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    root = fmt.checkpoints_root(out)
    root.mkdir(parents=True)
    return out, root


# ------------------------------------------------------------------------------------------------ lease


def test_refresh_after_release_never_recreates_the_lease(tmp_path: Path) -> None:
    """A refresh that comes after the release (``CheckpointClient._teardown`` releases even when joining the
    refresh thread timed out, e.g. a refresh blocked on the lease lock or a slow NFS fsync) does nothing: the
    released lease does not come back naming this live process, and another job can take the output dir."""
    out, _ = _root(tmp_path)
    lease = Lease.acquire(out, "job-a")
    assert lease.release()
    try:
        lease.refresh()
    except LeaseLost:
        pass  # an acceptable answer: the lease is not ours any more
    assert ownership.read_lease(out) is None, "a released lease came back to life"
    Lease.acquire(out, "job-b")  # another job must be able to take the output dir


def test_a_fifo_at_the_lease_temp_name_does_not_hang_acquire(tmp_path: Path) -> None:
    """A FIFO at the lease's old fixed temp name (``.ckptd-lease.json.tmp``) cannot hang ``Lease.acquire``:
    each write uses a fresh random temp name created O_EXCL | O_NOFOLLOW, so nothing already in the directory is
    ever opened for writing. (It used to be opened O_WRONLY, blocking forever inside the lease lock.)"""
    out, root = _root(tmp_path)
    os.mkfifo(root / fmt.LEASE_TEMP_NAME)
    res = _run_py(
        f"""
        from ckptd import ownership
        try:
            ownership.Lease.acquire({str(out)!r}, "job-a")
            print("acquired")
        except (ownership.OwnershipError, OSError) as e:
            print("refused:", e)
        """,
        timeout=20,
    )
    assert res.returncode != 124, "Lease.acquire hung on a FIFO at the lease's temp name"
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_stopped_lease_lock_holder_does_not_hang_other_jobs_forever(tmp_path: Path) -> None:
    """A process stopped while it holds the lease lock (Slurm suspend, Ctrl-Z, a debugger, an NFS client that
    lost its server) makes ``Lease.acquire`` fail within ``LOCK_TIMEOUT_S`` with an error naming the lock and the
    holder's pid, instead of hanging every later ``CheckpointClient(...)`` (and under torchrun every rank)."""
    out, root = _root(tmp_path)
    lock = root / fmt.LEASE_LOCK_NAME
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)
        res = _run_py(
            f"""
            from ckptd import ownership
            try:
                ownership.Lease.acquire({str(out)!r}, "job-b")
                print("acquired")
            except (ownership.OwnershipError, OSError) as e:
                print("refused:", e)
            """,
            timeout=45,
        )
        assert res.returncode != 124, "Lease.acquire waited forever behind a stopped lock holder"
        assert res.returncode == 0 and res.stdout.startswith("refused:"), (res.stdout, res.stderr[-2000:])
        assert fmt.LEASE_LOCK_NAME in res.stdout and f"pid {holder.pid}" in res.stdout, res.stdout
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)


def test_a_remote_holder_that_keeps_refreshing_is_never_taken_over_whatever_its_clock(tmp_path: Path) -> None:
    """A holder on another host whose clock lags ours by more than ``LEASE_TIMEOUT_S`` but that rewrites its
    lease every half second is never taken over: staleness is the lease file's mtime against a probe file
    created now in the same directory (one clock, the file system's), not the holder's ``refreshed`` against
    this host's clock."""
    out, _ = _root(tmp_path)
    far = dataclasses.replace(ProcessIdentity.current(), host="node-b.cluster", pid=4242)
    lag = ownership.LEASE_TIMEOUT_S + 30  # node-b's clock is 150 s behind ours
    stop = threading.Event()

    def remote_holder_refreshing() -> None:
        while not stop.is_set():
            then = time.time() - lag
            rec = ownership.LeaseRecord("job-b", far, then - 3600, then)
            with ownership._lease_lock(fmt.checkpoints_root(out)):  # what Lease.refresh does on node-b
                ownership._write_lease(fmt.checkpoints_root(out), rec)
            stop.wait(0.5)

    t = threading.Thread(target=remote_holder_refreshing, daemon=True)
    t.start()
    try:
        time.sleep(1.2)  # it has refreshed twice within the last second
        with pytest.raises(LeaseHeld):
            Lease.acquire(out, "job-c")
        assert not ownership.lease_allows(out, "job-c")
    finally:
        stop.set()
        t.join(5)


def test_a_record_dated_in_the_future_is_not_immortal(tmp_path: Path) -> None:
    """A remote holder's lease whose file claims to have been written far in the file system's future (a
    clock set wrong, a hand-made record) expires like a stale one; its ``refreshed`` field, from the holder's
    clock, plays no part either way."""
    out, root = _root(tmp_path)
    far = dataclasses.replace(ProcessIdentity.current(), host="node-b.cluster", pid=4242)
    future = time.time() + 10 * ownership.LEASE_TIMEOUT_S
    ownership.lease_path(out).write_bytes(ownership.LeaseRecord("job-b", far, future, future).to_bytes())
    assert not ownership.lease_allows(out, "job-c")  # written just now on the file system's clock: alive
    os.utime(ownership.lease_path(out), (future, future))
    assert ownership.lease_allows(out, "job-c")
    with pytest.warns(RuntimeWarning, match="no longer running"):
        Lease.acquire(out, "job-c").release()
    assert sorted(os.listdir(root)) == [], "a probe or temp file was left behind"


def test_a_stopped_holder_of_a_saves_veto_lock_gives_a_bounded_error_naming_it(tmp_path: Path) -> None:
    """The ranks of one save veto it one at a time under its ``.veto`` lock; a rank stopped while holding
    it makes another rank's veto fail after ``timeout_s`` with LockTimeout (an OSError, which the client
    reports in the handle) naming the lock and the holder, instead of blocking that rank forever."""
    out, root = _root(tmp_path)
    lock = root / fmt.temp_veto_name(7, "ab12cd34")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(ownership.LockTimeout) as err:
            ownership.veto_commit(out, 7, "ab12cd34", time.time() + 60, timeout_s=1.0)
        assert time.monotonic() - t0 < 10
        assert isinstance(err.value, OSError)
        text = str(err.value)
        assert lock.name in text and f"pid {holder.pid}" in text and "may still commit" in text, text
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)


def test_leftover_lease_temp_files_are_swept_once_old(tmp_path: Path) -> None:
    """A process killed between creating a lease temp file and renaming it leaves the temp file; sweeps
    remove it (and a FIFO at the old fixed temp name) once it is older than the margin, and keep a fresh one
    (a lease write in progress)."""
    out, root = _root(tmp_path)
    old = root / lease_temp_name("dead01")
    fresh = root / lease_temp_name("live02")
    legacy = root / fmt.LEASE_TEMP_NAME
    old.write_bytes(b"{}")
    fresh.write_bytes(b"{}")
    os.mkfifo(legacy)
    long_ago = time.time() - ownership.SWEEP_MARGIN_S - 60
    for path in (old, legacy):
        os.utime(path, (long_ago, long_ago))
    removed = ownership.sweep_stale(out, live_txns=set())
    assert set(removed) == {old, legacy}
    assert fresh.exists() and not os.path.lexists(old) and not os.path.lexists(legacy)


def test_a_takeover_records_the_earlier_jobs_as_predecessors_bounded(tmp_path: Path) -> None:
    """Taking the lease over from a provably dead holder records its job (and that job's predecessors)
    newest first, at most ``MAX_PREDECESSORS``; a restart of the same job keeps the list. ``lease_allows``
    lets a predecessor's save commit, and no other job's."""
    out, root = _root(tmp_path)
    jobs = [f"job-{i}" for i in range(ownership.MAX_PREDECESSORS + 3)]
    dead = _dead_identity()
    # A dead holder whose own lease had (too many) predecessors of its own, newest first.
    with ownership._lease_lock(root):
        earlier = tuple(reversed(jobs[:-1]))
        ownership._write_lease(root, ownership.LeaseRecord(jobs[-1], dead, 0.0, 0.0, predecessors=earlier))
    with pytest.warns(RuntimeWarning, match="no longer running"):
        lease = Lease.acquire(out, "job-new")
    rec = ownership.read_lease(out)
    assert rec is not None and rec.job == "job-new" and rec == lease.record
    assert rec.predecessors == tuple(reversed(jobs))[: ownership.MAX_PREDECESSORS]
    assert ownership.lease_allows(out, jobs[-1]) and not ownership.lease_allows(out, "job-stranger")
    assert not ownership.lease_allows(out, jobs[0])  # dropped off the bounded list
    assert ownership.lease_predecessors(out, "job-new") == frozenset(rec.predecessors)
    assert ownership.lease_predecessors(out, jobs[-1]) == frozenset()  # only the holder's save is judged
    # The same job restarted (its earlier process is dead): the predecessors stay, the job is not one.
    with ownership._lease_lock(root):
        ownership._write_lease(root, dataclasses.replace(rec, holder=dead))
    restarted = Lease.acquire(out, "job-new")
    assert restarted.record.predecessors == rec.predecessors
    assert not lease.release() and restarted.release()  # one record, two Lease objects of this process


def test_two_leases_of_one_process_on_one_dir_are_released_by_the_last_only(tmp_path: Path) -> None:
    """Two clients of one process share one lease record: the first release keeps it, the last removes it,
    and a release in a forked child of the holder never removes it."""
    out, _ = _root(tmp_path)
    first = Lease.acquire(out, "job-a")
    second = Lease.acquire(out, "job-a")
    assert not second.release() and ownership.read_lease(out) is not None
    pid = os.fork()
    if pid == 0:  # a forked child releasing its inherited copy (an atexit finalizer does exactly this)
        os._exit(0 if not first.release() and ownership.read_lease(out) is not None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a forked child removed its parent's lease"
    assert ownership.read_lease(out) is not None
    assert first.release() and ownership.read_lease(out) is None


def _dead_identity() -> ProcessIdentity:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    who = ProcessIdentity.of_pid(proc.pid)
    proc.kill()
    proc.wait(10)
    assert who is not None
    return who


def test_a_dead_jobs_handed_over_save_is_admitted_beside_its_successors_and_commits_first(
    harness: Harness, output_dir: Path
) -> None:
    """A job dies right after handing over a save (every part in, the daemon still writing: here each file
    write stalls 3 s). A new job takes the lease over at once and saves: the daemon admits that save beside
    the dead job's (the lease names the dead job as a predecessor, so it is not "another job writing the same
    output_dir"), does not abort the dead job's save, and commits both, the dead job's first (hand-over
    order). (The dead job's save used to be aborted: "job-a no longer holds the lease".)"""
    harness.start(env={"CKPTD_TEST_FAULTS": "after_file_write=stall"})
    data = st_bytes({"m": torch.ones(4)})
    old_rank0, fd, ino = child_slab(1 << 16, data)
    a, b = harness.peer(), harness.peer()
    try:
        ownership.Lease.acquire(output_dir, "job-a", holder=ProcessIdentity.of_pid(old_rank0.pid))
        spec = FileSpec(fmt.component_filename("weights", "global"), 0, len(data), "weights")
        old = StageRequest(
            txn=new_txn(),
            output_dir=str(output_dir),
            step=40,
            rank=0,
            world_size=1,
            expected_ranks=[0],
            timeout_s=60.0,
            pid=old_rank0.pid,
            segment="ckptd-review-child",
            segment_fd=fd,
            segment_ino=ino,
            segment_size=1 << 16,
            files=[spec],
            commit=commit_info(ComponentSpec("weights", "global", [0])),
            job="job-a",
        )
        assert a.stage(old)[0] == MsgType.ACCEPTED
    finally:
        old_rank0.kill()  # the whole old job dies right after the hand-over
        old_rank0.wait()
    with pytest.warns(RuntimeWarning, match="no longer running"):
        ownership.Lease.acquire(output_dir, "job-b")
    shm = harness.shm()
    req = stage_req(
        shm,
        output_dir,
        41,
        [global_file(shm, "weights", st_bytes({"w": torch.ones(2)}))],
        commit=commit_info(ComponentSpec("weights", "global", [0])),
        job="job-b",
        timeout_s=60.0,
    )
    t, _, body = b.stage(req)
    assert t == MsgType.ACCEPTED, body
    kind, body = outcome(a, old.txn, timeout_s=30)
    assert kind == MsgType.COMMITTED, body
    kind, body = outcome(b, req.txn, timeout_s=30)
    assert kind == MsgType.COMMITTED, body
    root = fmt.checkpoints_root(output_dir)
    first, second = (json.loads((root / f"checkpoint-{s}" / fmt.MANIFEST_NAME).read_text()) for s in (40, 41))
    assert first["txn"] == old.txn and second["txn"] == req.txn
    assert first["timestamp"] <= second["timestamp"], "the successor's save committed before its predecessor's"


HOSTILE_VALUES = {
    "version-null": {"version": None},
    "version-inf": {"version": 1e400},  # json.loads reads 1e400 as inf
    "deadline-huge-int": {"deadline": 10**400},
    "created-huge-int": {"created": 10**400},
}


def _record_with(step: int, txn: str, kind: str, **override) -> bytes:
    rec = ownership.OwnerRecord(ProcessIdentity.current(), step, txn, "job-a", time.time() + 60, kind, time.time())
    body = {**json.loads(rec.to_bytes()), **override}
    text = json.dumps(body).replace("Infinity", "1e400")  # keep it parseable by json.loads as inf
    return text.encode()


@pytest.mark.parametrize("case", sorted(HOSTILE_VALUES))
def test_a_hostile_owner_or_veto_record_is_ignored_not_a_crash_of_every_sweep(tmp_path: Path, case: str) -> None:
    """An owner, veto or tombstone record with hostile values (``"version": null``, ``1e400``, a 400-digit
    deadline) is skipped like any unreadable record: ``judge_entries`` and ``sweep_stale`` do not raise."""
    _, root = _root(tmp_path)
    (root / fmt.temp_veto_name(5, "ab12")).write_bytes(_record_with(5, "ab12", "veto", **HOSTILE_VALUES[case]))
    (root / fmt.temp_dirname(6, "cd34")).write_bytes(_record_with(6, "cd34", "tombstone", **HOSTILE_VALUES[case]))
    verdicts = ownership.judge_entries(root.parent, live_txns=set())  # must not raise
    assert {v.path.name for v in verdicts} >= {fmt.temp_veto_name(5, "ab12"), fmt.temp_dirname(6, "cd34")}
    ownership.sweep_stale(root.parent, live_txns=set())


@pytest.mark.parametrize("override", [{"version": None}, {"acquired": 10**400}, {"version": [1]}])
def test_a_hostile_lease_record_is_ignored_like_any_unreadable_lease(tmp_path: Path, override: dict) -> None:
    """A lease with hostile values is ignored like any unreadable lease: ``read_lease`` gives None,
    ``lease_allows`` allows, and ``Lease.acquire`` takes it (no TypeError/OverflowError out of either)."""
    out, _ = _root(tmp_path)
    rec = ownership.LeaseRecord("job-a", ProcessIdentity.current(), time.time(), time.time())
    body = {**json.loads(rec.to_bytes()), **override}
    ownership.lease_path(out).write_text(json.dumps(body))
    assert ownership.read_lease(out) is None
    assert ownership.lease_allows(out, "job-b")
    Lease.acquire(out, "job-b").release()


# ------------------------------------------------------------------------------------------------- veto

VETO_KILLED_AFTER_ITS_RENAME = r"""
import os, signal, sys, time
from ckptd import ownership
real_rename = os.rename
def rename_then_die(src, dst, *a, **k):
    real_rename(src, dst, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 right after the veto moved the temp dir away
os.rename = rename_then_die
ownership.veto_commit(sys.argv[1], int(sys.argv[2]), sys.argv[3], time.time() + 300)
print("not killed")
"""


def test_a_tombstone_can_never_be_renamed_into_place_as_checkpoint_n(tmp_path: Path, monkeypatch) -> None:
    """The daemon's ``_rename_into_place`` checks that the temp name still holds its directory (lstat +
    inode), then renames. Between the two, the ranks can veto:

    1. rank A's veto renames the temp dir away and is killed (kill -9) before it records the outcome;
    2. rank B's veto finds no outcome and no temp dir, so it creates a tombstone (a regular file) there and
       reports "vetoed";
    3. the daemon's rename moves the tombstone into place.

    The daemon must notice (post-rename inode check), put it back and not commit: ``checkpoint-<step>`` never
    becomes a file and rank B's "vetoed" stays true. Both halves are the real code:
    ``Transaction._rename_into_place`` (the daemon) and ``veto_commit`` (a real process killed with SIGKILL,
    then this one); the interleaving is forced by running the vetoes right at the daemon's rename."""
    out, root = _root(tmp_path)
    step, txn = 9, "feedc0de"
    temp, final = root / fmt.temp_dirname(step, txn), root / fmt.checkpoint_dirname(step)
    temp.mkdir()
    (temp / fmt.MANIFEST_NAME).write_text(json.dumps({"format": fmt.FORMAT_VERSION, "step": step, "txn": txn}))
    daemon_txn = SimpleNamespace(temp_dir=temp, final_dir=final, temp_ino=os.lstat(temp).st_ino, root=root, step=step)

    verdicts = []
    real_rename = os.rename

    class OsAtTheRename:
        """``os`` for transactions.py, whose rename first lets the two ranks veto (the race window)."""

        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def rename(src, dst, *a, **k):
            if Path(src) == temp and not verdicts:
                killed = subprocess.run(
                    [sys.executable, "-c", VETO_KILLED_AFTER_ITS_RENAME, str(out), str(step), txn],
                    cwd=REPO,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
                verdicts.append(ownership.veto_commit(out, step, txn, time.time() + 300))
            return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(tx, "os", OsAtTheRename())
    try:
        tx.Transaction._rename_into_place(daemon_txn)
        committed = True
    except (tx.TxnError, OSError):
        committed = False
    monkeypatch.undo()
    assert verdicts == [True], verdicts  # rank B was told: vetoed, can never commit
    assert not committed, "the daemon committed a save that a rank had vetoed"
    assert not os.path.lexists(final), f"{final.name} is a {'file' if final.is_file() else 'thing'} now"


# --------------------------------------------------------------------------------- hidden processes

HIDEPID_SCRIPT = r"""
set -e
mount -t proc -o hidepid=2 proc /proc
PYTHONPATH="$SITE:$REPO" "$PY" -c '
import os, sys, time
from ckptd import ownership
ownership.Lease.acquire(sys.argv[1], "job-a")
open(sys.argv[2], "w").write("ready")
time.sleep(120)
' "$OUT" "$READY" &
holder=$!
for i in $(seq 1 200); do [ -e "$READY" ] && break; sleep 0.05; done
setpriv --reuid=65534 --regid=65534 --clear-groups env PYTHONPATH="$SITE:$REPO" "$PY" -c '
import sys
from ckptd import ownership
rec = ownership.read_lease(sys.argv[1])
print("VERDICT", rec is not None, rec.holder.alive() if rec else None, ownership.lease_allows(sys.argv[1], "job-b"))
' "$OUT"
kill $holder
"""


def test_a_live_holder_hidden_by_proc_hidepid_is_not_provably_dead(tmp_path: Path) -> None:
    """Under ``/proc`` ``hidepid=2`` another user's live process is invisible in /proc, yet ``kill(pid, 0)``
    answers EPERM: ``ProcessIdentity.alive()`` does not call it dead (only ESRCH proves that), so another job
    neither takes its lease over nor may commit into its output dir. Run in a private pid + mount namespace (its
    own /proc instance), so nothing outside changes: the holder runs as root, the judge as nobody."""
    py = Path("/usr/bin/python3.11")
    if not (py.exists() and shutil.which("unshare") and shutil.which("setpriv") and os.geteuid() == 0):
        pytest.skip("needs root, unshare, setpriv and a system python3.11 that user nobody can run")
    import msgpack
    import xxhash
    import zmq

    base = Path(tempfile.mkdtemp(prefix="rv-hidepid-", dir="/tmp"))
    try:
        site = base / "site"
        site.mkdir()
        for mod in (xxhash, msgpack, zmq):
            src = Path(mod.__file__).parent
            shutil.copytree(src, site / src.name)
            libs = src.parent / f"py{src.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, site / libs.name)
        out = base / "out"
        for p in (base, site):
            p.chmod(0o755)
        env = {
            **os.environ,
            "SITE": str(site),
            "REPO": str(REPO),
            "PY": str(py),
            "OUT": str(out),
            "READY": str(base / "ready"),
        }
        res = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "sh", "-c", HIDEPID_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("VERDICT")), None)
        if line is None:
            pytest.skip(f"the namespace could not be set up here: {res.stderr[-500:]}")
        _, found, alive, allows = line.split()
        assert found == "True", line
        assert alive != "False", "a live holder was judged provably dead because /proc hides it"
        assert allows == "False", "another job's commit is allowed into a live job's output dir"
    finally:
        shutil.rmtree(base, ignore_errors=True)
