"""Worker of benchmarks/sharded.py: one rank of an FSDP2 job (CPU, gloo) that saves and loads its sharded state
with ckptd (SHARDED components) and with torch.distributed.checkpoint, interleaved.

Run by torchrun (one ``--standalone`` launch per repeat, started by the driver) as

    sharded_worker.py --tag TAG --out OUT --results RESULTS [--mib 256] [--saves 3] [--repeat 0] [--no-prewarm]

The model is an MLP of 4 Linear layers (``d×d``, ``d×(d+1)``, ``(d+1)×d``, ``d×d``; the ``d+1`` rows do not
split evenly over 4 ranks), ``fully_shard``-ed per layer and at the root over a 1-D CPU mesh of every rank, with
AdamW after one training step, so that its moments exist. ``d`` is chosen so that parameters plus both moments
come to about ``--mib`` MiB in all (``d ≈ sqrt(mib MiB / 48)``, a multiple of 4).

A round runs each save method once, in an order that rotates from round to round (and from repeat to repeat):

- ``ckptd``: ``client.save_async(step)`` of components ``model`` and ``optimizer`` (both ``SharingPattern.SHARDED``,
  the ``get_model_state_dict`` / ``get_optimizer_state_dict`` recipe), then ``handle.wait()``;
- ``dcp_async``: ``get_state_dict(model, optim)`` + ``dcp.async_save({"model": msd, "optim": osd}, ...)`` (default
  stager and thread executor), then ``future.result()``;
- ``dcp_save``: ``get_state_dict`` + ``dcp.save`` of the same dict.

Then both loads, in a rotating order, from this round's checkpoints: ``client.load(path)`` of the ckptd one and
``get_state_dict`` + ``dcp.load`` + ``set_state_dict`` of the ``dcp_async`` one. Before each load (untimed) every
local shard of the parameters and of the moments is zeroed, and after it the per-tensor float64 sums of the local
shards are checked against those taken after the training step: a load that restored nothing would fail here.
Before the loads, rank 0 records how much of each checkpoint is in the page cache (``fincore``) and then, unless
``--no-prewarm``, reads every file once (untimed), so that both loads read from a warm page cache.

Every timed call starts right after a ``dist.barrier()``. Round 0 is the warm-up (every method and load once, not
counted by the driver). After each round rank 0 records the bytes on disk of each output and deletes them
(untimed, after a barrier). Each rank writes ``RESULTS/<TAG>_rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from client import CheckpointClient, SharingPattern, StateComponent

MiB = 1024**2
SAVES = ["ckptd", "dcp_async", "dcp_save"]
LOADS = ["ckptd", "dcp"]
BATCH = 8


class MLP(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            [
                torch.nn.Linear(d, d),
                torch.nn.Linear(d, d + 1),  # d + 1 rows (and bias) split unevenly over 4 ranks (torch.chunk)
                torch.nn.Linear(d + 1, d),
                torch.nn.Linear(d, d),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


def width(mib: float) -> int:
    """d such that 4 layers of about d² fp32 parameters, plus AdamW's two moments, are about ``mib`` MiB."""
    return max(8, 4 * round(math.sqrt(mib * MiB / 48) / 4))


class ModelState:
    """The recipe of torch.distributed.checkpoint.state_dict: FQN-keyed DTensors in, the same out."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_model_state_dict(self.model, sd)


class OptimState:
    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optim)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optim, sd)


def build(mib: float) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    d = width(mib)
    model = MLP(d)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1000 + dist.get_rank())
    x, y = torch.randn(BATCH, d, generator=g), torch.randn(BATCH, d, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return model, optim, d


def local(t: Any) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_tensors(model: torch.nn.Module, optim: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """This rank's local shards of the parameters and of the AdamW moments (not the steps)."""
    out = []
    names = {p: n for n, p in model.named_parameters()}
    for p, n in names.items():
        out.append((n, local(p.data)))
        for k in ("exp_avg", "exp_avg_sq"):
            if k in optim.state.get(p, {}):
                out.append((f"{n}.{k}", local(optim.state[p][k])))
    return out


def fingerprint(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, float]:
    return {n: t.sum(dtype=torch.float64).item() for n, t in state_tensors(model, optim)}


@torch.no_grad()
def scramble(model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
    for _, t in state_tensors(model, optim):
        t.zero_()


def local_bytes(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, int]:
    ts = state_tensors(model, optim)
    return {
        "params": sum(t.numel() * t.element_size() for n, t in ts if not n.endswith(("exp_avg", "exp_avg_sq"))),
        "moments": sum(t.numel() * t.element_size() for n, t in ts if n.endswith(("exp_avg", "exp_avg_sq"))),
    }


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def resident(path: Path) -> float | None:
    """Fraction of the bytes of the files under ``path`` that are in the page cache (``fincore``), or None."""
    files = [str(f) for f in sorted(path.rglob("*")) if f.is_file()]
    total = sum(os.stat(f).st_size for f in files)
    if not files or total == 0 or shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return sum(int(x) for x in out.split()) / total
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def prewarm(path: Path) -> None:
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass


def rotated(items: list[str], k: int) -> list[str]:
    k %= len(items)
    return items[k:] + items[:k]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--mib", type=float, default=256.0)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--repeat", type=int, default=0)
    p.add_argument("--no-prewarm", action="store_true")
    args = p.parse_args()
    marks = {"main": time.time()}
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    marks["init"] = time.time()
    rec: dict[str, Any] = {"rank": rank, "world": world, "marks": marks, "rounds": []}
    try:
        model, optim, d = build(args.mib)
        rec["d"] = d
        rec["local_bytes"] = local_bytes(model, optim)
        ref = fingerprint(model, optim)
        marks["built"] = time.time()
        components = [
            StateComponent("model", ModelState(model), SharingPattern.SHARDED),
            StateComponent("optimizer", OptimState(model, optim), SharingPattern.SHARDED),
        ]
        with CheckpointClient(args.out / "ckptd", components, timeout_s=120) as client:
            marks["client"] = time.time()
            for i in range(args.saves + 1):
                k = args.repeat * (args.saves + 1) + i
                step = i + 1
                rnd: dict[str, Any] = {"round": i, "warmup": i == 0, "save": {}, "load": {}, "order": []}
                dcp_dir = args.out / f"dcp-{step}"
                ckpt: Path | None = None
                for m in rotated(SAVES, k):
                    rnd["order"].append(m)
                    dist.barrier()
                    if m == "ckptd":
                        t0 = time.perf_counter()
                        h = client.save_async(step)
                        t1 = time.perf_counter()
                        ckpt = h.wait(300)
                        t2 = time.perf_counter()
                        rnd["save"][m] = {
                            "blocking_s": t1 - t0,
                            "done_s": t2 - t0,
                            "staged_s": h.staged_s,
                            "collective_s": h.collective_s,
                            "bytes_staged": h.bytes_staged,
                        }
                    elif m == "dcp_async":
                        t0 = time.perf_counter()
                        msd, osd = get_state_dict(model, optim)
                        tg = time.perf_counter()
                        fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(dcp_dir))
                        t1 = time.perf_counter()
                        fut.result()
                        t2 = time.perf_counter()
                        del msd, osd
                        rnd["save"][m] = {"blocking_s": t1 - t0, "done_s": t2 - t0, "get_state_dict_s": tg - t0}
                    else:
                        t0 = time.perf_counter()
                        msd, osd = get_state_dict(model, optim)
                        tg = time.perf_counter()
                        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(args.out / f"dcp-sync-{step}"))
                        t1 = time.perf_counter()
                        del msd, osd
                        rnd["save"][m] = {"blocking_s": t1 - t0, "done_s": t1 - t0, "get_state_dict_s": tg - t0}
                assert ckpt is not None
                dist.barrier()
                sources = {"ckptd": ckpt, "dcp": dcp_dir}
                if rank == 0:
                    rnd["disk_bytes"] = {
                        "ckptd": tree_bytes(ckpt),
                        "dcp_async": tree_bytes(dcp_dir),
                        "dcp_save": tree_bytes(args.out / f"dcp-sync-{step}"),
                    }
                    rnd["resident_before_loads"] = {m: resident(src) for m, src in sources.items()}
                    if not args.no_prewarm:
                        for src in sources.values():
                            prewarm(src)
                        rnd["resident_after_prewarm"] = {m: resident(src) for m, src in sources.items()}
                for m in rotated(LOADS, k):
                    scramble(model, optim)
                    dist.barrier()
                    t0 = time.perf_counter()
                    if m == "ckptd":
                        client.load(ckpt)
                    else:
                        msd, osd = get_state_dict(model, optim)
                        state = {"model": msd, "optim": osd}
                        dcp.load(state, checkpoint_id=str(dcp_dir))
                        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
                        del msd, osd, state
                    t1 = time.perf_counter()
                    got = fingerprint(model, optim)
                    bad = sorted(n for n in ref if got.get(n) != ref[n])
                    if bad:
                        raise RuntimeError(f"rank {rank}: {m} load restored wrong values for {bad[:4]} ({len(bad)})")
                    rnd["load"][m] = {"load_s": t1 - t0}
                dist.barrier()
                if rank == 0:
                    for path in (ckpt, dcp_dir, args.out / f"dcp-sync-{step}"):
                        shutil.rmtree(path, ignore_errors=True)
                dist.barrier()
                rec["rounds"].append(rnd)
        marks["done"] = time.time()
    except BaseException:
        traceback.print_exc()
        raise
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.tag}_rank{rank}.json").write_text(json.dumps(rec, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
