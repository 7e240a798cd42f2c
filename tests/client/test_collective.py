"""No collective can hang (issue 5, defect 7): whatever fails on one rank before or inside a collective of
``CheckpointClient(...)``, ``save_async`` or ``load`` is carried into it, so every rank raises the same
CheckpointError within seconds (gloo's own timeout is 30 minutes). Two real ranks under torchrun (gloo);
rank 1 gets a malformed endpoint, loses its daemon, and fails to apply a checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import stop_daemon
from test_torchrun import new_endpoint, torchrun

from ckptd import protocol as proto
from client.transport import DaemonLink

FAST_S = 20.0  # far below any collective timeout: the ranks raised together, nobody waited one out


def start_daemon(endpoint: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    link = DaemonLink(endpoint)
    try:
        deadline = time.monotonic() + 60
        while not link.ping(1.0):
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon for rank 1 did not start"
    finally:
        link.close()
    return proc


def both_raise_the_same(res: dict, case: str) -> str:
    a, b = res[0]["cases"][case], res[1]["cases"][case]
    assert not a["ok"] and not b["ok"], f"{case}: {a} / {b}"
    assert a["type"] == b["type"] == "CheckpointError"
    assert a["error"] == b["error"], f"{case}: the ranks raised different errors"
    assert a["seconds"] < FAST_S and b["seconds"] < FAST_S, f"{case}: {a['seconds']:.1f} s / {b['seconds']:.1f} s"
    return a["error"]


def test_a_failure_on_one_rank_makes_every_rank_raise_together_within_seconds(endpoint, monkeypatch, tmp_path) -> None:
    rank1_endpoint = new_endpoint()
    daemon = start_daemon(rank1_endpoint)
    monkeypatch.setenv("CKPTD_TEST_RANK1_ENDPOINT", rank1_endpoint)
    try:
        res = torchrun("collective", tmp_path / "out", tmp_path / "results", endpoint)
    finally:
        daemon.kill()
        daemon.wait()
        stop_daemon(rank1_endpoint)

    err = both_raise_the_same(res, "construct")
    assert "rank 1" in err and "bogus://nowhere" in err and "rank 0:" not in err, err
    # Rank 0 had taken the output dir's lease before the vote: it gave it back.
    assert res[0]["cases"]["construct"]["listing"] == []
    assert not (tmp_path / "out" / "construct" / "checkpoints" / ".ckptd-lease.json").exists()

    err = both_raise_the_same(res, "save")
    assert "save of step 1 failed before the hand-off" in err and "rank 1" in err, err
    assert proto.ipc_path(rank1_endpoint) in err and "nothing was written" in err, err

    err = both_raise_the_same(res, "load")
    assert "rank 1" in err and "load_state_dict failed" in err and "does not match" in err, err

    err = both_raise_the_same(res, "skip")
    assert "pass the same skip= on every rank" in err and "['trainer']" in err, err

    err = both_raise_the_same(res, "skip_unknown")
    assert "rank 1" in err and "no such component" in err and "trainr" in err, err
