"""Simulated nodes on one machine: one torchrun launch per node, each with its own CKPTD_NODE_ID and
CKPTD_ENDPOINT, and CKPTD_PEER_HOST=127.0.0.1 (DESIGN §5)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd import protocol as proto

WORKER = Path(__file__).with_name("node_worker.py")
LAUNCH_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_endpoint(node: int) -> str:
    proto.ensure_private_dir(proto.runtime_dir())
    return f"ipc://{proto.runtime_dir()}/mn-{secrets.token_hex(3)}-n{node}.sock"


def start_standalone_daemon(endpoint: str, log: Path, *flags: str) -> subprocess.Popen:
    """``ckptd serve`` as a cluster would start it on a node (not the embedded one); waits until it answers."""
    import time

    import zmq

    cmd = [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, "--nice", "0", *flags]
    env = {k: v for k, v in os.environ.items() if k != "CKPTD_PEER_HOST"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, start_new_session=True)
    ctx = zmq.Context()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            sock.send(proto.pack(proto.MsgType.HELLO, 1, pid=os.getpid(), version=proto.PROTOCOL_VERSION))
            answered = sock.poll(500)
            sock.close()
            if answered:
                return proc
            if proc.poll() is not None:
                raise AssertionError(f"ckptd serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        raise AssertionError(f"ckptd serve did not answer at {endpoint}: {log.read_text()[-2000:]}")
    finally:
        ctx.term()


@dataclass
class Job:
    results: dict[int, dict[str, Any]]
    outputs: list[str]
    endpoints: list[str]


def run_job(
    mode: str,
    out: Path,
    results: Path,
    nnodes: int = 2,
    nproc: int = 2,
    endpoints: list[str] | None = None,
    node_env: dict[int, dict[str, str]] | None = None,
    script: Path = WORKER,
    peer_host_env: bool = True,
) -> Job:
    """Launch ``nnodes`` torchruns of ``nproc`` ranks each and wait for all; fails with their output."""
    port = free_port()
    endpoints = endpoints or [node_endpoint(n) for n in range(nnodes)]
    procs = []
    for n in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={n}"]
        cmd += [f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}"]
        cmd += [str(script), mode, str(out), str(results)]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "CKPTD_NODE_ID": f"sim-node-{n}",
            proto.ENDPOINT_ENV: endpoints[n],
            **(node_env or {}).get(n, {}),
        }
        env.pop("CKPTD_PEER_HOST", None)
        if peer_host_env:
            env["CKPTD_PEER_HOST"] = "127.0.0.1"
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        )
    outputs = []
    failed = []
    for n, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            output, _ = proc.communicate()
            failed.append(f"node {n} hung for more than {LAUNCH_TIMEOUT_S} s")
        outputs.append(output)
        if proc.returncode != 0:
            failed.append(f"node {n} exited with {proc.returncode}")
    if failed:
        text = "\n".join(f"===== node {n} =====\n{o[-6000:]}" for n, o in enumerate(outputs))
        raise AssertionError(f"{mode}: {'; '.join(failed)}\n{text}")
    found = {}
    for r in range(nnodes * nproc):
        path = results / f"{mode}_rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result; output:\n" + "\n".join(outputs)
        found[r] = json.loads(path.read_text())
    return Job(found, outputs, endpoints)
