"""Worker for tests/client/test_torchrun.py, run by ``torchrun --nproc_per_node=N dist_worker.py MODE ...``.

Every rank writes ``<result_dir>/<mode>_rank<r>.json`` with what it saw; the test process asserts on those
files and on the checkpoint directories. Expected CheckpointErrors are recorded, not raised; anything
unexpected propagates, so torchrun exits non-zero and the test prints the traceback.

Modes:
  train OUT RESULTS     3 training steps, save_async(3) + wait, then record RNG draws and 4 more losses
  resume OUT RESULTS    fresh objects (other seeds), load("latest"), record RNG draws and 4 more losses
  failures OUT RESULTS  replication validation cases (one output dir each under OUT/validate), then saves
                        where rank 1's state_dict fails and saves that work (OUT/badleaf)
  collective OUT RESULTS
                        something fails on rank 1 only, before or inside a collective: a bad endpoint at
                        construction, a daemon that is gone at save_async (rank 1 talks to its own daemon at
                        $CKPTD_TEST_RANK1_ENDPOINT and kills it), a load_state_dict that raises at load;
                        every rank must raise the same CheckpointError within seconds
  preempt OUT RESULTS   a loop with preemption_point(step) on both ranks; only rank 0 gets SIGTERM (at
                        step 7): both ranks save step 7 together and leave with SystemExit(143)
  lease OUT RESULTS     build a client on OUT (which another process of some job may hold), and if that
                        works save step 10 and load it back; records the outcome and the job id
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ckptd import format as fmt
from client import CheckpointClient, CheckpointError, RNGState, SharingPattern, StateComponent, list_checkpoints

SAVE_STEP = 3
CONTINUE_STEPS = 4
# Small enough that the model is split over several Hugging Face shards.
MAX_SHARD_SIZE = 700


# ------------------------------------------------------------------------------------------- helpers


class DictState:
    """A Stateful over a plain dict (the trainer's progress, an optimizer-like tree, ...)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


class DataState:
    """Per-rank data-loader position: a cursor and a per-rank tensor that shifts every batch."""

    def __init__(self, shift: torch.Tensor) -> None:
        self.cursor = 0
        self.shift = shift

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "shift": self.shift.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        self.shift = state["shift"].clone()


def make_model(hidden: int = 16) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_lists(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {name: t.tolist() for name, t in state.items()}


def draws() -> dict[str, Any]:
    """A few values from every generator RNGState covers."""
    return {
        "torch": torch.rand(5).tolist(),
        "python": [random.random() for _ in range(3)],
        "numpy": np.random.rand(3).tolist(),
    }


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, data: DataState, trainer: DictState) -> float:
    """One data-parallel step: per-rank batch, gradients averaged over ranks by hand (no DDP broadcast)."""
    x = torch.randn(4, 8) + data.shift + 0.01 * data.cursor
    y = torch.randn(4, 4)
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    world = dist.get_world_size()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    opt.step()
    data.cursor += 1
    trainer.state["step"] += 1
    trainer.state["losses"].append(loss.item())
    return loss.item()


def components(model, opt, data, trainer) -> list[StateComponent]:
    return [
        StateComponent("trainer", trainer, SharingPattern.GLOBAL),
        StateComponent("model", model, SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        StateComponent("data", data, SharingPattern.PER_RANK),
    ]


def seed_rank(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def listing(out: Path) -> list[str]:
    root = out / "checkpoints"
    # The lease that the open client holds is not a checkpoint, a temp or a trash dir.
    return sorted(n for n in os.listdir(root) if n != fmt.LEASE_NAME) if root.is_dir() else []


# --------------------------------------------------------------------------------------------- modes


def run_train(rank: int, out: Path) -> dict[str, Any]:
    torch.manual_seed(0)  # the model and optimizer start identical on every rank
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seed_rank(1000 + rank)  # from here on every rank draws its own numbers
    data = DataState(torch.full((8,), float(rank + 1)) + torch.arange(8.0) * (rank + 2))
    trainer = DictState({"step": 0, "losses": []})
    with CheckpointClient(out, components(model, opt, data, trainer), max_shard_size=MAX_SHARD_SIZE) as client:
        for _ in range(SAVE_STEP):
            train_step(model, opt, data, trainer)
        saved_data = data.state_dict()
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}
        handle = client.save_async(SAVE_STEP, metadata={"loss": trainer.state["losses"][-1]})
        path = handle.wait(60)
        after_save = draws()
        losses = [train_step(model, opt, data, trainer) for _ in range(CONTINUE_STEPS)]
    return {
        "path": str(path),
        "data_cursor": saved_data["cursor"],
        "data_shift": saved_data["shift"].tolist(),
        "model": tensor_lists(saved_model),
        "model_digest": digest(saved_model),
        "draws": after_save,
        "losses": losses,
    }


def run_resume(rank: int, out: Path) -> dict[str, Any]:
    seed_rank(77 + 13 * rank)  # fresh objects that differ from the saved ones and between ranks
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = DataState(torch.full((8,), -5.0 - rank))
    trainer = DictState({"step": 0, "losses": []})
    before = digest(model.state_dict())
    with CheckpointClient(out, components(model, opt, data, trainer)) as client:
        path = client.load("latest")
        after_load = draws()
        model_digest = digest(model.state_dict())
        digests: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, model_digest)
        result = {
            "path": str(path),
            "digest_before_load": before,
            "model_digest": model_digest,
            "model_digests_all_ranks": digests,
            "trainer_step": trainer.state["step"],
            "data_cursor": data.cursor,
            "data_shift": data.shift.tolist(),
            "optimizer_steps": sorted({int(s["step"]) for s in opt.state_dict()["state"].values()}),
            "draws": after_load,
        }
        result["losses"] = [train_step(model, opt, data, trainer) for _ in range(CONTINUE_STEPS)]
    return result


def _attempt(client: CheckpointClient, step: int, out: Path) -> dict[str, Any]:
    """One save on every rank; records the outcome and (after a barrier) what the output dir holds."""
    try:
        path = client.save_async(step).wait(60)
        outcome = {"ok": True, "path": str(path)}
    except CheckpointError as e:
        outcome = {"ok": False, "error": str(e), "type": type(e).__name__}
    dist.barrier()
    outcome["listing"] = listing(out)
    outcome["committed"] = [p.name for p in list_checkpoints(out)]
    return outcome


def optimizer_like() -> dict[str, Any]:
    """An optimizer-shaped tree whose tensors sit two levels below the top, one of them bf16."""
    g = torch.Generator().manual_seed(5)
    return {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 4, generator=g).to(torch.bfloat16)},
            1: {"step": torch.tensor(3.0), "exp_avg_sq": torch.rand(4, generator=g)},
        },
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}],
    }


def run_validate(rank: int, out: Path) -> dict[str, Any]:
    cases: dict[str, Any] = {}

    def case(name: str, level: str, model: torch.nn.Module, opt_state: dict[str, Any]) -> None:
        comps = [
            StateComponent(
                "model", model, SharingPattern.REPLICATED, validate_replication=True, validation_level=level
            ),
            StateComponent(
                "optimizer",
                DictState(opt_state),
                SharingPattern.REPLICATED,
                validate_replication=True,
                validation_level=level,
            ),
        ]
        with CheckpointClient(out / name, comps) as client:
            cases[name] = [_attempt(client, 1, out / name)]

    def fresh(hidden: int = 16) -> torch.nn.Module:
        torch.manual_seed(0)
        return make_model(hidden)

    # Control: identical replicas pass at tensor level and commit.
    case("tensor_identical", "tensor", fresh(), optimizer_like())

    # Rank 1 perturbs one model weight; afterwards it restores it and the next save goes through.
    model = fresh()
    if rank == 1:
        with torch.no_grad():
            model[0].weight[3, 2] += 1e-3
    comps = [
        StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True, validation_level="tensor")
    ]
    with CheckpointClient(out / "tensor_model_weight", comps) as client:
        first = _attempt(client, 1, out / "tensor_model_weight")
        if rank == 1:
            with torch.no_grad():
                model[0].weight.copy_(fresh()[0].weight)
        cases["tensor_model_weight"] = [first, _attempt(client, 2, out / "tensor_model_weight")]

    # Rank 1 flips one element of the bf16 tensor two levels down in the optimizer-like tree.
    opt_state = optimizer_like()
    if rank == 1:
        t = opt_state["state"][0]["exp_avg"]
        t[1, 1] = t[1, 1] + 1.0
    case("tensor_nested_bf16", "tensor", fresh(), opt_state)

    # Quick level: values differ on rank 1 (model weight and the nested bf16 tensor) -> passes.
    model, opt_state = fresh(), optimizer_like()
    if rank == 1:
        with torch.no_grad():
            model[2].bias.add_(0.5)
        opt_state["state"][0]["exp_avg"][0, 0] += 2.0
    case("quick_values", "quick", model, opt_state)

    # Quick level: a shape difference on rank 1 fails.
    case("quick_shape", "quick", fresh(17 if rank == 1 else 16), optimizer_like())
    return {"cases": cases}


class FaultyData(DataState):
    """Per-rank state whose state_dict misbehaves on demand: ``mode`` "leaf" puts a set (no safetensors
    or JSON form) two levels down, "raise" makes state_dict() itself raise, None behaves."""

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__(shift)
        self.mode: str | None = None

    def state_dict(self) -> dict[str, Any]:
        if self.mode == "raise":
            raise RuntimeError("sampler state unavailable on this rank")
        state = super().state_dict()
        state["sampler"] = {"epoch": 1, "seen": {1, 2, 3} if self.mode == "leaf" else [1, 2, 3]}
        return state


def run_badleaf(rank: int, out: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = make_model()
    data = FaultyData(torch.full((3,), float(rank)))
    comps = [
        StateComponent("model", model, SharingPattern.REPLICATED),
        StateComponent("data", data, SharingPattern.PER_RANK),
    ]
    attempts = {}
    with CheckpointClient(out, comps) as client:
        data.mode = "leaf" if rank == 1 else None
        attempts["leaf"] = _attempt(client, 1, out)
        data.mode = None
        attempts["retry"] = _attempt(client, 1, out)  # the same step again, now clean
        data.mode = "raise" if rank == 1 else None
        attempts["raise"] = _attempt(client, 2, out)
        data.mode = None
        attempts["next"] = _attempt(client, 3, out)
    return {"attempts": attempts}


def run_failures(rank: int, out: Path) -> dict[str, Any]:
    return {"validate": run_validate(rank, out / "validate"), "badleaf": run_badleaf(rank, out / "badleaf")}


def _timed(what) -> dict[str, Any]:
    """Run ``what()``; record whether it raised CheckpointError, its text, and how long it took."""
    t0 = time.monotonic()
    try:
        what()
        outcome: dict[str, Any] = {"ok": True}
    except CheckpointError as e:
        outcome = {"ok": False, "error": str(e), "type": type(e).__name__}
    outcome["seconds"] = time.monotonic() - t0
    dist.barrier()
    return outcome


class LoadFailsOnRank1(DictState):
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if dist.get_rank() == 1:
            raise RuntimeError("this rank's object does not match the checkpoint")
        super().load_state_dict(state)


def run_collective(rank: int, out: Path) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    comps = [StateComponent("trainer", DictState({"step": 1}), SharingPattern.GLOBAL)]

    # 1. Construction: rank 1's endpoint is malformed; rank 0's is fine (and takes the lease first).
    endpoint = "bogus://nowhere" if rank == 1 else None
    cases["construct"] = _timed(lambda: CheckpointClient(out / "construct", comps, endpoint=endpoint))
    cases["construct"]["listing"] = listing(out / "construct")

    # 2. save_async: rank 1's own daemon is gone, and rank 1 may not start one (it is not local rank 0).
    mine = os.environ["CKPTD_TEST_RANK1_ENDPOINT"] if rank == 1 else None
    client = CheckpointClient(out / "save", comps, endpoint=mine, daemon_start_timeout_s=3.0)
    if rank == 1:
        lock = Path(mine[len("ipc://") :] + ".lock")
        pid = int(lock.read_text().strip())
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
            time.sleep(0.01)
        time.sleep(0.5)  # the connection drop reaches this rank's socket monitor
    dist.barrier()
    cases["save"] = _timed(lambda: client.save_async(1))
    client.close(wait=False)

    # 3. load: a committed checkpoint, then rank 1's load_state_dict raises while applying it.
    trainer = LoadFailsOnRank1({"step": 0})
    with CheckpointClient(out / "load", [StateComponent("trainer", DictState({"step": 7}), "global")]) as writer:
        writer.save_async(7).wait(60)
    with CheckpointClient(out / "load", [StateComponent("trainer", trainer, SharingPattern.GLOBAL)]) as reader:
        cases["load"] = _timed(lambda: reader.load("latest"))
    # 4. load with skip= on rank 1 only: refused on both ranks before any component is read.
    with CheckpointClient(out / "load", [StateComponent("trainer", DictState({"step": 0}), "global")]) as reader:
        cases["skip"] = _timed(lambda: reader.load("latest", skip=["trainer"] if rank == 1 else ()))
        # ... and a key no component has (a typo) on rank 1 only: also raised on both, not left in a collective.
        cases["skip_unknown"] = _timed(lambda: reader.load("latest", skip=["trainr"] if rank == 1 else ()))
    return {"cases": cases}


def run_lease(rank: int, out: Path) -> dict[str, Any]:
    trainer = DictState({"step": 10, "rank_seen": 0})
    comps = [StateComponent("trainer", trainer, SharingPattern.GLOBAL)]
    outcome: dict[str, Any] = {"run_id": os.environ.get("TORCHELASTIC_RUN_ID")}
    t0 = time.monotonic()
    try:
        client = CheckpointClient(out, comps)
    except CheckpointError as e:
        outcome.update(ok=False, error=str(e), seconds=time.monotonic() - t0)
        return outcome
    outcome.update(ok=True, seconds=time.monotonic() - t0, job=client.job)
    with client:
        outcome["path"] = str(client.save_async(10).wait(60))
        outcome["loaded"] = str(client.load("latest"))
    return outcome


def run_preempt(rank: int, out: Path) -> dict[str, Any]:
    trainer = DictState({"step": 0})
    data = DataState(torch.full((4,), float(rank)))
    comps = [
        StateComponent("trainer", trainer, SharingPattern.GLOBAL),
        StateComponent("data", data, SharingPattern.PER_RANK),
    ]
    outcome: dict[str, Any] = {}
    with CheckpointClient(out, comps) as client:
        client.install_preemption_handler(timeout_s=60)
        try:
            for step in range(1, 1000):
                trainer.state["step"] = step
                data.cursor = step
                if step == 5:
                    client.save_async(step)
                if step == 7 and rank == 0:
                    os.kill(os.getpid(), signal.SIGTERM)  # the cluster's notice, to this rank only
                client.preemption_point(step)
                time.sleep(0.01)
            outcome["exit"] = None
        except SystemExit as e:
            outcome["exit"] = e.code
        outcome["signalled"] = client.preempted
        outcome["step"] = trainer.state["step"]
    return outcome


MODES = {
    "preempt": run_preempt,
    "train": run_train,
    "resume": run_resume,
    "failures": run_failures,
    "collective": run_collective,
    "lease": run_lease,
}


def main() -> int:
    mode, out, results = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        result = MODES[mode](rank, out)
        result["rank"] = rank
        result["world_size"] = dist.get_world_size()
        results.mkdir(parents=True, exist_ok=True)
        (results / f"{mode}_rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # do not wait in destroy_process_group for a peer that may be stuck
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
