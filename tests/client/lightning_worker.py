"""One Lightning run for tests/client/test_lightning.py: a tiny regression model with AdamW and a step LR
schedule, checkpointed through CkptdCheckpointIO at every epoch end.

    python lightning_worker.py MODE OUT RESULTS      MODE: reference | crash | resume

``crash`` kills itself (SIGKILL) in the second batch after the epoch-2 checkpoint was handed off; ``resume``
fits again with ckpt_path="last". Each finished run writes its final weights to RESULTS/MODE.safetensors.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from client.integrations.lightning import CkptdCheckpointIO


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


class Kill(pl.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 10:  # epoch 2's checkpoint (step 8) is handed off, step 10 is not saved
            os.kill(os.getpid(), signal.SIGKILL)


class StartStep(pl.Callback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer, module):
        self.step = trainer.global_step  # after a resume: the restored step


def main() -> None:
    mode, out, results = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    results.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)  # 4 steps per epoch
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=out / "pl", every_n_epochs=1, save_top_k=2, monitor="step",
                                        mode="max", save_last=True)  # fmt: skip
    start = StartStep()
    callbacks = [ckpt, start] + ([Kill()] if mode == "crash" else [])
    trainer = pl.Trainer(
        max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, plugins=[CkptdCheckpointIO(out / "ckptd")],
        deterministic=True,
    )  # fmt: skip
    model = Regression()
    trainer.fit(model, loader, ckpt_path="last" if mode == "resume" else None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(results / f"{mode}.safetensors"))
    kept = sorted(p.name for p in (out / "pl").iterdir() if not p.name.startswith("."))
    (results / f"{mode}.json").write_text(
        json.dumps({"step": trainer.global_step, "start": start.step, "pointers": kept})
    )


if __name__ == "__main__":
    main()
