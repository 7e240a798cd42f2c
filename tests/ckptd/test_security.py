"""CURVE authentication: key files, and a real asyncio ROUTER on 127.0.0.1 against real DEALERs and raw TCP.

The server runs the way the daemon does (a ``zmq.asyncio.Context`` inside ``asyncio.run``); each client runs
in a worker thread with a plain ``zmq.Context``, the way a rank does, so a blocking client can never starve
the ZAP handler that shares the server's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio
import zmq.auth

from ckptd import security as sec
from ckptd.security import AuthorizedKey, Keys, SecurityError

REFUSAL_WAIT_S = 1.0
REPLY_TIMEOUT_MS = 5000


@dataclass
class EchoServer:
    """A CURVE ROUTER that records every message reaching ``recv`` and answers it with msgpack."""

    port: int
    ctx: zmq.asyncio.Context
    sock: zmq.asyncio.Socket
    security: sec.ServerSecurity
    received: list[object] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def serve(self) -> None:
        while True:
            identity, payload = await self.sock.recv_multipart()
            msg = msgpack.unpackb(payload)
            self.received.append(msg)
            await self.sock.send_multipart([identity, msgpack.packb({"echo": msg})])


@contextlib.asynccontextmanager
async def curve_server(keys: Keys) -> AsyncIterator[EchoServer]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    security = sec.secure_server_socket(ctx, sock, keys)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    server = EchoServer(port=port, ctx=ctx, sock=sock, security=security)
    server.task = asyncio.create_task(server.serve())
    try:
        yield server
    finally:
        assert not server.task.done(), "the server loop died"
        server.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server.task
        # The daemon's shutdown order: close the secured socket, stop security, then terminate the context.
        sock.close(linger=0)
        security.stop()
        ctx.term()


def client_round_trip(endpoint: str, keys: Keys | None, messages: list[object], **kw: object) -> list[object]:
    """Send each message from a fresh DEALER (CURVE when ``keys``) and return the replies."""
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        if keys is not None:
            sec.secure_client_socket(dealer, keys, **kw)  # type: ignore[arg-type]
        dealer.connect(endpoint)
        replies = []
        for msg in messages:
            dealer.send(msgpack.packb(msg))
            if not dealer.poll(REPLY_TIMEOUT_MS):
                raise AssertionError(f"no reply to {msg!r} within {REPLY_TIMEOUT_MS} ms")
            replies.append(msgpack.unpackb(dealer.recv()))
        return replies
    finally:
        ctx.destroy(linger=0)


def client_is_refused(endpoint: str, configure: Callable[[zmq.Socket], None], wait_s: float = REFUSAL_WAIT_S) -> bool:
    """True when a DEALER configured by ``configure`` gets no reply within ``wait_s`` (it keeps retrying)."""
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        configure(dealer)
        dealer.connect(endpoint)
        dealer.send(msgpack.packb({"type": "stage", "files": [], "step": 10**12, "save_total_limit": 1}))
        return not dealer.poll(int(wait_s * 1000))
    finally:
        ctx.destroy(linger=0)


def random_pair_keys(server_public: bytes) -> Keys:
    """Keys with a fresh client pair nobody authorized, trusting ``server_public``."""
    public, secret = zmq.curve_keypair()
    return Keys(server_public=server_public, client_public=public, client_secret=secret)


def security_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == sec.__name__ and r.levelno == logging.WARNING]


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    sec.generate_keys(directory)
    return directory


# ------------------------------------------------------------------------------------------ key files


def test_generate_keys_writes_the_documented_layout_and_modes(tmp_path: Path) -> None:
    paths = sec.generate_keys(tmp_path / "keys")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(paths.directory) == 0o700
    assert mode(paths.authorized) == 0o700
    assert mode(paths.server_secret) == 0o600
    assert mode(paths.client_secret) == 0o600
    assert mode(paths.server_public) == 0o644
    assert mode(paths.client_public) == 0o644
    assert sorted(os.listdir(paths.directory)) == [
        "authorized",
        "client.key",
        "client.key_secret",
        "server.key",
        "server.key_secret",
    ]
    assert os.listdir(paths.authorized) == ["client.key"]
    # pyzmq reads the files back as ordinary certificates.
    server_public, server_secret = zmq.auth.load_certificate(paths.server_secret)
    client_public, _ = zmq.auth.load_certificate(paths.client_secret)
    assert zmq.curve_public(server_secret) == server_public
    assert zmq.auth.load_certificate(paths.authorized / "client.key")[0] == client_public


def test_generate_keys_refuses_to_overwrite_keys(key_dir: Path) -> None:
    before = sec.load_keys(key_dir)
    with pytest.raises(SecurityError, match="refusing to overwrite"):
        sec.generate_keys(key_dir)
    assert sec.load_keys(key_dir) == before


def test_generate_keys_force_replaces_keys_and_restores_private_modes(key_dir: Path) -> None:
    before = sec.load_keys(key_dir)
    extra_public, _ = zmq.curve_keypair()
    (key_dir / "authorized" / "peer.key").write_text(f'curve\n    public-key = "{extra_public.decode()}"\n')
    os.chmod(key_dir / "server.key_secret", 0o644)  # a mode the overwrite must not inherit
    sec.generate_keys(key_dir, force=True)
    after = sec.load_keys(key_dir)
    assert after.server_public != before.server_public
    assert after.client_public != before.client_public
    assert stat.S_IMODE(os.stat(key_dir / "server.key_secret").st_mode) == 0o600
    assert {k.name for k in after.authorized} == {"client", "peer"}  # dropped-in keys survive
    assert [p for p in os.listdir(key_dir) if p.startswith(".keygen-")] == []


def test_generate_keys_refuses_a_group_writable_directory(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(SecurityError, match="writable by group/other"):
        sec.generate_keys(directory)


def test_load_keys_reads_what_generate_keys_wrote(key_dir: Path) -> None:
    keys = sec.load_keys(key_dir)
    assert keys.server_public == zmq.auth.load_certificate(key_dir / "server.key")[0]
    assert keys.client_secret == zmq.auth.load_certificate(key_dir / "client.key_secret")[1]
    assert keys.authorized == (AuthorizedKey("client", keys.client_public),)
    assert keys.can_serve and keys.can_connect and keys.directory == key_dir
    assert keys.server_secret.decode() not in repr(keys)  # secrets stay out of logs and tracebacks


def test_load_keys_takes_the_argument_then_the_environment(
    key_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(sec.KEYS_ENV, raising=False)
    with pytest.raises(SecurityError, match="no CURVE key directory given.*CKPTD_KEYS"):
        sec.load_keys()
    monkeypatch.setenv(sec.KEYS_ENV, str(key_dir))
    assert sec.load_keys().directory == key_dir
    other = tmp_path / "other"
    sec.generate_keys(other)
    assert sec.load_keys(other).directory == other


def test_load_keys_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match=r"does not exist; create it with 'ckptd keygen"):
        sec.load_keys(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("server.key", r"public key file .*server\.key is missing"),
        ("client.key_secret", r"client\.key_secret is missing but .*client\.key exists"),
        ("client.key", r"client\.key is missing but .*client\.key_secret exists"),
    ],
)
def test_load_keys_missing_file(key_dir: Path, remove: str, message: str) -> None:
    os.unlink(key_dir / remove)
    with pytest.raises(SecurityError, match=message):
        sec.load_keys(key_dir)


def test_load_keys_partial_directories_load_and_say_what_they_lack(key_dir: Path) -> None:
    # A rank's copy needs no server secret; a daemon-only copy needs no client pair.
    os.unlink(key_dir / "server.key_secret")
    rank_keys = sec.load_keys(key_dir)
    assert rank_keys.can_connect and not rank_keys.can_serve
    os.unlink(key_dir / "client.key")
    os.unlink(key_dir / "client.key_secret")
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        with pytest.raises(SecurityError, match="has no client key pair"):
            sec.secure_client_socket(dealer, sec.load_keys(key_dir))
    finally:
        dealer.close(linger=0)
        ctx.destroy(linger=0)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
@pytest.mark.parametrize("name", ["server.key_secret", "client.key_secret"])
def test_load_keys_refuses_a_secret_readable_by_others(key_dir: Path, name: str, mode: int) -> None:
    os.chmod(key_dir / name, mode)
    with pytest.raises(SecurityError, match=rf"{name} is readable by group/other.*chmod 600"):
        sec.load_keys(key_dir)


@pytest.mark.parametrize("target", ["", "authorized", "server.key", "authorized/client.key"])
def test_load_keys_refuses_anything_others_can_write(key_dir: Path, target: str) -> None:
    path = key_dir / target
    os.chmod(path, os.stat(path).st_mode | 0o020)
    with pytest.raises(SecurityError, match="writable by group/other"):
        sec.load_keys(key_dir)


GOOD_PUBLIC = b"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "has no public-key line"),
        (b"\x00\xff garbage \x80" * 20, "has no public-key line"),
        (b'curve\n    public-key = "hello"\n', "is not a CURVE key"),
        (b'curve\n    public-key = "' + b"~" * 40 + b'"\n', "is not a CURVE key"),
        (b'curve\n    public-key = "' + b"\xc3\xa9" * 20 + b'"\n', "is not a CURVE key"),
        (b'curve\n    public-key = "' + b"%" * 40 + b'"\n', "is not a CURVE key"),  # z85 value overflows 32 bits
        (b'curve\n    public-key = "' + GOOD_PUBLIC + b'x"\n', "is not a CURVE key"),
    ],
)
def test_load_keys_refuses_garbage_public_keys(key_dir: Path, text: bytes, message: str) -> None:
    (key_dir / "server.key").write_bytes(text)
    with pytest.raises(SecurityError, match=message):
        sec.load_keys(key_dir)


def test_load_keys_refuses_a_secret_that_does_not_match_its_public_key(key_dir: Path) -> None:
    other_public, other_secret = zmq.curve_keypair()
    keys = sec.load_keys(key_dir)
    path = key_dir / "client.key_secret"
    path.write_text(
        f'curve\n    public-key = "{keys.client_public.decode()}"\n    secret-key = "{other_secret.decode()}"\n'
    )
    with pytest.raises(SecurityError, match="does not belong to its public-key"):
        sec.load_keys(key_dir)
    # A consistent pair from another generation: the secret file no longer matches client.key.
    path.write_text(f'curve\n    public-key = "{other_public.decode()}"\n    secret-key = "{other_secret.decode()}"\n')
    with pytest.raises(SecurityError, match="belongs to a different key pair"):
        sec.load_keys(key_dir)


def test_load_keys_refuses_a_fifo_or_huge_file_without_hanging(key_dir: Path) -> None:
    os.unlink(key_dir / "server.key")
    os.mkfifo(key_dir / "server.key")
    with pytest.raises(SecurityError, match="not a regular file"):
        sec.load_keys(key_dir)
    os.unlink(key_dir / "server.key")
    (key_dir / "server.key").write_bytes(b"#" * (sec.MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(SecurityError, match="is not one"):
        sec.load_keys(key_dir)


def test_require_keys_for_network_endpoints(key_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SecurityError) as err:
        sec.require_keys_for("tcp://0.0.0.0:5555", None)
    assert str(err.value).startswith(
        "tcp:// endpoints need CURVE keys: run 'ckptd keygen DIR' and pass --keys DIR or set CKPTD_KEYS"
    )
    sec.require_keys_for("ipc:///tmp/ckptd-1000/ckptd.sock", None)
    sec.require_keys_for("tcp://0.0.0.0:5555", sec.load_keys(key_dir))
    monkeypatch.delenv(sec.KEYS_ENV, raising=False)
    with pytest.raises(SecurityError, match="tcp:// endpoints need CURVE keys"):
        sec.keys_for_endpoint("tcp://127.0.0.1:5555")
    assert sec.keys_for_endpoint("ipc:///tmp/x.sock", key_dir) is None  # IPC never speaks CURVE
    monkeypatch.setenv(sec.KEYS_ENV, str(key_dir))
    assert sec.keys_for_endpoint("tcp://127.0.0.1:5555") == sec.load_keys(key_dir)


# -------------------------------------------------------------------------------------------- sockets


def test_authenticated_client_round_trips_msgpack(key_dir: Path) -> None:
    keys = sec.load_keys(key_dir)
    messages = [{"v": 1, "type": "hello", "id": i, "pid": os.getpid(), "blob": os.urandom(i * 97)} for i in range(20)]

    async def main() -> None:
        async with curve_server(keys) as server:
            replies = await asyncio.to_thread(client_round_trip, server.endpoint, keys, messages)
            assert replies == [{"echo": m} for m in messages]
            assert server.received == messages
            assert server.security.rejections == 0

    asyncio.run(main())


def _no_keys(sock: zmq.Socket) -> None:
    pass


def _wrong_pair(keys: Keys) -> Callable[[zmq.Socket], None]:
    # A complete key set of its own: it does not know this server's public key.
    return lambda sock: sec.secure_client_socket(sock, sec.ephemeral_keys())


def _unauthorized_client_key(keys: Keys) -> Callable[[zmq.Socket], None]:
    return lambda sock: sec.secure_client_socket(sock, random_pair_keys(keys.server_public))


@pytest.mark.parametrize(
    ("make_client", "logged"),
    [
        # Whichever side notices the mismatch first decides which of the two libzmq reports.
        (lambda keys: _no_keys, "security mechanism mismatch|hung up mid-handshake .as a client without CURVE keys"),
        (_wrong_pair, "CURVE cryptographic handshake failed"),
        (_unauthorized_client_key, r"refused peer 127\.0\.0\.1: client public key .* is not in authorized/"),
    ],
    ids=["no-keys", "wrong-key-pair", "right-server-key-unauthorized-client-key"],
)
def test_unauthenticated_clients_are_refused_logged_and_the_server_keeps_serving(
    key_dir: Path, caplog: pytest.LogCaptureFixture, make_client: Callable, logged: str
) -> None:
    keys = sec.load_keys(key_dir)
    caplog.set_level(logging.INFO, logger=sec.__name__)

    async def main() -> None:
        async with curve_server(keys) as server:
            refused = await asyncio.to_thread(client_is_refused, server.endpoint, make_client(keys))
            assert refused, "the unauthenticated client got a reply"
            assert server.received == [], "an unauthenticated message reached recv"
            assert server.security.rejections >= 1
            warnings = security_warnings(caplog)
            assert any(re.search(logged, w) for w in warnings), warnings
            assert all("messages are dropped" in w for w in warnings)
            # The good client is still served, after the bad one and while it may still be retrying.
            replies = await asyncio.to_thread(client_round_trip, server.endpoint, keys, [{"after": True}])
            assert replies == [{"echo": {"after": True}}]
            assert server.received == [{"after": True}]

    asyncio.run(main())


def test_a_retrying_refused_client_is_logged_once_not_per_attempt(
    key_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = sec.load_keys(key_dir)
    caplog.set_level(logging.WARNING, logger=sec.__name__)

    async def main() -> None:
        async with curve_server(keys) as server:
            # libzmq reconnects every 100 ms, so ~15 refused handshakes in this window.
            await asyncio.to_thread(client_is_refused, server.endpoint, _wrong_pair(keys), 1.5)
            assert server.security.rejections >= 5
            warnings = security_warnings(caplog)
            # One line for the repeated reason; the client's last attempt, cut short as it closes, may add
            # one "hung up mid-handshake" line.
            assert len([w for w in warnings if "cryptographic" in w]) == 1, warnings
            assert len(warnings) <= 2, warnings

    asyncio.run(main())


def test_client_side_monitor_reports_why_it_was_refused(key_dir: Path) -> None:
    """What the rank's transport can show its user instead of a timeout (see handshake_failure_reason)."""
    keys = sec.load_keys(key_dir)

    def refused_reason(endpoint: str) -> str:
        ctx = zmq.Context()
        try:
            dealer = ctx.socket(zmq.DEALER)
            dealer.linger = 0
            sec.secure_client_socket(dealer, random_pair_keys(keys.server_public))
            monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            dealer.connect(endpoint)
            assert monitor.poll(REPLY_TIMEOUT_MS), "no handshake failure reported to the client"
            event = zmq.utils.monitor.recv_monitor_message(monitor)
            return sec.handshake_failure_reason(int(event["event"]), int(event["value"]))
        finally:
            ctx.destroy(linger=0)

    async def main() -> None:
        async with curve_server(keys) as server:
            reason = await asyncio.to_thread(refused_reason, server.endpoint)
            assert reason.startswith("CURVE key not authorized (ZAP status 400)")

    asyncio.run(main())


def test_keys_dropped_into_authorized_are_accepted_and_removed_ones_refused(key_dir: Path, tmp_path: Path) -> None:
    keys = sec.load_keys(key_dir)
    extra_dir = tmp_path / "extra"
    extra_dir.mkdir(mode=0o700)
    extra_public_file, _ = zmq.auth.create_certificates(extra_dir, "trainer-b")
    extra_public, extra_secret = zmq.auth.load_certificate(extra_dir / "trainer-b.key_secret")
    extra = Keys(server_public=keys.server_public, client_public=extra_public, client_secret=extra_secret)

    async def main() -> None:
        async with curve_server(keys) as server:
            assert await asyncio.to_thread(client_is_refused, server.endpoint, _configure(extra))
            shutil.copyfile(extra_public_file, key_dir / "authorized" / "trainer-b.key")
            replies = await asyncio.to_thread(client_round_trip, server.endpoint, extra, ["hi"])
            assert replies == [{"echo": "hi"}]
            os.unlink(key_dir / "authorized" / "trainer-b.key")
            assert await asyncio.to_thread(client_is_refused, server.endpoint, _configure(extra))
            # With authorized/ gone altogether, every new peer is refused (never: the old set stays valid).
            shutil.rmtree(key_dir / "authorized")
            assert await asyncio.to_thread(client_is_refused, server.endpoint, _configure(keys))
            assert server.received == ["hi"]

    asyncio.run(main())


def _configure(keys: Keys) -> Callable[[zmq.Socket], None]:
    return lambda sock: sec.secure_client_socket(sock, keys)


def test_a_stopped_authenticator_refuses_everyone_rather_than_admitting_everyone(key_dir: Path) -> None:
    keys = sec.load_keys(key_dir)

    async def main() -> None:
        async with curve_server(keys) as server:
            server.security.stop()  # the wrong order: the socket is still open and bound
            assert await asyncio.to_thread(client_is_refused, server.endpoint, _configure(keys))
            assert server.received == []

    asyncio.run(main())


def test_raw_tcp_garbage_never_reaches_recv_nor_breaks_the_server(key_dir: Path) -> None:
    keys = sec.load_keys(key_dir)
    rng = random.Random(20240611)
    # A valid ZMTP 3.0 greeting (signature, version, mechanism, as-server, filler) so that part of the
    # garbage gets past the greeting into the CURVE / NULL command parsers.
    greeting = lambda mech: b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + mech.ljust(20, b"\x00") + b"\x00" * 32  # noqa: E731

    def frames() -> list[bytes]:
        out = []
        for i in range(1000):
            body = rng.randbytes(rng.choice([1, 2, 10, 64, 300, 4096]))
            kind = i % 4
            if kind == 1:
                body = greeting(b"CURVE") + body
            elif kind == 2:
                body = greeting(b"NULL") + b"\x04" + bytes([len(body) % 256]) + b"\x05READY" + body
            elif kind == 3:
                body = greeting(b"CURVE") + b"\x04\x00\x00\x00\x00\x00\x00\x00\xc8\x05HELLO" + body
            out.append(body)
        return out

    def fuzz(port: int) -> int:
        sent = 0
        conn: socket.socket | None = None
        for frame in frames():
            for _attempt in range(2):
                try:
                    if conn is None:
                        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                    conn.sendall(frame)
                    sent += 1
                    break
                except OSError:  # the server dropped us: reconnect and go on
                    if conn is not None:
                        conn.close()
                    conn = None
            if rng.random() < 0.2 and conn is not None:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()
        return sent

    async def main() -> None:
        async with curve_server(keys) as server:
            sent = await asyncio.to_thread(fuzz, server.port)
            assert sent >= 900
            await asyncio.sleep(REFUSAL_WAIT_S)
            assert server.received == []
            assert server.security.rejections > 0
            replies = await asyncio.to_thread(client_round_trip, server.endpoint, keys, [{"still": "alive"}])
            assert replies == [{"echo": {"still": "alive"}}]

    asyncio.run(main())


def test_a_daemon_is_also_a_curve_client_of_a_peer_daemon_on_the_same_context(key_dir: Path) -> None:
    """Leader/follower: one key directory, a DEALER on the context whose ZAP handler guards its ROUTER."""
    follower_keys = sec.load_keys(key_dir)
    leader_keys = sec.ephemeral_keys()  # e.g. handed over through the job's collective
    leader_keys = replace(leader_keys, authorized=(AuthorizedKey("follower", follower_keys.client_public),))

    async def main() -> None:
        async with curve_server(leader_keys) as leader, curve_server(follower_keys) as follower:
            peer = follower.ctx.socket(zmq.DEALER)
            peer.linger = 0
            sec.secure_client_socket(peer, follower_keys, server_key=leader_keys.server_public)
            peer.connect(leader.endpoint)
            await peer.send(msgpack.packb({"type": "prepared", "node": 1}))
            assert await peer.poll(REPLY_TIMEOUT_MS)
            assert msgpack.unpackb(await peer.recv()) == {"echo": {"type": "prepared", "node": 1}}
            peer.close(linger=0)
            # The follower's own ROUTER still authenticates its ranks.
            replies = await asyncio.to_thread(client_round_trip, follower.endpoint, follower_keys, [1])
            assert replies == [{"echo": 1}]

    asyncio.run(main())


def test_two_server_sockets_on_one_context_share_one_handler(key_dir: Path) -> None:
    keys = sec.load_keys(key_dir)

    async def main() -> None:
        async with curve_server(keys) as server:
            second = server.ctx.socket(zmq.ROUTER)
            second.linger = 0
            try:
                with pytest.raises(SecurityError, match="add_socket"):
                    sec.secure_server_socket(server.ctx, second, keys)
                server.security.add_socket(second)
                port = second.bind_to_random_port("tcp://127.0.0.1")
                endpoint = f"tcp://127.0.0.1:{port}"
                assert await asyncio.to_thread(client_is_refused, endpoint, _no_keys)
                received = asyncio.ensure_future(second.recv_multipart())
                await asyncio.to_thread(_send_one, endpoint, keys, "second")
                _identity, payload = await asyncio.wait_for(received, 5)
                assert msgpack.unpackb(payload) == "second"
            finally:
                second.close(linger=0)

    asyncio.run(main())


def _send_one(endpoint: str, keys: Keys, msg: object) -> None:
    """Send one message and leave; linger lets the handshake and the send finish before the context goes."""
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        sec.secure_client_socket(dealer, keys)
        dealer.connect(endpoint)
        dealer.send(msgpack.packb(msg))
        dealer.close(linger=5000)
    finally:
        ctx.term()


def test_misuse_is_refused_with_clear_errors(key_dir: Path) -> None:
    keys = sec.load_keys(key_dir)
    ctx = zmq.Context()
    made: list[zmq.Socket] = []

    def new_socket(kind: int) -> zmq.Socket:
        made.append(ctx.socket(kind))  # kept: a temporary collected unclosed is a ResourceWarning
        return made[-1]

    try:
        sock = new_socket(zmq.ROUTER)
        with pytest.raises(SecurityError, match="needs a running asyncio loop"):
            sec.secure_server_socket(ctx, sock, keys)
        dealer = new_socket(zmq.DEALER)
        dealer.connect("tcp://127.0.0.1:9")
        with pytest.raises(SecurityError, match="already bound or connected.*before connect"):
            sec.secure_client_socket(dealer, keys)
        with pytest.raises(SecurityError, match="not a CURVE public key"):
            sec.secure_client_socket(new_socket(zmq.DEALER), keys, server_key=b"short")

        async def main() -> None:
            bound = new_socket(zmq.ROUTER)
            bound.bind("tcp://127.0.0.1:*")
            with pytest.raises(SecurityError, match="already bound or connected.*before bind"):
                sec.secure_server_socket(ctx, bound, keys)
            with pytest.raises(SecurityError, match="has no server.key_secret"):
                sec.secure_server_socket(ctx, new_socket(zmq.ROUTER), replace(keys, server_secret=None))
            with pytest.raises(SecurityError, match="authorizes no client key"):
                sec.secure_server_socket(ctx, new_socket(zmq.ROUTER), replace(keys, authorized=()))
            # A failed attempt leaves no handler behind: securing a fresh socket still works.
            fresh = new_socket(zmq.ROUTER)
            security = sec.secure_server_socket(ctx, fresh, keys)
            fresh.close(linger=0)
            security.stop()
            security.stop()  # idempotent

        asyncio.run(main())
    finally:
        for sock in made:
            sock.close(linger=0)
        ctx.destroy(linger=0)


def test_a_plain_context_server_works_too_and_security_is_a_context_manager(key_dir: Path) -> None:
    """secure_server_socket on a plain zmq.Context: its ZAP task still runs on the asyncio loop."""
    keys = sec.load_keys(key_dir)

    async def main() -> None:
        ctx = zmq.Context()
        sock = zmq.asyncio.Socket(ctx, zmq.ROUTER)
        with sec.secure_server_socket(ctx, sock, keys) as security:
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            received = asyncio.ensure_future(sock.recv_multipart())
            await asyncio.to_thread(_send_one, f"tcp://127.0.0.1:{port}", keys, "plain")
            _identity, payload = await asyncio.wait_for(received, 5)
            assert msgpack.unpackb(payload) == "plain"
            sock.close(linger=0)
        assert security.rejections == 0
        ctx.term()  # returns: stop() closed the handler's sockets

    asyncio.run(main())


def test_an_ipc_socket_on_the_same_context_is_not_affected(key_dir: Path, tmp_path: Path) -> None:
    """Multi-node daemon: IPC ROUTER for its ranks next to a CURVE ROUTER for peers, one context."""
    keys = sec.load_keys(key_dir)
    ipc_dir = tmp_path / "ipc"
    ipc_dir.mkdir(mode=0o700)
    endpoint = f"ipc://{ipc_dir}/d.sock"

    async def main() -> None:
        async with curve_server(keys) as server:
            ipc = server.ctx.socket(zmq.ROUTER)
            ipc.linger = 0
            try:
                ipc.bind(endpoint)
                received = asyncio.ensure_future(ipc.recv_multipart())
                ctx = zmq.Context()
                try:
                    dealer = ctx.socket(zmq.DEALER)
                    dealer.connect(endpoint)  # no keys: IPC never speaks CURVE
                    await asyncio.to_thread(dealer.send, msgpack.packb("over ipc"))
                    _identity, payload = await asyncio.wait_for(received, 5)
                    assert msgpack.unpackb(payload) == "over ipc"
                    dealer.close(linger=0)
                finally:
                    ctx.term()
                assert server.security.rejections == 0
            finally:
                ipc.close(linger=0)

    asyncio.run(main())
