"""One HF Trainer run for tests/client/test_hf_trainer.py: CkptdTrainer on a config-built tiny Llama.

    python hf_worker.py MODE OUT RESULTS      MODE: reference | crash | resume

``crash`` kills itself (SIGKILL) right after the save of step 4 is handed off; ``resume`` continues from
ckptd's newest checkpoint. Each finished run writes its final weights to RESULTS/MODE.safetensors.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from client.integrations.hf import CkptdTrainer


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class KillAfterSave(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StallProbe(transformers.TrainerCallback):
    """Times each save, from before the Trainer's save to the next event (the stall the loop sees)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.t0 = 0.0
        self.start: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step  # after a resume: the restored step

    def on_step_end(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.t0)


def main() -> None:
    mode, out, results = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    results.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=12, save_steps=4, save_total_limit=2, per_device_train_batch_size=2,
        learning_rate=1e-2, warmup_steps=2, report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    probe = StallProbe()
    callbacks = [probe] + ([KillAfterSave(4)] if mode == "crash" else [])
    trainer = CkptdTrainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=mode == "resume")
    trainer.save_model(str(out / "final-model"))
    trainer.ckptd.close()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(results / f"{mode}.safetensors"))
    (results / f"{mode}.json").write_text(
        json.dumps({"stalls": probe.seconds, "step": trainer.state.global_step, "start": probe.start})
    )


if __name__ == "__main__":
    main()
