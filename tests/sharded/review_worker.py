"""One rank of a review scenario for tests/sharded/test_review_sharded.py (torchrun + gloo).

    python -m torch.distributed.run --nproc_per_node=N review_worker.py SCENARIO OUT RESULTS

Every rank writes RESULTS/<SCENARIO>_rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


class Holder:
    """A SHARDED component: a fixed state, and what load_state_dict received."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.loaded: Any = None

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loaded = sd


def placements(out: Path, rank: int) -> dict[str, Any]:
    """Rank 0 declares the 4x4 tensor Shard(0), rank 1 Shard(1): a misconfigured parallel plan. Each holds 8
    elements of it, so the byte counts add up, yet rows 2-3 x columns 0-1 are held by no rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent

    full = torch.arange(16, dtype=torch.float32).reshape(4, 4) + 1  # no zero anywhere
    mesh = init_device_mesh("cpu", (2,))
    if rank == 0:
        local, place = full[0:2].clone(), [Shard(0)]
    else:
        local, place = full[:, 2:4].contiguous(), [Shard(1)]
    dt = DTensor.from_local(local, mesh, place, run_check=False, shape=full.shape, stride=full.stride())
    report: dict[str, Any] = {}
    with CheckpointClient(out, [StateComponent("w", Holder({"t": dt}), SharingPattern.SHARDED)]) as client:
        try:
            report["path"] = str(client.save_async(1).wait(60))
        except CheckpointError as e:
            report["error"] = str(e)
    if "path" in report and rank == 0:
        from safetensors.torch import load_file

        saved = load_file(str(Path(report["path"]) / "w_state.safetensors"))
        key = next(iter(saved))
        report["saved_equals_full"] = bool(torch.equal(saved[key], full))
        report["zeros"] = int((saved[key] == 0).sum())
    return report


SCENARIOS = {"placements": placements}


def main() -> None:
    scenario, out, results = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    results.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = SCENARIOS[scenario](out, rank)
    report["rank"] = rank
    (results / f"{scenario}_rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
