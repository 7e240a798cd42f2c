#!/usr/bin/env python3
"""Overlapped staging: the visible stall of ``save_async`` against the memcpy floor (DESIGN.md §8).

    python benchmarks/overlap.py                     # 1 GiB (SGD parameters + momentum), 5 repeats
    python benchmarks/overlap.py --mib 256 --repeats 3 --json out.json

A training loop whose step is a forward+backward that outlasts the copy of the state, then
``optimizer.step()``. Each repeat measures, interleaved and in rotating order:

- ``floor``: ``copy_`` of every state tensor into a preallocated, pre-faulted buffer (the copy floor);
- ``sync``: ``save_async`` with ``overlap_staging=False`` (everything copied before it returns);
- ``overlap``: ``save_async`` with overlapped staging (the default): the visible stall, then the time the
  optimizer's pre-step hook waited for the background copy (``handle.hook_wait_s``).

The forward+backward is a separate small MLP on its own data, sized by ``--fwd-ms`` (default: 1.5 × the
measured floor), so that it outlasts the copy as the target's condition says. Medians (min–max) over the
repeats; ratios of medians. Exit status 0 whether or not the target is met; the table says PASS/MISS.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ckptd import protocol as proto
from client import CheckpointClient, SharingPattern, StateComponent

TARGET = 0.25  # overlapped stall <= 0.25 x the copy floor


class Params:
    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"p{i}": p.detach() for i, p in enumerate(self.params)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(sd[f"p{i}"])


def fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 10 else f"{x:.2f} s"


def summary(xs: list[float]) -> str:
    return f"{fmt_s(statistics.median(xs))} ({fmt_s(min(xs))}–{fmt_s(max(xs))})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="state size: parameters + SGD momentum (default 1024)")
    ap.add_argument("--tensors", type=int, default=16, help="parameter tensors (default 16)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fwd-ms", type=float, default=None, help="forward+backward time (default 1.5 x the floor)")
    ap.add_argument("--dir", default=None, help="where the temp output dir goes (default $TMPDIR or /tmp)")
    ap.add_argument("--json", default=None, help="write the raw values here")
    args = ap.parse_args()

    n = args.mib * 2**20 // 8 // args.tensors  # half the bytes are parameters, half momentum
    params = [torch.nn.Parameter(torch.randn(n)) for _ in range(args.tensors)]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # the momentum buffers exist from here on
    state = [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
    floor_buf = [torch.empty_like(t) for t in state]
    for b in floor_buf:
        b.fill_(0)

    def floor() -> float:
        t0 = time.perf_counter()
        for dst, src in zip(floor_buf, state, strict=True):
            dst.copy_(src)
        return time.perf_counter() - t0

    floor()
    fwd_ms = args.fwd_ms if args.fwd_ms is not None else 1.5 * 1000 * statistics.median(floor() for _ in range(3))
    net = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 512))
    x = torch.randn(256, 512)

    def forward_backward() -> None:
        t_end = time.perf_counter() + fwd_ms / 1000
        while time.perf_counter() < t_end:
            net(x).square().mean().backward()

    work = Path(tempfile.mkdtemp(prefix="ckptd-overlap-", dir=args.dir))
    proto.ensure_private_dir(proto.runtime_dir())
    endpoint = f"ipc://{proto.runtime_dir()}/bench-overlap-{secrets.token_hex(4)}.sock"
    comps = [
        StateComponent("model", Params(params), SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
    ]
    rows: dict[str, list[float]] = {"floor": [], "sync": [], "overlap": [], "hook_wait": [], "overlapped_mib": []}
    clients = {
        "sync": CheckpointClient(work / "sync", comps, endpoint=endpoint, save_total_limit=1, overlap_staging=False),
        "overlap": CheckpointClient(work / "overlap", comps, endpoint=endpoint, save_total_limit=1),
    }
    step = 0
    try:
        for mode in ("sync", "overlap"):  # warm-up: the slabs are allocated here, not in a timed save
            clients[mode].save_async(step).wait()
            step += 1
        order = ["floor", "sync", "overlap"]
        for r in range(args.repeats):
            for mode in order[r % 3 :] + order[: r % 3]:
                if mode == "floor":
                    rows["floor"].append(floor())
                    continue
                t0 = time.perf_counter()
                h = clients[mode].save_async(step)
                rows[mode].append(time.perf_counter() - t0)
                forward_backward()
                opt.step()  # the pre-step hook waits for the background copy, if it is still running
                if mode == "overlap":
                    rows["hook_wait"].append(h.hook_wait_s)
                    rows["overlapped_mib"].append(h.overlapped_bytes / 2**20)
                h.wait()
                step += 1
            print(f"  repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    finally:
        for c in clients.values():
            c.close()
        shutil.rmtree(work, ignore_errors=True)
        _stop_daemon(endpoint)

    fl, ov = statistics.median(rows["floor"]), statistics.median(rows["overlap"])
    print(f"\nOverlapped staging: {args.mib} MiB (SGD parameters + momentum, {2 * args.tensors} tensors), CPU;")
    print(f"forward+backward {fwd_ms:.0f} ms per step; medians (min–max) over {args.repeats} repeats\n")
    print(f"  memcpy floor                 {summary(rows['floor'])}")
    print(f"  save_async, no overlap       {summary(rows['sync'])}")
    left = statistics.median(rows["overlapped_mib"])
    print(f"  save_async, overlapped       {summary(rows['overlap'])}   ({left:.0f} MiB left to the copy thread)")
    print(f"  pre-step hook waited         {summary(rows['hook_wait'])}")
    ratio = ov / fl
    print(f"\n  overlapped stall / floor: {ratio:.3f} (target <= {TARGET}: {'PASS' if ratio <= TARGET else 'MISS'})")
    print(f"  no-overlap stall / floor: {statistics.median(rows['sync']) / fl:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "fwd_ms": fwd_ms, "rows": rows}, indent=1))
    return 0


def _stop_daemon(endpoint: str) -> None:
    """SIGTERM the daemon the clients started at ``endpoint`` (its pid is in ``<socket>.lock``)."""
    import signal

    try:
        pid = int(Path(proto.ipc_path(endpoint) + ".lock").read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, TypeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
