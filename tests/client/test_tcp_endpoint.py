"""A rank on a CURVE-authenticated tcp:// endpoint: it saves and loads with the right keys, and is told at
once, in words, when it has none or the wrong ones. Real daemon process, real keys, real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptd import security
from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent
from client.transport import rotate_log

pytestmark = pytest.mark.timeout(90)


class Box:
    def __init__(self, value: float) -> None:
        self.t = torch.full((1000,), value)

    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, sd: dict) -> None:
        self.t = sd["t"].clone()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    keys = tmp_path / "keys"
    security.generate_keys(keys)
    ep = f"tcp://127.0.0.1:{free_port()}"
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "serve", "--endpoint", ep, "--keys", str(keys)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "CKPTD_KEYS": ""},
    )
    monkeypatch.delenv("CKPTD_KEYS", raising=False)
    try:
        yield ep, keys, tmp_path / "daemon.log"
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def test_a_rank_with_the_keys_saves_and_loads_over_curve_tcp(tcp_daemon, tmp_path, monkeypatch) -> None:
    ep, keys, _ = tcp_daemon
    monkeypatch.setenv("CKPTD_KEYS", str(keys))
    box = Box(3.0)
    with CheckpointClient(tmp_path / "out", [StateComponent("box", box, SharingPattern.GLOBAL)], endpoint=ep) as c:
        path = c.save_async(3).wait(timeout=30)
        assert path.name == "checkpoint-3"
        box.t.zero_()
        assert c.load("latest") == path
        assert torch.equal(box.t, torch.full((1000,), 3.0))


def test_a_rank_without_keys_is_refused_at_once_saying_what_to_do(tcp_daemon, tmp_path) -> None:
    ep, _, _ = tcp_daemon
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="need CURVE keys.*ckptd keygen"):
        CheckpointClient(tmp_path / "out", [StateComponent("box", Box(1.0), SharingPattern.GLOBAL)], endpoint=ep)
    assert time.monotonic() - t0 < 10


def test_a_rank_whose_key_is_not_authorized_is_told_why(tcp_daemon, tmp_path, monkeypatch) -> None:
    ep, keys, log = tcp_daemon
    stranger = tmp_path / "stranger"
    security.generate_keys(stranger)
    # The right server key, but a client key the daemon never authorized.
    (stranger / "server.key").write_bytes((keys / "server.key").read_bytes())
    (stranger / "server.key_secret").unlink()
    monkeypatch.setenv("CKPTD_KEYS", str(stranger))
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="not authorized|refused"):
        CheckpointClient(
            tmp_path / "out",
            [StateComponent("box", Box(1.0), SharingPattern.GLOBAL)],
            endpoint=ep,
            daemon_start_timeout_s=20,
        )
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "out" / "checkpoints").exists() or not any(
        n.startswith("checkpoint-") for n in os.listdir(tmp_path / "out" / "checkpoints")
    )


def test_the_embedded_daemons_log_is_rotated_once_it_grows_past_its_bound(tmp_path: Path) -> None:
    log = tmp_path / "ckptd.sock.log"
    log.write_bytes(b"x" * 2048)
    rotate_log(log, max_bytes=4096)
    assert log.exists() and not (tmp_path / "ckptd.sock.log.1").exists()
    log.write_bytes(b"y" * 8192)
    rotate_log(log, max_bytes=4096)
    assert not log.exists() and (tmp_path / "ckptd.sock.log.1").read_bytes() == b"y" * 8192
