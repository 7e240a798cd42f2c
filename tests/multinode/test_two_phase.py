"""Multi-node two-phase commit (DESIGN §5), on simulated nodes: one torchrun launch per node on this machine,
each with its own CKPTD_NODE_ID and CKPTD_ENDPOINT, peers on 127.0.0.1. Real daemons (embedded, one per
node), real CURVE over TCP between them, real files; ranks run tests/multinode/node_worker.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import stop_daemon
from launch import run_job

from ckptd import format as fmt
from client import verify_checkpoint

pytestmark = pytest.mark.timeout(400)


@pytest.fixture
def endpoints():
    eps: list[str] = []
    yield eps
    for ep in eps:
        stop_daemon(ep)


def launch(mode: str, tmp_path: Path, endpoints: list[str], nnodes: int = 2, nproc: int = 2, **kw):
    from launch import node_endpoint

    endpoints.extend(node_endpoint(n) for n in range(nnodes))
    return run_job(mode, tmp_path / "out", tmp_path / "results", nnodes, nproc, endpoints=list(endpoints), **kw)


def expect_own_state(rec: dict, step: int) -> None:
    r, node = rec["rank"], rec["node"]
    assert rec == {**rec, "model_w": float(step), "trainer_step": step, "shard_x": step * 100.0 + r}
    assert rec["shard_rank"] == r and rec["node_y"] == step * 1000.0 + node and rec["node"] == node


def test_two_nodes_commit_every_pattern_once_both_prepared_and_every_rank_resumes_its_own_state(tmp_path, endpoints):
    # Node 1's daemon stalls 3 s at its first fsync: the leader must not commit before node 1 is PREPARED.
    job = launch("roundtrip", tmp_path, endpoints, node_env={1: {"CKPTD_TEST_FAULTS": "after_file_fsync=stall"}})
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    names = sorted(p.name for p in ckpt.iterdir())
    assert [n for n in names if n.startswith("shard_state_rank_")] == [
        f"shard_state_rank_{r}.safetensors" for r in range(4)
    ]
    assert [n for n in names if n.startswith("node_cache_")] == [
        "node_cache_state_node_0.safetensors",
        "node_cache_state_node_1.safetensors",
    ]
    assert "trainer_state.safetensors" in names and "model.safetensors.index.json" in names
    manifest = fmt.read_manifest(ckpt)
    assert manifest.world_size == 4 and manifest.topology["nnodes"] == 2
    # PER_NODE files were written by each node's local rank 0, PER_RANK by their own ranks.
    assert manifest.files["node_cache_state_node_1.safetensors"].written_by == 2
    assert {manifest.files[f"shard_state_rank_{r}.safetensors"].written_by for r in range(4)} == {0, 1, 2, 3}
    assert verify_checkpoint(ckpt)
    for r, rec in job.results.items():
        assert rec["path2"] == str(ckpt)
        assert rec["visible_while_waiting"] is False, f"rank {r} saw checkpoint-1 before node 1 was prepared"
        assert rec["seconds1"] > 2.5, f"step 1 committed in {rec['seconds1']:.2f} s, before node 1's 3 s stall ended"
        assert rec["paths34"] == [str(ckpt.with_name(f"checkpoint-{s}")) for s in (3, 4)]
        assert rec["resumed"]["loaded"] == str(ckpt.with_name("checkpoint-4"))
        expect_own_state({**rec["resumed"], "rank": rec["rank"], "node": rec["node"]}, 4)
    assert not [n for n in (tmp_path / "out" / "checkpoints").iterdir() if n.name.startswith(".tmp")]


@pytest.mark.parametrize("victim", ["follower", "leader"])
def test_kill_9_of_a_node_daemon_mid_save_aborts_everywhere_and_the_next_save_commits(tmp_path, endpoints, victim):
    job = launch(f"kill_{victim}", tmp_path, endpoints)
    root = tmp_path / "out" / "checkpoints"
    for r, rec in job.results.items():
        assert "path2" not in rec, f"rank {r}: step 2 committed although a node's daemon was killed mid-save"
        assert "not committed" in rec["error2"] or "can never commit" in rec["error2"], rec["error2"]
        assert rec["seconds2"] < 40, f"rank {r} took {rec['seconds2']:.1f} s, past the 40 s transaction timeout"
        # The temp dir is gone on every rank's view right after the handles raised.
        assert not [e for e in rec["entries_after_abort"] if re.fullmatch(r"\.tmp-checkpoint-2-[0-9a-f]+", e)]
        assert "checkpoint-2" not in rec["entries_after_abort"]
        assert rec["latest_after_abort"] == str(root / "checkpoint-1")
        expect_own_state({**rec["after_abort"], "rank": r, "node": rec["node"]}, 1)
        assert rec["path3"] == str(root / "checkpoint-3")
        expect_own_state({**rec["resumed"], "rank": r, "node": rec["node"]}, 3)
    victims = [rec for rec in job.results.values() if "killed" in rec]
    assert len(victims) == 1 and victims[0]["node"] == (1 if victim == "follower" else 0)
    assert len(victims[0]["ranks_in_at_kill"]) == 2  # killed after both of its ranks had handed over
    # Only committed checkpoints and the vetoes' records are left once the next daemon has run.
    left = [e for e in job.results[0]["entries_end"] if e.startswith(".tmp") and not e.endswith(".veto")]
    assert left == []
    assert verify_checkpoint(root / "checkpoint-1") and verify_checkpoint(root / "checkpoint-3")


def test_a_peer_without_the_jobs_key_is_refused_and_logged_and_nothing_is_written(tmp_path, endpoints):
    # Standalone daemons, as a cluster starts them (`ckptd serve --peer-host`), and no CKPTD_PEER_HOST in the job.
    from launch import node_endpoint, start_standalone_daemon

    endpoints.extend(node_endpoint(n) for n in range(2))
    logs = [tmp_path / f"ckptd-node{n}.log" for n in range(2)]
    daemons = [
        start_standalone_daemon(ep, log, "--peer-host", "127.0.0.1") for ep, log in zip(endpoints, logs, strict=True)
    ]
    try:
        job = run_job("nokey", tmp_path / "out", tmp_path / "results", endpoints=list(endpoints), peer_host_env=False)
    finally:
        for d in daemons:
            d.terminate()
            d.wait(30)
    assert all(d.returncode == 0 for d in daemons)
    rec = job.results[0]
    assert rec["leader"].startswith("tcp://127.0.0.1:")
    assert rec["answered"] is False
    assert rec["entries"] == [".ckptd-lease.json", "checkpoint-1"]
    log = logs[0].read_text()
    assert "refused peer" in log and rec["leader"].rsplit(":", 1)[0].split("//")[1] in log
    manifest = fmt.read_manifest(tmp_path / "out" / "checkpoints" / "checkpoint-1")
    assert manifest.txn != "f" * 16


def test_three_nodes_of_one_rank_commit_and_resume(tmp_path, endpoints):
    job = launch("roundtrip", tmp_path, endpoints, nnodes=3, nproc=1)
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    manifest = fmt.read_manifest(ckpt)
    assert manifest.topology["nnodes"] == 3
    assert sorted(f for f in manifest.files if f.startswith("node_cache")) == [
        f"node_cache_state_node_{n}.safetensors" for n in range(3)
    ]
    for r, rec in job.results.items():
        assert rec["node"] == r
        expect_own_state({**rec["resumed"], "rank": r, "node": r}, 4)
    assert json.loads((ckpt / fmt.MANIFEST_NAME).read_text())["world_size"] == 3


def test_ranks_of_one_launcher_node_claiming_different_node_ids_are_refused_on_every_rank(tmp_path, endpoints):
    job = launch("identity", tmp_path, endpoints, nnodes=1, nproc=2)
    for rec in job.results.values():
        assert rec["error"] and "one daemon serves one node" in rec["error"] and "CKPTD_NODE_ID" in rec["error"]
        assert rec["nnodes"] == 1


def test_fsdp2_sharded_state_across_two_nodes_is_written_by_each_nodes_daemon_and_reshards(tmp_path, endpoints):
    import torch
    from launch import WORKER

    script = WORKER.with_name("sharded_node_worker.py")
    job = launch("save", tmp_path, endpoints, nnodes=2, nproc=2, script=script)
    ckpt = Path(job.results[0]["path"])
    assert verify_checkpoint(ckpt)
    manifest = fmt.read_manifest(ckpt)
    assert manifest.topology["nnodes"] == 2
    # Ranks of both nodes wrote pieces of the same full-tensor files.
    assert manifest.components["model"].ranks == [0, 1, 2, 3]
    # Resumed on 2 nodes of 1 rank: world 4 -> 2, bit for bit.
    from launch import node_endpoint

    fresh = [node_endpoint(n) for n in range(2)]
    endpoints.extend(fresh)
    run_job("resume", tmp_path / "out", tmp_path / "again", 2, 1, endpoints=fresh, script=script)
    reference = torch.load(tmp_path / "results" / "reference.pt", weights_only=True)
    loaded = torch.load(tmp_path / "again" / "loaded-fsdp-ckptd.pt", weights_only=True)
    for key in reference["model"]:
        assert torch.equal(loaded["model"][key], reference["model"][key]), key
    assert loaded["optim"]["state"].keys() == reference["optim"]["state"].keys()
    for fqn, state in reference["optim"]["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded["optim"]["state"][fqn][name], value), (fqn, name)
