"""client.save_model: the model alone as a Hugging Face directory, written by the real daemon while training
goes on, committed by one rename (never half there, an earlier save_model replaced atomically, anything
else refused), read by ``huggingface_hub.load_torch_model`` and ``transformers``' ``from_pretrained``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import stop_daemon

from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent, list_checkpoints

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def components(model, opt):
    return [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("optimizer", opt, SharingPattern.GLOBAL),
    ]


def test_save_model_writes_a_hugging_face_dir_while_training_goes_on(endpoint, output_dir):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dest = output_dir / "final-model"
    with CheckpointClient(output_dir, components(model, opt)) as client:
        train_step(model, opt, 0)
        client.save_async(1).wait(60)
        train_step(model, opt, 1)
        expected = snapshot(model)
        handle = client.save_model(dest)
        # Training goes on at once: the daemon writes from the staged snapshot.
        for i in range(2, 5):
            train_step(model, opt, i)
        assert handle.wait(60) == dest.resolve()
        assert not torch.equal(model.state_dict()["lm_head.weight"], expected["lm_head.weight"])
        # Not a checkpoint: "latest" and the checkpoint list are unchanged.
        assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-1"]
    names = sorted(os.listdir(dest))
    assert "config.json" in names and "model.safetensors.index.json" in names, names
    assert any(n.startswith("model-00001-of-") for n in names), names
    assert json.loads((dest / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    fresh = tiny_llama(seed=1)
    huggingface_hub.load_torch_model(fresh, dest, strict=True)
    loaded = fresh.state_dict()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
    hf = transformers.AutoModelForCausalLM.from_pretrained(dest)
    for k, v in expected.items():
        assert torch.equal(hf.state_dict()[k], v), k

    verify = subprocess.run([sys.executable, "-m", "ckptd", "verify", str(dest)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_second_save_model_replaces_the_first_and_anything_else_is_refused(endpoint, output_dir, tmp_path):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dest = output_dir / "model"
    with CheckpointClient(output_dir, components(model, opt)) as client:
        first = snapshot(model)
        client.save_model(dest, step=3).wait(60)
        train_step(model, opt, 0)
        second = snapshot(model)
        client.save_model(dest, step=4, metadata={"note": "after step 4"}).wait(60)
        fresh = tiny_llama(seed=2)
        huggingface_hub.load_torch_model(fresh, dest)
        assert torch.equal(fresh.state_dict()["lm_head.weight"], second["lm_head.weight"])
        assert not torch.equal(first["lm_head.weight"], second["lm_head.weight"])
        manifest = json.loads((dest / "checkpoint_manifest.json").read_text())
        assert manifest["step"] == 4 and manifest["metadata"]["note"] == "after step 4"
        # No trash or temp dir is left behind by the swap.
        leftovers = [n for n in os.listdir(output_dir / "checkpoints") if n.startswith((".tmp-", ".trash-"))]
        assert leftovers == []

        # A directory that holds anything else is never replaced.
        other = output_dir / "notes"
        other.mkdir()
        (other / "README.md").write_text("mine")
        with pytest.raises(CheckpointError, match="no earlier save_model wrote"):
            client.save_model(other)
        assert os.listdir(other) == ["README.md"]
        # Nor a checkpoint, nor anything inside the checkpoints directory, nor the output dir itself.
        ckpt = client.save_async(5).wait(60)
        for bad in (ckpt, output_dir / "checkpoints" / "m", output_dir, output_dir.parent):
            with pytest.raises(CheckpointError, match="taken for a checkpoint"):
                client.save_model(bad)
        # The client still saves afterwards.
        assert client.save_async(6).wait(60).name == "checkpoint-6"


def test_save_model_without_a_model_component_or_with_a_per_rank_one_says_what_to_declare(endpoint, output_dir):
    w = torch.nn.Linear(4, 4)
    with CheckpointClient(output_dir, [StateComponent("weights", w, SharingPattern.GLOBAL)]) as client:
        with pytest.raises(CheckpointError, match="declare the model as"):
            client.save_model(output_dir / "m")
    out2 = output_dir.parent / "out2"
    with CheckpointClient(out2, [StateComponent("model", w, SharingPattern.PER_RANK)]) as client:
        with pytest.raises(CheckpointError, match="only a GLOBAL, REPLICATED or SHARDED model"):
            client.save_model(out2 / "m")


def test_kill_9_of_the_daemon_before_the_rename_leaves_no_model_dir_and_nothing_behind(
    endpoint, output_dir, monkeypatch
):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dest = output_dir / "model"
    monkeypatch.setenv("CKPTD_TEST_FAULTS", "before_rename=crash")
    client = CheckpointClient(output_dir, components(model, opt), heartbeat_timeout_s=3.0)
    try:
        with pytest.raises(CheckpointError):
            client.save_model(dest).wait(60)
    finally:
        client.close(wait=False)
    monkeypatch.delenv("CKPTD_TEST_FAULTS")
    stop_daemon(endpoint)
    assert not dest.exists()
    # The next client's daemon sweeps the dead save's temp dir; a save_model then works.
    with CheckpointClient(output_dir, components(model, opt)) as client:
        client.save_async(1).wait(60)
        assert client.save_model(dest).wait(60) == dest.resolve()
    # (The veto's record stays until the dead save's deadline has passed, as for any abandoned save.)
    root = output_dir / "checkpoints"
    left = [n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-")) and (root / n).is_dir()]
    assert left == [], left


def test_ckptd_export_of_a_checkpoint_with_a_config_is_loaded_by_from_pretrained(endpoint, output_dir, tmp_path):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with CheckpointClient(output_dir, components(model, opt)) as client:
        train_step(model, opt, 0)
        expected = snapshot(model)
        ckpt = client.save_async(1).wait(60)
    dest = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "ckptd", "export", str(ckpt), str(dest)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(dest)
    for k, v in expected.items():
        assert torch.equal(hf.state_dict()[k], v), k
    assert not [n for n in os.listdir(dest) if n.startswith(".")]


def test_export_never_writes_config_json_through_a_planted_symlink(endpoint, output_dir, tmp_path):
    """(From the issue-10 review: config.json was written through a symlink planted in DEST.)"""
    model = tiny_llama()
    with CheckpointClient(output_dir, [StateComponent("model", model, SharingPattern.GLOBAL)]) as client:
        ckpt = client.save_async(1).wait(60)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    dest = tmp_path / "export"
    dest.mkdir()
    os.symlink(victim, dest / "config.json")
    os.symlink(victim, dest / ".config.json.tmp")  # the temp name export used to write through
    r = subprocess.run(
        [sys.executable, "-m", "ckptd", "export", str(ckpt), str(dest), "--force"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious\n"
    assert not (dest / "config.json").is_symlink()
    assert json.loads((dest / "config.json").read_text())["model_type"] == "llama"
