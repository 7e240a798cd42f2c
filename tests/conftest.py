"""Shared fixtures: a private daemon endpoint per test, and cleanup of whatever daemon a test started."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import zmq

from ckptd import protocol as proto

if TYPE_CHECKING:
    from tests.ckptd.harness import Daemon, Harness

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _daemon_pid(endpoint: str) -> int | None:
    path = proto.ipc_path(endpoint)
    try:
        text = Path(path + ".lock").read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError, TypeError):
        return None


def stop_daemon(endpoint: str, timeout: float = 10.0) -> None:
    """Stop the daemon serving ``endpoint`` (SIGTERM, then SIGKILL) and remove its files."""
    pid = _daemon_pid(endpoint)
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    # A daemon started by a client inside pytest is pytest's child: reap it, or its
                    # zombie would look alive until the deadline.
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                except ChildProcessError:
                    pass
                os.kill(pid, 0)
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    path = proto.ipc_path(endpoint)
    for suffix in ("", ".lock", ".log"):
        try:
            os.unlink(path + suffix)
        except (OSError, TypeError):
            pass


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch):
    """A fresh IPC endpoint (short path, private dir); also exported as $CKPTD_ENDPOINT for subprocesses."""
    proto.ensure_private_dir(proto.runtime_dir())
    ep = f"ipc://{proto.runtime_dir()}/t-{secrets.token_hex(4)}.sock"
    monkeypatch.setenv(proto.ENDPOINT_ENV, ep)
    yield ep
    stop_daemon(ep)


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


# The daemon tests' hand-driven harness (tests/ckptd/harness.py). Kept here rather than in a
# tests/ckptd/conftest.py, which would shadow this module for tests that import it as ``conftest``.
@pytest.fixture
def harness(endpoint: str, tmp_path: Path) -> Iterator[Harness]:
    from tests.ckptd.harness import Harness

    h = Harness(endpoint, tmp_path, zmq.Context())
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def daemon(harness: Harness) -> Daemon:
    return harness.start()
