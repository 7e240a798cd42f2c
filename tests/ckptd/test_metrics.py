"""``ckptd serve --metrics-port``: a real daemon's Prometheus endpoint, scraped over HTTP during a save (the
byte counters move while the daemon writes), after its commit, and after an abort (counted by cause)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import stop_daemon

from ckptd.metrics import AbortCause, abort_cause
from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent
from client.transport import DaemonLink

pytest.importorskip("prometheus_client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """Every sample of the endpoint, by its name and labels as printed."""
    if shutil.which("curl"):
        text = subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True, check=True
        ).stdout
    else:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Blob:
    def __init__(self) -> None:
        self.t = {f"w{i}": torch.full((1 << 20,), float(i)) for i in range(8)}

    def state_dict(self):
        return self.t

    def load_state_dict(self, sd) -> None:
        self.t = sd


def test_metrics_move_during_a_save_and_count_commits_and_aborts_by_cause(endpoint, tmp_path):
    port = free_port()
    env = {**os.environ, "CKPTD_TEST_FAULTS": "after_file_write=stall@1,before_rename=enospc@2"}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, "--metrics-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        link = DaemonLink(endpoint)
        deadline = time.monotonic() + 60
        while not link.ping(1.0):
            assert daemon.poll() is None and time.monotonic() < deadline, "the daemon did not start"
        link.close()
        before = scrape(port)
        assert before["ckptd_bytes_written_total"] == 0 and before["ckptd_commits_total"] == 0
        assert before['ckptd_aborts_total{cause="write_error"}'] == 0

        comps = [StateComponent("model", Blob(), SharingPattern.GLOBAL)]  # 8 shards of 4 MiB
        with CheckpointClient(tmp_path / "out", comps, max_shard_size=4 << 20) as client:
            h = client.save_async(1)
            time.sleep(1.0)  # the daemon stalls 3 s after writing its first file
            during = scrape(port)
            assert during['ckptd_transactions_in_flight{state="writing"}'] == 1, during
            assert 0 < during["ckptd_bytes_written_total"] < 32 << 20, during
            assert during["ckptd_slab_bytes"] >= 32 << 20
            assert during["ckptd_bytes_staged_total"] >= 32 << 20
            h.wait(60)
            after = scrape(port)
            assert after["ckptd_bytes_written_total"] >= 32 << 20 > during["ckptd_bytes_written_total"]
            assert after["ckptd_commits_total"] == 1 and after["ckptd_commit_latency_seconds_count"] == 1
            assert after["ckptd_commit_latency_seconds_sum"] > 2.0  # the 3 s stall is in it
            assert after["ckptd_stall_seconds_count"] == 1 and 0 < after["ckptd_stall_seconds_sum"] < 30
            assert after["ckptd_last_commit_throughput_bytes_per_second"] > 0

            with pytest.raises(CheckpointError, match="No space left"):
                client.save_async(2).wait(60)
        final = scrape(port)
        assert final['ckptd_aborts_total{cause="write_error"}'] == 1, final
        assert final["ckptd_commits_total"] == 1
        assert not any(k.startswith("ckptd_transactions_in_flight{") and v for k, v in final.items())
    finally:
        daemon.terminate()
        daemon.wait(30)
        stop_daemon(endpoint)


def test_a_taken_metrics_port_is_a_usage_error_naming_it(endpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2 and f"--metrics-port {port}" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "reason,cause",
    [
        ("rank 1: writing failed: [Errno 5] Input/output error", AbortCause.WRITE_ERROR),
        ("its deadline passed while it waited to commit", AbortCause.DEADLINE),
        ("the daemon was asked to stop and its grace of 30 s ran out", AbortCause.SHUTDOWN),
        ("node(s) [1] went silent for 10 s", AbortCause.PEER),
        ("the daemon refuses to commit it: component 'x' has no files", AbortCause.REFUSED),
        ("rank 0: the hand-off got no answer", AbortCause.RANK),
        ("job 'a' no longer holds the lease of this output dir", AbortCause.OWNERSHIP),
        ("something new", AbortCause.OTHER),
    ],
)
def test_abort_reasons_are_sorted_into_causes(reason, cause):
    assert abort_cause(reason) == cause
