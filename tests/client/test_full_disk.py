"""A disk that fills mid-save, and a file system that turns read-only (DESIGN.md §5.4, §9).

The output dir lives on a real, small tmpfs mounted for the test (tests run as root here; skipped when
mounting is not possible). tmpfs refuses O_DIRECT, so these saves also take the daemon's buffered path.
Everything else is real too: the embedded daemon, the /dev/shm staging slab, the files and their fsyncs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import trainer_script as trainer

from client import CheckpointClient, CheckpointError, find_latest_checkpoint, verify_checkpoint
from tests import invariants as inv
from tests.conftest import stop_daemon

pytestmark = pytest.mark.timeout(180)

DISK_MB = 48
MiB = 1 << 20


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path, endpoint: str) -> Iterator[Callable[[str], None]]:
    """Mount a DISK_MB tmpfs at tmp_path/disk; yields ``remount(options)`` (e.g. "ro", "size=160m").

    Unmounted in teardown whatever happened, after stopping the daemon that may hold files open on it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = _run("mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0755", "tmpfs", str(mnt))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    def remount(options: str) -> None:
        res = _run("mount", "-o", f"remount,{options}", str(mnt))
        assert res.returncode == 0, f"mount -o remount,{options} {mnt}: {res.stderr.strip()}"

    try:
        yield remount
    finally:
        stop_daemon(endpoint)
        for _ in range(50):
            if not os.path.ismount(mnt) or _run("umount", str(mnt)).returncode == 0:
                break
            time.sleep(0.1)
        else:
            _run("umount", "-l", str(mnt))  # something still holds it: detach it at least
        assert not os.path.ismount(mnt), f"could not unmount the test tmpfs at {mnt}"


def _fill(blob: trainer.Blob, mib: int, value: float) -> None:
    blob.tensor = torch.full((mib * MiB // 4,), value, dtype=torch.float32)


def _assert_aborted_cleanly(
    client: CheckpointClient, step: int, root: Path, cause: str, used_before: int, mnt: Path
) -> str:
    """save_async(step) must fail through its handle with ``cause`` in the message, and by the time the
    handle raises the temp dir must be gone and its bytes given back to the file system."""
    handle = client.save_async(step)
    with pytest.raises(CheckpointError) as err:
        handle.wait(60)
    # Right after the raise, no sleep: "removed on abort" means before the rank is told.
    leftovers = inv.temp_or_trash(root.parent)
    used_now = shutil.disk_usage(mnt).used
    msg = str(err.value)
    assert f"step {step}" in msg, msg
    assert re.search(cause, msg), f"the error does not name the cause ({cause}): {msg}"
    assert not leftovers, f"the aborted save's temp dir was still there when the handle raised: {leftovers}"
    assert used_now <= used_before + MiB, (
        f"the aborted save still took {(used_now - used_before) / MiB:.1f} MiB of the disk when the handle raised"
    )
    assert not (root / f"checkpoint-{step}").exists()
    return msg


def _assert_intact(client: CheckpointClient, ckpt: Path, model: torch.nn.Module, blob: trainer.Blob, expected) -> None:
    """``ckpt`` verifies, is still the latest, and loads back bit-exactly into the client's live objects."""
    result = verify_checkpoint(ckpt)
    assert result, str(result)
    assert find_latest_checkpoint(ckpt.parent.parent) == ckpt
    exp_model, exp_blob = expected
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-7.0)
    blob.tensor = torch.zeros(1)
    assert client.load("latest") == ckpt
    for k, v in exp_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(blob.tensor, exp_blob.tensor)


def test_disk_full_mid_save_aborts_with_enospc_frees_the_space_and_keeps_the_earlier_checkpoint(
    small_disk, tmp_path: Path
) -> None:
    mnt = tmp_path / "disk"
    out = mnt / "run"
    root = out / "checkpoints"
    model, blob = trainer.build_state(1, 8)
    with CheckpointClient(out, trainer.components(model, blob), timeout_s=60) as client:
        ckpt1 = client.save_async(1).wait(60)
        assert ckpt1 == root / "checkpoint-1"
        used_after_1 = shutil.disk_usage(mnt).used
        free = shutil.disk_usage(mnt).free

        # Larger than what is left: the daemon starts writing and runs out of space part-way.
        big_mib = free // MiB + 16
        _fill(blob, big_mib, 2.0)
        _assert_aborted_cleanly(client, 2, root, r"No space left|ENOSPC|Errno 28", used_after_1, mnt)
        _assert_intact(client, ckpt1, model, blob, trainer.build_state(1, 8))

        # Training goes on: a save that fits the space the aborted one gave back commits.
        _fill(blob, 8, 3.0)
        ckpt3 = client.save_async(3).wait(60)
        assert verify_checkpoint(ckpt3)
        assert inv.committed_steps(out) == [1, 3]

        # Space comes back (the volume grows): the large state commits now.
        small_disk(f"size={DISK_MB + 2 * big_mib}m")
        _fill(blob, big_mib, 4.0)
        ckpt4 = client.save_async(4).wait(60)
        assert verify_checkpoint(ckpt4)
        assert find_latest_checkpoint(out) == ckpt4
        assert not inv.temp_or_trash(out)
        blob.tensor = torch.zeros(1)
        assert client.load("latest") == ckpt4
        assert torch.equal(blob.tensor, torch.full((big_mib * MiB // 4,), 4.0))


def test_read_only_file_system_aborts_with_erofs_and_commits_again_after_remount_rw(small_disk, tmp_path: Path) -> None:
    mnt = tmp_path / "disk"
    out = mnt / "run"
    root = out / "checkpoints"
    model, blob = trainer.build_state(2, 4)
    with CheckpointClient(out, trainer.components(model, blob), timeout_s=60) as client:
        ckpt1 = client.save_async(1).wait(60)
        used_after_1 = shutil.disk_usage(mnt).used

        small_disk("ro")
        _fill(blob, 4, 2.0)
        _assert_aborted_cleanly(client, 2, root, r"Read-only file system|EROFS|Errno 30", used_after_1, mnt)
        _assert_intact(client, ckpt1, model, blob, trainer.build_state(2, 4))

        small_disk("rw")
        _fill(blob, 4, 3.0)
        ckpt3 = client.save_async(3).wait(60)
        assert verify_checkpoint(ckpt3)
        assert find_latest_checkpoint(out) == ckpt3
        assert inv.committed_steps(out) == [1, 3]
        blob.tensor = torch.zeros(1)
        assert client.load("latest") == ckpt3
        assert torch.equal(blob.tensor, torch.full((4 * MiB // 4,), 3.0))
