"""ZeroMQ CURVE authentication for network (``tcp://``) endpoints: key files, the daemon's side, the rank's side.

An IPC endpoint needs none of this: its directory is ``0700``, so only the job's user can connect. A
``tcp://`` endpoint is reachable by any host that routes to the port, and one message can commit or wipe
checkpoints, so the daemon refuses to serve one without CURVE keys (``require_keys_for``).

Key directory layout (written by ``generate_keys`` / ``ckptd keygen DIR``)::

    DIR/                      0700
      server.key              0644  the daemon's public key (every client needs it)
      server.key_secret       0600  the daemon's secret key (daemons only)
      client.key              0644  the client public key (ranks and peer daemons)
      client.key_secret       0600  the client secret key
      authorized/             0700  public keys the daemon accepts, one ``NAME.key`` each
        client.key                  a copy of ../client.key; drop more ``*.key`` files in to admit more clients

Files use pyzmq/czmq's certificate format (``zmq.auth.create_certificates``). The key directory is taken
from an explicit argument, else from ``$CKPTD_KEYS``.

How the daemon side works: the server socket is a CURVE server with the ZAP domain ``ckptd`` and
``ZMQ_ZAP_ENFORCE_DOMAIN`` set, and a ZAP handler (RFC 27) runs as a task on the daemon's asyncio loop. libzmq
asks it about every peer that completes the CURVE key exchange; it answers 200 only for a public key found
in ``authorized/``. Peers that fail earlier (no CURVE, wrong server key, garbage) are dropped by libzmq
itself; a socket monitor reports those. Either way the peer's messages never reach ``recv``, and the
rejection is logged once per peer and reason per minute. With the enforce option a missing or stopped
handler means every peer is refused, never that every peer is accepted (libzmq's default without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

logger = logging.getLogger(__name__)

KEYS_ENV = "CKPTD_KEYS"
SERVER_NAME = "server"
CLIENT_NAME = "client"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
AUTHORIZED_DIR = "authorized"
ZAP_DOMAIN = "ckptd"
# libzmq looks for the ZAP handler of a context at this fixed inproc address (RFC 27).
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
# Key files are a few hundred bytes; the bound keeps a key path pointing at /dev/zero from eating memory.
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_AUTHORIZED_KEYS = 10_000
# A client that keeps retrying with a bad key fails its handshake ~10 times a second; one line per minute
# per (peer, reason) says the same without flooding the log.
REJECTION_LOG_INTERVAL_S = 60.0
MAX_TRACKED_REJECTIONS = 1024
MAX_REJECTION_LINES_PER_INTERVAL = 100
NETWORK_FREE_TRANSPORTS = ("ipc://", "inproc://")
NEED_KEYS_MESSAGE = "tcp:// endpoints need CURVE keys: run 'ckptd keygen DIR' and pass --keys DIR or set " + KEYS_ENV

_Z85_KEY = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_KEY_LINE = re.compile(rb"^\s*(public-key|secret-key)\s*=\s*\"?([^\"\s]*)\"?\s*$")
_PROTOCOL_ERRORS: Mapping[int, str] = MappingProxyType(
    {int(getattr(zmq, n)): n.removeprefix("PROTOCOL_ERROR_") for n in dir(zmq) if n.startswith("PROTOCOL_ERROR_")}
)


class SecurityError(RuntimeError):
    """Keys are missing, unsafe or malformed, or a socket cannot be secured as asked."""


@dataclass(frozen=True)
class KeyPaths:
    """Where ``generate_keys`` wrote each file of a key directory."""

    directory: Path
    server_public: Path
    server_secret: Path
    client_public: Path
    client_secret: Path
    authorized: Path


@dataclass(frozen=True)
class AuthorizedKey:
    """One public key the daemon accepts; ``name`` is its file name in ``authorized/`` without ``.key``."""

    name: str
    public_key: bytes  # Z85, 40 bytes


@dataclass(frozen=True)
class Keys:
    """CURVE key material, all Z85-encoded (40 bytes per key); secrets are kept out of ``repr``.

    A daemon needs ``server_secret`` and a non-empty ``authorized``; a rank (or a daemon connecting to a
    peer daemon) needs the client pair and ``server_public``. One directory can hold all of it.
    """

    server_public: bytes
    server_secret: bytes | None = field(default=None, repr=False)
    client_public: bytes | None = None
    client_secret: bytes | None = field(default=None, repr=False)
    authorized: tuple[AuthorizedKey, ...] = ()
    directory: Path | None = None

    @property
    def can_serve(self) -> bool:
        """True when these keys are enough to run a CURVE server."""
        return self.server_secret is not None and bool(self.authorized)

    @property
    def can_connect(self) -> bool:
        """True when these keys are enough to connect to a CURVE server."""
        return self.client_public is not None and self.client_secret is not None

    def where(self) -> str:
        """Where these keys came from, for error messages."""
        return f"key directory {self.directory}" if self.directory is not None else "in-memory keys"


# --------------------------------------------------------------------------------------------- key files


def resolve_key_dir(directory: str | os.PathLike[str] | None = None) -> Path | None:
    """The key directory to use: ``directory`` if given, else ``$CKPTD_KEYS``, else None.

    Args:
        directory: an explicit key directory (``--keys DIR``); an empty string counts as not given.

    Returns:
        The directory as a ``Path`` (not checked for existence), or None when neither source names one.

    Example:
        >>> resolve_key_dir("/etc/ckptd/keys")
        PosixPath('/etc/ckptd/keys')
    """
    if directory is not None and str(directory) != "":
        return Path(directory)
    env = os.environ.get(KEYS_ENV, "")
    return Path(env) if env else None


def needs_curve(endpoint: str) -> bool:
    """True when ``endpoint`` crosses a network and so must use CURVE; IPC and inproc never do.

    Both the daemon and its clients apply this same rule, so they always agree on whether a socket
    speaks CURVE, whatever keys happen to be configured.

    Args:
        endpoint: a ZeroMQ endpoint such as ``tcp://10.0.0.1:5555`` or ``ipc:///tmp/ckptd-1000/ckptd.sock``.

    Example:
        >>> needs_curve("tcp://0.0.0.0:5555"), needs_curve("ipc:///tmp/x.sock")
        (True, False)
    """
    return not endpoint.lower().startswith(NETWORK_FREE_TRANSPORTS)


def require_keys_for(endpoint: str, keys: Keys | None) -> None:
    """Refuse a network endpoint without CURVE keys.

    Args:
        endpoint: the endpoint about to be bound or connected.
        keys: the keys loaded for it, or None when none were configured.

    Raises:
        SecurityError: ``endpoint`` is tcp:// (or another network transport) and ``keys`` is None.

    Example:
        >>> require_keys_for("ipc:///tmp/ckptd-1000/ckptd.sock", None)  # fine: same-user IPC
        >>> require_keys_for("tcp://0.0.0.0:5555", None)
        Traceback (most recent call last):
        ...
        ckptd.security.SecurityError: tcp:// endpoints need CURVE keys: ...
    """
    if keys is None and needs_curve(endpoint):
        raise SecurityError(f"{NEED_KEYS_MESSAGE} (endpoint {endpoint})")


def keys_for_endpoint(endpoint: str, directory: str | os.PathLike[str] | None = None) -> Keys | None:
    """Load the keys ``endpoint`` needs: None for IPC, the key directory's keys for tcp://.

    This is the one call a daemon or a client makes at start-up: it resolves the directory (argument, then
    ``$CKPTD_KEYS``), refuses a tcp:// endpoint without one, and ignores configured keys for IPC (IPC never
    uses CURVE, see ``needs_curve``).

    Args:
        endpoint: the endpoint to serve or connect to.
        directory: ``--keys DIR``, or None to use ``$CKPTD_KEYS``.

    Raises:
        SecurityError: a network endpoint without a key directory, or any ``load_keys`` error.

    Example:
        >>> keys = keys_for_endpoint("tcp://10.0.0.1:5555", "/etc/ckptd/keys")  # doctest: +SKIP
        >>> keys_for_endpoint("ipc:///tmp/ckptd-1000/ckptd.sock") is None
        True
    """
    if not needs_curve(endpoint):
        return None
    key_dir = resolve_key_dir(directory)
    if key_dir is None:
        require_keys_for(endpoint, None)
    return load_keys(key_dir)


def generate_keys(directory: str | os.PathLike[str], force: bool = False) -> KeyPaths:
    """Write a server key pair, a client key pair and ``authorized/client.key`` into ``directory``.

    The directory is created ``0700`` if missing; secret files are created ``0600`` (never readable by
    anyone else, not even for an instant: each file is written in a private temporary directory and
    renamed into place). Other keys already in ``authorized/`` are kept.

    Args:
        directory: the key directory (``ckptd keygen DIR``).
        force: replace existing keys. Every client and peer holding the old ones is locked out.

    Returns:
        The paths written.

    Raises:
        SecurityError: keys already exist and ``force`` is False, or the directory (or ``authorized/``) is
            owned by another user or writable by group/other (either could swap the keys).
        OSError: the directory cannot be created or written (``ckptd keygen`` reports it).

    Example:
        >>> paths = generate_keys("/tmp/ckptd-keys")  # doctest: +SKIP
        >>> oct(paths.server_secret.stat().st_mode & 0o777)  # doctest: +SKIP
        '0o600'
    """
    root = Path(directory)
    paths = _key_paths(root)
    try:
        root.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not root.is_dir():
            raise SecurityError(f"{root} exists and is not a directory; expected a key directory") from None
        _check_trusted(root, "key directory")
    existing = [
        p
        for p in (paths.server_public, paths.server_secret, paths.client_public, paths.client_secret)
        if os.path.lexists(p)
    ]
    if existing and not force:
        names = ", ".join(p.name for p in existing)
        raise SecurityError(
            f"{root} already holds CURVE keys ({names}); refusing to overwrite them, since every client and "
            "peer holding the old keys would be locked out. Use another directory, or pass --force to replace them"
        )
    paths.authorized.mkdir(mode=0o700, exist_ok=True)
    _check_trusted(paths.authorized, "authorized-keys directory")
    old_umask = os.umask(0o077)
    try:
        with tempfile.TemporaryDirectory(prefix=".keygen-", dir=root) as tmp:
            server_public, server_secret = zmq.auth.create_certificates(tmp, SERVER_NAME)
            client_public, client_secret = zmq.auth.create_certificates(tmp, CLIENT_NAME)
            authorized_copy = os.path.join(tmp, "authorized-client.key")
            shutil.copyfile(client_public, authorized_copy)
            for src, dst, mode in (
                (server_public, paths.server_public, 0o644),
                (server_secret, paths.server_secret, 0o600),
                (client_public, paths.client_public, 0o644),
                (client_secret, paths.client_secret, 0o600),
                (authorized_copy, paths.authorized / f"{CLIENT_NAME}{PUBLIC_SUFFIX}", 0o644),
            ):
                os.chmod(src, mode)
                _fsync_file(src)
                os.replace(src, dst)
    finally:
        os.umask(old_umask)
    _fsync_dir(paths.authorized)
    _fsync_dir(root)
    logger.info("wrote CURVE keys to %s", root)
    return paths


def load_keys(directory: str | os.PathLike[str] | None = None) -> Keys:
    """Read and check a key directory (``directory``, else ``$CKPTD_KEYS``).

    ``server.key`` is required. ``server.key_secret``, the client pair and ``authorized/`` are loaded when
    present (a rank's copy of the directory needs no server secret); ``secure_server_socket`` and
    ``secure_client_socket`` say what they miss. The directory, ``authorized/`` and every file must be owned
    by this user or root and not writable by group/other (as ssh's StrictModes); every file must be a regular
    file of at most 64 KiB; secret files must not be readable by group/other; each secret must match its
    public key.

    Args:
        directory: the key directory, or None to use ``$CKPTD_KEYS``.

    Returns:
        The keys, with ``directory`` set.

    Raises:
        SecurityError: no directory given, a missing directory or ``server.key``, half a key pair, a file or
            directory owned by another user or with unsafe permissions, a malformed key, or any OSError
            while reading (a symlink loop, EACCES...); the message names the file and the fix.

    Example:
        >>> keys = load_keys("/etc/ckptd/keys")  # doctest: +SKIP
        >>> keys.can_serve, keys.can_connect  # doctest: +SKIP
        (True, True)
    """
    root = resolve_key_dir(directory)
    if root is None:
        raise SecurityError(
            f"no CURVE key directory given: pass one (--keys DIR) or set {KEYS_ENV}; create one with 'ckptd keygen DIR'"
        )
    # Any OSError becomes a SecurityError naming the path (a symlink loop, a name too long, EACCES, EIO...):
    # every caller (ckptd serve, ckptd status, CheckpointClient) answers it with a message, never a traceback.
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise SecurityError(
            f"CURVE key directory {root} does not exist; create it with 'ckptd keygen {root}' "
            f"or point --keys / {KEYS_ENV} at an existing one"
        ) from None
    except OSError as e:
        raise _unreadable(root, e) from None
    try:
        return _load_keys(root, st)
    except OSError as e:
        raise _unreadable(root, e) from None


def _unreadable(root: Path, e: OSError) -> SecurityError:
    where = "" if e.filename is None or str(e.filename) == str(root) else f" ({e.filename})"
    return SecurityError(
        f"cannot read the CURVE key directory {root}{where}: {e.strerror or e}; expected a key directory made by "
        f"'ckptd keygen' that this user can read: check the path (--keys / {KEYS_ENV}), its owner and permissions"
    )


def _load_keys(root: Path, st: os.stat_result) -> Keys:
    if not stat.S_ISDIR(st.st_mode):
        raise SecurityError(f"{root} is not a directory; expected a CURVE key directory made by 'ckptd keygen'")
    _check_trusted(root, "key directory", st)
    paths = _key_paths(root)
    server_public, _ = _read_key_file(paths.server_public, secret=False)
    server_secret = _read_secret_if_present(paths.server_secret, server_public)
    client_public, client_secret = _read_pair_if_present(paths.client_public, paths.client_secret)
    return Keys(
        server_public=server_public,
        server_secret=server_secret,
        client_public=client_public,
        client_secret=client_secret,
        authorized=_read_authorized(paths.authorized),
        directory=root,
    )


def ephemeral_keys() -> Keys:
    """Fresh in-memory keys (server pair, client pair, the client authorized), never written anywhere.

    For keys that live only as long as one job, e.g. handed from the leader daemon to its followers
    through the job's own collective.

    Example:
        >>> keys = ephemeral_keys()
        >>> keys.can_serve and keys.can_connect
        True
    """
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return Keys(
        server_public=server_public,
        server_secret=server_secret,
        client_public=client_public,
        client_secret=client_secret,
        authorized=(AuthorizedKey(CLIENT_NAME, client_public),),
    )


def _key_paths(root: Path) -> KeyPaths:
    return KeyPaths(
        directory=root,
        server_public=root / f"{SERVER_NAME}{PUBLIC_SUFFIX}",
        server_secret=root / f"{SERVER_NAME}{SECRET_SUFFIX}",
        client_public=root / f"{CLIENT_NAME}{PUBLIC_SUFFIX}",
        client_secret=root / f"{CLIENT_NAME}{SECRET_SUFFIX}",
        authorized=root / AUTHORIZED_DIR,
    )


def _check_trusted(path: Path, what: str, st: os.stat_result | None = None) -> None:
    """Refuse a key file or directory that someone other than us (or root) could change, as ssh's StrictModes
    does: one owned by another user (who may chmod it, swap the keys or add its own to ``authorized/``,
    whatever its mode says now) or writable by group/other."""
    st = st or os.stat(path)
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise SecurityError(
            f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {me}) or root, so that user could "
            f"replace the keys in it; expected it owned by uid {me}: chown {me} {path}, or use a key directory "
            "of your own ('ckptd keygen DIR')"
        )
    if st.st_mode & 0o022:
        raise SecurityError(
            f"{what} {path} is writable by group/other (mode {stat.filemode(st.st_mode)}), so anyone could replace "
            f"the keys in it; expected no group/other write: chmod go-w {path}"
        )


def _read_secret_if_present(path: Path, public: bytes) -> bytes | None:
    if not os.path.lexists(path):
        return None
    secret_public, secret = _read_key_file(path, secret=True)
    if secret_public != public:
        raise SecurityError(
            f"{path} belongs to a different key pair than {path.with_name(path.name.removesuffix('_secret'))}; "
            "expected the pair written together by 'ckptd keygen': regenerate or restore both files"
        )
    return secret


def _read_pair_if_present(public_path: Path, secret_path: Path) -> tuple[bytes | None, bytes | None]:
    has_public, has_secret = os.path.lexists(public_path), os.path.lexists(secret_path)
    if not has_public and not has_secret:
        return None, None
    if not has_public or not has_secret:
        present, missing = (public_path, secret_path) if has_public else (secret_path, public_path)
        raise SecurityError(
            f"{missing} is missing but {present} exists; expected both halves of the key pair: copy the missing "
            "file from the directory 'ckptd keygen' wrote"
        )
    public, _ = _read_key_file(public_path, secret=False)
    return public, _read_secret_if_present(secret_path, public)


def _read_authorized(directory: Path) -> tuple[AuthorizedKey, ...]:
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return ()
    if not stat.S_ISDIR(st.st_mode):
        raise SecurityError(f"{directory} is not a directory; expected a directory of authorized public keys")
    _check_trusted(directory, "authorized-keys directory", st)
    names = sorted(n for n in os.listdir(directory) if n.endswith(PUBLIC_SUFFIX) and not n.startswith("."))
    if len(names) > MAX_AUTHORIZED_KEYS:
        raise SecurityError(f"{directory} holds {len(names)} keys; at most {MAX_AUTHORIZED_KEYS} are supported")
    return tuple(
        AuthorizedKey(n.removesuffix(PUBLIC_SUFFIX), _read_key_file(directory / n, secret=False)[0]) for n in names
    )


def _read_key_file(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a certificate file, refusing anything unsafe or malformed."""
    kind = "secret key file" if secret else "public key file"
    try:
        # O_NONBLOCK: a FIFO planted as a key file must not hang the daemon's start-up.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecurityError(
            f"{kind} {path} is missing; expected the layout 'ckptd keygen DIR' writes (see docs/security.md)"
        ) from None
    except OSError as e:
        raise SecurityError(f"cannot open {kind} {path}: {e.strerror}; check its owner and permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecurityError(f"{kind} {path} is not a regular file; expected a key file made by 'ckptd keygen'")
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise SecurityError(
                f"{kind} {path} is {st.st_size} bytes; a key file is under {MAX_KEY_FILE_BYTES} bytes, "
                "so this is not one"
            )
        _check_trusted(path, kind, st)
        if secret and st.st_mode & 0o044:
            raise SecurityError(
                f"{kind} {path} is readable by group/other (mode {stat.filemode(st.st_mode)}); a secret key "
                f"must be private to its owner: chmod 600 {path}"
            )
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    found: dict[bytes, bytes] = {}
    for line in data.splitlines():
        m = _KEY_LINE.match(line)
        if m and m.group(1) not in found:
            found[m.group(1)] = m.group(2)
    public = _check_z85(found.get(b"public-key"), path, "public-key")
    if not secret:
        return public, None
    secret_key = _check_z85(found.get(b"secret-key"), path, "secret-key")
    if zmq.curve_public(secret_key) != public:
        raise SecurityError(
            f"{path}: its secret-key does not belong to its public-key; the file is corrupt: regenerate it"
        )
    return public, secret_key


def _check_z85(value: bytes | None, path: Path, name: str) -> bytes:
    if value is None:
        raise SecurityError(
            f'{path} has no {name} line; expected a ZeroMQ certificate ({name} = "<40 Z85 characters>") '
            "as written by 'ckptd keygen'"
        )
    ok = _Z85_KEY.fullmatch(value) is not None
    if ok:
        try:
            ok = len(z85.decode(value)) == 32
        except (KeyError, ValueError, struct.error):
            ok = False
    if not ok:
        shown = value[:48].decode("ascii", "replace")
        raise SecurityError(
            f"{path}: {name} {shown!r} is not a CURVE key; expected 40 Z85 characters: regenerate the key file"
        )
    return value


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- sockets


def secure_client_socket(sock: zmq.Socket, keys: Keys, server_key: bytes | None = None) -> None:
    """Make ``sock`` a CURVE client; call before ``connect``.

    Works for a rank's DEALER and for a daemon connecting to a peer daemon alike (both present the client
    key pair of the same key directory).

    Args:
        sock: a socket not yet connected or bound (any context type).
        keys: keys with the client pair (``keys.can_connect``).
        server_key: the Z85 public key of the server to trust; default ``keys.server_public``. A follower
            daemon passes the leader's key here when it was handed over at run time.

    Raises:
        SecurityError: ``keys`` have no client pair, ``server_key`` is not a key, or ``sock`` is already
            connected (CURVE options only apply to later connects).

    Example:
        >>> sock = zmq.Context.instance().socket(zmq.DEALER)  # doctest: +SKIP
        >>> secure_client_socket(sock, load_keys())  # doctest: +SKIP
        >>> sock.connect("tcp://10.0.0.1:5555")  # doctest: +SKIP
    """
    if not keys.can_connect:
        raise SecurityError(
            f"{keys.where()} has no client key pair ({CLIENT_NAME}{PUBLIC_SUFFIX} and {CLIENT_NAME}{SECRET_SUFFIX}); "
            "a client of a tcp:// endpoint needs it: copy them from the directory 'ckptd keygen' wrote"
        )
    trusted = server_key if server_key is not None else keys.server_public
    if _Z85_KEY.fullmatch(trusted) is None:
        raise SecurityError(f"server key {trusted[:48]!r} is not a CURVE public key; expected 40 Z85 characters")
    _check_unused(sock, "secure_client_socket", "connect")
    assert keys.client_public is not None and keys.client_secret is not None  # can_connect checked it
    sock.curve_secretkey = keys.client_secret
    sock.curve_publickey = keys.client_public
    sock.curve_serverkey = trusted


def secure_server_socket(ctx: zmq.Context, sock: zmq.Socket, keys: Keys) -> ServerSecurity:
    """Make ``sock`` a CURVE server that admits only the keys in ``keys.authorized``; call before ``bind``.

    Starts the context's ZAP handler as a task on the running asyncio loop (so call it from inside
    ``async def``, e.g. the daemon's ``serve_async``) and a monitor that logs peers failing the handshake.
    A second server socket on the same context goes through ``ServerSecurity.add_socket``.

    Args:
        ctx: the context ``sock`` was made from (``zmq.asyncio.Context`` or plain ``zmq.Context``).
        sock: a server socket (the daemon's ROUTER) not yet bound.
        keys: keys with the server secret and at least one authorized key (``keys.can_serve``).

    Returns:
        The running ``ServerSecurity``; call its ``stop()`` after closing the socket and before
        ``ctx.term()``.

    Raises:
        SecurityError: no running asyncio loop, keys unfit to serve, ``sock`` already bound, or a ZAP
            handler already running on ``ctx``.

    Example:
        >>> ctx = zmq.asyncio.Context()  # doctest: +SKIP
        >>> sock = ctx.socket(zmq.ROUTER)  # doctest: +SKIP
        >>> security = secure_server_socket(ctx, sock, load_keys())  # doctest: +SKIP
        >>> sock.bind("tcp://0.0.0.0:5555")  # doctest: +SKIP
        >>> ...  # serve; then: sock.close(); security.stop(); ctx.term()
    """
    security = ServerSecurity(ctx, keys)
    try:
        security.add_socket(sock)
    except BaseException:
        security.stop()
        raise
    return security


class ServerSecurity:
    """The daemon's CURVE gatekeeper for one ZeroMQ context: a ZAP handler and handshake monitors.

    Everything runs on the asyncio loop that created it (no threads). Construct it through
    ``secure_server_socket``.
    """

    def __init__(self, ctx: zmq.Context, keys: Keys) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise SecurityError(
                "secure_server_socket needs a running asyncio loop (its ZAP handler is a task on it); "
                "call it from inside the daemon's async code, e.g. serve_async"
            ) from None
        if keys.server_secret is None:
            raise SecurityError(
                f"{keys.where()} has no {SERVER_NAME}{SECRET_SUFFIX}; a daemon serving a tcp:// endpoint needs "
                "the server secret key: run it where the key directory from 'ckptd keygen' is complete"
            )
        if not keys.authorized:
            raise SecurityError(
                f"{keys.where()} authorizes no client key ({AUTHORIZED_DIR}/ is empty or missing), so every peer "
                f"would be refused; expected at least {AUTHORIZED_DIR}/{CLIENT_NAME}{PUBLIC_SUFFIX}"
            )
        self._ctx = ctx
        self._keys = keys
        self._allowed = {k.public_key: k.name for k in keys.authorized}
        # None: the first handshake re-reads authorized/, covering any change since load_keys read it.
        self._authorized_stamp_seen: tuple[object, ...] | None = None
        self._rejections = 0
        self._recent: OrderedDict[tuple[str, str], list[float]] = OrderedDict()  # key -> [first, suppressed]
        self._budget_start = time.monotonic()
        self._budget_lines = 0
        self._budget_suppressed = 0
        self._sockets: list[zmq.Socket] = []
        self._monitors: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        zap = ctx.socket(zmq.REP, socket_class=zmq.asyncio.Socket)
        zap.linger = 0
        try:
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            zap.close(linger=0)
            if e.errno == errno.EADDRINUSE:
                raise SecurityError(
                    "a ZAP handler already runs on this ZeroMQ context; secure further sockets of the same "
                    "context with ServerSecurity.add_socket instead of a second secure_server_socket"
                ) from None
            raise
        self._zap = zap
        self._tasks.append(self._loop.create_task(self._serve_zap(), name="ckptd-zap"))

    def __enter__(self) -> ServerSecurity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def rejections(self) -> int:
        """How many peers were refused so far (ZAP denials and failed handshakes)."""
        return self._rejections

    def add_socket(self, sock: zmq.Socket) -> None:
        """Make another not-yet-bound socket of the same context a CURVE server under this handler.

        Args:
            sock: e.g. the leader daemon's peer ROUTER next to its rank ROUTER.

        Raises:
            SecurityError: the handler was stopped, or ``sock`` is already bound.

        Example:
            >>> security.add_socket(peer_router); peer_router.bind("tcp://0.0.0.0:5556")  # doctest: +SKIP
        """
        if self._stopped:
            raise SecurityError("this ServerSecurity was stopped; start a new one with secure_server_socket")
        _check_unused(sock, "secure_server_socket", "bind")
        sock.curve_server = True
        sock.curve_secretkey = self._keys.server_secret
        sock.curve_publickey = self._keys.server_public
        sock.zap_domain = ZAP_DOMAIN.encode()
        try:
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        except (AttributeError, zmq.ZMQError) as e:
            # Older libzmq: peers are still checked while the handler runs, but once it stops, a peer
            # holding the server's public key would be let in; hence stop() only after closing the socket.
            logger.warning("libzmq lacks ZMQ_ZAP_ENFORCE_DOMAIN (%s); close server sockets before stop()", e)
        address = f"inproc://ckptd-handshake-monitor-{secrets.token_hex(8)}"
        sock.monitor(address, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        monitor = self._ctx.socket(zmq.PAIR, socket_class=zmq.asyncio.Socket)
        monitor.linger = 0
        monitor.connect(address)
        self._sockets.append(sock)
        self._monitors.append(monitor)
        self._tasks.append(self._loop.create_task(self._watch_handshakes(monitor), name="ckptd-handshake-monitor"))

    def stop(self) -> None:
        """Stop the ZAP handler and monitors and close their sockets; idempotent.

        Call it after closing the secured sockets and before ``ctx.term()`` (which would otherwise wait for
        these sockets forever). If a secured socket is still open, new peers are refused from now on.

        Example:
            >>> sock.close(linger=500); security.stop(); ctx.term()  # doctest: +SKIP
        """
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for sock in self._sockets:
            with contextlib.suppress(zmq.ZMQError):
                if not sock.closed:
                    sock.disable_monitor()
        for monitor in self._monitors:
            monitor.close(linger=0)
        # Closing alone frees the inproc address later, on libzmq's reaper thread; unbinding frees it now, so
        # a new handler on this context (a restarted serve_async) can bind it at once.
        with contextlib.suppress(zmq.ZMQError):
            self._zap.unbind(ZAP_ENDPOINT)
        self._zap.close(linger=0)
        logger.debug("CURVE authentication stopped (%d peers refused)", self._rejections)

    # -- the ZAP handler (RFC 27)

    async def _serve_zap(self) -> None:
        while True:
            try:
                request = await self._zap.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as e:
                if e.errno in (zmq.ENOTSOCK, zmq.ETERM):
                    return
                logger.exception("ZAP handler: receive failed; peers wait for their handshake to time out")
                await asyncio.sleep(0.1)
                continue
            try:
                reply = self._decide(request)
            except Exception:
                # Refuse rather than admit on a bug of ours; the handler itself keeps going.
                logger.exception("ZAP handler failed on a request; refusing that peer")
                reply = (500, "internal error", b"")
            # A REP socket must answer every request before it can receive the next, even a malformed one.
            code, text, user = reply
            request_id = request[1] if len(request) >= 2 else b""
            await self._zap.send_multipart([ZAP_VERSION, request_id, str(code).encode(), text.encode(), user, b""])

    def _decide(self, request: list[bytes]) -> tuple[int, str, bytes]:
        if len(request) < 6:
            return self._refuse("?", "malformed ZAP request", "ZAP")
        version, _request_id, domain, address_b, _identity, mechanism = request[:6]
        credentials = request[6:]
        address = address_b.decode("ascii", "replace") or "?"
        if version != ZAP_VERSION:
            return self._refuse(address, f"ZAP version {version!r} (expected {ZAP_VERSION!r})", "ZAP")
        if domain != ZAP_DOMAIN.encode():
            return self._refuse(address, f"ZAP domain {domain!r} is not {ZAP_DOMAIN!r}", "ZAP")
        if mechanism != b"CURVE":
            return self._refuse(address, f"security mechanism {mechanism!r} (only CURVE is accepted)", "ZAP")
        if len(credentials) != 1 or len(credentials[0]) != 32:
            return self._refuse(address, "malformed CURVE credentials", "ZAP")
        public = z85.encode(credentials[0])
        self._reload_authorized_if_changed()
        name = self._allowed.get(public)
        if name is None:
            key = public.decode("ascii")
            # One line per address and minute, not per key: a peer cycling through random keys would
            # otherwise write a line per attempt.
            return self._refuse(address, f"client public key {key} is not in {AUTHORIZED_DIR}/", "key")
        logger.info("accepted CURVE peer %s (authorized key %r)", address, name)
        return 200, "OK", name.encode()

    def _refuse(self, address: str, reason: str, key: str) -> tuple[int, str, bytes]:
        self._note_rejection(f"peer {address}", reason, (address, key))
        return 400, reason[:200], b""

    def _authorized_stamp(self) -> tuple[object, ...] | None:
        # Names, inodes, sizes and mtimes of the key files: a key dropped in, removed or replaced shows up
        # even within one tick of the directory's (coarse) mtime. One listdir per handshake, not per message.
        if self._keys.directory is None:
            return None
        directory = self._keys.directory / AUTHORIZED_DIR
        try:
            with os.scandir(directory) as entries:
                return tuple(
                    sorted(
                        (e.name, st.st_ino, st.st_size, st.st_mtime_ns)
                        for e in entries
                        if e.name.endswith(PUBLIC_SUFFIX)
                        for st in (e.stat(),)
                    )
                )
        except FileNotFoundError:
            return ("missing",)
        except OSError:
            return None  # e.g. a transient EACCES: keep the keys we have rather than flip-flop

    def _reload_authorized_if_changed(self) -> None:
        stamp = self._authorized_stamp()
        if stamp is None or stamp == self._authorized_stamp_seen:
            return
        self._authorized_stamp_seen = stamp
        assert self._keys.directory is not None
        try:
            authorized = _read_authorized(self._keys.directory / AUTHORIZED_DIR)
        except (SecurityError, OSError) as e:
            logger.warning("kept the previous authorized keys: re-reading them failed: %s", e)
            return
        self._allowed = {k.public_key: k.name for k in authorized}
        if not self._allowed:
            logger.warning("%s is empty or gone: every new peer is refused", self._keys.directory / AUTHORIZED_DIR)
            return
        logger.info("re-read %s: %d authorized keys", self._keys.directory / AUTHORIZED_DIR, len(self._allowed))

    # -- peers that fail before ZAP is asked

    async def _watch_handshakes(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            try:
                event = parse_monitor_message(await monitor.recv_multipart())
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError:
                return  # monitor closed: stop() or context teardown
            except Exception:
                logger.exception("handshake monitor: unreadable event ignored")
                continue
            endpoint = event["endpoint"].decode("utf-8", "replace")
            reason = handshake_failure_reason(int(event["event"]), int(event["value"]))
            # libzmq 4.3 reports the listening endpoint, not the peer's address, for these events.
            self._note_rejection(f"a peer on {endpoint} (address not reported by libzmq)", reason, (endpoint, reason))

    def _note_rejection(self, who: str, reason: str, key: tuple[str, str]) -> None:
        self._rejections += 1
        now = time.monotonic()
        entry = self._recent.get(key)
        if entry is not None and now - entry[0] < REJECTION_LOG_INTERVAL_S:
            entry[1] += 1
            return
        # Many distinct peers (a scan from many hosts) still get at most this many lines per minute.
        if now - self._budget_start >= REJECTION_LOG_INTERVAL_S:
            if self._budget_suppressed:
                logger.warning(
                    "refused %d more peers in the previous minute without logging each", self._budget_suppressed
                )
            self._budget_start, self._budget_lines, self._budget_suppressed = now, 0, 0
        if self._budget_lines >= MAX_REJECTION_LINES_PER_INTERVAL:
            self._budget_suppressed += 1
            return
        self._budget_lines += 1
        repeats = f" (and {int(entry[1])} more times in the previous minute)" if entry is not None and entry[1] else ""
        self._recent[key] = [now, 0]
        self._recent.move_to_end(key)
        while len(self._recent) > MAX_TRACKED_REJECTIONS:
            self._recent.popitem(last=False)
        logger.warning("refused %s: %s; its messages are dropped%s", who, reason, repeats)


def handshake_failure_reason(event: int, value: int, client: bool = False) -> str:
    """A readable cause for a socket monitor's handshake-failure event, on either end of a connection.

    The daemon logs it for refused peers; a client can use it on its own monitor to tell its user why a
    tcp:// daemon refuses it instead of waiting for a timeout.

    Args:
        event: ``zmq.EVENT_HANDSHAKE_FAILED_*`` (``parse_monitor_message(...)["event"]``).
        value: the event's value (a ZMTP protocol error code, or a ZAP status code for auth failures).
        client: the event was seen by the connecting side. A failure without detail then means the daemon
            hung up on us, which is what a daemon does with a HELLO it cannot decrypt.

    Example:
        >>> handshake_failure_reason(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)
        'CURVE key not authorized (ZAP status 400): the public key is not in the server authorized/ directory'
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"CURVE key not authorized (ZAP status {value}): the public key is not in the server "
            f"{AUTHORIZED_DIR}/ directory"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "security mechanism mismatch: one side uses CURVE and the other does not (keys not configured?)"
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return (
                "CURVE cryptographic handshake failed: the client does not hold this server's public key "
                "(server.key), or a key is corrupt"
            )
        return f"malformed ZMTP handshake ({_PROTOCOL_ERRORS.get(value, hex(value))})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and client:
        return (
            "the daemon hung up mid-handshake: it could not decrypt this client's CURVE hello, so the server.key "
            "this client trusts is most likely not that daemon's (or the endpoint does not speak CURVE)"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        # A peer without CURVE often sees the mismatch first and hangs up, so the server only sees this.
        return (
            "handshake failed without detail: the peer hung up mid-handshake (as a client without CURVE keys "
            "does) or sent garbage"
        )
    return f"handshake event {event:#x} value {value:#x}"


def _check_unused(sock: zmq.Socket, who: str, verb: str) -> None:
    # libzmq copies security options into a listener or connecter when bind/connect runs, so options set
    # afterwards would silently leave that endpoint unauthenticated.
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    if last:
        raise SecurityError(
            f"{who}: the socket is already bound or connected ({last.decode(errors='replace')}), so that endpoint "
            f"would stay unauthenticated; expected a fresh socket: call it before {verb}"
        )
