"""Fixtures of the daemon tests: a harness that starts real daemons and talks to them by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.ckptd.harness import Daemon, Harness


@pytest.fixture
def harness(endpoint: str, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(endpoint, tmp_path, zmq.Context())
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def daemon(harness: Harness) -> Daemon:
    return harness.start()
