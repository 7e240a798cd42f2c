"""``ckptd import``: a checkpoint made by transformers' own Trainer, a Forgather-layout checkpoint and a DCP
checkpoint become ckptd checkpoints (saved by the real daemon) that resume bit for bit through
``load("latest")``; pickled files are read only behind the flag, and only by the weights-only rules."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from client import CheckpointClient, RNGState, SharingPattern, StateComponent, list_checkpoints

transformers = pytest.importorskip("transformers")

FLAG = "--trust-weights-only-pickle"


def ckptd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=300)


def tiny_llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def trainer_for(model: torch.nn.Module, out: Path) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        save_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        logging_steps=1,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens())


class Holder:
    def __init__(self) -> None:
        self.state = None

    def state_dict(self):
        return self.state

    def load_state_dict(self, sd) -> None:
        self.state = sd


def same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}.{i}")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hf")
    trainer_for(tiny_llama(0), base / "run").train()
    ckpt = base / "run" / "checkpoint-4"
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "model.safetensors"} <= set(os.listdir(ckpt))
    return ckpt


def test_an_hf_trainer_checkpoint_imports_and_resumes_bit_exactly(endpoint, tmp_path, hf_checkpoint):
    src, out = hf_checkpoint, tmp_path / "out"
    r = ckptd("import", str(src), str(out), FLAG)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert "training_args.bin" in r.stderr  # left out, and said so
    manifest = json.loads((out / "checkpoints" / "checkpoint-4" / "checkpoint_manifest.json").read_text())
    assert manifest["components"]["model"]["metadata"]["hf_config"]["model_type"] == "llama"

    # Resume as a user would: the same model, and the optimizer and scheduler a Trainer builds for it.
    model = tiny_llama(seed=1)
    trainer = trainer_for(model, tmp_path / "resumed")
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    progress = Holder()
    comps = [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("optimizer", opt, SharingPattern.GLOBAL),
        StateComponent("scheduler", sched, SharingPattern.GLOBAL),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        StateComponent("trainer_state", progress, SharingPattern.GLOBAL),
    ]
    with CheckpointClient(out, comps) as client:
        assert client.load("latest") == out / "checkpoints" / "checkpoint-4"
    same({k: v for k, v in model.state_dict().items()}, load_file(str(src / "model.safetensors")))
    same(opt.state_dict(), torch.load(src / "optimizer.pt", weights_only=True))
    same(sched.state_dict(), torch.load(src / "scheduler.pt", weights_only=True))
    assert progress.state == json.loads((src / "trainer_state.json").read_text())
    hf_rng = torch.load(src / "rng_state.pth", weights_only=False)
    assert torch.equal(torch.get_rng_state(), hf_rng["cpu"]) and random.getstate() == hf_rng["python"]

    # One more step from the ckptd resume and from the HF files themselves: the same weights, bit for bit.
    ref = tiny_llama(seed=2)
    ref_trainer = trainer_for(ref, tmp_path / "ref")
    ref_trainer.create_optimizer_and_scheduler(num_training_steps=4)
    ref.load_state_dict(load_file(str(src / "model.safetensors")))
    ref_trainer.optimizer.load_state_dict(torch.load(src / "optimizer.pt", weights_only=True))
    batch = Tokens()[3]
    for m, o in ((model, opt), (ref, ref_trainer.optimizer)):
        m(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
        o.step()
    same(model.state_dict(), ref.state_dict())


def test_pickled_files_are_refused_without_the_flag_and_nothing_is_written(endpoint, tmp_path, hf_checkpoint):
    out = tmp_path / "out"
    r = ckptd("import", str(hf_checkpoint), str(out))
    assert r.returncode == 2
    assert "optimizer.pt" in r.stderr and FLAG in r.stderr and "--skip" in r.stderr, r.stderr
    assert not (out / "checkpoints").exists() or list_checkpoints(out) == []
    # Leaving the pickled components out imports the rest (safetensors and JSON only).
    r = ckptd("import", str(hf_checkpoint), str(out), "--skip", "optimizer", "--skip", "scheduler", "--skip", "rng")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "checkpoints" / "checkpoint-4" / "checkpoint_manifest.json").read_text())
    assert sorted(manifest["components"]) == ["model", "trainer_state"]


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ckptd-import-pwned",))


def test_a_hostile_pickle_is_refused_by_the_weights_only_unpickler(endpoint, tmp_path, hf_checkpoint):
    import shutil

    src = tmp_path / "checkpoint-4"
    shutil.copytree(hf_checkpoint, src)
    torch.save({"state": {}, "param_groups": [], "x": Boom()}, src / "optimizer.pt")
    with pytest.raises(Exception):  # noqa: B017 - any loader would run it; ours must not
        torch.load(src / "optimizer.pt", weights_only=True)
    r = ckptd("import", str(src), str(tmp_path / "out"), FLAG)
    assert r.returncode == 2 and "weights-only unpickler" in r.stderr, r.stderr
    assert not Path("/tmp/ckptd-import-pwned").exists()


def test_a_dcp_checkpoint_imports_and_resumes_bit_exactly(endpoint, tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    src = tmp_path / "dcp-step-3"
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 3}, checkpoint_id=str(src))

    r = ckptd("import", str(src), str(tmp_path / "out"), FLAG)
    assert r.returncode == 0, r.stdout + r.stderr
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    comps = [
        StateComponent("model", fresh, SharingPattern.GLOBAL),
        StateComponent("optim", fresh_opt, SharingPattern.GLOBAL),
    ]
    with CheckpointClient(tmp_path / "out", comps) as client:
        assert client.load("latest").name == "checkpoint-3"
    manifest = json.loads((tmp_path / "out" / "checkpoints" / "checkpoint-3" / "checkpoint_manifest.json").read_text())
    assert manifest["metadata"]["ckptd.import"]["values"] == {"step": 3}
    same(fresh.state_dict(), model.state_dict())
    same(fresh_opt.state_dict(), opt.state_dict())
    x = torch.randn(5, 8)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).pow(2).sum().backward()
        o.step()
    same(fresh.state_dict(), model.state_dict())


def test_a_hostile_dcp_metadata_is_refused(endpoint, tmp_path):
    src = tmp_path / "dcp-1"
    src.mkdir()
    (src / ".metadata").write_bytes(pickle.dumps(Boom()))
    r = ckptd("import", str(src), str(tmp_path / "out"), FLAG)
    assert r.returncode == 2 and ("posix.system" in r.stderr or "os.system" in r.stderr), r.stderr
    assert not Path("/tmp/ckptd-import-pwned").exists()


def test_a_forgather_checkpoint_imports_with_its_sharing_patterns(endpoint, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    src = tmp_path / "checkpoint-500"
    src.mkdir()
    save_file(model.state_dict(), str(src / "model.safetensors"))
    torch.save(opt.state_dict(), src / "optimizer_state.pt")
    torch.save({"position": 1234, "epoch": 2}, src / "dataset_state.pt")
    manifest = {
        "checkpoint_path": str(src),
        "world_size": 1,
        "timestamp": "2026-01-24T10:30:45",
        "components": {
            "model": {"key": "model", "sharing_pattern": "replicated", "ranks": [0]},
            "optimizer": {"key": "optimizer", "sharing_pattern": "replicated", "ranks": [0]},
            "dataset": {"key": "dataset", "sharing_pattern": "global", "ranks": [0], "required": False},
            "rng": {"key": "rng", "sharing_pattern": "per_rank", "ranks": [0], "required": False},
        },
    }
    (src / "checkpoint_manifest.json").write_text(json.dumps(manifest))
    r = ckptd("import", str(src), str(tmp_path / "out"), FLAG)
    assert r.returncode == 0, r.stderr
    assert "rng (optional, and its file is not there)" in r.stderr

    fresh = torch.nn.Linear(6, 3)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    data = Holder()
    comps = [
        StateComponent("model", fresh, SharingPattern.REPLICATED),
        StateComponent("optimizer", fresh_opt, SharingPattern.REPLICATED),
        StateComponent("dataset", data, SharingPattern.GLOBAL, required=False),
    ]
    with CheckpointClient(tmp_path / "out", comps) as client:
        assert client.load("latest").name == "checkpoint-500"
    same(fresh.state_dict(), model.state_dict())
    same(fresh_opt.state_dict(), opt.state_dict())
    assert data.state == {"position": 1234, "epoch": 2}
