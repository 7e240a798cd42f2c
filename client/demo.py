"""The trainer that ``ckptd demo`` runs (``python -m client.demo``): a small CPU model, AdamW, an LR
schedule, dropout and random batches, so that a bit-exact resume needs every piece of state restored.

This is a program, not library code: it reports progress on stdout for the demo to relay.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from client import CheckpointClient, RNGState, SharingPattern, StateComponent


class Progress:
    """Training progress (the step to resume at) as a checkpointable component."""

    def __init__(self) -> None:
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]


def build(width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.GELU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, 1),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=10_000)
    return model, opt, sched


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object) -> float:
    x = torch.randn(32, 64)
    y = x[:, :8].sum(dim=1, keepdim=True).sin()
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()  # type: ignore[attr-defined]
    return float(loss.item())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.demo")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument(
        "--crash-at", type=int, default=None, help="kill -9 this process once the save of this step is handed off"
    )
    ap.add_argument("--no-checkpoint", action="store_true")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--losses", required=True, help="JSON file for {step: loss}")
    args = ap.parse_args(argv)

    torch.manual_seed(1234)
    model, opt, sched = build(args.width)
    progress = Progress()
    losses: dict[int, float] = {}
    if args.no_checkpoint:
        for step in range(1, args.steps + 1):
            losses[step] = train_step(model, opt, sched)
            print(f"step {step} loss {losses[step]:.6f}", flush=True)
        Path(args.losses).write_text(json.dumps(losses))
        return 0

    components = [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("optimizer", opt, SharingPattern.GLOBAL),
        StateComponent("scheduler", sched, SharingPattern.GLOBAL),
        StateComponent("trainer", progress, SharingPattern.GLOBAL),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
    ]
    with CheckpointClient(args.output_dir, components, save_total_limit=3) as client:
        loaded = client.load("latest")
        if loaded is not None:
            print(f"resumed {loaded} at step {progress.step}", flush=True)
        handles = []
        for step in range(progress.step + 1, args.steps + 1):
            losses[step] = train_step(model, opt, sched)
            progress.step = step
            progress.losses.append(losses[step])
            print(f"step {step} loss {losses[step]:.6f}", flush=True)
            if step % args.save_every == 0:
                t0 = time.perf_counter()
                handles.append(client.save_async(step, metadata={"loss": losses[step]}))
                stall_ms = (time.perf_counter() - t0) * 1e3
                print(f"saved {step} stall_ms {stall_ms:.2f}", flush=True)
                if step == args.crash_at:
                    Path(args.losses).write_text(json.dumps(losses))
                    # Overlapped staging hands the save to the daemon at the next optimizer.step() (its
                    # pre-step hook, once the background copy is done): run that step's compute, then die.
                    train_step(model, opt, sched)
                    print(f"crash {step}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            for h in [h for h in handles if h.done()]:
                handles.remove(h)
                print(f"committed {h.wait()}", flush=True)
        for h in handles:
            print(f"committed {h.wait()}", flush=True)
    Path(args.losses).write_text(json.dumps(losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
