"""A client that started the embedded daemon leaves no ``ResourceWarning`` behind (the daemon outlives it by
design; a thread of the client reaps it), checked in a fresh interpreter with every ResourceWarning shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import gc, sys, torch
from client import CheckpointClient, SharingPattern, StateComponent
w = torch.nn.Linear(2, 2)
with CheckpointClient(sys.argv[1], [StateComponent("model", w, SharingPattern.GLOBAL)]) as c:
    c.save_async(1).wait(60)
del c
gc.collect()
print("saved")
"""


def test_a_client_that_started_the_embedded_daemon_leaves_no_resource_warning(endpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-X", "dev", "-c", SCRIPT, str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "saved" in r.stdout, r.stderr[-3000:]
    assert "ResourceWarning" not in r.stderr, r.stderr[-3000:]
