"""Defects a fresh-context review of the metrics endpoint found, each reproduced first as a failing test: a
port out of range crashed with a traceback, a refused metrics start left the socket and lock behind, the
status URL of an IPv6 host was no URL, and the byte counter counted short and failed writes."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import stop_daemon

ROOT = str(Path(__file__).resolve().parents[2])
ENV = {**os.environ, "PYTHONPATH": ROOT}


def _serve(endpoint, *extra, env=ENV, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_metrics_port_out_of_range_is_a_usage_error_not_a_traceback(endpoint):
    r = _serve(endpoint, "--metrics-port", "70000")
    assert "Traceback" not in r.stderr, r.stderr[-800:]
    assert r.returncode == 2, r.stderr[-800:]


@pytest.mark.parametrize("why", ["port_in_use", "no_prometheus"])
def test_a_refused_metrics_start_leaves_no_socket_or_lock_behind(endpoint, tmp_path, why):
    sock_path = endpoint[len("ipc://") :]
    env = dict(ENV)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        if why == "no_prometheus":
            fake = tmp_path / "fake" / "prometheus_client"
            fake.mkdir(parents=True)
            (fake / "__init__.py").write_text("raise ImportError('hidden for the test')\n")
            env["PYTHONPATH"] = f"{tmp_path / 'fake'}:{ROOT}"
            port = 0
        r = _serve(endpoint, "--metrics-port", str(port), env=env)
    finally:
        holder.close()
    assert r.returncode == 2, r.stderr[-500:]
    left = [p for p in (sock_path, sock_path + ".lock") if os.path.lexists(p)]
    assert not left, f"exit 2 ({r.stderr.strip()[-200:]}) but left behind {left}"


def test_status_metrics_url_is_usable_for_an_ipv6_metrics_host(endpoint):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    d = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ckptd",
            "serve",
            "--endpoint",
            endpoint,
            "--metrics-port",
            "0",
            "--metrics-host",
            "::1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        cwd=ROOT,
    )
    try:
        url = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and url is None:
            r = subprocess.run(
                [sys.executable, "-m", "ckptd", "status", "--endpoint", endpoint, "--json", "--timeout", "2"],
                capture_output=True,
                text=True,
                env=ENV,
                cwd=ROOT,
            )
            if r.returncode == 0:
                url = json.loads(r.stdout)["metrics"]
            else:
                assert d.poll() is None, "daemon died"
                time.sleep(0.3)
        assert url is not None
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        assert parts.hostname == "::1" and parts.port, url  # http://::1:PORT/metrics is no URL (needs [::1])
    finally:
        d.terminate()
        d.wait(30)
        stop_daemon(endpoint)


# ---- the per-chunk byte counter counts bytes that were never written ----------------------------------


class _Seg:
    def __init__(self, n):
        import mmap

        self.mm = mmap.mmap(-1, n)
        self.size = n


def _region_spec(n):
    from ckptd import protocol as proto

    return proto.FileSpec(
        path="f.bin", offset=0, length=n, component="model", kind="region", file_size=n, runs=[(0, 0, n, 1, n)]
    )


def test_bytes_written_counter_does_not_double_count_a_short_pwrite(tmp_path, monkeypatch):
    from ckptd import metrics, writer

    n = 3 * writer.WRITE_CHUNK
    seg = _Seg(n)
    counter = metrics.ByteCounter()
    real = os.pwrite
    calls = {"n": 0}

    def short_once(fd, data, off):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(fd, bytes(data)[: len(data) // 2], off)  # a legal short write
        return real(fd, data, off)

    monkeypatch.setattr(writer.os, "pwrite", short_once)
    try:
        spec = _region_spec(n)
    except TypeError as e:
        pytest.skip(f"FileSpec signature: {e}")
    f = writer.write_regions(seg, spec, tmp_path, key=0, written=counter.add)
    writer.fsync_and_close(f)
    assert os.path.getsize(tmp_path / "f.bin") == n
    assert counter.value == n, f"{counter.value} bytes counted for {n} written"


def test_bytes_written_counter_does_not_count_a_chunk_whose_write_failed(tmp_path, monkeypatch):
    from ckptd import metrics, writer

    n = 2 * writer.WRITE_CHUNK
    seg = _Seg(n)
    counter = metrics.ByteCounter()

    def enospc(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "write", enospc)
    from ckptd import protocol as proto

    spec = proto.FileSpec(path="g.bin", offset=0, length=n, component="model")
    with pytest.raises(OSError):
        writer.write_range(seg, spec, tmp_path, False, written=counter.add)
    assert counter.value == 0, f"{counter.value} bytes counted as written, none were"
