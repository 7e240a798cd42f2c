"""Worker for tests/multinode/test_review_multinode.py (the issue 6 review): one rank of a job spread over
simulated nodes, like node_worker.py (whose state and helpers it reuses). Every rank writes
``RESULTS/<mode>_rank<r>.json``; CheckpointErrors are recorded, anything else propagates.

Modes:
  shared_daemon     two torchrun launches on one host that share one daemon endpoint and set no
                    CKPTD_NODE_ID (the node identity falls back to GROUP_RANK): construct, save step 1, wait
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch.distributed as dist
from node_worker import components, state_for

from client import CheckpointClient, CheckpointError


def mode_shared_daemon(out: Path, rank: int, node: int) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    holders = state_for(1, rank, node)
    try:
        client = CheckpointClient(out, components(holders), timeout_s=25)
    except CheckpointError as e:
        rec["construct_error"] = str(e)
        return rec
    with client:
        rec["nnodes"] = client.topology.nnodes
        try:
            rec["path1"] = str(client.save_async(1).wait(timeout=60))
        except CheckpointError as e:
            rec["error1"] = str(e)
        dist.barrier()
    return rec


def main() -> None:
    mode, out, results = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    node = int(os.environ["GROUP_RANK"])
    try:
        if mode == "shared_daemon":
            rec = mode_shared_daemon(out, rank, node)
        else:
            raise SystemExit(f"unknown mode {mode}")
    except Exception:
        traceback.print_exc()
        raise
    rec.update(rank=rank, node=node)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{mode}_rank{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
