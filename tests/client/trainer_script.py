"""A tiny trainer run as a real subprocess by the crash tests (tests/client/test_crash.py).

It builds deterministic state (a small model plus a large "blob" tensor, both a pure function of the
seed and size), saves it with ``save_async`` through a CheckpointClient whose daemon it starts itself
(embedded mode, endpoint from $CKPTD_ENDPOINT), prints a marker line once ``save_async`` has returned,
and then keeps "training" until it is killed. The test SIGKILLs it on seeing the marker.

``build_state`` is also imported by the tests to rebuild the expected content, as are the small
process helpers below (``lock_path``, ``daemon_pid``, ``process_gone``).
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
