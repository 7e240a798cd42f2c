"""One rank of a SHARDED (FSDP2 / tensor parallel) training job, run by tests/sharded/test_sharded.py.

    python -m torch.distributed.run --nproc_per_node=N sharded_worker.py MODE LAYOUT OUT RESULTS [SOURCE]

LAYOUT is ``fsdp`` (FSDP2 over every rank, uneven layer sizes), ``DPxTP`` (e.g. ``2x2``: FSDP2 over the data
parallel dim of a 2-D mesh, ColwiseParallel / RowwiseParallel over the tensor parallel dim) or ``plain``
(one process, no torch.distributed, an unsharded module). Modes:

- ``save``: train SAVE_STEP steps, save with ckptd (model and optimizer SHARDED) to OUT and with
  ``dcp.save`` to OUT/dcp, and write the full (gathered) state to RESULTS/reference.pt.
- ``resume``: load from SOURCE (``ckptd`` or ``dcp``) at this layout, gather the full state into
  RESULTS/loaded-<tag>.pt, train CONTINUE_STEPS more steps and report the losses.

With ``SHARDED_TRY_MISDECLARED=1``, ``save`` first tries to save the state declared PER_RANK and REPLICATED
(both must fail); with ``SHARDED_APP_STATE=1`` it also saves the ``get_state_dict`` / ``set_state_dict``
recipe as one more component, ``train``, and ``resume`` loads through that component alone.

Every rank writes RESULTS/<mode>-<tag>_rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SAVE_STEP = 3
CONTINUE_STEPS = 3
BATCH = 8


class MLP(torch.nn.Module):
    def __init__(self, tp: bool) -> None:
        super().__init__()
        # Uneven sizes: 33 and 17 rows do not split evenly over 2 or 4 ranks (torch.chunk semantics). Tensor
        # parallel needs the hidden size to split evenly over its ranks.
        hidden = 32 if tp else 33
        self.a = torch.nn.Linear(10, hidden)
        self.b = torch.nn.Linear(hidden, 17)
        self.c = torch.nn.Linear(17, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class ModelState:
    """The recipe of torch.distributed.checkpoint.state_dict: FQN-keyed DTensors in, the same out."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, sd)


class OptimState:
    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optim)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optim, sd)


class AppState:
    """The get_state_dict / set_state_dict recipe as one component (nested: model and optimizer together)."""

    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optim)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def build(layout: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, int, int]:
    """The model on this layout, its AdamW, and this rank's data-parallel index and size."""
    torch.manual_seed(0)
    if layout == "plain":
        model = MLP(tp=False)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2), 0, 1
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if layout == "fsdp":
        model = MLP(tp=False)
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model.a, model.b, model.c):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        dp, dp_size = dist.get_rank(), world
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        dp_size, tp_size = (int(x) for x in layout.split("x"))
        assert dp_size * tp_size == world, (layout, world)
        model = MLP(tp=True)
        mesh = init_device_mesh("cpu", (dp_size, tp_size), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"a": ColwiseParallel(), "b": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
        dp = mesh.get_coordinate()[0]
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), dp, dp_size


def train(model: torch.nn.Module, optim: torch.optim.Optimizer, dp: int, dp_size: int, steps: range) -> list[float]:
    """Deterministic steps: the global batch of each step is fixed; each data-parallel rank takes its slice."""
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(BATCH, 10, generator=g), torch.randn(BATCH, 5, generator=g)
        per = BATCH // dp_size
        loss = torch.nn.functional.mse_loss(model(x[dp * per : (dp + 1) * per]), y[dp * per : (dp + 1) * per])
        optim.zero_grad()
        loss.backward()
        optim.step()
        total = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(total)
            total /= dist.get_world_size()
        losses.append(total.item())
    return losses


def full_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole state, gathered (for the test only: ckptd itself never gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True))
    return {"model": {k: v.clone() for k, v in msd.items()}, "optim": osd}


def main() -> None:
    mode, layout, out, results = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    source = sys.argv[5] if len(sys.argv) > 5 else "ckptd"
    results.mkdir(parents=True, exist_ok=True)
    if layout != "plain":
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    from client import CheckpointClient, SharingPattern, StateComponent

    model, optim, dp, dp_size = build(layout)
    plain_model = os.environ.get("SHARDED_PLAIN_MODEL") == "1"  # model.state_dict() itself (DTensors in it)
    components = [
        StateComponent("model", model if plain_model else ModelState(model), SharingPattern.SHARDED),
        # Its plain values (step, param_groups) are checked across ranks; its DTensors differ by design.
        StateComponent("optimizer", OptimState(model, optim), SharingPattern.SHARDED, validate_replication=True),
    ]
    if os.environ.get("SHARDED_APP_STATE") == "1" and mode != "save":  # load through the recipe alone
        components = [StateComponent("train", AppState(model, optim), SharingPattern.SHARDED)]
    tag = f"{layout}-{source}"
    report: dict[str, Any] = {"rank": rank}
    if mode == "save":
        report["losses"] = train(model, optim, dp, dp_size, range(SAVE_STEP))
        if os.environ.get("SHARDED_TRY_MISDECLARED") == "1":
            report["misdeclared"] = misdeclared(out, model, optim, ["per_rank", "replicated"])
        if os.environ.get("SHARDED_APP_STATE") == "1":  # the recipe as one more component, beside the others
            components.append(StateComponent("train", AppState(model, optim), SharingPattern.SHARDED))
        with CheckpointClient(out, components) as client:
            h = client.save_async(SAVE_STEP)
            report["path"] = str(h.wait(60))
            report["bytes_staged"] = h.bytes_staged
            report["staged_s"] = h.staged_s
            # The model alone, as a Hugging Face directory beside the output dir (every rank's shards).
            report["model_dir"] = str(client.save_model(out.parent / "model", step=SAVE_STEP).wait(60))
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optim)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / "dcp"))
        ref = full_state(model, optim)
        if rank == 0:
            torch.save(ref, results / "reference.pt")
    elif mode == "resume":
        t0 = time.perf_counter()
        if source == "ckptd":
            from client import CheckpointError

            with CheckpointClient(out, components) as client:
                try:
                    report["path"] = str(client.load("latest"))
                except CheckpointError as e:
                    if os.environ.get("SHARDED_EXPECT_LOAD_ERROR") != "1":
                        raise
                    report["error"] = str(e)
                    (results / f"{mode}-{tag}_rank{rank}.json").write_text(json.dumps(report))
                    dist.barrier()
                    dist.destroy_process_group()
                    return
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(model, optim)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=str(out / "dcp"))
            set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        report["load_s"] = time.perf_counter() - t0
        loaded = full_state(model, optim) if layout != "plain" else _plain_state(model, optim)
        if rank == 0:
            torch.save(loaded, results / f"loaded-{tag}.pt")
        report["losses"] = train(model, optim, dp, dp_size, range(SAVE_STEP, SAVE_STEP + CONTINUE_STEPS))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    (results / f"{mode}-{tag}_rank{rank}.json").write_text(json.dumps(report))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def misdeclared(out: Path, model: torch.nn.Module, optim: torch.optim.Optimizer, patterns: list[str]) -> dict:
    """Try to save the DTensor state declared with each of ``patterns``: every save must fail, naming the
    tensor and what to declare, and leave no checkpoint. Returns the errors and the checkpoints found."""
    from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent

    errors = {}
    for value in patterns:
        pattern = SharingPattern(value)
        wrong = [
            StateComponent("model", model, pattern),
            StateComponent("optimizer", OptimState(model, optim), pattern),
        ]
        with CheckpointClient(out, wrong) as client:
            try:
                client.save_async(1)
            except CheckpointError as e:
                errors[value] = str(e)
    # A SHARDED component whose plain value differs between ranks, validated: refused like a REPLICATED one.
    rank = dist.get_rank()
    diverged = StateComponent(
        "optimizer", _Diverged(OptimState(model, optim), rank), SharingPattern.SHARDED, validate_replication=True
    )
    with CheckpointClient(out, [StateComponent("model", model, SharingPattern.SHARDED), diverged]) as client:
        try:
            client.save_async(1)
        except CheckpointError as e:
            errors["sharded-diverged"] = str(e)
    return {"errors": errors, "checkpoints": [p.name for p in sorted((out / "checkpoints").glob("checkpoint-*"))]}


class _Diverged:
    """A SHARDED state whose plain ``lr`` differs on every rank (a bug SHARDED validation must catch)."""

    def __init__(self, inner: Any, rank: int) -> None:
        self.inner, self.rank = inner, rank

    def state_dict(self) -> dict[str, Any]:
        sd = self.inner.state_dict()
        sd["param_groups"][0]["lr"] = 0.1 * (self.rank + 1)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.inner.load_state_dict(sd)


def _plain_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        "model": {k: v.clone() for k, v in get_model_state_dict(model).items()},
        "optim": get_optimizer_state_dict(model, optim),
    }


if __name__ == "__main__":
    main()
