"""Resume speed: client.load() of a committed checkpoint into existing tensors (as a model's
load_state_dict copies into its parameters) against a raw sequential read of the same files into a
preallocated buffer (DESIGN.md §8: load >= 0.8 x raw sequential read bandwidth). Interleaved repeats, medians.

    python benchmarks/load.py [--size-mib 1024] [--tensors 64] [--repeats 5] [--drop-caches]

--drop-caches (root only) empties the page cache before each read, so both sides read from the disk;
without it both read from the page cache, which measures the CPU side of loading (parse, checksum, views).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ckptd import protocol as proto
from client import CheckpointClient, SharingPattern, StateComponent

CHUNK = 64 * 1024 * 1024


class Blob:
    def __init__(self, mib: int, tensors: int) -> None:
        n = mib * 2**20 // 4 // tensors
        self.tensors = {f"t{i}": torch.randn(n) for i in range(tensors)}

    def state_dict(self) -> dict:
        return dict(self.tensors)

    def load_state_dict(self, state: dict) -> None:
        # Like nn.Module.load_state_dict: copy into the tensors the trainer already has.
        for k, t in self.tensors.items():
            t.copy_(state[k])


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def raw_read(files: list[Path]) -> float:
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ckptd-load-", dir=args.dir)
    proto.ensure_private_dir(proto.runtime_dir())
    endpoint = f"ipc://{proto.runtime_dir()}/loadbench-{os.getpid()}.sock"
    results: dict[str, list[float]] = {"raw": [], "load": [], "load_noverify": []}
    try:
        blob = Blob(args.size_mib, args.tensors)
        with CheckpointClient(work, [StateComponent("state", blob, SharingPattern.GLOBAL)], endpoint=endpoint) as c:
            ckpt = c.save_async(1).wait()
            files = sorted(p for p in ckpt.iterdir())
            nbytes = sum(p.stat().st_size for p in files)
            raw_read(files)  # warm-up
            for r in range(args.repeats):
                order = ["raw", "load", "load_noverify"]
                order = order[r % 3 :] + order[: r % 3]
                for what in order:
                    if args.drop_caches:
                        drop_caches()
                    if what == "raw":
                        results["raw"].append(raw_read(files))
                    else:
                        t0 = time.perf_counter()
                        c.load(ckpt, verify=(what == "load"))
                        results[what].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    gib = nbytes / 2**30
    print(
        f"checkpoint {nbytes / 2**20:.0f} MiB in {len(files)} files, {args.repeats} repeats, "
        f"page cache {'dropped' if args.drop_caches else 'warm'}"
    )
    for k, label in (
        ("raw", "raw sequential read"),
        ("load", "client.load (checksums)"),
        ("load_noverify", "client.load(verify=False)"),
    ):
        print(f"{label:28s} {med[k]:7.3f} s  {gib / med[k]:6.2f} GiB/s")
    for k in ("load", "load_noverify"):
        ratio = med["raw"] / med[k]
        verdict = "PASS" if ratio >= 0.8 else "MISS"
        print(f"{k:14s} bandwidth / raw read bandwidth = {ratio:.2f}x  (target >= 0.8x) {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
