"""Worker for tests/multinode: one rank of a job spread over simulated nodes (one torchrun launch per node).

Run as ``torchrun --nnodes N --node-rank i ... node_worker.py MODE OUT RESULTS``, with ``CKPTD_NODE_ID``,
``CKPTD_ENDPOINT`` and ``CKPTD_PEER_HOST=127.0.0.1`` set per launch. Every rank writes
``RESULTS/<mode>_rank<r>.json``; expected CheckpointErrors are recorded, anything else propagates (torchrun
exits non-zero and the test prints the traceback).

Every tensor is filled from (step, rank, node), so a resumed rank can prove it got its own state back.

Modes:
  roundtrip     save steps 1 and 2 (GLOBAL, REPLICATED, PER_RANK, PER_NODE, RNG), wait for each, recording
                whether checkpoint-1 was visible while it waited; then steps 3 and 4 back to back; then fresh
                objects load("latest")
  kill_follower save 1; save 2 with a big PER_RANK state, and node 1's local rank 0 kill -9s its daemon right
                after save_async returns; every rank records the error and its delay, the entries of
                checkpoints/, what load("latest") gives; then save 3 (a fresh daemon) and load it
  kill_leader   the same, with rank 0 killing the leader's daemon
  identity      the ranks of one launch claim different CKPTD_NODE_IDs (refused), then none (one node)
  nokey         rank 0 connects to the leader's peer socket with a key of its own and sends a forged vote
                (recording whether anything answered), then the job saves step 1
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ckptd import format as fmt
from client import CheckpointClient, CheckpointError, RNGState, SharingPattern, StateComponent

BIG = 16 * 1024 * 1024  # float32 elements per rank in the kill modes: 64 MiB, still being written when killed


class Holder:
    """A Stateful over a dict of tensors that load_state_dict replaces in place."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def filled(n: int, value: float) -> torch.Tensor:
    return torch.full((n,), float(value), dtype=torch.float32)


def state_for(step: int, rank: int, node: int, big: bool = False) -> dict[str, Holder]:
    return {
        "model": Holder({"w": filled(64, step), "b": filled(8, step + 0.5)}),
        "trainer": Holder({"step": step, "lr": 0.1 * step}),
        "shard": Holder({"x": filled(BIG if big else 32, step * 100 + rank), "rank": rank}),
        "node_cache": Holder({"y": filled(16, step * 1000 + node), "node": node}),
    }


def components(holders: dict[str, Holder]) -> list[StateComponent]:
    return [
        StateComponent("model", holders["model"], SharingPattern.REPLICATED),
        StateComponent("trainer", holders["trainer"], SharingPattern.GLOBAL),
        StateComponent("shard", holders["shard"], SharingPattern.PER_RANK),
        StateComponent("node_cache", holders["node_cache"], SharingPattern.PER_NODE),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
    ]


def describe(holders: dict[str, Holder]) -> dict[str, Any]:
    """What was loaded, as the values every tensor is filled with."""
    h = {k: v.state for k, v in holders.items()}
    return {
        "model_w": float(h["model"]["w"][0]),
        "trainer_step": h["trainer"]["step"],
        "shard_x": float(h["shard"]["x"][0]),
        "shard_rank": h["shard"]["rank"],
        "shard_len": int(h["shard"]["x"].numel()),
        "node_y": float(h["node_cache"]["y"][0]),
        "node": h["node_cache"]["node"],
    }


def entries(out: Path) -> list[str]:
    root = fmt.checkpoints_root(out)
    return sorted(os.listdir(root)) if root.is_dir() else []


def resume(out: Path, rank: int, node: int) -> dict[str, Any]:
    holders = state_for(0, rank, node)
    with CheckpointClient(out, components(holders), timeout_s=60) as client:
        path = client.load("latest")
    return {"loaded": str(path) if path else None, **describe(holders)}


def mode_roundtrip(out: Path, rank: int, node: int) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    holders = state_for(1, rank, node)
    with CheckpointClient(out, components(holders), timeout_s=60, save_total_limit=5) as client:
        t0 = time.monotonic()
        handle = client.save_async(1)
        visible_early = []
        while not handle.done():
            visible_early.append((fmt.checkpoints_root(out) / "checkpoint-1").exists())
            time.sleep(0.05)
        rec["path1"] = str(handle.wait())
        rec["seconds1"] = time.monotonic() - t0
        rec["visible_while_waiting"] = any(visible_early[:-1])
        rec["polls"] = len(visible_early)
        holders2 = state_for(2, rank, node)
        for k, v in holders2.items():
            holders[k].state = v.state
        rec["path2"] = str(client.save_async(2).wait())
        # Back to back: step 4 is handed over (and prepared on every node) while step 3 may still wait for
        # its commit; the leader commits them in order.
        handles = []
        for step in (3, 4):
            for k, v in state_for(step, rank, node).items():
                holders[k].state = v.state
            handles.append(client.save_async(step))
        client.wait()
        rec["paths34"] = [str(h.wait()) for h in handles]
        dist.barrier()
    rec["resumed"] = resume(out, rank, node)
    return rec


def wait_for_parts(client: CheckpointClient, txn: str, count: int) -> list[int]:
    from ckptd.protocol import MsgType

    deadline = time.monotonic() + 10
    ranks: list[int] = []
    while time.monotonic() < deadline:
        report = client._link.request(MsgType.STATUS, 5).body
        ranks = next((t["ranks_in"] for t in report["in_flight"] if t["txn"] == txn), [])
        if len(ranks) >= count:
            break
        time.sleep(0.002)
    return ranks


def mode_kill(out: Path, rank: int, node: int, victim_node: int) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    holders = state_for(1, rank, node)
    with CheckpointClient(out, components(holders), timeout_s=40) as client:
        rec["path1"] = str(client.save_async(1).wait())
        for k, v in state_for(2, rank, node, big=True).items():
            holders[k].state = v.state
        local_leader = client.topology.local_rank == 0
        handle = client.save_async(2)
        t0 = time.monotonic()
        if node == victim_node and local_leader:
            # Right after every rank of this node has handed its part over (the daemon is still writing).
            rec["ranks_in_at_kill"] = wait_for_parts(client, handle.txn, len(client.topology.node_ranks(node)))
            os.kill(client._link.daemon_pid, signal.SIGKILL)
            rec["killed"] = client._link.daemon_pid
        try:
            rec["path2"] = str(handle.wait(timeout=60))
        except CheckpointError as e:
            rec["error2"] = str(e)
        rec["seconds2"] = time.monotonic() - t0
        dist.barrier()
        rec["entries_after_abort"] = entries(out)
        loaded = state_for(0, rank, node)
        with CheckpointClient(out, components(loaded), read_only=True) as reader:
            rec["latest_after_abort"] = str(reader.load("latest"))
        rec["after_abort"] = describe(loaded)
        for k, v in state_for(3, rank, node).items():
            holders[k].state = v.state
        rec["path3"] = str(client.save_async(3).wait(timeout=60))
        dist.barrier()
        rec["entries_end"] = entries(out)
    rec["resumed"] = resume(out, rank, node)
    return rec


def mode_nokey(out: Path, rank: int, node: int) -> dict[str, Any]:
    import zmq

    from ckptd import protocol as proto
    from ckptd import security

    rec: dict[str, Any] = {}
    holders = state_for(1, rank, node)
    with CheckpointClient(out, components(holders), timeout_s=60) as client:
        if rank == 0:
            leader = client._leader_address
            rec["leader"] = leader
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # The job's server key is no secret; the client key pair is this process's own, not the job's.
            security.secure_client_socket(
                sock, security.ephemeral_keys(), server_key=client._peer_keys["server_public"].encode()
            )
            sock.connect(leader)
            forged = {"txn": "f" * 16, "node": 1, "ino": 1, "files": []}
            for msg in (proto.MsgType.P_HELLO, proto.MsgType.P_PREPARED, proto.MsgType.P_ABORT):
                body = {"node": 1, "pid": 1} if msg == proto.MsgType.P_HELLO else forged
                if msg == proto.MsgType.P_ABORT:
                    body = {"txn": "f" * 16, "node": 1, "reason": "forged"}
                try:
                    sock.send(proto.pack(msg, 7, **body), zmq.NOBLOCK)
                except zmq.Again:
                    pass
            rec["answered"] = bool(sock.poll(3000))
            sock.close()
            ctx.term()
        dist.barrier()
        rec["path1"] = str(client.save_async(1).wait())
        rec["entries"] = entries(out)
    return rec


def mode_identity(out: Path, rank: int, node: int) -> dict[str, Any]:
    """Two ranks of one torchrun node claiming different node ids: refused on every rank, naming the fix."""
    rec: dict[str, Any] = {}
    os.environ["CKPTD_NODE_ID"] = f"claimed-{rank}"
    try:
        CheckpointClient(out, components(state_for(1, rank, node)), timeout_s=30).close()
        rec["error"] = None
    except CheckpointError as e:
        rec["error"] = str(e)
    del os.environ["CKPTD_NODE_ID"]
    with CheckpointClient(out, components(state_for(1, rank, node)), timeout_s=30) as client:
        rec["nnodes"] = client.topology.nnodes
    return rec


def main() -> None:
    mode, out, results = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    node = int(os.environ["GROUP_RANK"])
    try:
        if mode == "roundtrip":
            rec = mode_roundtrip(out, rank, node)
        elif mode == "kill_follower":
            rec = mode_kill(out, rank, node, victim_node=1)
        elif mode == "kill_leader":
            rec = mode_kill(out, rank, node, victim_node=0)
        elif mode == "identity":
            rec = mode_identity(out, rank, node)
        elif mode == "nokey":
            rec = mode_nokey(out, rank, node)
        else:
            raise SystemExit(f"unknown mode {mode}")
    except BaseException:
        traceback.print_exc()
        raise
    rec.update(rank=rank, node=node)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{mode}_rank{rank}.json").write_text(json.dumps(rec, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
