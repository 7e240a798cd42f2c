"""Worker of benchmarks/multinode.py: one rank of a job on one or more (simulated) nodes.

Run by torchrun (one launch per node, started by the driver) as

    multinode_worker.py --tag TAG --out OUT --results RESULTS [--small-mib 1] [--mib 64] [--saves 5]

Phase "collective": a client over a small state (``--small-mib`` MiB PER_RANK per rank plus a 4 KiB REPLICATED
component whose replication digest travels in the vote), one warm-up save and ``--saves`` timed saves.
Phase "commit" (skipped with ``--mib 0``): a client over ``--mib`` MiB PER_RANK per rank, the same count of
saves. Every save starts right after a ``dist.barrier()``, so that ``collective_s`` times the collective and not
how late the ranks arrived, and is waited for (``handle.wait()``) before the next: saves never overlap. After
each commit rank 0 deletes the previous checkpoint (untimed, after a barrier) so the disk holds at most two.

Each rank writes ``RESULTS/<TAG>_rank<r>.json``: per phase, per save, the ``save_async`` stall, ``staged_s``,
``collective_s`` and the time from the ``save_async`` call until ``wait()`` returned; and the pickled size of the
object this rank contributed to the warm-up save's collective (measured by wrapping ``client._all_gather`` from
outside, after construction; not during the timed saves, where pickling would add to ``collective_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from client import CheckpointClient, SharingPattern, StateComponent

MiB = 1024**2


class Holder:
    """A Stateful over a dict of tensors."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def components(mib: float, rank: int) -> list[StateComponent]:
    n = max(1, int(mib * MiB) // 4)
    gen = torch.Generator().manual_seed(rank)
    shard = Holder({"x": torch.empty(n, dtype=torch.float32).uniform_(-1, 1, generator=gen)})
    model = Holder({"w": torch.linspace(0, 1, 1024, dtype=torch.float32)})  # the same on every rank
    return [
        StateComponent("shard", shard, SharingPattern.PER_RANK),
        StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True),
    ]


def run_phase(out: Path, mib: float, saves: int, rank: int, first_step: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"mib_per_rank": mib, "saves": []}
    vote_bytes: list[int] = []
    with CheckpointClient(out, components(mib, rank), timeout_s=120) as client:
        inner = client._all_gather

        def measured(obj: Any) -> list[Any]:
            if measuring:  # the warm-up save only: pickling here would add to the timed collective_s
                vote_bytes.append(len(pickle.dumps(obj)))
            return inner(obj)

        client._all_gather = measured  # type: ignore[method-assign]
        prev: Path | None = None
        measuring = False
        for i in range(saves + 1):
            step = first_step + i
            measuring = i == 0
            dist.barrier()
            t0 = time.monotonic()
            handle = client.save_async(step)
            t1 = time.monotonic()
            path = handle.wait()
            t2 = time.monotonic()
            sample = {
                "step": step,
                "warmup": i == 0,
                "stall_s": t1 - t0,
                "staged_s": handle.staged_s,
                "collective_s": handle.collective_s,
                "committed_s": t2 - t0,
                "bytes_staged": handle.bytes_staged,
            }
            rec["saves"].append(sample)
            dist.barrier()  # every rank saw the commit before the previous checkpoint goes
            if rank == 0 and prev is not None:
                shutil.rmtree(prev, ignore_errors=True)
            prev = path
            dist.barrier()
    rec["vote_bytes"] = vote_bytes
    return rec


def main() -> None:
    t_main = time.time()
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--small-mib", type=float, default=1.0)
    p.add_argument("--mib", type=float, default=0.0)
    p.add_argument("--saves", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    marks = {"main": t_main, "init": time.time()}
    rec: dict[str, Any] = {
        "marks": marks,
        "rank": rank,
        "world": dist.get_world_size(),
        "node": int(os.environ.get("GROUP_RANK", "0")),
        "node_id": os.environ.get("CKPTD_NODE_ID"),
    }
    try:
        rec["collective"] = run_phase(args.out / "small", args.small_mib, args.saves, rank, 1)
        marks["collective"] = time.time()
        if args.mib > 0:
            rec["commit"] = run_phase(args.out / "big", args.mib, args.saves, rank, 1)
            marks["commit"] = time.time()
    except BaseException:
        traceback.print_exc()
        raise
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.tag}_rank{rank}.json").write_text(json.dumps(rec, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
