"""Docs that run: every ``python`` block of README.md, and the blocks of docs/quickstart.md in order (one
script), run as written in a fresh directory against a real embedded daemon; run twice, the second run
resumes from the first's checkpoints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(doc: str) -> list[str]:
    return BLOCK.findall((ROOT / doc).read_text())


@pytest.mark.parametrize("doc", ["README.md", "docs/quickstart.md"])
def test_the_python_blocks_of_a_doc_run_as_written_and_resume_when_run_again(doc, endpoint, tmp_path):
    blocks = python_blocks(doc)
    assert blocks, f"{doc} has no python block"
    script = tmp_path / "doc_script.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for run in (1, 2):
        r = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        assert r.returncode == 0, f"{doc}, run {run}:\n{r.stdout}\n{r.stderr}"
        assert "a checkpoint is missing" not in r.stdout
    checkpoints = sorted((tmp_path / "runs" / "exp1" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, f"{doc}: no checkpoint was committed"
