"""Defects a fresh-context review of CkptdCheckpointIO found, each reproduced first as a failing test: removing
one pointer deleted a checkpoint another folder's pointer named, a forged pointer could delete another run's
checkpoint, the best-marked checkpoint was removed, and last.ckpt named a save that then aborted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
from client.integrations.lightning import CkptdCheckpointIO  # noqa: E402


def ck(step):
    return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.full((4,), float(step))}}


def test_removing_one_pointer_keeps_a_checkpoint_another_dirs_pointer_names(endpoint, tmp_path):
    # Two ModelCheckpoint callbacks with their own dirpath (top-k by metric in a/, every-n in b/) at one step.
    io = CkptdCheckpointIO(tmp_path / "ckptd")
    try:
        io.save_checkpoint(ck(4), tmp_path / "a" / "best.ckpt")
        io.save_checkpoint(ck(4), tmp_path / "b" / "periodic.ckpt")
        io.client.wait()
        io.remove_checkpoint(tmp_path / "a" / "best.ckpt")
        assert io.load_checkpoint(tmp_path / "b" / "periodic.ckpt")["global_step"] == 4
    finally:
        io.teardown()


def test_remove_checkpoint_never_deletes_a_checkpoint_outside_its_output_dir(endpoint, tmp_path):
    other = CkptdCheckpointIO(tmp_path / "other-run")
    try:
        other.save_checkpoint(ck(4), tmp_path / "other-pl" / "x.ckpt")
        other.client.wait()
    finally:
        other.teardown()
    victim = tmp_path / "other-run" / "checkpoints" / "checkpoint-4"
    assert victim.is_dir()
    io = CkptdCheckpointIO(tmp_path / "mine")
    try:
        # A pointer copied in (or forged) naming another run's checkpoint.
        (tmp_path / "pl").mkdir()
        (tmp_path / "pl" / "copied.ckpt").write_text((tmp_path / "other-pl" / "x.ckpt").read_text())
        io.remove_checkpoint(tmp_path / "pl" / "copied.ckpt")
    finally:
        io.teardown()
    assert victim.is_dir(), "another output dir's committed checkpoint was deleted"


def test_remove_checkpoint_keeps_the_best_marked_checkpoint(endpoint, tmp_path):
    from client import find_best_checkpoint

    io = CkptdCheckpointIO(tmp_path / "ckptd")
    try:
        io.save_checkpoint(ck(4), tmp_path / "pl" / "s4.ckpt")
        io.save_checkpoint(ck(8), tmp_path / "pl" / "s8.ckpt")
        io.client.wait()
        io.client.set_best_checkpoint(4)
        assert find_best_checkpoint(tmp_path / "ckptd").name == "checkpoint-4"
        io.remove_checkpoint(tmp_path / "pl" / "s4.ckpt")
    finally:
        io.teardown()
    best = find_best_checkpoint(tmp_path / "ckptd")
    assert best is not None and best.is_dir(), f"the best mark names {best}, which was removed"


def test_last_ckpt_never_names_a_save_that_aborted(endpoint, tmp_path, monkeypatch):
    # The daemon (embedded, inherits the env) fails the second save's rename with ENOSPC.
    monkeypatch.setenv("CKPTD_TEST_FAULTS", "before_rename=enospc@2")
    io = CkptdCheckpointIO(tmp_path / "ckptd")
    last = tmp_path / "pl" / "last.ckpt"
    try:
        io.save_checkpoint(ck(4), last)
        io.client.wait()
        io.save_checkpoint(ck(8), last)  # returns at hand-off; the commit then fails
        with pytest.raises(Exception, match="No space left"):
            io.client.wait()
        # As after a kill -9 now: the pointer still names step 8, and loading it falls back to step 4.
        assert io.load_checkpoint(last)["global_step"] == 4
        # Once the plugin has seen the failure, the pointer names checkpoint-4 again.
        target = Path(json.loads(last.read_text())["checkpoint"])
        assert target.name == "checkpoint-4" and target.is_dir(), target
        # And a later save at step 8 is retried, not taken for done.
        io.save_checkpoint(ck(8), last)
        io.client.wait()
        assert io.load_checkpoint(last)["global_step"] == 8
    finally:
        io.teardown()
