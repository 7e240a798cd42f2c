"""A small DDP training script with asynchronous checkpoints and resume.

    python examples/train_ddp.py --output-dir runs/ddp                      # one process
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --output-dir runs/ddp

Run it, interrupt it (Ctrl-C or kill -9) at any point, run it again: it resumes from the newest committed
checkpoint and continues exactly where that checkpoint left off.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist

from client import CheckpointClient, RNGState, SharingPattern, StateComponent


class Progress:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=20)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)  # identical initial replicas
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    progress = Progress()
    torch.manual_seed(1000 + rank)  # each rank draws its own data

    components = [
        StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
        StateComponent("scheduler", sched, SharingPattern.REPLICATED),
        StateComponent("trainer", progress, SharingPattern.GLOBAL),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
    ]
    with CheckpointClient(args.output_dir, components, save_total_limit=3) as ckpt:
        resumed = ckpt.load("latest")
        if resumed and rank == 0:
            logging.info("resumed from %s at step %d", resumed, progress.step)
        for step in range(progress.step + 1, args.steps + 1):
            x = torch.randn(64, 32)
            loss = torch.nn.functional.mse_loss(ddp(x), x.sum(dim=1, keepdim=True).tanh())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            progress.step = step
            if step % args.save_every == 0:
                ckpt.save_async(step, metadata={"loss": loss.item()})
                if rank == 0:
                    logging.info("step %d loss %.4f: checkpoint handed to ckptd", step, loss.item())
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
