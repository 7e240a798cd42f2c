"""Defects a fresh-context review of save_model found, each reproduced first as a failing test: a directory
created at DEST during the save was swapped out and deleted, DEST inside another run's checkpoints/ made a
fake checkpoint there, the commit did not fsync DEST's parent; and kill -9 at the commit's last steps."""

from __future__ import annotations

import json
import os
import time

import torch
from conftest import stop_daemon

from client import (
    CheckpointClient,
    CheckpointError,
    SharingPattern,
    StateComponent,
    find_latest_checkpoint,
    list_checkpoints,
)

FSYNC_HOOK = """
import os
_log = os.environ.get("REVIEW_FSYNC_LOG")
if _log:
    from ckptd import writer as _w
    _orig = _w.fsync_dir
    def fsync_dir(path, *a, **k):
        with open(_log, "a") as f:
            f.write(os.fspath(path) + "\\n")
        return _orig(path, *a, **k)
    _w.fsync_dir = fsync_dir
"""


def comps(m, opt=None):
    c = [StateComponent("model", m, SharingPattern.GLOBAL)]
    if opt is not None:
        c.append(StateComponent("optimizer", opt, SharingPattern.GLOBAL))
    return c


def test_dest_replaced_by_a_foreign_dir_between_check_and_rename_is_not_swapped_and_deleted(
    endpoint, output_dir, monkeypatch
):
    """check_export_target runs before the manifest; _rename_into_place then swaps (RENAME_EXCHANGE) whatever
    non-empty dir is at dest, and the swapped-out one goes to trash and is removed."""
    m = torch.nn.Linear(4, 4)
    dest = output_dir / "model"
    monkeypatch.setenv("CKPTD_TEST_FAULTS", "before_rename=stall")
    with CheckpointClient(output_dir, comps(m), timeout_s=60) as c:
        h = c.save_model(dest)
        root = output_dir / "checkpoints"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:  # the manifest is in the temp dir: the check is behind us
            if any((root / n / "checkpoint_manifest.json").exists() for n in os.listdir(root) if n.startswith(".tmp-")):
                break
            time.sleep(0.01)
        dest.mkdir()
        (dest / "precious.txt").write_text("user data")
        try:
            h.wait(60)
            raised = None
        except CheckpointError as e:
            raised = str(e)
    assert (dest / "precious.txt").read_text() == "user data", "the user's directory was swapped out"
    assert raised is not None and "created by someone else during the save" in raised, raised


def test_save_model_into_another_output_dirs_checkpoints_is_refused(endpoint, output_dir, tmp_path):
    """Only this output dir's checkpoints/ is refused; dest=<other run>/checkpoints/checkpoint-7 creates a
    model-only checkpoint-7 that the other run's load('latest') picks."""
    other = tmp_path / "other"
    m = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with CheckpointClient(other, comps(m, opt), endpoint=endpoint) as c:
        c.save_async(1).wait(60)
    with CheckpointClient(output_dir, comps(m, opt), endpoint=endpoint) as c:
        try:
            c.save_model(other / "checkpoints" / "checkpoint-7", step=7).wait(60)
            raised = None
        except CheckpointError as e:
            raised = str(e)
    assert raised is not None and "checkpoints directory of an output dir" in raised, raised
    assert find_latest_checkpoint(other).name == "checkpoint-1", list_checkpoints(other)


def test_export_commit_fsyncs_the_destination_parent(endpoint, output_dir, monkeypatch, tmp_path):
    """DESIGN 5.3: rename, then fsync the parent. For an export the new entry is in dest.parent; the
    daemon fsyncs only checkpoints/."""
    log = tmp_path / "fsync.log"
    monkeypatch.setenv("REVIEW_FSYNC_LOG", str(log))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FSYNC_HOOK)
    monkeypatch.setenv("PYTHONPATH", f"{hook}:" + os.environ.get("PYTHONPATH", ""))
    m = torch.nn.Linear(4, 4)
    dest = tmp_path / "elsewhere" / "model"
    with CheckpointClient(output_dir, comps(m), endpoint=endpoint) as c:
        c.save_model(dest).wait(60)
    synced = log.read_text().split()
    assert str(output_dir / "checkpoints") in synced, synced  # the hook works
    assert str(dest.parent) in synced, synced


def test_kill_9_after_the_rename_of_a_save_model(endpoint, output_dir, monkeypatch):
    m = torch.nn.Linear(4, 4)
    dest = output_dir / "model"
    monkeypatch.setenv("CKPTD_TEST_FAULTS", "after_rename=crash")
    c = CheckpointClient(output_dir, comps(m), heartbeat_timeout_s=3.0)
    try:
        assert c.save_model(dest).wait(60) == dest
    finally:
        c.close(wait=False)
    monkeypatch.delenv("CKPTD_TEST_FAULTS")
    stop_daemon(endpoint)
    with CheckpointClient(output_dir, comps(m)) as c:
        c.save_async(1).wait(60)
    root = output_dir / "checkpoints"
    assert [n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-")) and (root / n).is_dir()] == []


def test_kill_9_between_renames_of_a_second_save_model(endpoint, output_dir, monkeypatch):
    m = torch.nn.Linear(4, 4)
    dest = output_dir / "model"
    with CheckpointClient(output_dir, comps(m)) as c:
        c.save_model(dest, step=1).wait(60)
    stop_daemon(endpoint)
    monkeypatch.setenv("CKPTD_TEST_FAULTS", "between_renames=crash")
    c = CheckpointClient(output_dir, comps(m), heartbeat_timeout_s=3.0)
    try:
        assert c.save_model(dest, step=2).wait(60) == dest
    finally:
        c.close(wait=False)
    monkeypatch.delenv("CKPTD_TEST_FAULTS")
    stop_daemon(endpoint)
    assert json.loads((dest / "checkpoint_manifest.json").read_text())["step"] == 2
    with CheckpointClient(output_dir, comps(m)) as c:
        c.save_async(1).wait(60)
    root = output_dir / "checkpoints"
    assert [n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-")) and (root / n).is_dir()] == []
