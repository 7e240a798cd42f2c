"""``ckptd`` command line: serve, ls, inspect, verify, gc, status, export, demo.

Exit codes: 0 success, 1 a check failed, 2 usage or environment error.

Everything this module knows about files on disk comes from ``ckptd.format`` (names, manifest, checksums)
and everything it knows about the daemon from ``ckptd.protocol``. Results go to stdout, errors and
progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ckptd
from ckptd import format as fmt
from ckptd import protocol as proto
from ckptd import security
from ckptd.metrics import MetricsUnavailable
from ckptd.security import SecurityError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
DAEMON_TIMEOUT_S = 1.0
GC_MIN_AGE_S = 3600.0


class CliError(Exception):
    """Ends a subcommand: the message goes to stderr, ``code`` becomes the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------ formatting


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def rank_ranges(ranks: Iterable[int] | None) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    if ranks is None:
        return "-"
    rs = sorted(set(ranks))
    if not rs:
        return "-"
    out, start, prev = [], rs[0], rs[0]
    for r in rs[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Iterable[int] = ()) -> None:
    """A plain text table on stdout; columns in ``right`` are right-aligned (numbers)."""
    right = set(right)
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(parts).rstrip())


def timestamp_age(timestamp: str | None) -> float | None:
    """Seconds since an ISO-8601 manifest timestamp, or None when it does not parse."""
    if not isinstance(timestamp, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return (_dt.datetime.now(_dt.timezone.utc) - t).total_seconds()


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


class Progress:
    """``done / total`` bytes on stderr, drawn by tqdm: redrawn in place on a TTY, a line a second otherwise."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.tty = sys.stderr.isatty()
        self.shown = enabled
        self.bar = tqdm(
            total=total,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=not enabled,
            mininterval=0.1 if self.tty else 1.0,
            # Off a terminal, one line per update (a log file gets no carriage returns).
            ascii=not self.tty,
            dynamic_ncols=self.tty,
            bar_format=None if self.tty else "{desc}: {n_fmt}B / {total_fmt}B ({percentage:.0f}%, {rate_fmt})\n",
        )

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def finish(self) -> None:
        self.bar.close()


def want_progress(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "progress", False)) or sys.stderr.isatty()


# -------------------------------------------------------------------------------------- paths on disk


def output_dir_arg(arg: str) -> Path:
    """The output dir a user named (the directory holding ``checkpoints/``); its checkpoints dir may be
    given instead. Raises CliError with a hint for anything else."""
    path = Path(arg)
    if not path.exists():
        raise CliError(f"{path}: no such directory; expected a training output dir holding {fmt.CHECKPOINTS_DIRNAME}/")
    if not path.is_dir():
        raise CliError(f"{path}: not a directory; expected a training output dir holding {fmt.CHECKPOINTS_DIRNAME}/")
    if fmt.checkpoints_root(path).is_dir():
        return path
    if path.name == fmt.CHECKPOINTS_DIRNAME:
        return path.parent
    if (path / fmt.MANIFEST_NAME).exists() or fmt.parse_checkpoint_dirname(path.name) is not None:
        raise CliError(
            f"{path} is a checkpoint, not an output dir; pass its output dir ({path.parent.parent}), "
            "or use 'ckptd inspect'/'ckptd verify' on the checkpoint itself"
        )
    raise CliError(
        f"{path} has no {fmt.CHECKPOINTS_DIRNAME}/ directory; expected the output_dir given to CheckpointClient "
        f"(checkpoints live in OUTPUT_DIR/{fmt.CHECKPOINTS_DIRNAME}/checkpoint-<step>/). Nothing has been saved "
        "there yet, or it is another directory"
    )


def checkpoint_arg(arg: str) -> Path:
    """A committed checkpoint directory; raises CliError saying what the path is instead."""
    path = Path(arg)
    expected = f"expected a committed checkpoint such as OUTPUT_DIR/{fmt.CHECKPOINTS_DIRNAME}/checkpoint-<step>"
    if path.is_symlink():
        # Never followed: a checkpoint appears by renaming a real directory, so a link was planted by hand.
        try:
            fmt.check_directory(path)
        except fmt.FormatError as e:
            raise CliError(str(e)) from None
    if not path.exists():
        raise CliError(f"{path}: no such directory; {expected} (list them with 'ckptd ls OUTPUT_DIR')")
    if not path.is_dir():
        raise CliError(f"{path}: not a directory; {expected}")
    # lexists: a manifest that is a dangling symlink, a FIFO or a device is still "there", and is refused
    # with its own reason when it is read.
    if os.path.lexists(path / fmt.MANIFEST_NAME):
        return path
    name = path.name
    if fmt.parse_temp_dirname(name) is not None:
        why = "is the temporary directory of a save in flight or of one that never committed; it is never read"
        raise CliError(f"{path} {why}; {expected} ('ckptd gc' removes stale temp dirs)")
    if fmt.is_trash_dirname(name):
        raise CliError(f"{path} is a checkpoint being deleted (trash); {expected}")
    if fmt.checkpoints_root(path).is_dir() or name == fmt.CHECKPOINTS_DIRNAME:
        raise CliError(f"{path} is an output dir, not a checkpoint; {expected} (see 'ckptd ls {path}')")
    raise CliError(f"{path} has no {fmt.MANIFEST_NAME}, so it is not a committed ckptd checkpoint; {expected}")


def open_checkpoint(path: Path, code: int = EXIT_USAGE) -> fmt.CheckpointDir:
    """The checkpoint directory opened once (``O_DIRECTORY | O_NOFOLLOW``), so that every file is then read
    relative to it and a directory swapped for a symlink meanwhile is never followed; CliError if not."""
    try:
        return fmt.CheckpointDir(path)
    except FileNotFoundError:
        raise CliError(
            f"{path}: no such directory (removed meanwhile?); list checkpoints with 'ckptd ls'", code
        ) from None
    except fmt.FormatError as e:
        raise CliError(str(e), code) from None
    except OSError as e:
        raise CliError(f"{path}: cannot be opened ({e.strerror or e})", code) from None


def load_manifest(path: Path | fmt.CheckpointDir, code: int = EXIT_USAGE) -> fmt.Manifest:
    """The checkpoint's manifest, read safely (bounded, regular file only); CliError with ``code`` if not."""
    base = path.path if isinstance(path, fmt.CheckpointDir) else path
    try:
        return fmt.read_manifest(path)
    except fmt.FormatError as e:
        raise CliError(f"{e}; 'ckptd verify {base}' reports every problem", code) from None
    except OSError as e:
        raise CliError(f"{base / fmt.MANIFEST_NAME}: cannot be read ({e.strerror or e})", code) from None


@dataclass
class Extra:
    """A temp or trash directory under ``checkpoints/``."""

    name: str
    path: Path
    kind: str  # "temp" or "trash"
    step: int | None
    txn: str | None
    age_s: float | None
    size_bytes: int


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def scan_extras(output_dir: Path) -> list[Extra]:
    """Temp and trash directories (named by ckptd.format), oldest first."""
    root = fmt.checkpoints_root(output_dir)
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    extras = []
    now = time.time()
    for name in names:
        temp = fmt.parse_temp_dirname(name)
        if temp is None and not fmt.is_trash_dirname(name):
            continue
        path = root / name
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            continue  # gone meanwhile (committed, aborted or deleted)
        kind = "temp" if temp else "trash"
        extras.append(
            Extra(name, path, kind, temp[0] if temp else None, temp[1] if temp else None, age, dir_size(path))
        )
    extras.sort(key=lambda e: -(e.age_s or 0.0))
    return extras


def manifest_data_size(manifest: fmt.Manifest) -> int:
    return sum(f.size for f in manifest.files.values())


# ----------------------------------------------------------------------------------------- the daemon


def request_status(endpoint: str, timeout_s: float = DAEMON_TIMEOUT_S) -> dict[str, Any] | None:
    """Ask the daemon at ``endpoint`` for its status report; None when nothing answers in time.

    Raises:
        CliError: the keys cannot be loaded, the daemon refused this client's CURVE handshake (a daemon that
            refuses us is not "no daemon": the message says why and what to do), or it answered nonsense.
    """
    import zmq
    from zmq.utils.monitor import parse_monitor_message

    try:
        keys = security.keys_for_endpoint(endpoint)
    except SecurityError as e:
        raise CliError(str(e)) from None
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor: zmq.Socket | None = None
    refused: str | None = None  # why the last CURVE handshake failed, if it did
    try:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if keys is not None:
            security.secure_client_socket(sock, keys)
            # A daemon that refuses our key still accepts the TCP connection; only the handshake says no.
            monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            )
            poller.register(monitor, zmq.POLLIN)
        sock.connect(endpoint)
        sock.send(proto.pack(proto.MsgType.STATUS, 1))
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            ready = dict(poller.poll(max(1, int(remaining * 1000)))) if remaining > 0 else {}
            if monitor is not None and monitor in ready:
                while monitor.poll(0, zmq.POLLIN):
                    event = parse_monitor_message(monitor.recv_multipart())
                    if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        refused = None
                        continue
                    refused = _refused_message(endpoint, keys, int(event["event"]), int(event["value"]))
                    if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                        # The daemon's verdict on our keys: retrying cannot change it.
                        raise CliError(refused)
            if sock not in ready:
                if remaining <= 0:
                    if refused is not None:  # every attempt was hung up on: no daemon would do that
                        raise CliError(refused)
                    return None
                continue
            frame = sock.recv_multipart(zmq.NOBLOCK)[-1]
            try:
                msg_type, req_id, body = proto.unpack(frame)
            except proto.ProtocolError as e:
                raise CliError(f"the daemon at {endpoint} sent a malformed reply: {e}") from None
            if req_id != 1:
                continue  # a notification meant for someone else
            if msg_type == proto.MsgType.STATUS_REPORT:
                return body
            if msg_type == proto.MsgType.ERROR:
                raise CliError(f"the daemon at {endpoint} rejected the status request: {body.get('message')}")
            raise CliError(f"the daemon at {endpoint} answered status with {msg_type.value!r}")
    except (SecurityError, zmq.ZMQError) as e:
        raise CliError(f"cannot connect to {endpoint}: {e}") from None
    finally:
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def _refused_message(endpoint: str, keys: security.Keys | None, event: int, value: int) -> str:
    import zmq

    reason = security.handshake_failure_reason(event, value, client=True)
    where = keys.where() if keys is not None else "no keys"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        todo = (
            f"expected this client's key ({where}, client.key) in the daemon's {security.AUTHORIZED_DIR}/: copy "
            f"it there as NAME.key on the daemon's host (docs/security.md, 'More clients'), or pass --keys / "
            f"${security.KEYS_ENV} naming a key directory the daemon authorizes"
        )
    else:
        todo = (
            f"expected {where} to hold that daemon's server.key: copy the daemon's server.key into it, or pass "
            f"--keys / ${security.KEYS_ENV} naming the key directory the daemon was started with"
        )
    return f"the daemon at {endpoint} refused this client's CURVE handshake: {reason}; {todo}"


def endpoint_arg(arg: str | None) -> str:
    try:
        return proto.resolve_endpoint(arg)
    except proto.ProtocolError as e:
        raise CliError(str(e)) from None


def no_daemon_hint(endpoint: str) -> str:
    return (
        f"start one with 'ckptd serve --endpoint {endpoint}', or pass the endpoint the training job uses "
        f"(--endpoint or ${proto.ENDPOINT_ENV}); an embedded daemon exits when its job is idle"
    )


# ------------------------------------------------------------------------------------------------- ls


def cmd_ls(args: argparse.Namespace) -> int:
    out = output_dir_arg(args.output_dir)
    if not args.verbose:
        logging.getLogger(fmt.__name__).setLevel(logging.ERROR)  # broken dirs are reported below instead
    survey = fmt.survey_checkpoints(out)
    found = survey.found
    extras = scan_extras(out)
    # lstat only (no file is opened): cheap for every checkpoint, and enough to catch a FIFO, a symlink or a
    # size the manifest lies about before it is printed as if it were true.
    problems = {c.step: fmt.disk_problems(c.path, c.manifest) for c in found}
    try:
        best_path = fmt.find_best_checkpoint(out)
        best_problem = None
    except fmt.FormatError as e:
        best_path, best_problem = None, str(e)
    best_step = fmt.parse_checkpoint_dirname(best_path.name) if best_path is not None else None
    if args.json:
        print_json(
            {
                "output_dir": str(out),
                "checkpoints": [
                    {
                        "step": c.step,
                        "path": str(c.path),
                        "size_bytes": manifest_data_size(c.manifest),
                        "timestamp": c.manifest.timestamp,
                        "age_s": timestamp_age(c.manifest.timestamp),
                        "txn": c.manifest.txn,
                        "world_size": c.manifest.world_size,
                        "components": list(c.manifest.components),
                        "problems": problems[c.step],
                        "best": c.step == best_step,
                    }
                    for c in found
                ],
                "best_mark_problem": best_problem,
                "temp": [asdict(e) for e in extras if e.kind == "temp"],
                "trash": [asdict(e) for e in extras if e.kind == "trash"],
                "broken": [{"path": str(b.path), "error": b.reason} for b in survey.broken],
            }
        )
        return EXIT_OK
    root = fmt.checkpoints_root(out)
    if found:
        rows = [
            (
                f"{c.step} *" if c.step == best_step else c.step,
                human_bytes(manifest_data_size(c.manifest)) + (" !" if problems[c.step] else ""),
                human_age(timestamp_age(c.manifest.timestamp)),
                ",".join(c.manifest.components),
            )
            for c in found
        ]
        print_table(("STEP", "SIZE", "AGE", "COMPONENTS"), rows, right=(0, 1, 2))
        for c in found:
            if problems[c.step]:
                print(
                    f"! {c.path.name}: its files disagree with its manifest, so its size is not to be trusted and "
                    f"loading it would fail ('ckptd verify {c.path}' checks every byte):"
                )
                for problem in problems[c.step]:
                    print(f"    {problem}")
        if best_step is not None:
            print(f"* checkpoint-{best_step} is the best ('load(\"best\")' restores it; retention keeps it)")
    else:
        print(f"no committed checkpoints in {root}")
    if best_problem is not None:
        print(f"! {best_problem}")
    for e in extras:
        if e.kind == "temp":
            print(
                f"temp   {e.name}  step {e.step}, txn {e.txn}, {human_bytes(e.size_bytes)}, "
                f"modified {human_age(e.age_s)} ago: in flight / stale (never read; 'ckptd gc' removes stale ones)"
            )
        else:
            print(
                f"trash  {e.name}  {human_bytes(e.size_bytes)}, modified {human_age(e.age_s)} ago: "
                "being deleted / stale ('ckptd gc' removes it)"
            )
    for b in survey.broken:
        print(f"BROKEN {b.path.name}  ignored by every reader: {b.reason}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    path = checkpoint_arg(args.checkpoint)
    with open_checkpoint(path) as d:
        return inspect_checkpoint(args, d)


def inspect_checkpoint(args: argparse.Namespace, d: fmt.CheckpointDir) -> int:
    path = d.path
    manifest = load_manifest(d)
    if args.json:
        try:
            sys.stdout.write(fmt.read_manifest_bytes(d).decode("utf-8"))
        except (fmt.FormatError, OSError) as e:  # replaced since it was parsed a moment ago
            raise CliError(f"{path / fmt.MANIFEST_NAME}: cannot be read again ({e})") from None
        return EXIT_OK
    # Types, sizes and headers of every listed file (a few KiB read each), and the model index against the
    # manifest: the manifest is not shown as truth where the files contradict it.
    problems = fmt.disk_problems(path, manifest, structure=True, at=d)
    bad_files = {rel for rel in manifest.files if any(p.startswith(f"{path / rel}:") for p in problems)}
    age = timestamp_age(manifest.timestamp)
    header = [
        ("checkpoint", str(path)),
        ("format", manifest.format),
        ("step", str(manifest.step)),
        ("txn", manifest.txn),
        ("world size", str(manifest.world_size)),
        ("timestamp", manifest.timestamp + (f" ({human_age(age)} ago)" if age is not None else "")),
        ("pytorch", manifest.pytorch_version or "-"),
        ("ckptd", manifest.ckptd_version or "-"),
        (
            "size",
            f"{human_bytes(manifest_data_size(manifest))} in {len(manifest.files)} files"
            + (" (as the manifest claims; see PROBLEMS)" if problems else ""),
        ),
    ]
    if manifest.topology:
        header.append(("topology", json.dumps(manifest.topology, sort_keys=True)))
    if manifest.training_args_hash:
        header.append(("args hash", manifest.training_args_hash))
    meta = manifest.metadata or {}
    header.append(("metadata", json.dumps(meta, sort_keys=True) if meta else "-"))
    width = max(len(k) for k, _ in header)
    for k, v in header:
        print(f"{k.ljust(width)}  {v}")

    print()
    rows = []
    for c in manifest.components.values():
        notes = []
        if fmt.MODEL_INDEX_NAME in c.files:
            notes.append("Hugging Face layout")
        if c.replicated_across is not None:
            notes.append(f"replicated across {rank_ranges(c.replicated_across)}")
        if c.group_name is not None:
            n = len(c.group_instances) if c.group_instances is not None else "?"
            notes.append(f"group {c.group_name}, {n} instance(s)")
        if c.metadata:
            notes.append("metadata " + json.dumps(c.metadata, sort_keys=True))
        rows.append(
            (
                c.key,
                c.sharing_pattern,
                rank_ranges(c.ranks),
                human_bytes(c.size_bytes),
                len(c.files),
                "yes" if c.required else "no",
                "; ".join(notes),
            )
        )
    print_table(("COMPONENT", "PATTERN", "RANKS", "SIZE", "FILES", "REQUIRED", "NOTES"), rows, right=(3, 4))

    print()
    rows = []
    for f in sorted(manifest.files.values(), key=lambda f: (f.component, f.path)):
        share = []
        if f.rank is not None:
            share.append(f"rank {f.rank}")
        if f.group_instance is not None:
            share.append(f"instance {f.group_instance}")
        if f.node is not None:
            share.append(f"node {f.node}")
        on_disk = "BAD, see PROBLEMS" if f.path in bad_files else "ok"
        rows.append((f.path, f.size, f.checksum, f.component, ", ".join(share) or "-", f.written_by, on_disk))
    print_table(("FILE", "BYTES", "CHECKSUM", "COMPONENT", "SHARE", "WRITER", "ON DISK"), rows, right=(1, 5))
    if problems:
        print()
        print(f"PROBLEMS (types, sizes and headers on disk; 'ckptd verify {path}' also checks every byte)")
        for problem in problems:
            print(f"  {problem}")
        print(
            f"ckptd inspect: {path} has {len(problems)} problem(s) on disk (listed under PROBLEMS); do not resume "
            "from it: client.load(\"latest\") skips it, 'ckptd ls' lists the others",
            file=sys.stderr,
        )
    return EXIT_OK


# --------------------------------------------------------------------------------------------- verify


def cmd_drop(args: argparse.Namespace) -> int:
    path = checkpoint_arg(args.checkpoint)
    try:
        removed = fmt.drop_component(path, args.component, force=args.force)
    except fmt.FormatError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(
            f"{path}: could not drop {args.component!r}: {e}; the checkpoint is unchanged or holds "
            "only files its manifest no longer lists: run the same command again to remove them"
        ) from None
    how = f"load(..., skip=[{args.component!r}])" if args.force else "load('latest')"
    print(
        f"dropped component {args.component!r} from {path.name}: removed {', '.join(removed) or 'no file'}; "
        f"{how} resumes from it without {args.component!r}"
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    path = checkpoint_arg(args.checkpoint)
    try:
        total = manifest_data_size(fmt.read_manifest(path))
    except (fmt.FormatError, OSError):
        total = 0  # verify_checkpoint reports the manifest problem itself
    checksums = not args.size_only
    progress = Progress(f"verifying {path.name}", total, want_progress(args) and checksums)
    result = fmt.verify_checkpoint(path, checksums=checksums, progress=progress)
    if checksums:
        progress.finish()
    what = "sizes and checksums" if checksums else "sizes only (checksums skipped)"
    if args.json:
        print_json(
            {
                "path": str(path),
                "ok": result.ok,
                "checked": "sizes+checksums" if checksums else "sizes",
                "files_checked": result.files_checked,
                "bytes_checked": result.bytes_checked,
                "problems": result.problems,
            }
        )
    elif result.ok:
        print(f"{path}: OK, {result.files_checked} files, {human_bytes(result.bytes_checked)}, {what}")
    else:
        print(f"{path}: FAILED, {len(result.problems)} problem(s) ({what}):")
        for problem in result.problems:
            print(f"  {problem}")
    if result.ok:
        return EXIT_OK
    print(
        f"ckptd verify: {path} is damaged; do not resume from it: resume from an older checkpoint "
        "('ckptd ls' lists them; client.load(\"latest\") falls back on its own)",
        file=sys.stderr,
    )
    return EXIT_CHECK_FAILED


# ------------------------------------------------------------------------------------------------- gc


def remove_tree(path: Path) -> None:
    """rmtree that tolerates the directory (or parts of it) vanishing meanwhile."""

    def on_error(func: Any, p: str, exc: Any) -> None:
        err = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(err, FileNotFoundError):
            raise err

    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=on_error)
        else:
            shutil.rmtree(path, onerror=on_error)
    except FileNotFoundError:
        pass


def cmd_gc(args: argparse.Namespace) -> int:
    from ckptd import ownership

    out = output_dir_arg(args.output_dir)
    if args.save_total_limit is not None:
        return gc_retention_preview(out, args)
    if args.keep_every_n_steps is not None:
        raise CliError("--keep-every-n-steps goes with --dry-run --save-total-limit N (a retention preview)")
    endpoint = endpoint_arg(args.endpoint)
    # The local daemon's live transactions are kept whatever their records say; every other entry is judged
    # by its owner record (host, pid and start time, deadline), so gc on any node removes only what a
    # provably gone owner left behind, and never another live daemon's temp dir.
    status = request_status(endpoint, args.timeout)
    live: set[str] = set()
    if status is not None:
        live = {str(t.get("txn")) for t in status.get("in_flight", []) if isinstance(t, dict)}
    else:
        print(
            f"ckptd gc: no daemon answered at {endpoint} within {args.timeout:g} s; temp dirs are judged by their "
            "owner records alone",
            file=sys.stderr,
        )
    min_age = 0.0 if args.force else args.min_age
    verdicts = ownership.judge_entries(out, live, unowned_min_age=min_age)
    if not any(v.stale for v in verdicts):
        for v in verdicts:
            print(f"kept {v.path.name}: {v.why}")
        print(f"nothing to remove in {fmt.checkpoints_root(out)}")
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    failures = 0
    for v in verdicts:
        if not v.stale:
            hint = " (--min-age, or --force)" if "no owner record" in v.why else ""
            print(f"kept {v.path.name}: {v.why}{hint}")
            continue
        if not args.dry_run and not ownership.remove_entry(v.path) and os.path.lexists(v.path):
            failures += 1
            print(f"ckptd gc: cannot remove {v.path}; check its permissions", file=sys.stderr)
            continue
        print(f"{verb} {v.path.name}: {v.why}")
    return EXIT_USAGE if failures else EXIT_OK


def gc_retention_preview(out: Path, args: argparse.Namespace) -> int:
    """``gc --dry-run --save-total-limit N``: what the daemon's retention would remove after the next commit."""
    from ckptd import transactions as tx

    if not args.dry_run:
        raise CliError(
            "--save-total-limit previews retention only (with --dry-run): the daemon applies retention itself "
            "after each commit, in its commit thread; pass save_total_limit= to CheckpointClient to change it"
        )
    if args.save_total_limit < 1 or (args.keep_every_n_steps is not None and args.keep_every_n_steps < 1):
        raise CliError("--save-total-limit and --keep-every-n-steps must be positive integers")
    found = fmt.survey_checkpoints(out).found
    if not found:
        print(f"no committed checkpoints in {fmt.checkpoints_root(out)}")
        return EXIT_OK
    try:
        best = fmt.find_best_checkpoint(out)
    except fmt.FormatError as e:
        raise CliError(f"{e}; retention would remove nothing while the mark is unreadable") from None
    best_step = fmt.parse_checkpoint_dirname(best.name) if best is not None else None
    steps = [c.step for c in found]
    for step, kept, why in tx.retention_verdicts(
        steps, steps[-1], args.save_total_limit, args.keep_every_n_steps, best_step
    ):
        print(f"{'would keep  ' if kept else 'would remove'} {fmt.checkpoint_dirname(step)}: {why}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------- status


def _node_summary(t: dict) -> str:
    """Multi-node: this daemon's role in the save, and (leading) how many nodes have voted PREPARED."""
    role, nnodes = t.get("role"), t.get("nnodes")
    if role not in ("leader", "follower") or not isinstance(nnodes, int):
        return ""
    if role == "follower":
        return f"  node {t.get('node')}/{nnodes} (follower)"
    voted = t.get("nodes_prepared") if isinstance(t.get("nodes_prepared"), list) else []
    return f"  leader: {len(voted) + 1}/{nnodes} nodes prepared"


def cmd_status(args: argparse.Namespace) -> int:
    endpoint = endpoint_arg(args.endpoint)
    if args.watch is not None:
        return watch_status(endpoint, args)
    report = request_status(endpoint, args.timeout)
    if report is None:
        raise CliError(f"no daemon answered at {endpoint} within {args.timeout:g} s; {no_daemon_hint(endpoint)}")
    if args.json:
        print_json(report)
        return EXIT_OK
    print("\n".join(render_status(report, endpoint, args.endpoint is None)))
    return EXIT_OK


def watch_status(endpoint: str, args: argparse.Namespace) -> int:
    """``status --watch S``: the report redrawn every S seconds until Ctrl-C (a lost daemon is shown, and
    watched for)."""
    interval = max(0.2, args.watch)
    tty = sys.stdout.isatty()
    try:
        while True:
            report = request_status(endpoint, args.timeout)
            if args.json:
                lines = [json.dumps(report, sort_keys=True)]
            elif report is None:
                lines = [f"no daemon answers at {endpoint} (watching; Ctrl-C to stop)"]
            else:
                lines = render_status(report, endpoint, args.endpoint is None)
                lines.append(f"(every {interval:g} s; Ctrl-C to stop)")
            if tty and not args.json:
                sys.stdout.write("\x1b[H\x1b[2J")  # home and clear: redraw in place
            print("\n".join(lines), flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def render_status(report: dict, endpoint: str, default_endpoint: bool) -> list[str]:
    """The lines of ``ckptd status`` for one report of the daemon."""
    out: list[str] = []
    in_flight = [t for t in report.get("in_flight", []) if isinstance(t, dict)]
    clients = report.get("clients") or []
    out.append(
        f"daemon       pid {report.get('pid')}, ckptd {report.get('version')}, up {human_age(report.get('uptime_s'))}"
    )
    shown = report.get("endpoint", endpoint)
    out.append(f"endpoint     {shown}")
    if default_endpoint and not os.environ.get(proto.ENDPOINT_ENV):
        out.append(
            "             (the default endpoint: every job of this user on this node shares it unless it sets "
            f"${proto.ENDPOINT_ENV}; the jobs below are what this daemon serves)"
        )
    jobs = report.get("jobs") if isinstance(report.get("jobs"), dict) else {}
    dirs = report.get("output_dirs") or []
    out.append(f"serves       {len(dirs)} output dir(s)")
    for d in dirs:
        job = jobs.get(d)
        out.append(f"  {d}" + (f"  (job {job})" if job else ""))
    out.append(f"clients      {len(clients)}" + (f" (pids {', '.join(map(str, clients))})" if clients else ""))
    out.append(f"in flight    {len(in_flight)} save(s)")
    for t in in_flight:
        out.append(
            f"  step {t.get('step')}  txn {t.get('txn')}  {t.get('state')}  "
            f"ranks {len(t.get('ranks_in') or [])}/{len(t.get('ranks_expected') or [])}  "
            f"staged {human_bytes(t.get('bytes_staged'))}  written {human_bytes(t.get('bytes_written'))}  "
            f"age {human_age(t.get('age_s'))}  {t.get('output_dir')}  job {t.get('job')}" + _node_summary(t)
        )
    out.append(
        f"totals       staged {human_bytes(report.get('bytes_staged'))}, "
        f"written {human_bytes(report.get('bytes_written'))}, "
        f"commits {report.get('commits')}, aborts {report.get('aborts')}"
    )
    last = report.get("last_commit")
    if last:
        when = report.get("last_commit_time")
        age = time.time() - when if isinstance(when, (int, float)) else None
        nbytes, secs = report.get("last_commit_bytes") or 0, report.get("last_commit_seconds")
        rate = f", {human_bytes(nbytes / secs)}/s" if isinstance(secs, (int, float)) and secs > 0 else ""
        took = f" in {secs:.3f} s" if isinstance(secs, (int, float)) else ""
        out.append(f"last commit  {last}, {human_age(age)} ago, {human_bytes(nbytes)}{took}{rate}")
    else:
        out.append("last commit  none since the daemon started")
    if report.get("metrics"):
        out.append(f"metrics      {report.get('metrics')}")
    if report.get("stopping"):
        out.append("stopping     yes: takes no new saves, finishing the ones in flight")
    # Failures after a commit's point of no return: the checkpoint is committed, but something after it
    # (retention, an fsync of the parent) did not happen and may need a look.
    for w in report.get("warnings") or []:
        out.append(f"warning      {w}")
    return out


# --------------------------------------------------------------------------------------------- export


def write_new_file(directory: Path, name: str, data: bytes) -> None:
    """``directory/name`` holds ``data``: written to a temp name created ``O_EXCL | O_NOFOLLOW`` (never through
    a symlink planted there), fsynced, then renamed over ``name``."""
    tmp = directory / f".{name}.ckptd-export-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of ours, or something planted: unlinking never follows a link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, directory / name)  # replaces a symlink at ``name`` itself, never its target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def copy_verified(
    src: Path, dst: Path, record: fmt.FileRecord, progress: Progress, at: fmt.CheckpointDir | None = None
) -> fmt.reading.Structure:
    """Copy ``src`` to ``dst`` through a temporary name, keeping it only if the bytes copied are verified.

    ``src`` is read by ``fmt.stream_verified``: a regular file only (never a FIFO, a device, or a symlink
    to something outside the checkpoint), opened relative to ``at`` (the checkpoint directory opened once)
    when given, its size, checksum and safetensors header checked as it streams. Returns what the header
    check parsed (``(metadata, layout)`` of a shard, ``(weight_map, tied)`` of the index).
    """
    tmp = dst.with_name(f".{dst.name}.ckptd-export")
    tmp.unlink(missing_ok=True)
    # O_EXCL | O_NOFOLLOW: never write through a link planted at the temporary name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:

        def write_all(chunk: memoryview) -> None:
            done = 0
            while done < len(chunk):
                done += os.write(fd, chunk[done:])

        try:
            parsed = fmt.stream_verified(src, record, sink=write_all, progress=progress, at=at)
        except fmt.FormatError as e:
            raise CliError(f"{e}; the checkpoint is damaged, export an older one", EXIT_CHECK_FAILED) from None
        os.close(fd)
        fd = -1
        os.replace(tmp, dst)
        return parsed
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def export_dest_problem(dest: Path, source: Path) -> str | None:
    """Why ``dest`` must not receive an export of the checkpoint ``source``, or None.

    Refused: a DEST that resolves (symlinks followed) to the source checkpoint or anywhere inside it, or
    inside any output dir's ``checkpoints/`` tree (the source's own included): export writes shards and an
    index, and there they would replace a committed checkpoint's files or be taken for a checkpoint.
    """
    target = dest.resolve()
    src = source.resolve()
    advice = (
        "choose a DEST outside every OUTPUT_DIR/checkpoints/ tree, e.g. OUTPUT_DIR/export-"
        f"{fmt.parse_checkpoint_dirname(source.name) or 'STEP'}"
    )
    for a in (target, *target.parents):
        if a == src:
            return (
                f"{dest} resolves to {target}, inside the checkpoint being exported ({source}); writing there "
                f"would replace its committed files: {advice}"
            )
        if a == src.parent or fmt.is_checkpoints_tree(a):
            return (
                f"{dest} resolves to {target}, inside {a}, the checkpoints directory of a ckptd output dir; "
                f"files written there would replace a committed checkpoint's own or be taken for one: {advice}"
            )
    return None


def cmd_export(args: argparse.Namespace) -> int:
    path = checkpoint_arg(args.checkpoint)
    with open_checkpoint(path, EXIT_CHECK_FAILED) as d:
        return export_checkpoint(args, d)


def export_checkpoint(args: argparse.Namespace, d: fmt.CheckpointDir) -> int:
    """``ckptd export``: every file is read relative to ``d`` (the checkpoint directory opened once)."""
    path = d.path
    manifest = load_manifest(d, EXIT_CHECK_FAILED)
    model = manifest.components.get(fmt.MODEL_KEY)
    if model is None:
        raise CliError(
            f"{path} has no {fmt.MODEL_KEY!r} component (it holds: {', '.join(manifest.components) or 'nothing'}); "
            f"export writes the model only, so save it as StateComponent({fmt.MODEL_KEY!r}, model, "
            "SharingPattern.GLOBAL or REPLICATED) to get Hugging Face shards"
        )
    if fmt.MODEL_INDEX_NAME not in model.files:
        raise CliError(
            f"the {fmt.MODEL_KEY!r} component of {path} was saved as a single generic ckptd file per share "
            f"({', '.join(model.files) or 'no files'}; pattern {model.sharing_pattern}), not as Hugging Face "
            f"shards with {fmt.MODEL_INDEX_NAME}; only a GLOBAL or REPLICATED model with a flat "
            "{name: tensor} state_dict is written in Hugging Face layout. Load this one with client.load()"
        )
    index_path = path / fmt.MODEL_INDEX_NAME
    index_rec = manifest.files[fmt.MODEL_INDEX_NAME]
    try:
        index_bytes = fmt.read_verified(index_path, index_rec, max_bytes=fmt.MAX_INDEX_BYTES, at=d)
        weight_map, tied = fmt.parse_model_index(bytes(index_bytes), str(index_path))
    except fmt.FormatError as e:
        raise CliError(f"{e}; the checkpoint is damaged, export an older one", EXIT_CHECK_FAILED) from None
    except OSError as e:
        raise CliError(f"{index_path}: cannot be read ({e.strerror or e})", EXIT_CHECK_FAILED) from None
    # Every shard the index names must be a file of the model component (never, say, the optimizer state).
    problems = fmt.index_problems(path, manifest, weight_map, tied)
    if problems:
        raise CliError(f"{problems[0]} (nothing was exported)", EXIT_CHECK_FAILED)
    shards = sorted(set(weight_map.values()))

    dest = Path(args.dest)
    problem = export_dest_problem(dest, path)
    if problem is not None:
        raise CliError(problem)
    if dest.exists() and not dest.is_dir():
        raise CliError(f"{dest} exists and is not a directory; expected a new or empty directory")
    created = not dest.exists()
    if not created and any(dest.iterdir()) and not args.force:
        raise CliError(f"{dest} is not empty; pass --force to write into it (files of the same name are replaced)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create {dest}: {e.strerror or e}") from None

    total = sum(manifest.files[s].size for s in shards) + index_rec.size
    progress = Progress(f"exporting {path.name}", total, want_progress(args))
    written: list[Path] = []
    try:
        for shard in shards:
            parsed = copy_verified(path / shard, dest / shard, manifest.files[shard], progress, at=d)
            written.append(dest / shard)
            # Each tensor the index maps to this shard must be in its header (checked before the index is
            # written, so a failure leaves nothing behind).
            names = {e.name for e in parsed[1].entries} if parsed is not None else set()
            problems = fmt.index_problems(path, manifest, weight_map, tied, {shard: names})
            if problems:
                raise CliError(f"{problems[0]} (nothing was exported)", EXIT_CHECK_FAILED)
        config = model.metadata.get(fmt.HF_CONFIG_METADATA_KEY)
        if isinstance(config, dict):
            # The model's Hugging Face config, kept in the manifest by the save: what from_pretrained needs.
            write_new_file(dest, fmt.HF_CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
            written.append(dest / fmt.HF_CONFIG_NAME)
        # The index last, as in the checkpoint: without it no loader picks up a partial export.
        copy_verified(index_path, dest / fmt.MODEL_INDEX_NAME, index_rec, progress, at=d)
        written.append(dest / fmt.MODEL_INDEX_NAME)
    except BaseException as e:
        progress.finish()
        for p in written:
            p.unlink(missing_ok=True)
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        if isinstance(e, OSError):
            raise CliError(f"export to {dest} failed: {e}; nothing was left behind") from None
        raise
    progress.finish()
    print(
        f"exported the model of {path} ({len(weight_map)} tensors, {human_bytes(total)} in {len(shards)} shard(s)) "
        f"to {dest}"
    )
    for group in tied:
        print(f"  tied weights stored once as {group[0]}: {', '.join(group[1:])} (re-tie them after loading)")
    if not created:
        mine = set(shards) | {fmt.MODEL_INDEX_NAME, fmt.HF_CONFIG_NAME}
        others = sorted(p.name for p in dest.iterdir() if p.name not in mine)
        if others:
            print(f"note: {dest} also holds {', '.join(others)}, which this export did not write", file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------------------------- serve


def cmd_import(args: argparse.Namespace) -> int:
    """``ckptd import``: the reading and the save run in ``python -m client.importing`` (the rank side: the
    node side never imports the client)."""
    cmd = [sys.executable, "-m", "client.importing", args.src, args.output_dir]
    if args.trust_weights_only_pickle:
        cmd.append("--trust-weights-only-pickle")
    for key in args.skip:
        cmd += ["--skip", key]
    if args.step is not None:
        cmd += ["--step", str(args.step)]
    if args.endpoint:
        cmd += ["--endpoint", args.endpoint]
    return subprocess.call(cmd)


def cmd_demo(args: argparse.Namespace) -> int:
    from ckptd import demo

    if args.output_dir and os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        raise CliError(
            f"--output-dir {args.output_dir} is not empty; the demo crashes and resumes a fresh run there and would "
            "resume whatever it finds: pass a new or empty directory, or leave --output-dir out for a temp dir"
        )
    cfg = demo.DemoConfig(
        output_dir=Path(args.output_dir) if args.output_dir else None,
        steps=args.steps,
        save_every=args.save_every,
        crash_at=args.crash_at,
    )
    return demo.run(cfg)


def serve_pacing_options(args: argparse.Namespace) -> dict[str, object]:
    """``--max-write-rate``, ``--cpu-affinity``, ``--ionice`` and ``--writer-threads``, checked, as
    DaemonConfig fields; CliError (exit 2) names the option, what was wrong and what to pass."""
    from ckptd import pacing

    if args.writer_threads < 1:
        raise CliError(f"--writer-threads {args.writer_threads}: expected at least 1 (the default is 4)")
    try:
        return {
            "max_write_rate": pacing.parse_write_rate(args.max_write_rate),
            "cpu_affinity": pacing.parse_cpu_list(args.cpu_affinity) if args.cpu_affinity is not None else None,
            "ionice": pacing.parse_ionice(args.ionice) if args.ionice is not None else None,
        }
    except pacing.PacingError as e:
        raise CliError(str(e)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from ckptd import server

    placement = serve_pacing_options(args)
    try:
        endpoint = proto.resolve_endpoint(args.endpoint)
        config = server.DaemonConfig(
            endpoint=endpoint,
            idle_exit_s=args.idle_exit,
            writer_threads=args.writer_threads,
            nice=args.nice,
            direct_io=args.direct_io,
            sweep_dirs=[Path(os.path.abspath(p)) for p in args.output_dir],
            grace_s=args.grace,
            keys_dir=Path(args.keys) if args.keys else None,
            peer_host=args.peer_host,
            peer_ports=args.peer_ports,
            drop_cache=args.drop_cache,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            **placement,  # type: ignore[arg-type]
        )
        return server.serve(config)
    except MetricsUnavailable as e:
        print(f"ckptd serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    except server.EndpointBusy as e:
        print(f"ckptd serve: {e}; use that daemon, or pass another --endpoint", file=sys.stderr)
        return EXIT_USAGE
    except (proto.ProtocolError, PermissionError, SecurityError) as e:
        print(f"ckptd serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # e.g. the socket directory cannot be created: say so, without a traceback
        logger.debug("ckptd serve failed", exc_info=True)
        print(f"ckptd serve: {e}; check the endpoint, --keys and --output-dir paths (-v shows where)", file=sys.stderr)
        return EXIT_USAGE


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        paths = security.generate_keys(Path(args.dir), force=args.force)
    except SecurityError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(
            f"cannot write CURVE keys to {args.dir}: {e}; expected a directory this user can create and write: "
            "pick another path or fix its permissions"
        ) from None
    print(f"wrote CURVE keys to {paths.directory}:")
    print(f"  server  {paths.server_public} (+ secret, 0600): for 'ckptd serve --keys {paths.directory}'")
    print(f"  client  {paths.client_public} (+ secret, 0600): for ranks, CKPTD_KEYS={paths.directory}")
    print(f"  {paths.authorized}/: public keys the daemon accepts (client.key is there)")
    return EXIT_OK


# -------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckptd",
        description="Asynchronous, transactional checkpoints for PyTorch.",
        epilog="Exit codes: 0 success, 1 a check failed (verify, export), 2 usage or environment error.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"ckptd {ckptd.__version__} (format {fmt.FORMAT_VERSION})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    endpoint_help = f"daemon endpoint (default ${proto.ENDPOINT_ENV} or {proto.default_endpoint()})"

    s = sub.add_parser("serve", help="run the node daemon")
    s.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; see docs/operations.md)",
    )
    s.add_argument("--metrics-host", default="127.0.0.1", help="interface of the metrics endpoint (default 127.0.0.1)")
    s.add_argument("--endpoint", help=f"ZeroMQ endpoint (default ${proto.ENDPOINT_ENV} or {proto.default_endpoint()})")
    s.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="S",
        help="exit after S seconds with no transaction and no live client",
    )
    s.add_argument("--writer-threads", type=int, default=4, metavar="N", help="parallel file writers (default 4)")
    s.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, give saves already handed over S seconds to commit, then abort the rest (default 30)",
    )
    s.add_argument(
        "--keys",
        metavar="DIR",
        help="CURVE key directory ('ckptd keygen DIR'); required for tcp:// endpoints (default $CKPTD_KEYS)",
    )
    s.add_argument(
        "--no-direct-io",
        dest="direct_io",
        action="store_false",
        help="write through the page cache instead of O_DIRECT (default: O_DIRECT where the file system takes it)",
    )
    s.add_argument(
        "--nice",
        type=int,
        default=10,
        metavar="N",
        help="lower the daemon's CPU priority by N (default 10) so that training keeps the cores; 0 keeps it",
    )
    s.add_argument(
        "--output-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="remove stale temp/trash directories under DIR/checkpoints at start (repeatable)",
    )
    s.add_argument(
        "--max-write-rate",
        metavar="RATE",
        default="off",
        help="spread each checkpoint's writes: a rate shared by all writers (e.g. 200MiB/s, 1GB/s), 'auto' (finish "
        "within half the interval between an output dir's saves; 'auto:F' for a fraction F), or 'off' (the "
        "default, also for the embedded daemon). Never at the cost of a save's deadline, and lifted when the "
        "next save is due",
    )
    s.add_argument(
        "--cpu-affinity",
        metavar="LIST",
        help="run every daemon thread on these CPUs only, e.g. '3' or '2-3' (taskset -c syntax); default: inherited",
    )
    s.add_argument(
        "--ionice",
        metavar="CLASS[:LEVEL]",
        help="I/O scheduling class of the daemon's writes: 'idle' or 'best-effort[:0-7]' (honoured by the bfq and "
        "mq-deadline schedulers); default: inherited",
    )
    s.add_argument(
        "--keep-page-cache",
        dest="drop_cache",
        action="store_false",
        help="leave written checkpoint files in the page cache (default: drop their pages after the fsync, so "
        "that checkpoints do not evict the trainer's cached data)",
    )
    s.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    s.add_argument(
        "--peer-host",
        metavar="HOST",
        help="interface (address or host name) this daemon binds for multi-node peer traffic when it leads a "
        "job (default $CKPTD_PEER_HOST, else the address of the host name)",
    )
    s.add_argument(
        "--peer-ports",
        metavar="LO-HI",
        help="TCP port range for the per-job peer sockets this daemon binds as a leader (default $CKPTD_PEER_PORTS, "
        "else an ephemeral port)",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("ls", help="list committed checkpoints; flag temp, trash and broken directories")
    s.add_argument("output_dir", metavar="OUTPUT_DIR", help="the training output dir (holds checkpoints/)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("inspect", help="show a checkpoint's manifest as tables")
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory (…/checkpoints/checkpoint-N)")
    s.add_argument("--json", action="store_true", help="print the raw manifest")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("verify", help="check every file against its manifest size and checksum (exit 1 if not)")
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory (…/checkpoints/checkpoint-N)")
    s.add_argument("--size-only", action="store_true", help="check sizes only, skip checksums (fast)")
    s.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a TTY")
    s.add_argument("--json", action="store_true", help="machine-readable result")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser(
        "drop", help="remove one component from a checkpoint (its files; the manifest is rewritten atomically)"
    )
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory (…/checkpoints/checkpoint-N)")
    s.add_argument("component", metavar="COMPONENT", help="the component's key, e.g. dataset")
    s.add_argument("--force", action="store_true", help="drop a component saved as required too")
    s.set_defaults(func=cmd_drop)

    s = sub.add_parser(
        "import",
        help="an HF Trainer, Forgather or DCP checkpoint as a pickle-free ckptd checkpoint",
        description="Read SRC (an HF Trainer checkpoint-N/, a Forgather checkpoint or a DCP checkpoint) and save it "
        "through the daemon as OUTPUT_DIR/checkpoints/checkpoint-N, which load('latest') resumes with components of "
        "the same keys (model, optimizer, scheduler, rng, trainer_state, ...).",
    )
    s.add_argument("src", metavar="SRC", help="the checkpoint directory to import")
    s.add_argument("output_dir", metavar="OUTPUT_DIR", help="the ckptd output dir to save it into")
    s.add_argument(
        "--trust-weights-only-pickle",
        action="store_true",
        help="read SRC's pickled files (.pt, .pth, .bin, DCP's .metadata) with torch.load(weights_only=True), which "
        "builds tensors, numbers, strings and containers only (DCP's metadata: its own records only); without it "
        "they are refused, so only safetensors and JSON are read",
    )
    s.add_argument("--skip", action="append", default=[], metavar="KEY", help="leave component KEY out (repeatable)")
    s.add_argument("--step", type=int, help="save as this step (default: the step SRC records, or ends its name with)")
    s.add_argument("--endpoint", help=endpoint_help)
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("gc", help="remove temp/trash directories that no live transaction owns")
    s.add_argument("output_dir", metavar="OUTPUT_DIR", help="the training output dir (holds checkpoints/)")
    s.add_argument("--endpoint", help=endpoint_help + ", asked which transactions are live")
    s.add_argument("--timeout", type=float, default=DAEMON_TIMEOUT_S, metavar="S", help="daemon answer timeout")
    s.add_argument(
        "--min-age",
        type=float,
        default=GC_MIN_AGE_S,
        metavar="S",
        help=f"remove a temp dir without an owner record (an older ckptd's) only once it is S seconds old "
        f"(default {GC_MIN_AGE_S:g})",
    )
    s.add_argument(
        "--force", action="store_true", help="remove temp dirs without an owner record (an older ckptd's) at any age"
    )
    s.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    s.add_argument(
        "--save-total-limit",
        type=int,
        metavar="N",
        help="with --dry-run: show which committed checkpoints retention with this limit would remove, and why",
    )
    s.add_argument(
        "--keep-every-n-steps",
        type=int,
        metavar="K",
        help="with --save-total-limit: milestones (multiples of K) are kept too",
    )
    s.set_defaults(func=cmd_gc)

    s = sub.add_parser("status", help="the daemon's saves in flight, bytes, throughput, last commit")
    s.add_argument("--endpoint", help=endpoint_help)
    s.add_argument("--timeout", type=float, default=DAEMON_TIMEOUT_S, metavar="S", help="daemon answer timeout")
    s.add_argument("--json", action="store_true", help="print the daemon's raw status report")
    s.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=1.0,
        metavar="S",
        help="redraw the status every S seconds (default 1) until Ctrl-C; with --json, one report per line",
    )
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("export", help="copy the model out as a plain Hugging Face safetensors directory")
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory (…/checkpoints/checkpoint-N)")
    s.add_argument("dest", metavar="DEST", help="directory to create (must be empty unless --force)")
    s.add_argument("--force", action="store_true", help="write into a non-empty DEST, replacing same-named files")
    s.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a TTY")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("keygen", help="write CURVE key pairs for tcp:// endpoints (server, client, authorized/)")
    s.add_argument("dir", metavar="DIR", help="key directory to create (0700); see docs/security.md")
    s.add_argument("--force", action="store_true", help="replace existing keys (other authorized keys are kept)")
    s.set_defaults(func=cmd_keygen)

    s = sub.add_parser("demo", help="a small training run with async checkpoints, a crash and a resume")
    s.add_argument("--output-dir", help="where to put the run: a new or empty directory (default: a new temp dir)")
    s.add_argument("--steps", type=int, default=30, help="training steps of each run (default 30)")
    s.add_argument("--save-every", type=int, default=5, help="save a checkpoint every N steps (default 5)")
    s.add_argument("--crash-at", type=int, default=20, help="the step whose save the trainer is killed in (default 20)")
    s.set_defaults(func=cmd_demo)

    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except CliError as e:
        print(f"ckptd {args.command}: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:  # e.g. `ckptd ls DIR | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"ckptd {args.command}: interrupted", file=sys.stderr)
        return 130
