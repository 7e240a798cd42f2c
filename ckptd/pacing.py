"""How hard the daemon's background work may press on the trainer: write pacing, CPU placement, I/O priority.

A checkpoint written at full speed competes with training for cores and memory bandwidth for as long as it
runs; the same bytes spread over the checkpoint interval compete far less at any one time. Pacing is applied
per chunk by the writer threads (``Pace.wait`` before each chunk of ``writer.write_range`` and
``writer.write_regions``):

* a fixed rate (``--max-write-rate 200MiB/s``): one token bucket shared by every writer thread;
* ``auto`` (``--max-write-rate auto[:FRACTION]``): each save of an output dir is spread to finish within
  FRACTION (default 0.5) of the interval measured between that dir's last hand-offs (never over more than
  ``AUTO_MAX_SPREAD_S``).

In every mode the first save of an output dir goes at full speed: there is no interval to plan with, and
nothing could lift its pace while its trainer waits for the slab.

Whatever the mode, pacing never costs a save its deadline or makes the trainer wait:

* every save keeps a floor schedule that has its bytes written by ``SAFE_FRACTION`` of its time budget
  (``timeout_s``, or the rank's deadline), with ``SAFE_MARGIN_S`` kept for fsync and commit;
* pacing is lifted for good once a later save of the same output dir is handed over (it waits behind this
  one), once the next save is due by the measured rhythm (the trainer may be waiting for the slab), when
  every writer thread is taken and another save waits for one, and when the daemon is asked to stop;
* a paced writer sleeps in slices of at most ``SLICE_S`` and stops as soon as its save is aborted.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

SAFE_FRACTION = 0.5  # the writes of a save finish by this fraction of its time budget, paced or not
SAFE_MARGIN_S = 1.0  # and at least this long before its deadline (fsync, manifest, rename)
AUTO_FRACTION = 0.5  # auto: finish within this fraction of the measured interval between hand-offs
AUTO_MAX_SPREAD_S = 60.0  # auto: never spread one save over longer than this (it commits that much later)
AUTO_HISTORY = 3  # auto: the shortest of this many recent intervals is the interval (a rhythm that speeds up)
BURST_S = 0.05  # fixed rate: an idle bucket lets this many seconds' worth of bytes through at once
SLICE_S = 0.05  # a paced writer re-checks abort and lifting at least this often

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
}
_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*(?:/\s*s)?\s*$")


class PacingError(ValueError):
    """A pacing, affinity or I/O priority option that cannot be used; the text says what to pass instead."""


@dataclass(frozen=True)
class WriteRate:
    """``--max-write-rate``: a fixed rate in bytes per second, or ``auto`` with its fraction of the interval."""

    bytes_per_s: float | None = None
    auto_fraction: float | None = None

    @property
    def enabled(self) -> bool:
        return self.bytes_per_s is not None or self.auto_fraction is not None

    def describe(self) -> str:
        if self.bytes_per_s is not None:
            return f"{self.bytes_per_s / 2**20:.0f} MiB/s"
        if self.auto_fraction is not None:
            return f"auto ({self.auto_fraction:g} of the interval between saves)"
        return "unlimited"


UNLIMITED = WriteRate()


def parse_write_rate(text: str) -> WriteRate:
    """``200MiB/s``, ``1.5GB/s``, ``500M``, ``auto``, ``auto:0.3`` or ``off``/``none``/``0`` (unlimited)."""
    t = text.strip().lower()
    if t in ("off", "none", "unlimited", "0"):
        return UNLIMITED
    if t == "auto" or t.startswith("auto:"):
        frac_text = t[5:] if t.startswith("auto:") else str(AUTO_FRACTION)
        try:
            frac = float(frac_text)
        except ValueError:
            frac = -1.0
        if not 0.05 <= frac <= 0.9:
            raise PacingError(
                f"--max-write-rate {text!r}: the fraction after 'auto:' must be a number from 0.05 to 0.9 (the "
                "share of the interval between saves a save's write may take); e.g. 'auto' or 'auto:0.5'"
            )
        return WriteRate(auto_fraction=frac)
    m = _RATE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise PacingError(
            f"--max-write-rate {text!r} is not a rate; expected a number with an optional unit per second "
            "(B, KB, MB, GB, KiB, MiB, GiB), e.g. '200MiB/s' or '1GB/s', or 'auto', or 'off'"
        )
    rate = float(m.group(1)) * _UNITS[unit]
    if rate == 0:
        return UNLIMITED
    if rate < 2**20:
        raise PacingError(
            f"--max-write-rate {text!r} is {rate:.0f} bytes/s, below 1 MiB/s: a checkpoint would take hours and miss "
            "its deadline (which pacing then overrides anyway); pass at least '1MiB/s', or 'auto'"
        )
    return WriteRate(bytes_per_s=rate)


def parse_cpu_list(text: str) -> set[int]:
    """``0``, ``0,2``, ``2-3``, ``0-1,4``: the CPUs, each of which must be one this process may use."""
    cpus: set[int] = set()
    for piece in text.split(","):
        piece = piece.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise PacingError(
                f"--cpu-affinity {text!r}: {piece!r} is not a CPU number or range; expected a list such as '0', "
                "'2-3' or '0,2-3' (as taskset -c and /sys/devices/system/cpu/online write them)"
            )
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        allowed = os.sched_getaffinity(0)
        if hi > max(allowed):  # checked before the range is built: '0-4000000000' must not exhaust memory
            cpus.add(hi)
            break
        cpus.update(range(lo, hi + 1))
    allowed = os.sched_getaffinity(0)
    outside = sorted(cpus - allowed)
    if outside:
        raise PacingError(
            f"--cpu-affinity {text!r} names CPU(s) {outside}, which this process may not run on (allowed: "
            f"{_format_cpus(allowed)}); pick CPUs from that list"
        )
    return cpus


def _format_cpus(cpus: set[int]) -> str:
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


IOPRIO_CLASS_BE = 2
IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "ppc64le": (273, 274), "riscv64": (30, 31)}


@dataclass(frozen=True)
class IoPriority:
    io_class: int  # IOPRIO_CLASS_BE or IOPRIO_CLASS_IDLE
    level: int  # 0 (highest) to 7 for best-effort; 0 for idle

    @property
    def value(self) -> int:
        return (self.io_class << _IOPRIO_CLASS_SHIFT) | self.level


def parse_ionice(text: str) -> IoPriority:
    """``idle``, ``best-effort`` (level 4), ``best-effort:7`` (also ``be:7``, ``3``, ``2:7`` as ionice -c writes)."""
    name, _, level_text = text.strip().lower().partition(":")
    if name in ("idle", "3"):
        if level_text:
            raise PacingError(f"--ionice {text!r}: the idle class takes no level; pass 'idle'")
        return IoPriority(IOPRIO_CLASS_IDLE, 0)
    if name in ("best-effort", "be", "2"):
        if not level_text:
            return IoPriority(IOPRIO_CLASS_BE, 4)
        if level_text.isdigit() and 0 <= int(level_text) <= 7:
            return IoPriority(IOPRIO_CLASS_BE, int(level_text))
        raise PacingError(
            f"--ionice {text!r}: the best-effort level must be 0 (highest) to 7 (lowest); e.g. 'best-effort:7'"
        )
    if name in ("realtime", "rt", "1"):
        raise PacingError(
            f"--ionice {text!r}: the realtime class would put checkpoint writes ahead of everything else; pass "
            "'idle' or 'best-effort[:LEVEL]'"
        )
    raise PacingError(f"--ionice {text!r} is not an I/O class; expected 'idle' or 'best-effort[:LEVEL]' (level 0-7)")


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def apply_cpu_affinity(cpus: set[int]) -> None:
    """Pin every thread of this process (and so every thread it starts later) to ``cpus``."""
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            continue  # a thread that exited meanwhile


def apply_ionice(prio: IoPriority) -> None:
    """ioprio_set on every thread of this process (Linux ioprio is per thread; new threads inherit it)."""
    numbers = _IOPRIO_SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, f"--ionice: ioprio_set is not known on {platform.machine()}; use ionice(1)")
    libc = ctypes.CDLL(None, use_errno=True)
    for tid in _threads():
        if libc.syscall(numbers[0], _IOPRIO_WHO_PROCESS, tid, prio.value) != 0:
            err = ctypes.get_errno()
            if err == errno.ESRCH:
                continue
            raise OSError(err, f"--ionice: ioprio_set failed: {os.strerror(err)}")


def get_ionice(tid: int = 0) -> IoPriority:
    numbers = _IOPRIO_SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, "ioprio_get is not known on this machine")
    libc = ctypes.CDLL(None, use_errno=True)
    value = libc.syscall(numbers[1], _IOPRIO_WHO_PROCESS, tid)
    if value < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return IoPriority(value >> _IOPRIO_CLASS_SHIFT, value & ((1 << _IOPRIO_CLASS_SHIFT) - 1))


class TokenBucket:
    """A byte rate shared by all writer threads (GCRA): a chunk may start once the bytes before it and its own
    are paid for, less ``burst_s`` of tolerance. So N bytes take at least N / rate - burst_s."""

    def __init__(self, bytes_per_s: float, burst_s: float = BURST_S) -> None:
        self.rate = bytes_per_s
        self.burst_s = burst_s
        self._tat = 0.0  # when the bytes reserved so far are paid for
        self._lock = threading.Lock()

    def reserve(self, n: int, latest: float | None = None) -> float:
        """When a chunk of ``n`` bytes may start. If that is after ``latest`` (a deadline needs it sooner), it
        starts at ``latest`` and is not charged: deadline-driven bytes do not delay other saves."""
        now = time.monotonic()
        with self._lock:
            tat = max(self._tat, now) + n / self.rate
            due = tat - self.burst_s
            if latest is not None and due > latest:
                return latest
            self._tat = tat
            return due


class Pace:
    """One save's pacing on this node: when each chunk of its writes may start.

    Args:
        opened: when the save was handed over (time.monotonic()).
        deadline: when it must be committed (time.monotonic()).
        total: the bytes this node writes for it (read again at each chunk: parts may still be joining).
        cancelled: True once the save is aborting; a paced writer then stops waiting at once.
        bucket: the shared token bucket (fixed rate), or None.
        target_end: auto: when its writes should be done, or None.
        due_at: when the next save is due by the measured rhythm (pacing stops then), or None.
    """

    def __init__(
        self,
        opened: float,
        deadline: float,
        total: Callable[[], int],
        cancelled: Callable[[], bool],
        bucket: TokenBucket | None = None,
        target_end: float | None = None,
        due_at: float | None = None,
    ) -> None:
        budget = max(0.0, deadline - opened)
        self.opened = opened
        self.safe_end = opened + max(0.0, min(SAFE_FRACTION * budget, budget - SAFE_MARGIN_S))
        self.bucket = bucket
        self.target_end = None if target_end is None else min(target_end, self.safe_end)
        self.due_at = due_at
        self._total = total
        self._cancelled = cancelled
        self._done = 0
        self._lock = threading.Lock()
        self.lifted_because: str | None = None
        self.waited_s = 0.0

    def lift(self, why: str) -> None:
        """Write the rest at full speed, for good."""
        if self.lifted_because is None:
            self.lifted_because = why

    def wait(self, n: int) -> None:
        """Before writing a chunk of ``n`` bytes: sleep until it is due. Raises ``Aborted`` if the save is
        aborted meanwhile."""
        with self._lock:
            before = self._done
            self._done += n
        if self._cancelled():
            raise Aborted()
        if self.lifted_because is not None:
            return
        total = max(1, self._total())
        # This chunk's share of the save, counted to its end: the last chunk starts by the end of the window.
        frac = min(1.0, (before + n) / total)
        # The floor: whatever the mode, the bytes up to this chunk go by the same share of the safe window.
        latest = self.opened + frac * (self.safe_end - self.opened)
        if self.target_end is not None:
            due = self.opened + frac * (self.target_end - self.opened)
        elif self.bucket is not None:
            due = self.bucket.reserve(n, latest)
        else:
            return
        due = min(due, latest)
        t0 = time.monotonic()
        while True:
            now = time.monotonic()
            if self._cancelled():
                raise Aborted()
            if self.due_at is not None and now >= self.due_at:
                self.lift("the next save is due")
            if now >= due or self.lifted_because is not None:
                break
            time.sleep(min(SLICE_S, due - now))
        self.waited_s += time.monotonic() - t0


class Aborted(Exception):
    """The save a paced writer was waiting for was aborted."""


@dataclass
class Rhythm:
    """The hand-off times of one output dir's recent saves (auto pacing measures the interval from them)."""

    handoffs: list[float]

    def note(self, t: float) -> float | None:
        """Record a hand-off at ``t``; returns the interval to plan the save with (None: not known yet)."""
        self.handoffs.append(t)
        del self.handoffs[: -(AUTO_HISTORY + 1)]
        gaps = [b - a for a, b in zip(self.handoffs, self.handoffs[1:], strict=False) if b > a]
        return min(gaps) if gaps else None
