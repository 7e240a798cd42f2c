"""A tiny trainer run as a real subprocess by the crash tests (tests/client/test_crash.py).

It builds deterministic state (a small model plus a large "blob" tensor, both a pure function of the
seed and size), saves it with ``save_async`` through a CheckpointClient whose daemon it starts itself
(embedded mode, endpoint from $CKPTD_ENDPOINT), prints a marker line once ``save_async`` has returned,
and then keeps "training" until it is killed. The test SIGKILLs it on seeing the marker.

``build_state`` is also imported by the tests to rebuild the expected content, as are the small
helpers below (``lock_path``, ``daemon_pid``, ``entries``, ``process_gone``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

MARKER = "CKPTD-TEST-STAGED"


# --------------------------------------------------------------------------- helpers for the tests


def lock_path(endpoint: str) -> Path:
    """The daemon's endpoint lock file (it holds the daemon's pid): socket path + ".lock"."""
    assert endpoint.startswith("ipc://")
    return Path(endpoint[len("ipc://") :] + ".lock")


def daemon_pid(endpoint: str) -> int | None:
    try:
        text = lock_path(endpoint).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def entries(root: Path) -> list[str]:
    """The names in a ``checkpoints`` directory, leaving out the lease a live client holds there."""
    from ckptd import format as fmt

    return sorted(n for n in os.listdir(root) if n != fmt.LEASE_NAME)


def memfd_slabs(owner_pid: int | None = None) -> dict[int, set[str]]:
    """Every process that holds (as an fd) or maps a ckptd staging slab, with the slab names.

    Slabs are memfds named ``ckptd-<uid>-<pid>-r<rank>-<id>``; ``owner_pid`` keeps only the slabs that
    process created. A slab of a dead trainer that appears here is memory still in use (by the daemon)."""
    prefix = f"memfd:ckptd-{os.getuid()}-" + (f"{owner_pid}-" if owner_pid is not None else "")
    found: dict[int, set[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        names: set[str] = set()
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                try:
                    target = os.readlink(f"/proc/{entry}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("/" + prefix):
                    names.add(target[len("/memfd:") :].split(" ")[0])
            with open(f"/proc/{entry}/maps") as f:
                for line in f:
                    i = line.find(prefix)
                    if i >= 0:
                        names.add(line[i + len("memfd:") :].split(" ")[0].strip())
        except OSError:
            continue  # the process exited meanwhile
        if names:
            found[int(entry)] = names
    return found


def shm_files(owner_pid: int) -> list[str]:
    """/dev/shm files named like a slab of ``owner_pid`` (slabs were /dev/shm files before they became
    memfds; there must be none now)."""
    prefix = f"ckptd-{os.getuid()}-{owner_pid}-"
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited; a zombie nobody has reaped yet counts as exited."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# --------------------------------------------------------------------------------- the trainer


class Captured:
    """Saves a given state and records what load_state_dict receives (shared by the client tests)."""

    def __init__(self, state) -> None:
        self.state = state
        self.loaded = None

    def state_dict(self):
        return self.state

    def load_state_dict(self, state) -> None:
        self.loaded = state


class Blob:
    """A stateful holding one large tensor and a little nested metadata."""

    def __init__(self, tensor: torch.Tensor, note: str) -> None:
        self.tensor = tensor
        self.note = note

    def state_dict(self) -> dict:
        return {"tensor": self.tensor, "note": self.note}

    def load_state_dict(self, state: dict) -> None:
        self.tensor = state["tensor"]
        self.note = state["note"]


def build_state(seed: int, blob_mb: int) -> tuple[torch.nn.Module, Blob]:
    """Deterministic model and blob: equal on every call with the same arguments."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    n = blob_mb * 1024 * 1024 // 4
    blob = torch.arange(n, dtype=torch.float32).mul_(0.5).add_(float(seed))
    return model, Blob(blob, f"seed={seed} mb={blob_mb}")


def components(model: torch.nn.Module, blob: Blob) -> list:
    from client import SharingPattern, StateComponent

    return [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("blob", blob, SharingPattern.GLOBAL),
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blob-mb", type=int, default=128)
    ap.add_argument("--then-step", type=int, default=None, help="hand over a second save right after the first")
    args = ap.parse_args()

    from client import CheckpointClient

    model, blob = build_state(args.seed, args.blob_mb)
    client = CheckpointClient(args.out, components(model, blob))  # endpoint from $CKPTD_ENDPOINT
    handle = client.save_async(args.step, metadata={"writer_pid": os.getpid()})
    if args.then_step is not None:
        # Back to back: this waits for the daemon to release the slab, then hands over a second save
        # while the first may still be syncing.
        handle = client.save_async(args.then_step, metadata={"writer_pid": os.getpid()})
    print(f"{MARKER} step={handle.step} txn={handle.txn} pid={os.getpid()}", flush=True)
    # Keep "training" until the test kills us. Overwrite the state we just handed off first: the
    # checkpoint must hold the snapshot taken inside save_async, not whatever the tensors hold later.
    with torch.no_grad():
        blob.tensor.fill_(-1.0)
        for p in model.parameters():
            p.fill_(-1.0)
    x = torch.randn(4, 16)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with torch.no_grad():
            model(x)
        time.sleep(0.01)
    print("trainer was not killed", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
