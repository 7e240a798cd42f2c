"""A harness for driving a real daemon by hand: a ``python -m ckptd serve`` process, raw ZeroMQ DEALER
sockets, staging slabs made the way a client makes them (sealed memfds), and hand-built stage requests.

Shared by the daemon's robustness tests, the fault-point walk and the fuzz tests. Every receive polls with a
timeout, so a daemon that hangs fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import mmap
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch
import xxhash
import zmq

from ckptd import format as fmt
from ckptd import protocol as proto
from ckptd.protocol import CommitInfo, ComponentSpec, FileSpec, MsgType, StageRequest

REPLY_TIMEOUT_S = 5.0
COMMIT_TIMEOUT_S = 10.0
START_TIMEOUT_S = 15.0

Message = tuple[MsgType, int, dict[str, Any]]


# ------------------------------------------------------------------------------------------ helpers


class Peer:
    """One DEALER socket talking to the daemon, with a mailbox for messages not consumed yet."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)
        self.inbox: list[Message] = []

    def close(self) -> None:
        self.sock.close(linger=0)

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def _recv(self, timeout_s: float) -> Message | None:
        if not self.sock.poll(max(1, int(timeout_s * 1000)), zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart(zmq.NOBLOCK)
        assert len(frames) == 1, f"daemon sent {len(frames)} frames in one message"
        return proto.unpack(frames[0])  # the daemon's own output must follow the protocol too

    def wait(self, pred: Callable[[Message], bool], what: str, timeout_s: float = REPLY_TIMEOUT_S) -> Message:
        for i, m in enumerate(self.inbox):
            if pred(m):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout_s} s; unconsumed: {self.inbox}")
            m = self._recv(remaining)
            if m is None:
                continue
            if pred(m):
                return m
            self.inbox.append(m)

    def request(self, msg_type: MsgType, timeout_s: float = REPLY_TIMEOUT_S, **body: Any) -> Message:
        req_id = next(self.ids)
        self.sock.send(proto.pack(msg_type, req_id, **body))
        return self.wait(lambda m: m[1] == req_id, f"reply to {msg_type.value} #{req_id}", timeout_s)

    def stage(self, req: StageRequest, timeout_s: float = REPLY_TIMEOUT_S) -> Message:
        req_id = next(self.ids)
        self.sock.send(proto.pack_stage(req, req_id))
        return self.wait(lambda m: m[1] == req_id, f"reply to stage #{req_id}", timeout_s)

    def stage_body(self, body: dict[str, Any], timeout_s: float = REPLY_TIMEOUT_S) -> Message:
        """A stage whose body is given raw (to send what StageRequest cannot express)."""
        req_id = next(self.ids)
        self.sock.send(msgpack.packb({"v": 1, "type": "stage", "id": req_id, **body}, use_bin_type=True))
        return self.wait(lambda m: m[1] == req_id, f"reply to stage #{req_id}", timeout_s)

    def notice(self, msg_type: MsgType, txn: str, timeout_s: float = COMMIT_TIMEOUT_S) -> dict[str, Any]:
        m = self.wait(
            lambda m: m[0] == msg_type and m[1] == 0 and m[2].get("txn") == txn,
            f"{msg_type.value} notification for txn {txn}",
            timeout_s,
        )
        return m[2]

    def hello(self) -> None:
        t, _, body = self.request(MsgType.HELLO, pid=os.getpid(), version=proto.PROTOCOL_VERSION)
        assert t == MsgType.WELCOME, body
        assert isinstance(body["pid"], int)


class Shm:
    """A real staging slab, created and mapped the way a client's is: a memfd sealed against shrinking."""

    def __init__(self, size: int, sealed: bool = True) -> None:
        self.name = f"{proto.SEGMENT_PREFIX}test-{secrets.token_hex(4)}"
        self.size = size
        self.fd = os.memfd_create(self.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        if sealed:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.ino = os.fstat(self.fd).st_ino
        self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.next_offset = 0

    def put(self, data: bytes, align: int = 4096) -> int:
        """Copy ``data`` to the next free aligned offset; returns that offset."""
        off = self.next_offset
        assert off + len(data) <= self.size, "test segment too small"
        self.mm[off : off + len(data)] = data
        self.next_offset = (off + len(data) + align - 1) // align * align
        return off

    def close(self) -> None:
        self.mm.close()
        try:
            os.close(self.fd)
        except OSError:
            pass


def st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """A complete safetensors file: header from ckptd.format, then the tensors back to back in order."""
    items = [(name, fmt.safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    layout = fmt.build_safetensors_layout(items, {"origin": "test_server"})
    data = b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors.values())
    assert len(layout.header) + len(data) == layout.file_size
    return layout.header + data


def xxh3(data: bytes) -> str:
    return f"{fmt.CHECKSUM_ALGO}:{xxhash.xxh3_128_hexdigest(data)}"


def new_txn() -> str:
    return secrets.token_hex(8)


def global_file(shm: Shm, key: str, data: bytes) -> FileSpec:
    return FileSpec(path=fmt.component_filename(key, "global"), offset=shm.put(data), length=len(data), component=key)


def rank_file(shm: Shm, key: str, rank: int, data: bytes) -> FileSpec:
    return FileSpec(
        path=fmt.component_filename(key, "per_rank", rank=rank),
        offset=shm.put(data),
        length=len(data),
        component=key,
        rank=rank,
    )


def commit_info(*components: ComponentSpec, metadata: dict[str, Any] | None = None) -> CommitInfo:
    return CommitInfo(
        components=list(components),
        topology={"world_size": 1},
        metadata=metadata or {},
        pytorch_version=torch.__version__,
        save_total_limit=None,
    )


def stage_req(
    shm: Shm,
    output_dir: Path | str,
    step: int,
    files: list[FileSpec],
    *,
    txn: str | None = None,
    rank: int = 0,
    expected: list[int] | None = None,
    timeout_s: float = 10.0,
    commit: CommitInfo | None = None,
    segment_fd: int | None = None,
    segment_ino: int | None = None,
    segment_size: int | None = None,
    segment: str | None = None,
    deadline: float | None = None,
    job: str | None = None,
) -> StageRequest:
    expected = expected or [0]
    return StageRequest(
        txn=txn or new_txn(),
        output_dir=str(output_dir),
        step=step,
        rank=rank,
        world_size=max(expected) + 1,
        expected_ranks=expected,
        timeout_s=timeout_s,
        pid=os.getpid(),
        segment=segment or shm.name,
        segment_fd=shm.fd if segment_fd is None else segment_fd,
        segment_ino=shm.ino if segment_ino is None else segment_ino,
        segment_size=shm.size if segment_size is None else segment_size,
        files=files,
        commit=commit,
        job=job,
        deadline=deadline,
    )


def global_save(
    peer: Peer, shm: Shm, output_dir: Path, step: int, tensors: dict[str, torch.Tensor], key: str = "weights"
) -> tuple[Path, bytes]:
    """One single-rank save of one GLOBAL component; returns (committed path, file bytes)."""
    data = st_bytes(tensors)
    spec = global_file(shm, key, data)
    req = stage_req(shm, output_dir, step, [spec], commit=commit_info(ComponentSpec(key, "global", [0])))
    t, _, body = peer.stage(req)
    assert t == MsgType.ACCEPTED, body
    done = peer.wait(
        lambda m: m[2].get("txn") == req.txn and m[0] in (MsgType.COMMITTED, MsgType.ABORTED),
        f"outcome of txn {req.txn}",
        COMMIT_TIMEOUT_S,
    )
    assert done[0] == MsgType.COMMITTED, done
    path = Path(done[2]["path"])
    assert path == output_dir / "checkpoints" / f"checkpoint-{step}"
    return path, data


@contextlib.contextmanager
def running_daemon(name: str) -> Iterator[str]:
    """A ``python -m ckptd serve`` on a fresh private IPC endpoint, answering before this yields it; stopped
    (SIGTERM, then SIGKILL) and its socket files removed after."""
    from ckptd.cli import request_status

    proto.ensure_private_dir(proto.runtime_dir())
    endpoint = f"ipc://{proto.runtime_dir()}/{name}-{secrets.token_hex(4)}.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while request_status(endpoint, 0.5) is None:
            assert proc.poll() is None, f"ckptd serve exited with {proc.returncode}"
            assert time.monotonic() < deadline, "ckptd serve did not answer within 30 s"
        yield endpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        path = proto.ipc_path(endpoint)
        for suffix in ("", ".lock"):
            Path(path + suffix).unlink(missing_ok=True)


def outcome(peer: Peer, txn: str, timeout_s: float = COMMIT_TIMEOUT_S) -> tuple[MsgType, dict[str, Any]]:
    """The transaction's outcome as ``peer`` hears it: (COMMITTED or ABORTED, the notification's body)."""
    m = peer.wait(
        lambda m: m[2].get("txn") == txn and m[0] in (MsgType.COMMITTED, MsgType.ABORTED),
        f"outcome of {txn}",
        timeout_s,
    )
    return m[0], m[2]


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def entries(path: Path) -> set[str]:
    return set(os.listdir(path)) if path.exists() else set()


def no_temp_or_trash(output_dir: Path) -> bool:
    return not any(n.startswith((".tmp-", ".trash-")) for n in entries(output_dir / "checkpoints"))


# ------------------------------------------------------------------------------------------ fixtures


@dataclass
class Daemon:
    proc: subprocess.Popen
    endpoint: str
    log: Path
    cwd: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Harness:
    endpoint: str
    tmp: Path
    ctx: zmq.Context
    daemons: list[Daemon] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)
    segments: list[Shm] = field(default_factory=list)

    def start(
        self,
        *extra: str,
        preexec_fn: Callable[[], None] | None = None,
        wait_ready: bool = True,
        endpoint: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Daemon:
        n = len(self.daemons)
        cwd = self.tmp / f"daemon-cwd-{n}"
        cwd.mkdir()
        log = self.tmp / f"daemon-{n}.log"
        ep = endpoint or self.endpoint
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ckptd", "serve", "--endpoint", ep, *extra],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                preexec_fn=preexec_fn,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        d = Daemon(proc, ep, log, cwd)
        self.daemons.append(d)
        if wait_ready:
            self.wait_ready(d)
        return d

    def wait_ready(self, d: Daemon) -> None:
        """Ready once a hello gets its welcome (the DEALER reconnects until the daemon binds)."""
        peer = self.peer(d.endpoint)
        req_id = next(peer.ids)
        peer.sock.send(proto.pack(MsgType.HELLO, req_id, pid=os.getpid(), version=proto.PROTOCOL_VERSION))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if d.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {d.proc.returncode} while starting:\n{d.log_text()}")
            m = peer._recv(0.1)
            if m is not None:
                assert m[0] == MsgType.WELCOME and m[1] == req_id, m
                # Say goodbye so this pid does not count as an attached client (idle exit).
                t, _, _ = peer.request(MsgType.BYE, pid=os.getpid())
                assert t == MsgType.BYE_OK
                self.peers.remove(peer)
                peer.close()
                return
        raise AssertionError(f"daemon did not answer hello within {START_TIMEOUT_S} s:\n{d.log_text()}")

    def peer(self, endpoint: str | None = None) -> Peer:
        p = Peer(self.ctx, endpoint or self.endpoint)
        self.peers.append(p)
        return p

    def shm(self, size: int = 1 << 20, sealed: bool = True) -> Shm:
        s = Shm(size, sealed)
        self.segments.append(s)
        return s

    def close(self) -> None:
        for p in self.peers:
            p.close()
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.terminate()
                try:
                    d.proc.wait(5)
                except subprocess.TimeoutExpired:
                    d.proc.kill()
                    d.proc.wait(5)
        for s in self.segments:
            s.close()
        self.ctx.term()


def assert_alive_and_committing(harness: Harness, daemon: Daemon, output_dir: Path, step: int) -> None:
    assert daemon.proc.poll() is None, f"daemon died:\n{daemon.log_text()}"
    peer = harness.peer()
    peer.hello()
    shm = harness.shm(64 * 1024)
    path, data = global_save(peer, shm, output_dir, step, {"w": torch.arange(8, dtype=torch.float32)})
    assert (path / "weights_state.safetensors").read_bytes() == data
    assert fmt.verify_checkpoint(path)
