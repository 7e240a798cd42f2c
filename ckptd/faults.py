"""Fault injection: named points in the daemon's write and commit path where a test makes it fail.

Off unless the test-only environment variable ``CKPTD_TEST_FAULTS`` is set when the daemon starts; a
production daemon never reads it again, and a point that is not armed costs one dict lookup. The value is
a comma-separated list of ``point=action`` rules, optionally ``point=action@n`` to fire on the n-th time
the point is reached (1-based, default 1), for example::

    CKPTD_TEST_FAULTS="before_rename=crash"
    CKPTD_TEST_FAULTS="after_file_write=enospc@2,retention=eio"

Actions: ``crash`` kills the daemon with SIGKILL on the spot (as a power cut would leave the process, not
the page cache); ``enospc``, ``eio`` and ``eacces`` raise the ``OSError`` the kernel would; ``stall`` sleeps
``STALL_S`` seconds there (a slow disk), so that a test can act while the daemon is at that point.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ENV = "CKPTD_TEST_FAULTS"
STALL_S = 3.0


class FaultPoint(str, enum.Enum):
    AFTER_FILE_WRITE = "after_file_write"  # a file's bytes are written, not yet fsynced
    BEFORE_FILE_FSYNC = "before_file_fsync"
    AFTER_FILE_FSYNC = "after_file_fsync"
    BEFORE_MANIFEST = "before_manifest"  # every part durable, manifest not yet written
    AFTER_MANIFEST = "after_manifest"  # manifest written and fsynced, temp dir not yet fsynced
    BEFORE_RENAME = "before_rename"  # temp dir durable; the last instant the save can still abort
    BETWEEN_RENAMES = "between_renames"  # re-save: swapped in by RENAME_EXCHANGE, old one not yet trashed
    AFTER_RENAME = "after_rename"  # committed; parent directory not yet fsynced
    RETENTION = "retention"  # committed; retention is about to take an old checkpoint out of sight


class FaultAction(str, enum.Enum):
    CRASH = "crash"
    ENOSPC = "enospc"
    EIO = "eio"
    EACCES = "eacces"
    STALL = "stall"


_ERRNO = {FaultAction.ENOSPC: errno.ENOSPC, FaultAction.EIO: errno.EIO, FaultAction.EACCES: errno.EACCES}


@dataclass
class FaultInjector:
    """The armed points of one daemon, and how often each has been reached (thread-safe)."""

    rules: dict[FaultPoint, tuple[FaultAction, int]] = field(default_factory=dict)
    hits: dict[FaultPoint, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def parse(cls, text: str) -> FaultInjector:
        """Parse ``point=action[@n],...``; raises ValueError naming the bad rule and the valid choices."""
        rules: dict[FaultPoint, tuple[FaultAction, int]] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            point, sep, rest = item.partition("=")
            action, _, nth = rest.partition("@")
            try:
                rules[FaultPoint(point)] = (FaultAction(action), int(nth) if nth else 1)
            except ValueError:
                raise ValueError(
                    f"{ENV}: bad rule {item!r}; expected point=action[@n] with point in "
                    f"{[p.value for p in FaultPoint]} and action in {[a.value for a in FaultAction]}"
                ) from None
            if not sep or rules[FaultPoint(point)][1] < 1:
                raise ValueError(f"{ENV}: bad rule {item!r}; expected point=action[@n] with n >= 1")
        return cls(rules)

    @classmethod
    def from_env(cls) -> FaultInjector:
        text = os.environ.get(ENV, "")
        injector = cls.parse(text)
        if injector.rules:
            logger.warning("fault injection armed (test only): %s", text)
        return injector

    def hit(self, point: FaultPoint) -> None:
        """Reached ``point``: do nothing, unless a rule says to fail here now."""
        rule = self.rules.get(point)
        if rule is None:
            return
        with self._lock:
            n = self.hits[point] = self.hits.get(point, 0) + 1
        action, nth = rule
        if n != nth:
            return
        logger.warning("injected fault: %s at %s (hit %d)", action.value, point.value, n)
        if action == FaultAction.CRASH:
            os.kill(os.getpid(), signal.SIGKILL)
        if action == FaultAction.STALL:
            time.sleep(STALL_S)
            return
        code = _ERRNO[action]
        raise OSError(code, f"{os.strerror(code)} (injected at {point.value})")
