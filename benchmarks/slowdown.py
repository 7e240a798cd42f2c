"""Training-step slowdown while ckptd writes a checkpoint in the background (DESIGN.md §8).

Runs a CPU training loop (an MLP, AdamW) and measures the median step time in three phases, interleaved
over --repeats rounds: with no save in flight (baseline), and while the daemon writes a save of
--state-mib MiB handed over by save_async (the stall itself excluded). Prints the slowdown as a ratio.

    python benchmarks/slowdown.py [--state-mib 1024] [--repeats 3] [--width 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from ckptd import protocol as proto
from client import CheckpointClient, SharingPattern, StateComponent


class Blob:
    def __init__(self, mib: int, tensors: int = 64) -> None:
        n = mib * 2**20 // 4 // tensors
        self.tensors = {f"t{i}": torch.randn(n) for i in range(tensors)}

    def state_dict(self) -> dict:
        return dict(self.tensors)

    def load_state_dict(self, state: dict) -> None:
        self.tensors = dict(state)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()

    model = torch.nn.Sequential(
        torch.nn.Linear(args.width, args.width), torch.nn.GELU(), torch.nn.Linear(args.width, args.width)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, args.width)

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    work = tempfile.mkdtemp(prefix="ckptd-slowdown-", dir=args.dir)
    proto.ensure_private_dir(proto.runtime_dir())
    endpoint = f"ipc://{proto.runtime_dir()}/slowdown-{os.getpid()}.sock"
    blob = Blob(args.state_mib)
    base, during, writes = [], [], []
    try:
        with CheckpointClient(work, [StateComponent("state", blob, SharingPattern.GLOBAL)], endpoint=endpoint) as c:
            c.save_async(0).wait()  # warm-up: allocates the slab
            for _ in range(20):
                step()
            for r in range(1, args.repeats + 1):
                t_end = time.perf_counter() + 2.0
                while time.perf_counter() < t_end:
                    base.append(step())
                h = c.save_async(r)
                t0 = time.perf_counter()
                while not h.done():
                    during.append(step())
                writes.append(time.perf_counter() - t0)
                h.wait()
                shutil.rmtree(h.path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, d = statistics.median(base), statistics.median(during)
    print(f"state {args.state_mib} MiB, {args.repeats} saves, torch threads {torch.get_num_threads()}")
    print(f"step time, no save in flight   : {b * 1e3:8.2f} ms  ({len(base)} steps)")
    print(
        f"step time, while ckptd writes  : {d * 1e3:8.2f} ms  ({len(during)} steps over "
        f"{statistics.median(writes):.2f} s per save)"
    )
    print(f"slowdown                       : {100 * (d / b - 1):+.1f} %   (target <= 5 % on the 2-core CI machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
