"""Who owns what in an output dir, judged without trusting a pid alone.

Three kinds of record live beside the checkpoints, in ``<output_dir>/checkpoints/``:

``.ckptd-lease.json`` (the lease)
    The one job that writes this output dir: its job id, and the process of its global rank 0 (host, boot
    id, pid namespace, pid, start time). ``Lease.acquire`` takes it when ``CheckpointClient`` is built:
    at once for another process of the same job (a torchrun elastic restart) or for a holder that is
    provably dead (same host, boot and pid namespace, and its pid is gone or now has another start time);
    never from another live job, which gets ``LeaseHeld``. A holder on another host (or one this host's
    ``/proc`` hides) counts as alive until its lease file has gone unrewritten for ``LEASE_TIMEOUT_S``,
    judged on the file system's own clock (``lease_age``), never by comparing two hosts' clocks. A takeover
    from a dead holder or an earlier process of the same job records the earlier job as a predecessor: its
    handed-over saves still commit. The daemon asks ``lease_allows`` right before each commit. The lease
    lock (and a save's veto lock) is waited for at most ``LOCK_TIMEOUT_S``: a stopped holder of it gives a
    ``LockTimeout`` naming it, never a hang. Only the process that took a lease releases it, and only its
    last ``Lease`` object of that output dir does.

``.tmp-checkpoint-<step>-<txn>.owner`` (temp-dir owner records)
    Written by the daemon before it creates the temp dir: the daemon process, the job and the save's
    deadline. ``sweep_stale`` removes a temp dir only when its owner is provably gone: the daemon process is
    dead (or it is the sweeping daemon itself, which knows its own live transactions), or the deadline has
    passed by ``SWEEP_MARGIN_S`` (provable on any node), or there is no record and the dir is older than the
    margin. Two daemons sweeping one directory therefore never remove each other's live temp dirs.

``.tmp-checkpoint-<step>-<txn>`` as a regular file (a tombstone)
    Left by ``veto_commit`` when a rank gives up on a save whose temp dir does not exist yet: the daemon's
    later ``mkdir`` of the temp dir fails, so the save can never commit. Sweeps remove tombstones once their
    deadline has passed by the margin, when no daemon may commit the save any more.

``.tmp-checkpoint-<step>-<txn>.veto`` (veto records)
    The lock under which the ranks of one save veto it one at a time, and the outcome the first of them
    found ("vetoed" or "committed"), which the others then report too. Swept like tombstones.

Identity of a process: ``ProcessIdentity`` (host, boot id, pid namespace, pid, start time, the 22nd field
of ``/proc/<pid>/stat``), so a reused pid is never mistaken for the process that wrote a record.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
import warnings
from collections.abc import Container, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ckptd import format as fmt
from ckptd.format.names import is_best_temp_name, is_lease_temp_name, lease_temp_name
from ckptd.protocol import is_valid_job

logger = logging.getLogger(__name__)

LEASE_TIMEOUT_S = 120.0  # a holder on another host counts as alive this long after its last refresh
LEASE_REFRESH_S = 30.0  # how often a holder refreshes (CheckpointClient does it from a thread)
SWEEP_MARGIN_S = 600.0  # after a deadline (or, with no record, after the last change) a temp dir is dead
RECORD_VERSION = 1
MAX_RECORD_VERSION = 1_000_000  # a sanity bound: newer ckptd versions may write higher ones
MAX_RECORD_BYTES = 64 * 1024  # a lease or owner record is a few hundred bytes; refuse anything huge
MAX_MANIFEST_BYTES = 256 * 1024 * 1024  # read bound when the veto looks for a manifest's txn
JOB_ENV = "CKPTD_JOB_ID"
_VETO_ATTEMPTS = 8
LOCK_TIMEOUT_S = 20.0  # the lease lock and a veto lock are held for milliseconds; a holder this slow is stuck
MAX_PREDECESSORS = 8  # earlier jobs a lease remembers (their handed-over saves may still commit)


class OwnershipError(RuntimeError):
    """An output dir or a transaction belongs to someone else; the text says who and what to do."""


class LeaseHeld(OwnershipError):
    """Another live job holds the output dir's lease."""

    def __init__(self, message: str, holder: LeaseRecord) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLost(OwnershipError):
    """The lease this process held was taken over (or removed) by someone else."""


class LockTimeout(OwnershipError, TimeoutError):
    """A lock of the output dir (the lease lock, a save's veto lock) stayed taken past its timeout: its
    holder is stopped (SIGSTOP, a debugger, a suspended job) or stuck on its file system. Also an OSError
    (TimeoutError), so callers that handle file-system failures handle this one too."""


# ------------------------------------------------------------------------------------- record parsing
#
# Leases and owner records are read from a directory other processes (other daemons, other nodes, an older
# ckptd, a bit flip) can write. Parsing one raises ValueError and nothing else, whatever the JSON holds, so
# every reader can skip a bad record with one ``except ValueError`` instead of crashing a sweep or ``gc``.

MAX_PID = 2**31 - 1  # pid_t; Linux's pid_max is at most 2**22
MAX_UINT64 = 2**64 - 1
MAX_RECORD_TEXT = 255  # host names and boot ids are far shorter (HOST_NAME_MAX is 64)
RECORD_KINDS = ("temp", "tombstone", "veto")
RECORD_OUTCOMES = ("vetoed", "committed")
_MISSING: Any = object()


def _load_json_object(data: bytes, what: str) -> dict[str, Any]:
    """``data`` parsed as a JSON object; ValueError (never another exception) if it is not one."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, an integer of more than 4300 digits
        raise ValueError(f"not a JSON {what} ({e})") from None
    except RecursionError:
        raise ValueError(f"not a {what}: its JSON is nested too deeply") from None
    if not isinstance(raw, dict):
        raise ValueError(f"a {what} must be a JSON object, got {type(raw).__name__}")
    return raw


def _int_field(raw: dict[str, Any], name: str, what: str, lo: int, hi: int, default: Any = _MISSING) -> int:
    v = raw.get(name, default)
    if v is _MISSING:
        raise ValueError(f"{what} field {name!r} is missing; expected an integer in [{lo}, {hi}]")
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{what} field {name!r} must be an integer in [{lo}, {hi}], got {_shown(v)}")
    return v


def _time_field(raw: dict[str, Any], name: str, what: str, default: Any = _MISSING) -> float:
    v = raw.get(name, default)
    if v is _MISSING:
        raise ValueError(f"{what} field {name!r} is missing; expected a Unix time")
    try:
        t = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    except OverflowError:  # an integer too large for a float
        t = math.inf
    if not math.isfinite(t):
        raise ValueError(f"{what} field {name!r} must be a finite Unix time, got {_shown(v)}")
    return t


def _text_field(raw: dict[str, Any], name: str, what: str) -> str:
    v = raw.get(name)
    # Printable only: these end up in log lines and in 'ckptd gc' output (no newline can forge a line, no
    # lone surrogate can make printing them fail).
    if not isinstance(v, str) or len(v) > MAX_RECORD_TEXT or not v.isprintable():
        raise ValueError(
            f"{what} field {name!r} must be a printable string of at most {MAX_RECORD_TEXT} characters, got {_shown(v)}"
        )
    return v


def _shown(v: Any) -> str:
    text = repr(v) if isinstance(v, (str, int, float, type(None))) and not isinstance(v, bool) else type(v).__name__
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------------------ identity


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _pid_namespace() -> int | None:
    """The inode of this process's pid namespace: pids of one namespace mean nothing in another
    (containers on one host share its boot id and, with host networking, its host name)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (after the command name, which may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(b")", 1)[-1].decode("ascii", "replace").split()


def _pid_exists(pid: int) -> bool | None:
    """False if ``pid`` provably names no process (ESRCH); None if one exists that ``/proc`` does not show
    us (EPERM, or we may signal it but not read it): it may be the process we look for or a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return None
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class ProcessIdentity:
    """A process named so that a reused pid can never pass for it.

    ``start_time`` is the process's start in clock ticks after boot (field 22 of ``/proc/<pid>/stat``);
    ``boot_id`` and ``pid_ns`` (the inode of the pid namespace the pid is numbered in) tell whether this
    machine can judge the pid at all.

    Example:
        >>> me = ProcessIdentity.current()
        >>> me.alive()
        True
        >>> ProcessIdentity.from_json(me.to_json()) == me
        True
    """

    host: str
    boot_id: str
    pid: int
    start_time: int
    pid_ns: int | None = None

    @classmethod
    def current(cls) -> ProcessIdentity:
        """This process.

        Example:
            >>> ProcessIdentity.current().pid == os.getpid()
            True
        """
        me = cls.of_pid(os.getpid())
        if me is None:  # /proc is not mounted: no start time can be read for anyone
            return cls(socket.gethostname(), _boot_id(), os.getpid(), 0, _pid_namespace())
        return me

    @classmethod
    def of_pid(cls, pid: int) -> ProcessIdentity | None:
        """The process that has ``pid`` now (in this machine's view), or None if there is none or it is a
        zombie.

        Args:
            pid: a process id in this process's pid namespace.

        Example:
            >>> ProcessIdentity.of_pid(os.getpid()).start_time > 0
            True
        """
        fields = _stat_fields(pid)
        if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
            return None
        return cls(socket.gethostname(), _boot_id(), pid, int(fields[19]), _pid_namespace())

    def is_local(self) -> bool:
        """Whether this machine can judge the process: same host, same boot, same pid namespace.

        Example:
            >>> ProcessIdentity.current().is_local()
            True
        """
        if self.host != socket.gethostname() or self.boot_id != _boot_id():
            return False
        mine = _pid_namespace()
        return self.pid_ns is None or mine is None or self.pid_ns == mine

    def alive(self) -> bool | None:
        """True if the process still runs; False if it provably does not (its pid is gone, a zombie, or
        belongs to a process with another start time); None if this machine cannot tell: it runs elsewhere,
        or its pid exists but ``/proc`` hides it (``hidepid=2``, another user's process) so that its start
        time cannot be compared.

        Only ESRCH from ``kill(pid, 0)`` proves a pid gone when ``/proc/<pid>`` cannot be read: EPERM means
        a live process of another user, which must never be judged dead (its lease taken over, its temp dirs
        swept) just because ``/proc`` is mounted with ``hidepid``.

        Example:
            >>> ProcessIdentity.current().alive()
            True
        """
        if not self.is_local():
            return None
        if self.pid <= 0:
            return False  # no process has such a pid (and kill(0, ...) would mean our own process group)
        fields = _stat_fields(self.pid)
        if fields is None:
            return _pid_exists(self.pid)
        if len(fields) < 20 or fields[0] in ("Z", "X"):
            return False
        return int(fields[19]) == self.start_time

    def same_process(self, other: ProcessIdentity) -> bool:
        """Whether two identities name the same process (the host name alone may differ in spelling).

        Example:
            >>> ProcessIdentity.current().same_process(ProcessIdentity.current())
            True
        """
        return (self.boot_id, self.pid_ns, self.pid, self.start_time) == (
            other.boot_id,
            other.pid_ns,
            other.pid,
            other.start_time,
        ) and self.host == other.host

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; ``from_json`` reads it back.

        Example:
            >>> sorted(ProcessIdentity.current().to_json())
            ['boot_id', 'host', 'pid', 'pid_ns', 'start_time']
        """
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> ProcessIdentity:
        """Parse ``to_json``'s dict; raises ValueError naming the bad field.

        Args:
            obj: the dict (for example a field of a lease or owner record).

        Example:
            >>> ProcessIdentity.from_json({"host": "h", "boot_id": "b", "pid": 1, "start_time": 5}).pid
            1
        """
        if not isinstance(obj, dict):
            raise ValueError(f"a process identity must be a JSON object, got {type(obj).__name__}")
        what = "process identity"
        host = _text_field(obj, "host", what)
        boot = _text_field(obj, "boot_id", what)
        pid = _int_field(obj, "pid", what, 0, MAX_PID)
        start = _int_field(obj, "start_time", what, 0, MAX_UINT64)
        ns = obj.get("pid_ns")
        if ns is not None:
            ns = _int_field(obj, "pid_ns", what, 0, MAX_UINT64)
        return cls(host, boot, pid, start, ns)


# ------------------------------------------------------------------------------------------------ job


def _job_token(raw: str) -> str:
    """``raw`` made into a valid job id (``protocol.is_valid_job``): odd characters become '_', and an
    over-long id keeps its head and a hash of the whole."""
    token = re.sub(r"[^A-Za-z0-9._:@-]", "_", raw)
    if len(token) > 128:
        token = token[:111] + "-" + hashlib.sha256(raw.encode()).hexdigest()[:16]
    return token


def current_job_id(environ: dict[str, str] | None = None) -> str:
    """The id of the job this process belongs to, for the output dir's lease.

    In order: ``$CKPTD_JOB_ID`` (explicit); ``slurm-$SLURM_JOB_ID`` (kept across a requeue and across
    relaunches inside one allocation, so the job step is left out); ``torchelastic-$TORCHELASTIC_RUN_ID``
    (torchrun's rendezvous id, the same for every elastic restart of one launch; ``none``, torchrun's
    default without a rendezvous id, does not count); otherwise this process alone,
    ``pid-<host>-<pid>-<start time>``.

    Args:
        environ: the environment to read (default ``os.environ``).

    Raises:
        ValueError: ``$CKPTD_JOB_ID`` is not 1-128 letters, digits or ``._:@-``.

    Example:
        >>> current_job_id({"CKPTD_JOB_ID": "llama-7b-run3"})
        'llama-7b-run3'
        >>> current_job_id({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "4242"})
        'slurm-4242'
    """
    env = os.environ if environ is None else environ
    explicit = env.get(JOB_ENV)
    if explicit:
        if not is_valid_job(explicit):
            raise ValueError(
                f"${JOB_ENV}={explicit!r} is not a valid job id: expected 1-128 letters, digits or '._:@-'; change it"
            )
        return explicit
    slurm = env.get("SLURM_JOB_ID")
    if slurm:
        return _job_token(f"slurm-{slurm}")
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return _job_token(f"torchelastic-{run_id}")
    me = ProcessIdentity.current()
    return _job_token(f"pid-{me.host}-{me.pid}-{me.start_time}")


# ---------------------------------------------------------------------------------------- file helpers


def _read_small(path: Path, limit: int = MAX_RECORD_BYTES) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes; None if it is missing, not a regular file
    (a FIFO, a symlink, a directory) or too large. Never blocks and never reads without bound."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return None if total > limit else b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


_AT_SYMLINK_FOLLOW = 0x400


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_new(path: Path, data: bytes, exclusive: bool) -> None:
    if exclusive and _link_new(path, data):
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _link_new(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` all at once: written into an unnamed O_TMPFILE, then linked in (which
    fails with EEXIST like O_EXCL). A process killed half-way leaves no torn record for sweeps to puzzle
    over. False where the file system has no O_TMPFILE (NFS): the caller then writes it in place."""
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except (OSError, AttributeError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        return False
    try:
        _write_all(fd, data)
        # linkat(2) with AT_SYMLINK_FOLLOW through /proc: os.link() would call link(2), which does not
        # follow the magic link and fails with EXDEV.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        if libc.linkat(-100, f"/proc/self/fd/{fd}".encode(), -100, os.fsencode(path), _AT_SYMLINK_FOLLOW) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_flock(fd: int) -> bool:
    """One non-blocking try at an exclusive flock on ``fd``; False if another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_holders(fd: int) -> list[str]:
    """Who holds the flock on ``fd``'s file, from ``/proc/locks`` ("pid 4242 (python)"), best effort: empty
    when it cannot be told (another pid namespace, another NFS client, no /proc)."""
    try:
        st = os.fstat(fd)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return []
    holders = []
    for line in lines:
        # "3: FLOCK  ADVISORY  WRITE 4242 00:2d:1234 0 EOF"; a waiter's line has "->" after the number.
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->" or key not in parts:
            continue
        pid = parts[parts.index(key) - 1]
        if not pid.isdigit() or pid == "0":
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                holders.append(f"pid {pid} ({f.read(64).strip()})")
        except OSError:
            holders.append(f"pid {pid}")
    return holders


def _lock_timed_out(path: Path, fd: int, timeout_s: float, what: str, advice: str) -> LockTimeout:
    holders = _lock_holders(fd)
    by = f"held by {', '.join(holders)}" if holders else "held by a process this machine cannot see"
    return LockTimeout(
        f"{what}: the lock {path} stayed taken for {timeout_s:.0f} s ({by}), where it is normally held for "
        f"milliseconds; that process is stopped (SIGSTOP, a debugger, a suspended job) or stuck on this file "
        f"system. {advice}",
    )


def _flock_within(fd: int, path: Path, timeout_s: float, what: str, advice: str) -> None:
    """Take an exclusive flock on ``fd`` within ``timeout_s``, or raise LockTimeout naming the lock and its
    holder: never wait forever behind a stopped process."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while not _try_flock(fd):
        if time.monotonic() >= deadline:
            raise _lock_timed_out(path, fd, timeout_s, what, advice)
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def make_dirs_durably(path: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every directory it creates, so it survives a power cut.

    Args:
        path: the directory to create (for example ``<output_dir>/checkpoints``).

    Example:
        >>> make_dirs_durably(Path("/tmp/ckptd-doc/out/checkpoints"))
    """
    missing = []
    p = Path(path)
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


def _remove(path: Path) -> bool:
    """Remove a file or a directory tree (never following a symlink); True if something was removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
        return not os.path.lexists(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


# ------------------------------------------------------------------------------------- owner records


@dataclass(frozen=True)
class OwnerRecord:
    """Who owns a temp dir (``kind`` "temp", written by the daemon) or a tombstone (``kind`` "tombstone",
    written by a rank that gave up on the save), and until when the save may commit."""

    owner: ProcessIdentity
    step: int
    txn: str
    job: str | None
    deadline: float | None
    kind: str = "temp"  # "temp" (daemon), "tombstone" or "veto" (a rank that gave up)
    created: float = 0.0
    outcome: str | None = None  # a veto record: "vetoed" or "committed", once decided
    version: int = RECORD_VERSION

    def to_bytes(self) -> bytes:
        body = {**asdict(self), "owner": self.owner.to_json()}
        return (json.dumps(body, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> OwnerRecord:
        """Parse a record; raises ValueError (and nothing else) saying what is wrong.

        Example:
            >>> OwnerRecord.from_bytes(b'{"step": 1, "txn": "ab12", "version": []}')
            Traceback (most recent call last):
            ...
            ValueError: owner record field 'version' must be an integer in [1, 1000000], got list
        """
        what = "owner record"
        raw = _load_json_object(data, what)
        step = _int_field(raw, "step", what, 0, MAX_UINT64)
        txn = raw.get("txn")
        if not fmt.is_valid_txn(txn):
            raise ValueError(f"{what} field 'txn' must be 1-64 letters or digits, got {_shown(txn)}")
        version = _int_field(raw, "version", what, 1, MAX_RECORD_VERSION, RECORD_VERSION)
        job = raw.get("job")
        if job is not None and not is_valid_job(job):
            raise ValueError(f"{what} field 'job' must be null or 1-128 letters, digits or '._:@-', got {_shown(job)}")
        deadline = raw.get("deadline")
        if deadline is not None:
            deadline = _time_field(raw, "deadline", what)
        kind = raw.get("kind", "temp")
        if kind not in RECORD_KINDS:
            raise ValueError(f"{what} field 'kind' must be one of {', '.join(RECORD_KINDS)}, got {_shown(kind)}")
        outcome = raw.get("outcome")
        if outcome is not None and outcome not in RECORD_OUTCOMES:
            raise ValueError(f"{what} field 'outcome' must be null or one of {RECORD_OUTCOMES}, got {_shown(outcome)}")
        return cls(
            owner=ProcessIdentity.from_json(raw.get("owner")),
            step=step,
            txn=txn,
            job=job,
            deadline=deadline,
            kind=kind,
            created=_time_field(raw, "created", what, 0.0),
            outcome=outcome,
            version=version,
        )


def _read_record(path: Path) -> OwnerRecord | None:
    data = _read_small(path)
    if data is None:
        return None
    try:
        return OwnerRecord.from_bytes(data)
    except ValueError as e:
        logger.warning("ignoring the unreadable owner record %s: %s", path, e)
        return None


def write_temp_owner(
    root: Path, step: int, txn: str, owner: ProcessIdentity, job: str | None, deadline: float | None
) -> Path:
    """Record who owns ``<root>/.tmp-checkpoint-<step>-<txn>``; call it BEFORE creating the temp dir, so a
    sweep never sees the dir without its owner.

    Args:
        root: the ``checkpoints`` directory of the output dir.
        step: the checkpoint step.
        txn: the transaction id.
        owner: the process that owns the temp dir (the daemon writing it).
        job: the job id of the save, if the rank sent one.
        deadline: Unix time after which the save may not commit (None: unknown).

    Returns:
        The record's path (``<root>/.tmp-checkpoint-<step>-<txn>.owner``).

    Example:
        >>> write_temp_owner(root, 7, "ab12", ProcessIdentity.current(), "job1", time.time() + 300)
        PosixPath('.../checkpoints/.tmp-checkpoint-7-ab12.owner')
    """
    rec = OwnerRecord(owner, step, txn, job, deadline, "temp", time.time())
    path = Path(root) / fmt.temp_owner_name(step, txn)
    # Exclusive: a record that exists belongs to another daemon holding the same txn; never clobber it.
    _write_new(path, rec.to_bytes(), exclusive=True)
    return path


def remove_temp_owner(root: Path, step: int, txn: str) -> None:
    """Remove the owner record of a temp dir that is gone (committed, or aborted and removed).

    Args:
        root: the ``checkpoints`` directory of the output dir.
        step: the checkpoint step.
        txn: the transaction id.

    Example:
        >>> remove_temp_owner(root, 7, "ab12")
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(root) / fmt.temp_owner_name(step, txn))


def _provably_gone(
    rec: OwnerRecord | None, mtime: float, now: float, me: ProcessIdentity, unowned_min_age: float = SWEEP_MARGIN_S
) -> str | None:
    """Why the owner of an entry is provably gone, or None if it may still be alive."""
    if rec is None:
        age = now - mtime
        return f"no owner record and unchanged for {age:.0f} s" if age > unowned_min_age else None
    if rec.deadline is not None and now > rec.deadline + SWEEP_MARGIN_S:
        return f"its deadline passed {now - rec.deadline:.0f} s ago"
    if rec.kind in ("tombstone", "veto"):
        # A tombstone (and the veto record that stands for it) must outlive every daemon that may still try
        # to commit the save: only the deadline (checked above) or, without one, its age ends it; the rank
        # that wrote it being dead proves nothing.
        age = now - mtime
        if rec.deadline is None and age > SWEEP_MARGIN_S:
            return f"a tombstone without a deadline, {age:.0f} s old"
        return None
    if rec.owner.same_process(me):
        # The sweeping daemon owns it and does not list it as live: it is its own leftover.
        return "this daemon owns it and has no such transaction"
    if rec.owner.alive() is False:
        return f"its owner {rec.owner.describe()} is no longer running"
    return None


def _why_kept(rec: OwnerRecord | None, mtime: float, now: float, unowned_min_age: float) -> str:
    if rec is None:
        return f"no owner record, modified {now - mtime:.0f} s ago (younger than {unowned_min_age:.0f} s)"
    if rec.kind in ("tombstone", "veto"):
        return "a rank's veto of that save, kept until its deadline has passed"
    where = "" if rec.owner.is_local() else " (another host: counted alive until its deadline)"
    return f"owned by {rec.owner.describe()}{where}"


@dataclass(frozen=True)
class Verdict:
    """What a sweep makes of one entry of ``checkpoints/``: ``stale`` entries may be removed, and ``why``."""

    path: Path
    stale: bool
    why: str


def judge_entries(
    output_dir: str | os.PathLike,
    live_txns: Container[str],
    now: float | None = None,
    unowned_min_age: float = SWEEP_MARGIN_S,
) -> list[Verdict]:
    """Judge every temp dir, tombstone, veto record, owner record, trash dir and leftover lease temp file of
    ``output_dir/checkpoints``.

    A temp dir (or tombstone) is stale only when its transaction is not in ``live_txns`` and its owner is
    provably gone (see the module docstring); trash dirs always are; an owner record whose temp dir is gone
    is stale with its owner. Whatever another live daemon (on this node or another) owns is kept.

    Args:
        output_dir: the output dir (its ``checkpoints`` directory is judged).
        live_txns: the transactions the calling daemon is running (``ckptd gc``: the local daemon's). A
            daemon passes a live view of its ledger, so that a transaction admitted while the sweep runs
            (whose temp dir may appear during it) is seen as live.
        now: the Unix time to judge deadlines by (default: now).
        unowned_min_age: how old a temp dir without an owner record (an older ckptd's) must be to go.

    Example:
        >>> [v.why for v in judge_entries("/data/run1", live_txns=set())]
        ['its owner pid 4242 on node7 is no longer running', 'trash']
    """
    root = fmt.checkpoints_root(output_dir)
    now = time.time() if now is None else now
    me = ProcessIdentity.current()
    try:
        names = sorted(os.listdir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out: list[Verdict] = []
    for name in names:
        path = root / name
        if fmt.is_trash_dirname(name):
            out.append(Verdict(path, True, "trash"))
            continue
        if is_best_temp_name(name):
            # Written and renamed within one commit-pool task: one left over is from a killed daemon.
            mtime = _mtime(path, now)
            old = now - mtime > unowned_min_age
            why = f"a best-mark write's leftover temp file, {now - mtime:.0f} s old" if old else "a best-mark write"
            out.append(Verdict(path, old, why))
            continue
        if is_lease_temp_name(name):
            # A lease write (or a clock probe) lives for milliseconds; one left over is from a killed process.
            mtime = _mtime(path, now)
            old = now - mtime > unowned_min_age
            why = f"a lease write's leftover temp file, {now - mtime:.0f} s old" if old else "a lease write in progress"
            out.append(Verdict(path, old, why))
            continue
        temp = fmt.parse_temp_dirname(name)
        owner_of = fmt.parse_temp_owner_name(name)
        veto_of = fmt.parse_temp_veto_name(name)
        if veto_of is not None:
            if veto_of[1] in live_txns:
                out.append(Verdict(path, False, "in flight on this daemon"))
                continue
            rec = _read_record(path) or _untimed_tombstone(*veto_of)
            mtime = _mtime(path, now)
            why = _provably_gone(rec, mtime, now, me, unowned_min_age)
            out.append(Verdict(path, why is not None, why or _why_kept(rec, mtime, now, unowned_min_age)))
        elif temp is not None:
            step, txn = temp
            if txn in live_txns:
                out.append(Verdict(path, False, "in flight on this daemon"))
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                rec = _read_record(path) or _untimed_tombstone(step, txn)
            else:
                rec = _read_record(root / fmt.temp_owner_name(step, txn))
            why = _provably_gone(rec, st.st_mtime, now, me, unowned_min_age)
            out.append(Verdict(path, why is not None, why or _why_kept(rec, st.st_mtime, now, unowned_min_age)))
        elif owner_of is not None:
            step, txn = owner_of
            if txn in live_txns or os.path.lexists(root / fmt.temp_dirname(step, txn)):
                continue  # judged together with its temp dir
            rec = _read_record(path)
            mtime = _mtime(path, now)
            why = _provably_gone(rec, mtime, now, me, unowned_min_age)
            out.append(Verdict(path, why is not None, why or _why_kept(rec, mtime, now, unowned_min_age)))
    return out


def remove_entry(path: Path) -> bool:
    """Remove a stale entry; after a temp dir or tombstone, also its owner record. True if it was removed."""
    gone = _remove(path)
    temp = fmt.parse_temp_dirname(path.name)
    if gone and temp is not None:
        _remove(path.parent / fmt.temp_owner_name(*temp))
    return gone


def sweep_stale(output_dir: str | os.PathLike, live_txns: Container[str], now: float | None = None) -> list[Path]:
    """Remove what ``judge_entries`` finds stale: temp dirs, tombstones and owner records that nobody can
    still own, and trash. Whatever another live daemon (on this node or another) owns is left alone.

    Args:
        output_dir: the output dir (its ``checkpoints`` directory is swept).
        live_txns: the transactions the calling daemon is running (empty for ``ckptd gc``).
        now: the Unix time to judge deadlines by (default: now).

    Returns:
        The paths removed.

    Example:
        >>> sweep_stale("/data/run1", live_txns={"9f3a01c2"})
        [PosixPath('/data/run1/checkpoints/.tmp-checkpoint-40-77aa01b2')]
    """
    removed = [v.path for v in judge_entries(output_dir, live_txns, now) if v.stale and remove_entry(v.path)]
    if removed:
        logger.info("swept %s", ", ".join(p.name for p in removed))
    return removed


def _untimed_tombstone(step: int, txn: str) -> OwnerRecord:
    """Stand-in for a tombstone file whose content cannot be read: judged by age alone."""
    return OwnerRecord(ProcessIdentity("", "", 0, 0), step, txn, None, None, "tombstone")


def _mtime(path: Path, default: float) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return default


# ------------------------------------------------------------------------------------------------ veto


_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing ``dst`` (Linux renameat2 RENAME_NOREPLACE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
        return
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(src), -100, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


def _manifest_txn(directory: Path) -> str | None:
    """The ``txn`` named by the manifest inside ``directory``, or None (no readable manifest)."""
    data = _read_small(directory / fmt.MANIFEST_NAME, MAX_MANIFEST_BYTES)
    if data is None:
        return None
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
        return None
    txn = raw.get("txn") if isinstance(raw, dict) else None
    return txn if isinstance(txn, str) else None


def veto_commit(
    output_dir: str | os.PathLike,
    step: int,
    txn: str,
    deadline: float | None,
    owner: ProcessIdentity | None = None,
    timeout_s: float = LOCK_TIMEOUT_S,
    final: Path | None = None,
) -> bool:
    """Make transaction ``txn`` impossible to commit, or find out that it already has.

    The daemon commits by renaming ``.tmp-checkpoint-<step>-<txn>`` into place; that rename is the point of
    no return, and this function races it through the file system only:

    - the temp dir exists: rename it to a trash name. If it held a manifest of another transaction, the
      daemon had just swapped it out for ours (a re-save of an existing step): the commit happened. Else the
      daemon's rename can no longer find it: vetoed.
    - it does not exist: create a tombstone, a regular file at its path (``O_EXCL``), so the daemon's later
      ``mkdir`` fails; then, if ``checkpoint-<step>`` holds our manifest, the commit happened before (the
      tombstone is removed again).

    Args:
        output_dir: the save's output dir.
        step: the save's step.
        txn: its transaction id.
        deadline: Unix time after which no daemon may commit it; kept in the tombstone, which sweeps remove
            ``SWEEP_MARGIN_S`` after it.
        owner: who vetoes (default: this process), recorded in the tombstone.
        timeout_s: how long to wait for the save's veto lock (another rank vetoing it) before giving up.
        final: where its commit renames the temp dir (default ``checkpoint-<step>``; a ``save_model`` dir).

    Returns:
        True if ``txn`` can never commit; False if it had already committed (``checkpoint-<step>`` is it).

    Raises:
        OSError: the file system refused every attempt (for example a read-only output dir), or the veto
            lock stayed taken past ``timeout_s`` (``LockTimeout``); the text says that the save may still
            commit.

    Example:
        >>> veto_commit("/data/run1", 40, "9f3a01c2", time.time() + 300)
        True
    """
    root = fmt.checkpoints_root(output_dir)
    owner = owner or ProcessIdentity.current()
    make_dirs_durably(root)
    # Ranks of one save veto it one at a time, and the first one's outcome stands for all: a second rank
    # must never put a tombstone where the first had just renamed the daemon's temp dir away (the daemon,
    # at its rename, would then rename the tombstone into place).
    lock = root / fmt.temp_veto_name(step, txn)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(
                errno.EINVAL,
                f"could not veto the commit of step {step} (txn {txn}): {lock} is not a regular file; the save "
                "may still commit; remove that entry",
            )
        _flock_within(
            fd,
            lock,
            timeout_s,
            f"could not veto the commit of step {step} (txn {txn}) in {root}",
            "The save may still commit; another rank of this job is vetoing it: look for a stopped rank.",
        )
        data = os.pread(fd, MAX_RECORD_BYTES, 0)
        try:
            earlier = OwnerRecord.from_bytes(data) if data else None
        except ValueError:
            earlier = None
        if earlier is not None and earlier.outcome is not None:
            return earlier.outcome == "vetoed"
        vetoed = _veto_locked(root, step, txn, deadline, owner, final or root / fmt.checkpoint_dirname(step))
        rec = OwnerRecord(owner, step, txn, None, deadline, "veto", time.time(), "vetoed" if vetoed else "committed")
        os.ftruncate(fd, 0)
        os.pwrite(fd, rec.to_bytes(), 0)
        return vetoed
    finally:
        os.close(fd)


def _veto_locked(root: Path, step: int, txn: str, deadline: float | None, owner: ProcessIdentity, final: Path) -> bool:
    temp = root / fmt.temp_dirname(step, txn)
    tomb = OwnerRecord(owner, step, txn, None, deadline, "tombstone", time.time())
    last_error: OSError | None = None
    for _ in range(_VETO_ATTEMPTS):
        try:
            st = os.lstat(temp)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            # A tombstone is already there (another rank, or an earlier call): the daemon can create nothing.
            return not _committed(final, txn)
        if st is not None:
            trash = root / fmt.trash_dirname(step, "v" + txn + secrets.token_hex(4))
            try:
                os.rename(temp, trash)
            except FileNotFoundError:
                continue  # gone meanwhile (committed, or removed): look again
            except OSError as e:
                last_error = e
                break
            try:
                moved = os.lstat(trash)
            except FileNotFoundError:  # a sweep removed our trash at once; judge by checkpoint-<step>
                return not _committed(final, txn)
            if stat.S_ISREG(moved.st_mode):
                # A tombstone appeared between lstat and rename and we moved it: put it back (never over
                # something new) and look again.
                try:
                    _rename_noreplace(trash, temp)
                except OSError:
                    _remove(trash)
                continue
            old = _manifest_txn(trash) if stat.S_ISDIR(moved.st_mode) else None
            _remove(trash)
            if (old is not None and old != txn) or _committed(final, txn):
                logger.info("step %d (txn %s) had committed before the veto", step, txn)
                return False
            logger.warning("vetoed step %d (txn %s): its temp dir is gone, it can never commit", step, txn)
            return True
        try:
            _write_new(temp, tomb.to_bytes(), exclusive=True)
        except FileExistsError:
            continue  # the daemon created the temp dir just now: rename it away
        except FileNotFoundError:
            make_dirs_durably(root)
            continue
        except OSError as e:
            last_error = e
            break
        if _committed(final, txn):
            _remove(temp)
            logger.info("step %d (txn %s) had committed before the veto", step, txn)
            return False
        logger.warning("vetoed step %d (txn %s) with a tombstone at %s", step, txn, temp)
        return True
    raise OSError(
        last_error.errno if last_error else errno.EAGAIN,
        f"could not veto the commit of step {step} (txn {txn}) in {root}: "
        f"{last_error.strerror if last_error else 'the temp dir kept changing'}; the save may still commit; "
        "check that the output dir is writable",
    )


def _committed(final: Path, txn: str) -> bool:
    return _manifest_txn(final) == txn


# ----------------------------------------------------------------------------------------------- lease


@dataclass(frozen=True)
class LeaseRecord:
    """The content of ``checkpoints/.ckptd-lease.json``: the job writing the output dir and its holder.

    ``predecessors`` are the jobs this one took the output dir over from (a provably dead holder, or an
    earlier process of the same job), newest first, at most ``MAX_PREDECESSORS``: a save such a job handed
    over before it died still lands (DESIGN §1), so the daemon admits and commits it beside this job's saves,
    in hand-over order. ``refreshed`` is the holder's own clock, shown to people only: staleness is judged on
    the file system's clock (``lease_age``).
    """

    job: str
    holder: ProcessIdentity
    acquired: float
    refreshed: float
    version: int = RECORD_VERSION
    predecessors: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        body = {
            "job": self.job,
            **self.holder.to_json(),
            "acquired": self.acquired,
            "refreshed": self.refreshed,
            "version": self.version,
            "predecessors": list(self.predecessors),
        }
        return (json.dumps(body, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        """Parse a lease; raises ValueError (and nothing else) saying what is wrong.

        Example:
            >>> LeaseRecord.from_bytes(b'{"job": "j", "refreshed": 1e999}')
            Traceback (most recent call last):
            ...
            ValueError: lease field 'refreshed' must be a finite Unix time, got inf
        """
        what = "lease"
        raw = _load_json_object(data, what)
        job = raw.get("job")
        if not is_valid_job(job):
            raise ValueError(f"{what} field 'job' must be 1-128 letters, digits or '._:@-', got {_shown(job)}")
        refreshed = _time_field(raw, "refreshed", what)
        acquired = _time_field(raw, "acquired", what, refreshed)
        version = _int_field(raw, "version", what, 1, MAX_RECORD_VERSION, 1)
        return cls(job, ProcessIdentity.from_json(raw), acquired, refreshed, version)

    def holder_alive(self, age_s: float | None, timeout_s: float = LEASE_TIMEOUT_S) -> bool | None:
        """False if the holder is provably gone; True if it runs here; None if it may be alive.

        Same machine: gone means dead or its pid reused. Elsewhere (or hidden from this machine's ``/proc``):
        the lease file has not been rewritten for ``timeout_s`` on the file system's own clock, or claims to
        have been written more than ``timeout_s`` in that clock's future (no refresh writes that: a record
        dated in the future never becomes immortal).

        Args:
            age_s: ``lease_age()`` of the output dir: seconds since the lease file was last written, on the
                file system's clock; None when unknown (then only a local holder can be judged).
            timeout_s: how long a holder that cannot be judged here counts as alive after its last refresh.

        Example:
            >>> read_lease("/data/run1").holder_alive(lease_age("/data/run1"))
            True
        """
        alive = self.holder.alive()
        if alive is None and age_s is not None and abs(age_s) > timeout_s:
            return False
        return alive

    def describe(self, now: float | None = None, age_s: float | None = None) -> str:
        """The job, its holder and how fresh the lease is, for messages (``age_s``: ``lease_age()``)."""
        now = time.time() if now is None else now
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.acquired))
        fresh = (
            f"lease file last written {age_s:.0f} s ago"
            if age_s is not None
            else f"last refreshed {max(0.0, now - self.refreshed):.0f} s ago"
        )
        return f"job {self.job!r} ({self.holder.describe()}, holding it since {since}, {fresh})"


def _predecessors_in(data: bytes) -> tuple[str, ...]:
    """The ``predecessors`` of a lease's bytes (already parsed by ``LeaseRecord.from_bytes``); invalid or
    surplus entries are left out, never an error: an older ckptd writes none."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return ()
    found = raw.get("predecessors") if isinstance(raw, dict) else None
    if not isinstance(found, list):
        return ()
    return tuple(j for j in found[: MAX_PREDECESSORS * 4] if is_valid_job(j))[:MAX_PREDECESSORS]


def _bounded_predecessors(jobs: tuple[str, ...], job: str) -> tuple[str, ...]:
    """``jobs`` without duplicates or ``job`` itself, newest first, at most ``MAX_PREDECESSORS``."""
    out: list[str] = []
    for j in jobs:
        if j != job and j not in out:
            out.append(j)
    return tuple(out[:MAX_PREDECESSORS])


def lease_path(output_dir: str | os.PathLike) -> Path:
    return fmt.checkpoints_root(output_dir) / fmt.LEASE_NAME


def read_lease(output_dir: str | os.PathLike) -> LeaseRecord | None:
    """The lease of ``output_dir``, or None if there is none (or it cannot be read, which is logged).

    Args:
        output_dir: the output dir.

    Example:
        >>> read_lease("/data/run1").job
        'torchelastic-3f1c...'
    """
    path = lease_path(output_dir)
    data = _read_small(path)
    if data is None:
        if os.path.lexists(path):
            logger.warning("ignoring %s: not a small regular file", path)
        return None
    try:
        rec = LeaseRecord.from_bytes(data)
    except ValueError as e:
        logger.warning("ignoring the unreadable lease %s: %s", path, e)
        return None
    predecessors = _predecessors_in(data)
    return dataclasses.replace(rec, predecessors=predecessors) if predecessors else rec


def _fs_now(root: Path) -> float | None:
    """The file system's clock now: the mtime of a probe file created (and removed) in ``root``. None if no
    file can be created there (a read-only mount)."""
    probe = root / lease_temp_name(secrets.token_hex(8))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def lease_age(output_dir: str | os.PathLike) -> float | None:
    """Seconds since the lease file was last written, judged on ONE clock: its mtime against a probe file
    created now in the same directory (both stamped by the file system: the NFS server, the local kernel),
    so that a holder whose clock is skewed against this host's is judged by neither clock. Negative if the
    mtime lies in the file system's future. Where no probe can be written, this host's clock stands in.
    None if there is no lease file.

    Args:
        output_dir: the output dir.

    Example:
        >>> lease_age("/data/run1")
        12.5
    """
    root = fmt.checkpoints_root(output_dir)
    try:
        written = os.lstat(root / fmt.LEASE_NAME).st_mtime
    except OSError:
        return None
    now = _fs_now(root)
    return (time.time() if now is None else now) - written


def _judge_holder(
    rec: LeaseRecord, output_dir: str | os.PathLike, timeout_s: float
) -> tuple[bool | None, float | None]:
    """``rec.holder_alive`` and the lease age it was judged by (None when the holder runs here)."""
    if rec.holder.alive() is not None:
        return rec.holder_alive(None, timeout_s), None
    age = lease_age(output_dir)
    return rec.holder_alive(age, timeout_s), age


def lease_allows(output_dir: str | os.PathLike, job: str) -> bool:
    """Whether a save of ``job`` may commit in ``output_dir``: no lease, ``job``'s own lease, a lease that
    took over from ``job`` (one of its ``predecessors``: a save handed over before that job died still
    lands), or a lease whose holder is provably gone. False when another job holds it and may be alive (the
    daemon then aborts instead of committing).

    Args:
        output_dir: the output dir.
        job: the job id the save was staged with.

    Example:
        >>> lease_allows("/data/run1", "slurm-4242")
        True
    """
    rec = read_lease(output_dir)
    if rec is None or rec.job == job or job in rec.predecessors:
        return True
    return _judge_holder(rec, output_dir, LEASE_TIMEOUT_S)[0] is False


def lease_predecessors(output_dir: str | os.PathLike, job: str | None) -> frozenset[str]:
    """The jobs whose saves may still commit in ``output_dir`` beside ``job``'s: the predecessors of the
    lease if ``job`` holds it, else none. The daemon does not count their saves in flight as a second job
    writing the directory.

    Args:
        output_dir: the output dir.
        job: the job id of a save being admitted.

    Example:
        >>> lease_predecessors("/data/run1", "pid-node7-4243-99120")
        frozenset({'pid-node7-4101-98012'})
    """
    rec = read_lease(output_dir)
    if rec is None or job is None or rec.job != job:
        return frozenset()
    return frozenset(rec.predecessors)


@contextlib.contextmanager
def _lease_lock(root: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive flock on ``<root>/.ckptd-lease.lock`` around a read-decide-write of the lease, taken
    within ``timeout_s`` or LockTimeout naming the lock and its holder.

    The lock file is removed while still locked, so the directory stays clean; a process that locked a
    file removed meanwhile sees another inode at the path and tries again."""
    path = root / fmt.LEASE_LOCK_NAME
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        try:
            if not _try_flock(fd):
                if time.monotonic() >= deadline:
                    raise _lock_timed_out(
                        path,
                        fd,
                        timeout_s,
                        f"could not take the lease lock of {root.parent}",
                        "Resume or stop that process (or remove the lock file if it runs nowhere), then retry.",
                    )
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"could not lock {path} within {timeout_s:.0f} s: other processes kept replacing it; try again"
                    )
                continue
            try:
                yield
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return
        finally:
            os.close(fd)


def _write_lease(root: Path, rec: LeaseRecord) -> None:
    """Replace the lease atomically and durably (temp file, fsync, rename over, fsync the directory).

    The temp file has a random name and is created O_EXCL | O_NOFOLLOW: whatever sits at any fixed name (a
    FIFO, a symlink) is never opened, so nothing in the directory can hang or redirect this write."""
    tmp = root / lease_temp_name(secrets.token_hex(8))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            _write_all(fd, rec.to_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, root / fmt.LEASE_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(root)


# Leases this process holds, counted per (checkpoints dir, job, holder): two CheckpointClients of one process
# on one output dir share one lease record, which only the last of them to close may remove. Process-local
# by nature (a count of Lease objects alive in this process), guarded by a lock for the refresh threads.
_holds: dict[tuple[str, str, ProcessIdentity], int] = {}
_holds_lock = threading.Lock()


def _hold_key(output_dir: Path, job: str, holder: ProcessIdentity) -> tuple[str, str, ProcessIdentity]:
    return (os.path.realpath(fmt.checkpoints_root(output_dir)), job, holder)


class Lease:
    """The lease this process holds on an output dir: ``acquire``, ``refresh`` now and then, ``release``.

    Only the process that acquired it refreshes or releases it (a forked child's copy does neither), and
    when several ``Lease`` objects of this process hold the same record (two clients of one output dir), only
    the last release removes it.

    Example:
        >>> lease = Lease.acquire("/data/run1", current_job_id())
        >>> lease.refresh()
        >>> lease.release()
        True
    """

    def __init__(self, output_dir: Path, record: LeaseRecord, timeout_s: float) -> None:
        self.output_dir = Path(output_dir)
        self.record = record
        self.timeout_s = timeout_s
        self.released = False
        self._pid = os.getpid()  # the process that took it; a forked child inherits this object, not the lease
        self._key = _hold_key(self.output_dir, record.job, record.holder)

    @property
    def job(self) -> str:
        return self.record.job

    @property
    def path(self) -> Path:
        return lease_path(self.output_dir)

    @classmethod
    def acquire(
        cls,
        output_dir: str | os.PathLike,
        job: str,
        *,
        holder: ProcessIdentity | None = None,
        timeout_s: float = LEASE_TIMEOUT_S,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
    ) -> Lease:
        """Take the lease of ``output_dir`` for ``job`` (creating ``checkpoints/`` durably if needed).

        Taken at once when there is none, when it is ``job``'s own (a restart of the same job, or another
        client of this process), or when its holder is provably gone (with a logged warning and a
        ``RuntimeWarning``). Taking it over from a dead holder or an earlier process of the same job records
        the earlier job(s) as ``predecessors``, so that their handed-over saves still commit.

        Args:
            output_dir: the output dir.
            job: this job's id (``current_job_id()``).
            holder: the holding process (default: this one).
            timeout_s: how long a holder on another host counts as alive after its last refresh.
            lock_timeout_s: how long to wait for the lease lock (another process deciding right now).

        Raises:
            LeaseHeld: another job holds it and may be alive; the text names it and says what to do.
            LockTimeout: the lease lock stayed taken (its holder is stopped); the text names it.
            ValueError: ``job`` is not a valid job id.

        Example:
            >>> Lease.acquire("/data/run1", "slurm-4242").job
            'slurm-4242'
        """
        if not is_valid_job(job):
            raise ValueError(f"job id {job!r} is invalid: expected 1-128 letters, digits or '._:@-'")
        holder = holder or ProcessIdentity.current()
        root = fmt.checkpoints_root(output_dir)
        make_dirs_durably(root)
        with _lease_lock(root, lock_timeout_s):
            now = time.time()
            old = read_lease(output_dir)
            predecessors: tuple[str, ...] = ()
            if old is not None and old.job != job and not old.holder.same_process(holder):
                alive, age = _judge_holder(old, output_dir, timeout_s)
                if alive is not False:
                    raise LeaseHeld(
                        f"{output_dir} is being written by {old.describe(now, age)}; this job is {job!r}. Use "
                        f"another output_dir, stop that job, or, to take it over deliberately, set "
                        f"${JOB_ENV}={old.job} (a holder on another host also expires {timeout_s:.0f} s after "
                        "its last refresh)",
                        old,
                    )
                text = (
                    f"taking over the lease of {output_dir} from {old.describe(now, age)}, which is no longer "
                    f"running; this job is {job!r}; saves it handed over still commit"
                )
                logger.warning("%s", text)
                warnings.warn(text, RuntimeWarning, stacklevel=3)
                predecessors = (old.job, *old.predecessors)
            elif old is not None and old.job != job:
                # This same process, under another job id: its saves in flight may still commit too.
                predecessors = (old.job, *old.predecessors)
            elif old is not None:
                if not old.holder.same_process(holder):
                    logger.info("taking over the lease of %s from an earlier process of job %r", output_dir, job)
                predecessors = old.predecessors
            rec = LeaseRecord(job, holder, now, now, predecessors=_bounded_predecessors(predecessors, job))
            _write_lease(root, rec)
            lease = cls(Path(output_dir), rec, timeout_s)
            with _holds_lock:
                _holds[lease._key] = _holds.get(lease._key, 0) + 1
        return lease

    def refresh(self) -> None:
        """Rewrite the lease (its ``refreshed`` time and the file's mtime), if it is still ours (or take it
        again if it is gone). Does nothing once released, or in a forked child of the holder.

        Raises:
            LeaseLost: another job (or another process) took the lease over.
            LockTimeout: the lease lock stayed taken (its holder is stopped).

        Example:
            >>> lease.refresh()
        """
        if self.released or os.getpid() != self._pid:
            return
        root = fmt.checkpoints_root(self.output_dir)
        make_dirs_durably(root)
        with _lease_lock(root):
            if self.released:  # released while this refresh waited for the lock: it must not come back
                return
            cur = read_lease(self.output_dir)
            if cur is not None and (cur.job != self.job or not cur.holder.same_process(self.record.holder)):
                raise LeaseLost(
                    f"the lease of {self.output_dir} now names {cur.describe()}, not this job {self.job!r} "
                    f"({self.record.holder.describe()}); saves of this job cannot commit there any more; stop one "
                    "of the two jobs"
                )
            if cur is None:
                # Removed by hand: nobody else holds it.
                logger.info("the lease of %s was gone; taking it again for job %r", self.output_dir, self.job)
            base = cur or self.record
            rec = LeaseRecord(self.job, self.record.holder, base.acquired, time.time(), predecessors=base.predecessors)
            _write_lease(root, rec)
            self.record = rec

    def release(self) -> bool:
        """Remove the lease if it is still ours and no other ``Lease`` of this process holds it; True if it
        was removed. A forked child of the holder never removes it (its copy of this object is inert).

        Example:
            >>> lease.release()
            True
        """
        if self.released:
            return False
        self.released = True
        if os.getpid() != self._pid:
            return False  # a forked child (an inherited finalizer at its exit): the lease is its parent's
        with _holds_lock:
            left = _holds.get(self._key, 1) - 1
            if left > 0:
                _holds[self._key] = left
            else:
                _holds.pop(self._key, None)
        if left > 0:
            logger.info(
                "the lease of %s stays: %d other client(s) of this process still hold it", self.output_dir, left
            )
            return False
        root = fmt.checkpoints_root(self.output_dir)
        try:
            with _lease_lock(root):
                cur = read_lease(self.output_dir)
                if cur is None or cur.job != self.job or not cur.holder.same_process(self.record.holder):
                    return False
                os.unlink(root / fmt.LEASE_NAME)
                return True
        except FileNotFoundError:  # the output dir is gone
            return False
