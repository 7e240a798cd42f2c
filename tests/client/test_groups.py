"""PER_GROUP and PER_NODE on one node, under torchrun with 4 gloo ranks (2 replicas x 2 TP shards)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd import format as fmt

WORKER = Path(__file__).resolve().parent / "groups_worker.py"


def test_per_group_and_per_node_are_written_once_per_instance_and_read_back_by_their_members(tmp_path, endpoint):
    out, results = tmp_path / "out", tmp_path / "results"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    cmd += [str(WORKER), str(out), str(results)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"torchrun hung; output:\n{proc.communicate()[0]}")
    assert proc.returncode == 0, output

    ckpt = out / "checkpoints" / "checkpoint-5"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "cache_state_node_0.safetensors",
        "checkpoint_manifest.json",
        "data_state_group_tp_0.safetensors",
        "data_state_group_tp_1.safetensors",
        "model_state_group_dp_0.safetensors",
        "model_state_group_dp_1.safetensors",
    ]
    manifest = fmt.read_manifest(ckpt)
    model, data, cache = (manifest.components[k] for k in ("model", "data", "cache"))
    assert model.group_name == "dp" and model.group_instances == [[0, 2], [1, 3]] and model.ranks == [0, 1]
    assert data.group_name == "tp" and data.group_instances == [[0, 1], [2, 3]] and data.ranks == [0, 2]
    assert cache.sharing_pattern == "per_node" and cache.ranks == [0]
    assert manifest.files["model_state_group_dp_1.safetensors"].written_by == 1
    assert manifest.files["data_state_group_tp_1.safetensors"].written_by == 2
    assert fmt.verify_checkpoint(ckpt)

    for rank in range(4):
        got = json.loads((results / f"rank{rank}.json").read_text())
        assert got["loaded"] == str(ckpt)
        assert got["model"] == 100 + rank % 2, (rank, got)  # its DP group's shard
        assert got["data"] == 200 + rank // 2, (rank, got)  # its replica's data position
        assert got["cache"] == 300
