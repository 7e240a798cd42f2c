"""Worker for test_groups.py, run by torchrun with 4 ranks: 2 replicas x 2 tensor-parallel shards.

TP groups [0,1] and [2,3]; DP groups [0,2] and [1,3] (the seed documents' DP x TP example, groups corrected).
A model shard is identical inside each DP group (PER_GROUP over "dp"); a data position is shared by a whole replica
(PER_GROUP over "tp"); a node cache is PER_NODE. Each rank records what it loaded in <results>/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from client import CheckpointClient, SharingPattern, StateComponent


class Value:
    def __init__(self, v: float) -> None:
        self.v = v

    def state_dict(self) -> dict:
        return {"t": torch.full((4,), float(self.v)), "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        assert torch.equal(state["t"], torch.full((4,), float(state["v"])))
        self.v = state["v"]


def main() -> None:
    out, results = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tp = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    groups = {"tp": tp[rank // 2], "dp": dp[rank % 2]}
    shard, data, cache = Value(100 + rank % 2), Value(200 + rank // 2), Value(300)
    comps = [
        StateComponent("model", shard, SharingPattern.PER_GROUP, process_group_name="dp"),
        StateComponent("data", data, SharingPattern.PER_GROUP, process_group_name="tp"),
        StateComponent("cache", cache, SharingPattern.PER_NODE),
    ]
    with CheckpointClient(out, comps, process_groups=groups) as client:
        saved = str(client.save_async(5).wait())
        shard.v = data.v = cache.v = -1
        loaded = str(client.load("latest"))
    results.mkdir(parents=True, exist_ok=True)
    record = {"saved": saved, "loaded": loaded, "model": shard.v, "data": data.v, "cache": cache.v}
    (results / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
