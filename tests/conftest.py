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


@pytest.fixture(autouse=True)
def _close_pipes_of_finished_children(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close the pipes of every child process a test started and that has exited by its end: a test that
    reads a trainer's stdout until it kills it otherwise leaves the pipe to the garbage collector (a
    ResourceWarning). Pipes of children still running are left alone (a later test may read them)."""
    import subprocess

    made: list[subprocess.Popen] = []
    real_init = subprocess.Popen.__init__

    def init(self: subprocess.Popen, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", init)
    yield
    for proc in made:
        if proc.poll() is None:
            continue
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
