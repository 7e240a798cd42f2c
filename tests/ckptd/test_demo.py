"""`ckptd demo`, the README's main job, end to end: real trainer processes, a real SIGKILL mid-save."""

from __future__ import annotations

import subprocess
import sys

import ckptd
from ckptd import format as fmt


def test_demo_resumes_bit_exact_after_the_trainer_is_killed_mid_save(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptd",
            "demo",
            "--output-dir",
            str(out),
            "--steps",
            "12",
            "--save-every",
            "4",
            "--crash-at",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kill -9 of the trainer now" in proc.stdout
    assert "load('latest') -> checkpoint-8" in proc.stdout
    assert "bit for bit (4/4)" in proc.stdout
    steps = [c.step for c in fmt.scan_checkpoints(out / "run")[0]]
    assert steps[-1] == 12 and 8 in steps
    for path in fmt.list_checkpoints(out / "run"):
        assert fmt.verify_checkpoint(path)


def test_demo_rejects_a_crash_step_that_is_not_a_save_step(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ckptd", "demo", "--output-dir", str(tmp_path), "--crash-at", "7"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "crash_at a multiple of save_every" in proc.stdout


def test_demo_refuses_a_non_empty_output_dir_up_front_and_leaves_it_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = subprocess.run(
        [sys.executable, "-m", "ckptd", "demo", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "is not empty" in proc.stderr and "new or empty directory" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_version_names_the_package_and_format_versions():
    proc = subprocess.run([sys.executable, "-m", "ckptd", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ckptd {ckptd.__version__} (format {fmt.FORMAT_VERSION})"


def test_every_option_of_every_command_has_help_text():
    import argparse

    from ckptd.cli import build_parser

    missing = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += [f"{name} {a.option_strings or a.dest}" for a in sub._actions if a.help is None]
    assert missing == []
