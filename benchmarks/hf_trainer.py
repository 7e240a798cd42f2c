#!/usr/bin/env python3
"""The Hugging Face Trainer's own checkpoint against CkptdTrainer's, side by side in ONE run: the time the
training loop stops for each save, and the whole run's time.

    python benchmarks/hf_trainer.py                    # Llama from a config, hidden 512, 4 layers (~25 M params)
    python benchmarks/hf_trainer.py --repeats 5 --hidden 768 --layers 6

Each repeat trains once with ``transformers.Trainer`` (synchronous ``checkpoint-N/``: safetensors model,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``) and once with ``CkptdTrainer`` (``save_async``), the
order alternating between repeats; each writes into a fresh output dir. The save stall is the time from the
end of the step that triggers a save to the Trainer's ``on_save`` callback (what the loop waits for);
CkptdTrainer's run time includes waiting for its last save to commit. Medians over the repeats; ratios
are HF over ckptd, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from ckptd import protocol as proto  # noqa: E402
from client.integrations.hf import CkptdTrainer  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, vocab: int) -> None:
        self.n, self.vocab = n, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (64,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class SaveStall(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.t0 = 0.0
        self.stalls: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.stalls.append(time.perf_counter() - self.t0)


def one_run(kind: str, a: argparse.Namespace, out: Path) -> tuple[float, list[float]]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 2,
        num_hidden_layers=a.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(config)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=a.steps,
        save_steps=a.save_every,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_steps=a.steps,
    )
    probe = SaveStall()
    cls = CkptdTrainer if kind == "ckptd" else transformers.Trainer
    trainer = cls(model=model, args=args, train_dataset=Tokens(a.steps * 4, 4096), callbacks=[probe])
    t0 = time.perf_counter()
    trainer.train()
    took = time.perf_counter() - t0  # CkptdTrainer.train waits for its saves to commit
    if kind == "ckptd":
        trainer.ckptd.close()
    return took, probe.stalls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--json", help="write the raw figures here")
    a = p.parse_args()
    proto.ensure_private_dir(proto.runtime_dir())
    os.environ[proto.ENDPOINT_ENV] = f"ipc://{proto.runtime_dir()}/bench-hf-{secrets.token_hex(4)}.sock"
    base = Path(tempfile.mkdtemp(prefix="ckptd-bench-hf-"))
    runs: dict[str, list[float]] = {"hf": [], "ckptd": []}
    stalls: dict[str, list[float]] = {"hf": [], "ckptd": []}
    try:
        one_run("hf", a, base / "warm-hf")  # imports, allocator and page cache warm for both
        one_run("ckptd", a, base / "warm-ckptd")
        for r in range(a.repeats):
            for kind in ("hf", "ckptd") if r % 2 == 0 else ("ckptd", "hf"):
                took, s = one_run(kind, a, base / f"{kind}-{r}")
                runs[kind].append(took)
                stalls[kind] += s
                shutil.rmtree(base / f"{kind}-{r}", ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in stalls.items()}
    run = {k: statistics.median(v) for k, v in runs.items()}
    print(
        f"Llama hidden {a.hidden}, {a.layers} layers; {a.steps} steps, a save every {a.save_every}; {a.repeats} repeats"
    )
    print(
        f"save stall (median over {len(stalls['hf'])} saves): HF Trainer {med['hf'] * 1e3:.0f} ms, "
        f"CkptdTrainer {med['ckptd'] * 1e3:.0f} ms  ->  {med['hf'] / med['ckptd']:.1f}x lower"
    )
    print(
        f"whole run (median): HF Trainer {run['hf']:.2f} s, CkptdTrainer {run['ckptd']:.2f} s  ->  "
        f"{run['hf'] / run['ckptd']:.2f}x"
    )
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "stalls": stalls}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
