"""CkptdTrainer (client.integrations.hf) with transformers' own Trainer on a config-built tiny Llama: saves
are asynchronous, a kill -9 right after a save's hand-off resumes bit for bit through the Trainer's own
resume path, retention follows save_total_limit, and the saved model loads with from_pretrained."""

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

transformers = pytest.importorskip("transformers")
WORKER = Path(__file__).with_name("hf_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run(mode: str, out: Path, results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(WORKER), mode, str(out), str(results)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_kill_9_after_a_save_resumes_bit_exactly_and_the_saved_model_loads(endpoint, tmp_path):
    results = tmp_path / "results"
    ref = run("reference", tmp_path / "ref", results)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    crash = run("crash", tmp_path / "run", results)
    assert crash.returncode == -9, crash.stderr[-3000:]
    # The daemon finished the save the dead trainer handed over.
    assert "checkpoint-4" in [p.name for p in list_checkpoints(tmp_path / "run")]
    resumed = run("resume", tmp_path / "run", results)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((results / "resume.json").read_text())["start"] == 4  # resumed, not started over
    a, b = load_file(str(results / "reference.safetensors")), load_file(str(results / "resume.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the resume"
    assert json.loads((results / "resume.json").read_text())["step"] == 12
    # save_total_limit=2: the two newest are kept.
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-8", "checkpoint-12"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final-model")
    for k, v in hf.state_dict().items():
        assert torch.equal(v, b[k]), k
    # Saves went through save_async: each stalled the loop far less than the daemon took to commit them.
    stalls = json.loads((results / "reference.json").read_text())["stalls"]
    assert len(stalls) == 3 and max(stalls) < 5.0, stalls
