"""Leaving a component out, as the seed's user guide teaches (delete its file): a missing file of an
optional component is skipped with a warning and the load goes on from that checkpoint; a damaged one still
fails verification and falls back; ``load(skip=...)`` and ``ckptd drop`` leave one out on purpose."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from client import CheckpointClient, SharingPattern, StateComponent, verify_checkpoint


class Box:
    def __init__(self, value: float) -> None:
        self.t = torch.full((256,), value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"t": self.t}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.t = sd["t"].clone()


def two_saves(output_dir, endpoint):
    """checkpoint-1 (model 1, dataset 10) and checkpoint-2 (model 2, dataset 20)."""
    model, data = Box(1.0), Box(10.0)
    comps = [
        StateComponent("model_state", model, SharingPattern.GLOBAL),
        StateComponent("dataset", data, SharingPattern.GLOBAL, required=False),
    ]
    with CheckpointClient(output_dir, comps, endpoint=endpoint) as c:
        c.save_async(1).wait(60)
        model.t.fill_(2.0)
        data.t.fill_(20.0)
        c.save_async(2).wait(60)
    return output_dir / "checkpoints" / "checkpoint-2"


def fresh(output_dir, endpoint):
    model, data = Box(0.0), Box(-1.0)
    comps = [
        StateComponent("model_state", model, SharingPattern.GLOBAL),
        StateComponent("dataset", data, SharingPattern.GLOBAL, required=False),
    ]
    return CheckpointClient(output_dir, comps, endpoint=endpoint), model, data


def test_a_deleted_optional_file_is_skipped_with_a_warning_and_the_load_stays_on_that_checkpoint(endpoint, output_dir):
    ckpt = two_saves(output_dir, endpoint)
    (ckpt / "dataset_state.safetensors").unlink()  # the seed's guide: rm checkpoint-N/dataset_state.pt
    c, model, data = fresh(output_dir, endpoint)
    with (
        c,
        pytest.warns(RuntimeWarning, match=r"dataset_state\.safetensors of optional component 'dataset' is missing"),
    ):
        assert c.load("latest") == ckpt
    assert torch.equal(model.t, torch.full((256,), 2.0))  # from checkpoint-2, not checkpoint-1
    assert torch.equal(data.t, torch.full((256,), -1.0))  # left as it was


def test_a_damaged_optional_file_still_fails_verification_and_falls_back(endpoint, output_dir):
    ckpt = two_saves(output_dir, endpoint)
    f = ckpt / "dataset_state.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    c, model, data = fresh(output_dir, endpoint)
    with c, pytest.warns(RuntimeWarning, match="checksum"):
        assert c.load("latest").name == "checkpoint-1"
    assert torch.equal(model.t, torch.full((256,), 1.0))
    assert torch.equal(data.t, torch.full((256,), 10.0))


def test_load_skip_leaves_a_component_out_without_a_warning(endpoint, output_dir):
    ckpt = two_saves(output_dir, endpoint)
    c, model, data = fresh(output_dir, endpoint)
    with c, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c.load("latest", skip=["dataset"]) == ckpt
        with pytest.raises(ValueError, match="no such component"):
            c.load("latest", skip=["nope"])
    assert torch.equal(model.t, torch.full((256,), 2.0))
    assert torch.equal(data.t, torch.full((256,), -1.0))


def ckptd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=60)


def test_ckptd_drop_removes_the_component_and_rewrites_the_manifest(endpoint, output_dir):
    ckpt = two_saves(output_dir, endpoint)
    r = ckptd("drop", str(ckpt), "dataset")
    assert r.returncode == 0, r.stderr
    assert not (ckpt / "dataset_state.safetensors").exists()
    assert verify_checkpoint(ckpt), "the rewritten manifest must verify"
    assert "dataset" not in (ckpt / "checkpoint_manifest.json").read_text()
    c, model, data = fresh(output_dir, endpoint)
    with c:
        assert c.load("latest") == ckpt  # an optional component not in the checkpoint: warned, not restored
    assert torch.equal(model.t, torch.full((256,), 2.0))
    assert torch.equal(data.t, torch.full((256,), -1.0))
    r = ckptd("drop", str(ckpt), "dataset")
    assert r.returncode == 2 and "no component 'dataset'" in r.stderr, r.stderr
    r = ckptd("drop", str(ckpt), "model_state")
    assert r.returncode == 2 and "only component" in r.stderr, r.stderr
    assert verify_checkpoint(ckpt)


def test_a_drop_killed_after_its_rename_is_finished_by_running_it_again(endpoint, output_dir):
    """Kill -9 between the manifest's rename and the unlinks leaves the component's files listed nowhere (and
    one killed before the rename, a temp manifest): running the same drop again removes them."""
    import os
    import shutil
    import time

    ckpt = two_saves(output_dir, endpoint)
    kept = output_dir / "dataset.copy"
    shutil.copy(ckpt / "dataset_state.safetensors", kept)
    assert ckptd("drop", str(ckpt), "dataset").returncode == 0
    shutil.copy(kept, ckpt / "dataset_state.safetensors")  # as the killed drop left it
    stale = ckpt / ".checkpoint_manifest.json.tmp-0123456789abcdef"
    stale.write_text("{}")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    r = ckptd("drop", str(ckpt), "dataset")
    assert r.returncode == 0, r.stderr
    assert not (ckpt / "dataset_state.safetensors").exists() and not stale.exists()
    assert verify_checkpoint(ckpt)
