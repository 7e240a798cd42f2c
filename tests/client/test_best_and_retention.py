"""The best checkpoint and the retention policies, through real embedded daemons: the best is chosen from
the save's metadata (or marked explicitly), kept by retention beside the newest ``save_total_limit``, never
lost to a kill -9 during retention, and loaded bit for bit by ``load("best")``; ``keep_every_n_steps``
milestones are never deleted."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import stop_daemon

from client import (
    CheckpointClient,
    CheckpointError,
    SharingPattern,
    StateComponent,
    find_best_checkpoint,
    list_checkpoints,
)

# eval_loss per step: step 2 is the best (lowest), and the newest saves are all worse than it.
LOSSES = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.8, 5: 0.6, 6: 0.95}


class Weights:
    def __init__(self) -> None:
        self.w = torch.zeros(1024)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.w = sd["w"].clone()


def steps_on_disk(output_dir) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(output_dir)]


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_retention_keeps_the_newest_plus_the_best_at_every_limit(endpoint, output_dir, limit):
    st = Weights()
    comps = [StateComponent("weights", st, SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, save_total_limit=limit, best_metric="eval_loss") as client:
        for step, loss in LOSSES.items():
            st.w = torch.full((1024,), float(step))
            path = client.save_async(step, metadata={"eval_loss": loss}).wait(60)
            on_disk = steps_on_disk(output_dir)
            # The seed's bug: a limit of 1 with a preserved best deleted the checkpoint just saved.
            assert path.exists() and step in on_disk, f"limit {limit}: checkpoint-{step} just saved is gone"
            best = min((s for s in LOSSES if s <= step), key=lambda s: LOSSES[s])
            assert find_best_checkpoint(output_dir) == output_dir / "checkpoints" / f"checkpoint-{best}"
            newest = sorted(s for s in LOSSES if s <= step)[-limit:]
            assert on_disk == sorted(set(newest) | {best}), f"limit {limit} after step {step}: {on_disk}"
        st.w = torch.zeros(1024)
        assert client.load("best") == output_dir / "checkpoints" / "checkpoint-2"
    assert torch.equal(st.w, torch.full((1024,), 2.0))


def test_greater_is_better_picks_the_highest_and_a_save_without_the_metric_is_never_best(endpoint, output_dir):
    comps = [StateComponent("weights", Weights(), SharingPattern.GLOBAL)]
    with CheckpointClient(
        output_dir, comps, save_total_limit=1, best_metric="accuracy", greater_is_better=True
    ) as client:
        client.save_async(1, metadata={"accuracy": 0.3}).wait(60)
        client.save_async(2, metadata={"accuracy": 0.8}).wait(60)
        client.save_async(3, metadata={"accuracy": 0.5}).wait(60)
        client.save_async(4).wait(60)  # no metric: kept as the newest, never the best
        client.save_async(5, metadata={"accuracy": "high"}).wait(60)  # not a number either
    assert find_best_checkpoint(output_dir).name == "checkpoint-2"
    assert steps_on_disk(output_dir) == [2, 5]


def test_set_best_checkpoint_marks_one_explicitly_and_retention_keeps_it(endpoint, output_dir):
    st = Weights()
    comps = [StateComponent("weights", st, SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, save_total_limit=1) as client:
        for step in (1, 2, 3):
            st.w = torch.full((1024,), float(step))
            client.save_async(step).wait(60)
            if step == 2:
                client.set_best_checkpoint(2)
        assert steps_on_disk(output_dir) == [2, 3]
        client.set_best_checkpoint(output_dir / "checkpoints" / "checkpoint-3")  # a path works too
        assert find_best_checkpoint(output_dir).name == "checkpoint-3"
        with pytest.raises(CheckpointError, match="checkpoint-7 is not a committed checkpoint"):
            client.set_best_checkpoint(7)
        assert find_best_checkpoint(output_dir).name == "checkpoint-3"  # a refused mark changes nothing
        client.save_async(4).wait(60)
        assert steps_on_disk(output_dir) == [3, 4]  # 2 is no longer the best: retention took it


def test_load_best_without_a_best_says_how_to_get_one(endpoint, output_dir):
    comps = [StateComponent("weights", Weights(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps) as client:
        client.save_async(1).wait(60)
        with pytest.raises(CheckpointError, match="no checkpoint is marked best"):
            client.load("best")


def test_a_limit_above_the_number_of_checkpoints_removes_none(endpoint, output_dir):
    """A limit of 5 with 4 checkpoints keeps all 4 (a slice from a negative start once kept only the last)."""
    comps = [StateComponent("weights", Weights(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, save_total_limit=5) as client:
        for step in range(1, 8):
            client.save_async(step).wait(60)
            assert steps_on_disk(output_dir) == list(range(max(1, step - 4), step + 1)), step


def test_keep_every_n_steps_milestones_survive_retention(endpoint, output_dir):
    comps = [StateComponent("weights", Weights(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, save_total_limit=1, keep_every_n_steps=3) as client:
        for step in range(1, 8):
            client.save_async(step).wait(60)
    assert steps_on_disk(output_dir) == [3, 6, 7]


@pytest.mark.parametrize("at", [1, 2])
def test_kill_9_during_retention_never_loses_the_best_or_the_newest(endpoint, output_dir, monkeypatch, at):
    """The daemon is killed (SIGKILL) at its ``at``-th retention removal of the last save; a new client (and
    daemon) then finds the best and the newest committed and loads the best bit for bit."""
    st = Weights()
    comps = [StateComponent("weights", st, SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, best_metric="eval_loss") as client:
        for step, loss in LOSSES.items():  # no limit yet: all six are kept
            st.w = torch.full((1024,), float(step))
            client.save_async(step, metadata={"eval_loss": loss}).wait(60)
    # The next daemon removes 7 - 1 - 1 = 5 old checkpoints when step 7 commits, and dies at removal ``at``.
    # (The embedded daemon outlives its client for a while: stopped first, so that a new one reads the fault.)
    stop_daemon(endpoint)
    monkeypatch.setenv("CKPTD_TEST_FAULTS", f"retention=crash@{at}")
    st.w = torch.full((1024,), 7.0)
    client = CheckpointClient(output_dir, comps, save_total_limit=1, best_metric="eval_loss")
    try:
        h = client.save_async(7, metadata={"eval_loss": 0.99})
        # The daemon died after the rename: the client learns it committed (its veto finds it) or not.
        with contextlib.suppress(CheckpointError):
            h.wait(60)
    finally:
        client.close(wait=False)
    monkeypatch.delenv("CKPTD_TEST_FAULTS")
    on_disk = steps_on_disk(output_dir)
    assert 7 in on_disk and 2 in on_disk, on_disk  # committed before retention ran, and the best
    assert len(on_disk) > 2, f"retention ran to the end: the daemon was not killed during it ({on_disk})"
    stop_daemon(endpoint)
    with CheckpointClient(output_dir, comps, best_metric="eval_loss") as client:
        assert find_best_checkpoint(output_dir).name == "checkpoint-2"
        st.w = torch.zeros(1024)
        client.load("best")
    assert torch.equal(st.w, torch.full((1024,), 2.0))


def test_gc_dry_run_shows_what_the_retention_policies_would_remove_and_why(endpoint, output_dir):
    import subprocess
    import sys

    comps = [StateComponent("weights", Weights(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, best_metric="eval_loss") as client:
        for step, loss in LOSSES.items():
            client.save_async(step, metadata={"eval_loss": loss}).wait(60)

    def gc(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "ckptd", "gc", str(output_dir), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    r = gc("--dry-run", "--save-total-limit", "2", "--keep-every-n-steps", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "would keep   checkpoint-2: the best" in lines
    assert any(line.startswith("would keep   checkpoint-3: a milestone") for line in lines)
    assert "would keep   checkpoint-5: among the 2 newest" in lines
    assert "would keep   checkpoint-6: just committed" in lines
    assert "would remove checkpoint-1: older than the 2 newest" in lines
    assert "would remove checkpoint-4: older than the 2 newest" in lines
    assert steps_on_disk(output_dir) == [1, 2, 3, 4, 5, 6]  # a preview removes nothing
    r = gc("--save-total-limit", "2")
    assert r.returncode == 2 and "previews retention only" in r.stderr
