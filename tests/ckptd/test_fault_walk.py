"""The fault-point walk: every named point of the daemon's write and commit path x {crash, ENOSPC, EIO}.

For each: a checkpoint is committed by a healthy daemon; a daemon armed with the fault (the test-only
``CKPTD_TEST_FAULTS``) takes the next save; a fresh daemon starts over the same output dir and commits one
more. Then every ``checkpoint-*`` verifies and holds its own step's bytes, the newest committed step is the
one a resume picks, nothing but committed checkpoints is left in the directory, and the outcome the ranks
heard matches the disk: a fault before the rename aborts (and nothing of the save exists), a fault after it
is a committed checkpoint."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptd import format as fmt
from ckptd.faults import FaultAction, FaultPoint
from ckptd.protocol import ComponentSpec, MsgType
from tests.ckptd.harness import (
    COMMIT_TIMEOUT_S,
    Harness,
    commit_info,
    entries,
    global_file,
    global_save,
    st_bytes,
    stage_req,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

AFTER_RENAME = {FaultPoint.BETWEEN_RENAMES, FaultPoint.AFTER_RENAME, FaultPoint.RETENTION}
ACTIONS = [FaultAction.CRASH, FaultAction.ENOSPC, FaultAction.EIO]


def state(step: int, salt: float = 0.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((1024,), float(step) + salt), "b": torch.full((7,), float(step) + salt)}


def holds_its_step(path: Path) -> bool:
    step = fmt.parse_checkpoint_dirname(path.name)
    t = load_file(str(path / "weights_state.safetensors"))
    return bool(torch.all(t["w"].floor() == step)) and bool(torch.all(t["b"].floor() == step))


@pytest.mark.parametrize(("point", "action"), list(itertools.product(FaultPoint, ACTIONS)))
def test_fault_point_leaves_only_verified_checkpoints_and_the_next_save_commits(
    point: FaultPoint, action: FaultAction, harness: Harness, output_dir: Path
) -> None:
    healthy = harness.start()
    shm = harness.shm(1 << 20)
    global_save(harness.peer(), shm, output_dir, 1, state(1))
    healthy.proc.terminate()
    assert healthy.proc.wait(10) == 0

    faulty = harness.start(env={"CKPTD_TEST_FAULTS": f"{point.value}={action.value}"})
    peer = harness.peer()
    # A re-save of step 1 takes the RENAME_EXCHANGE path; retention has something to remove at limit 1.
    step = 1 if point == FaultPoint.BETWEEN_RENAMES else 2
    shm2 = harness.shm(1 << 20)
    info = commit_info(ComponentSpec("weights", "global", [0]))
    info.save_total_limit = 1 if point == FaultPoint.RETENTION else None
    req = stage_req(shm2, output_dir, step, [global_file(shm2, "weights", st_bytes(state(step, 0.5)))], commit=info)
    t, _, body = peer.stage(req)
    assert t == MsgType.ACCEPTED, body
    if action == FaultAction.CRASH:
        faulty.proc.wait(COMMIT_TIMEOUT_S)
        assert faulty.proc.returncode == -9, faulty.log_text()
    else:
        outcome = peer.wait(
            lambda m: m[2].get("txn") == req.txn and m[0] in (MsgType.COMMITTED, MsgType.ABORTED),
            f"outcome at {point.value}",
            COMMIT_TIMEOUT_S,
        )
        if point in AFTER_RENAME:
            assert outcome[0] == MsgType.COMMITTED, (point, outcome)
            t, _, status = peer.request(MsgType.STATUS)
            assert any(point.value in w for w in status["warnings"]), status["warnings"]
        else:
            assert outcome[0] == MsgType.ABORTED, (point, outcome)
            assert action.value.upper() in outcome[2]["reason"], outcome[2]["reason"]
            # Announced only once the temp dir is gone.
            assert not any(n.startswith(".tmp-") for n in entries(output_dir / "checkpoints"))
        assert faulty.proc.poll() is None, faulty.log_text()
        faulty.proc.terminate()
        assert faulty.proc.wait(10) == 0, faulty.log_text()

    harness.start("--output-dir", str(output_dir))
    global_save(harness.peer(), harness.shm(1 << 20), output_dir, 3, state(3))

    root = output_dir / "checkpoints"
    names = entries(root)
    committed = sorted(n for n in names if fmt.parse_checkpoint_dirname(n) is not None)
    assert names == set(committed), f"left behind after {point.value}={action.value}: {names - set(committed)}"
    for name in committed:
        assert fmt.verify_checkpoint(root / name), name
        assert holds_its_step(root / name), name
    assert fmt.find_latest_checkpoint(output_dir) == root / "checkpoint-3"
    if step == 2:
        assert ("checkpoint-2" in names) == (point in AFTER_RENAME), (point, names)
    assert "checkpoint-1" in names or point == FaultPoint.RETENTION
    wait_until(lambda: True, 0, "")
