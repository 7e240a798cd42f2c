"""Who owns what: processes judged by (host, boot, pid, start time), temp-dir owner records, sweeps, leases.

Interim version written by the daemon owner so the daemon imports; the client-side owner replaces it with
the full lease implementation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ckptd import format as fmt

logger = logging.getLogger(__name__)

SWEEP_MARGIN_S = 600.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    boot_id: str
    pid: int
    start_time: int

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        return cls(socket.gethostname(), _boot_id(), pid, _start_time(pid) or 0)

    @classmethod
    def of_pid(cls, pid: int) -> ProcessIdentity | None:
        st = _start_time(pid)
        return None if st is None else cls(socket.gethostname(), _boot_id(), pid, st)

    def is_local(self) -> bool:
        return self.host == socket.gethostname() and self.boot_id == _boot_id()

    def alive(self) -> bool | None:
        if self.host != socket.gethostname():
            return None
        if self.boot_id != _boot_id():
            return False
        return _start_time(self.pid) == self.start_time

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ProcessIdentity:
        return cls(str(d["host"]), str(d["boot_id"]), int(d["pid"]), int(d["start_time"]))


def write_temp_owner(root: Path, step: int, txn: str, owner: ProcessIdentity, job: str | None, deadline: float) -> None:
    data = json.dumps({"owner": owner.to_json(), "job": job, "deadline": deadline}).encode()
    path = root / fmt.temp_owner_name(step, txn)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def remove_temp_owner(root: Path, step: int, txn: str) -> None:
    try:
        os.unlink(root / fmt.temp_owner_name(step, txn))
    except FileNotFoundError:
        pass


def _owner_gone(record_path: Path, entry: Path, now: float) -> bool:
    try:
        rec = json.loads(record_path.read_bytes()[: 1 << 16])
        owner = ProcessIdentity.from_json(rec["owner"])
        deadline = float(rec["deadline"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return now - os.lstat(entry).st_mtime > SWEEP_MARGIN_S
        except OSError:
            return True
    return owner.alive() is False or now > deadline + SWEEP_MARGIN_S


def sweep_stale(output_dir: Path, live_txns: set[str], now: float | None = None) -> list[Path]:
    root = fmt.checkpoints_root(output_dir)
    now = time.time() if now is None else now
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        path = root / name
        temp = fmt.parse_temp_dirname(name)
        if temp is not None:
            if temp[1] in live_txns or not _owner_gone(root / fmt.temp_owner_name(*temp), path, now):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            remove_temp_owner(root, *temp)
            removed.append(path)
        elif fmt.is_trash_dirname(name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("removed stale %s", ", ".join(p.name for p in removed))
    return removed


def read_lease(output_dir: Path) -> object | None:
    return None


def lease_allows(output_dir: Path, job: str) -> bool:
    return True
