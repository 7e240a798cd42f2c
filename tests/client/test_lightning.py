"""CkptdCheckpointIO (client.integrations.lightning) in a real Lightning Trainer: checkpoints are ckptd saves,
top-k removal removes the ckptd checkpoint too, and a kill -9 mid-run resumes through ckpt_path="last" to
final weights bit for bit equal to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from client import list_checkpoints

pytest.importorskip("lightning")
WORKER = Path(__file__).with_name("lightning_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run(mode: str, out: Path, results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(WORKER), mode, str(out), str(results)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_lightning_saves_through_ckptd_and_a_kill_9_resumes_bit_exactly(endpoint, tmp_path):
    results = tmp_path / "results"
    ref = run("reference", tmp_path / "ref", results)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    # Top 2 by step, plus last: steps 12 and 16 kept, 4 and 8 removed from disk too.
    assert json.loads((results / "reference.json").read_text())["step"] == 16
    assert [p.name for p in list_checkpoints(tmp_path / "ref" / "ckptd")] == ["checkpoint-12", "checkpoint-16"]
    pointer = json.loads((tmp_path / "ref" / "pl" / "last.ckpt").read_text())
    assert pointer["checkpoint"].endswith("checkpoints/checkpoint-16")

    crash = run("crash", tmp_path / "run", results)
    assert crash.returncode == -9, crash.stderr[-3000:]
    assert "checkpoint-8" in [p.name for p in list_checkpoints(tmp_path / "run" / "ckptd")]
    resumed = run("resume", tmp_path / "run", results)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((results / "resume.json").read_text())["start"] == 8  # resumed, not started over
    a, b = load_file(str(results / "reference.safetensors")), load_file(str(results / "resume.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the resume"
