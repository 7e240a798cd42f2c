"""Invariants the failure tests check after a crash, a full disk or hostile input (DESIGN.md §5, §9).

Shared by tests/test_torture.py, tests/client/test_full_disk.py and tests/ckptd/test_fuzz.py. Every
function looks at the real system: directory listings, checkpoint files, /dev/shm, /proc/<pid>/maps and
/proc/<pid>/fd, and the daemon's own answers on its socket. Each returns a list of human-readable problems
(empty when the invariant holds) so a test can name everything that broke at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zmq
from safetensors import safe_open

from ckptd import format as fmt
from ckptd import protocol as proto
from ckptd.protocol import MsgType
from tests.client.trainer_script import process_gone

SHM_DIR = "/dev/shm"
SLAB_PREFIX = proto.SEGMENT_PREFIX  # "ckptd-": /dev/shm slabs and memfd slabs alike
# ckptd-<uid>-<pid>-...: the pid of the process that created the slab
_CREATOR_RE = re.compile(rf"^{re.escape(SLAB_PREFIX)}(\d+)-(\d+)-")


# ------------------------------------------------------------------------------------------ processes


def wait_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Wait until every pid has exited; returns those still running at the deadline."""
    pending = list(pids)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if not process_gone(p)]
        if pending:
            time.sleep(0.01)
    return [p for p in pending if not process_gone(p)]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace")
    except OSError:
        return ""


def daemon_pid(endpoint: str) -> int | None:
    """The pid written in the endpoint's lock file, if it is a live ckptd serving this endpoint.

    Checked against the process's command line, so a stale lock file whose pid was reused by an unrelated
    process is never taken for the daemon (and never signalled)."""
    path = proto.ipc_path(endpoint)
    if path is None:
        return None
    try:
        pid = int(Path(path + ".lock").read_text().strip())
    except (OSError, ValueError):
        return None
    if process_gone(pid) or endpoint not in cmdline(pid):
        return None
    return pid


def kill_if_ours(pid: int | None, marker: str) -> None:
    """SIGKILL ``pid`` only if it is still alive and its command line contains ``marker``."""
    if pid is None or process_gone(pid) or marker not in cmdline(pid):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------------- staging memory


@dataclass(frozen=True)
class SlabHold:
    """A process holding a staging slab: open as a file descriptor, or mapped."""

    holder: int
    name: str  # the slab's name: /dev/shm/<name> or memfd:<name>
    kind: str  # "shm" or "memfd"
    how: str  # "fd" or "map"

    @property
    def creator(self) -> int | None:
        return creator_pid(self.name)

    def __str__(self) -> str:
        return f"pid {self.holder} ({cmdline(self.holder)[:80]!r}) holds {self.kind} {self.name} by {self.how}"


def creator_pid(name: str) -> int | None:
    """The pid of the process that created a slab named ``ckptd-<uid>-<pid>-...``, if the name says so."""
    m = _CREATOR_RE.match(name)
    return int(m.group(2)) if m and int(m.group(1)) == os.getuid() else None


def _slab_of(target: str) -> tuple[str, str] | None:
    """(kind, name) for a /proc fd link target or a maps path naming a ckptd slab."""
    if target.startswith(f"{SHM_DIR}/{SLAB_PREFIX}"):
        return "shm", target[len(SHM_DIR) + 1 :].split(" ")[0]
    if target.startswith(f"/memfd:{SLAB_PREFIX}"):
        return "memfd", target[len("/memfd:") :].removesuffix(" (deleted)").split(" ")[0]
    return None


def slab_holds() -> list[SlabHold]:
    """Every (process, slab) pair on the machine where the process has the slab open or mapped."""
    holds: set[SlabHold] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.rstrip("\n").split(None, 5)
                    if len(parts) == 6:
                        slab = _slab_of(parts[5])
                        if slab:
                            holds.add(SlabHold(pid, slab[1], slab[0], "map"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    slab = _slab_of(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    continue
                if slab:
                    holds.add(SlabHold(pid, slab[1], slab[0], "fd"))
        except OSError:
            continue  # the process exited while we looked
    return sorted(holds, key=lambda h: (h.name, h.holder, h.how))


def shm_slabs() -> list[str]:
    """Names of the ckptd slabs in /dev/shm (any owner)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(SLAB_PREFIX))
    except OSError:
        return []


def slab_leaks(is_mine: Callable[[str], bool], may_hold: set[int], watch: set[int] = frozenset()) -> list[str]:
    """Staging memory of this test that nobody needs any more (what ``shm-orphans --prefix ckptd-`` finds,
    plus memfds kept alive by a process that should have let go):

    - a /dev/shm slab of this test that no live process has open or mapped (node RAM lost until reboot);
    - a slab (/dev/shm or memfd) of this test held by a live process other than those in ``may_hold``
      (the trainers still running and the daemons still writing for them);
    - any slab at all held by a process in ``watch`` (this test's daemons) but not in ``may_hold``, in case
      slab names stop carrying their creator's pid.

    ``is_mine(name)`` picks this test's slabs out of those of other jobs on the machine.
    """
    every = slab_holds()
    holds = [h for h in every if is_mine(h.name) or h.holder in watch]
    problems = [f"leaked staging memory: {h}" for h in holds if h.holder not in may_hold]
    held = {h.name for h in every}
    for name in shm_slabs():
        if is_mine(name) and name not in held:
            try:
                size = os.stat(f"{SHM_DIR}/{name}").st_size
            except OSError:
                continue  # unlinked while we looked
            problems.append(f"orphaned /dev/shm/{name} ({size >> 20} MiB) that no live process uses")
    return problems


def remove_orphaned_shm(is_mine: Callable[[str], bool]) -> list[str]:
    """Unlink this test's /dev/shm slabs that no live process uses (teardown: never leave RAM behind)."""
    held = {h.name for h in slab_holds()}
    removed = []
    for name in shm_slabs():
        if is_mine(name) and name not in held:
            try:
                os.unlink(f"{SHM_DIR}/{name}")
                removed.append(name)
            except OSError:
                pass
    return removed


# ---------------------------------------------------------------------------------------- checkpoints


def checkpoint_entries(output_dir: Path) -> list[str]:
    try:
        return sorted(os.listdir(fmt.checkpoints_root(output_dir)))
    except FileNotFoundError:
        return []


def committed_steps(output_dir: Path) -> list[int]:
    """Steps of the directories named checkpoint-<int> (committed or not: the name is the promise)."""
    steps = (fmt.parse_checkpoint_dirname(n) for n in checkpoint_entries(output_dir))
    return sorted(s for s in steps if s is not None)


def temp_or_trash(output_dir: Path) -> list[str]:
    """Entries of checkpoints/ that are in flight or half-deleted: temp dirs and their owner records, trash,
    tombstones and veto records (every name starting ``.tmp-`` or ``.trash-``)."""
    return [n for n in checkpoint_entries(output_dir) if n.startswith((".tmp-", ".trash-"))]


def is_marker(root: Path, name: str) -> bool:
    """A tombstone (a regular file at a temp-dir name) or a veto record: the few bytes a rank that gave up
    on a save leaves so that no daemon can commit it. Unlike temp dirs they hold no checkpoint data, and a
    sweep may keep them until the save's deadline is provably past on every node (``SWEEP_MARGIN_S``)."""
    if name.endswith(".veto"):
        return True
    try:
        return fmt.parse_temp_dirname(name) is not None and os.path.isfile(root / name)
    except OSError:
        return False


def leftovers(output_dir: Path) -> list[str]:
    """The temp/trash entries that hold (or stand for) checkpoint data: temp dirs, their owner records and
    trash; what must be gone once a daemon has started and a save has committed after a crash."""
    root = fmt.checkpoints_root(output_dir)
    return [n for n in temp_or_trash(output_dir) if not is_marker(root, n)]


def describe_entries(output_dir: Path, names: Iterable[str]) -> list[str]:
    """Names of checkpoints/ entries, each with what it is when that says more than the name: a temp-dir
    owner record that does not parse (torn: its writer died between creating and filling it)."""
    root = fmt.checkpoints_root(output_dir)
    out = []
    for name in names:
        note = ""
        if fmt.parse_temp_owner_name(name) is not None:
            try:
                data = (root / name).read_bytes()[:4096]
            except OSError:
                data = None
            if data is not None:
                try:
                    json.loads(data)
                except ValueError:
                    note = f" (a torn owner record: {len(data)} bytes that are not JSON)"
        out.append(name + note)
    return out


def markers_never_swept(output_dir: Path, after_s: float) -> list[str]:
    """Tombstones and veto records that a sweep would still keep ``after_s`` seconds from now (after every
    deadline and margin has passed): entries that would pile up in checkpoints/ for ever."""
    from ckptd import ownership

    root = fmt.checkpoints_root(output_dir)
    markers = {n for n in temp_or_trash(output_dir) if is_marker(root, n)}
    if not markers:
        return []
    verdicts = {v.path.name: v for v in ownership.judge_entries(output_dir, set(), now=time.time() + after_s)}
    out = []
    for name in sorted(markers):
        v = verdicts.get(name)
        if v is None or not v.stale:
            out.append(f"{name} ({v.why if v else 'not even looked at by the sweep'})")
    return out


def checkpoint_problems(path: Path, step: int, expect: Callable[[str, torch.Tensor], str | None]) -> list[str]:
    """Problems of a committed checkpoint directory: it must verify, its manifest must name its own step,
    and every tensor of every safetensors file must pass ``expect(name, tensor)`` (None when it does)."""
    result = fmt.verify_checkpoint(path)
    if not result:
        return [f"{path.name} does not verify: {result}"]
    problems = []
    try:
        manifest = fmt.read_manifest(path)
    except (fmt.FormatError, OSError) as e:
        return [f"{path.name}: manifest unreadable after verify passed: {e}"]
    if manifest.step != step:
        problems.append(f"{path.name}: manifest names step {manifest.step}")
    tensors = 0
    for rel in sorted(manifest.files):
        if not rel.endswith(".safetensors"):
            continue
        with safe_open(str(path / rel), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors += 1
                bad = expect(name, f.get_tensor(name))
                if bad:
                    problems.append(f"{path.name}/{rel}: tensor {name!r} {bad}")
    if not tensors:
        problems.append(f"{path.name}: holds no tensor at all")
    return problems


def filled_with(value: float) -> Callable[[str, torch.Tensor], str | None]:
    """An ``expect`` for checkpoint_problems: every element equals ``value``."""

    def check(name: str, t: torch.Tensor) -> str | None:
        if t.numel() == 0:
            return None
        wrong = t.to(torch.float64) != value
        if bool(wrong.any()):
            seen = sorted({float(x) for x in t.to(torch.float64).flatten()[wrong.flatten()][:1000].tolist()})[:5]
            return f"holds {int(wrong.sum())} of {t.numel()} values other than {value} (e.g. {seen})"
        return None

    return check


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` (relative) with its mode, size and mtime in ns (for files; a directory's
    own size and mtime change when entries come and go, which its entries already show); no symlink is
    followed."""
    snap: dict[str, tuple[int, int, int]] = {}
    if not root.exists():
        return snap
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                snap[os.path.relpath(p, root)] = (st.st_mode, 0, 0)
            else:
                snap[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


def snapshot_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    out = [f"appeared: {p}" for p in added] + [f"vanished: {p}" for p in removed]
    return out + [f"changed: {p}" for p in changed]


# ------------------------------------------------------------------------------------------- the daemon


def ask(
    endpoint: str,
    msg_type: MsgType,
    timeout_s: float = 5.0,
    sock_setup: Callable[[zmq.Socket], None] | None = None,
    **body: Any,
) -> tuple[MsgType, dict[str, Any]] | None:
    """One request on a fresh DEALER; the reply's (type, body), or None if none came within the timeout."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if sock_setup is not None:
            sock_setup(sock)
        sock.connect(endpoint)
        sock.send(proto.pack(msg_type, 1, **body))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(max(1, int(left * 1000))):
                break
            t, req_id, reply = proto.unpack(sock.recv())
            if req_id == 1:
                return t, reply
        return None
    finally:
        sock.close(linger=0)


def daemon_status(endpoint: str, timeout_s: float = 5.0, **kw: Any) -> dict[str, Any] | None:
    reply = ask(endpoint, MsgType.STATUS, timeout_s, **kw)
    if reply is None or reply[0] != MsgType.STATUS_REPORT:
        return None
    return reply[1]


def wait_daemon_idle(endpoint: str, timeout_s: float) -> str | None:
    """Wait until the daemon at ``endpoint`` has no transaction in flight; None, or what went wrong."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        status = daemon_status(endpoint, timeout_s=2.0)
        if status is None:
            last = "no status reply"
        elif not status.get("in_flight"):
            return None
        else:
            last = [{k: t.get(k) for k in ("txn", "step", "state", "age_s")} for t in status["in_flight"]]
        time.sleep(0.05)
    return f"the daemon still had transactions in flight after {timeout_s:.0f} s: {last}"
