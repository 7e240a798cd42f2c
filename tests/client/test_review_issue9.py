"""Fresh-context review of issue 9 (bbcb1b4, bf71777): best mark, retention, skip=, ckptd drop.

Each test here reproduces one defect through real embedded daemons (the ``endpoint`` and ``output_dir``
fixtures), real files and the real CLI; no mocks. Each one fails on the code as reviewed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

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


class Box:
    def __init__(self, value: float = 0.0) -> None:
        self.t = torch.full((256,), value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"t": self.t}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.t = sd["t"].clone()


def steps_on_disk(output_dir) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(output_dir)]


def ckptd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------ retention


def test_resaving_an_older_step_never_deletes_the_newest_checkpoint(endpoint, output_dir):
    """save_total_limit=1, checkpoints 5 and 10, then step 5 is saved again (a re-save after resuming from
    checkpoint-5, or any save of a lower step). Retention keeps "the N newest (never the one just
    committed)" and the ledger promises "retention never removes a newer checkpoint", yet
    retention_verdicts counts the newest among the *others* only when limit > 1, so with limit 1 it trashes
    checkpoint-10, the highest step: load("latest") silently moves back to step 5."""
    box = Box()
    comps = [StateComponent("weights", box, SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, save_total_limit=1) as c:
        c.save_async(5).wait(60)
        c.save_async(10).wait(60)
        assert steps_on_disk(output_dir) == [10]
        c.save_async(5).wait(60)  # an older step
        on_disk = steps_on_disk(output_dir)
    assert 10 in on_disk, f"retention after saving step 5 deleted checkpoint-10, the newest: left {on_disk}"


def test_resaving_the_best_with_a_worse_metric_does_not_let_retention_delete_the_real_best(endpoint, output_dir):
    """best_metric=eval_loss (lower is better), save_total_limit=2: step 5 (0.3), step 10 (0.1, best), then
    step 10 is re-saved with 0.5. update_best sees the mark names the step just committed and simply
    rewrites it with 0.5, so the mark now calls a 0.5 checkpoint the best while checkpoint-5 holds 0.3.
    The next save (step 11, 0.4) then beats 0.5, takes the mark, and retention deletes checkpoint-5, the
    checkpoint with the best eval_loss on disk."""
    comps = [StateComponent("weights", Box(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, save_total_limit=2, best_metric="eval_loss") as c:
        c.save_async(5, metadata={"eval_loss": 0.3}).wait(60)
        c.save_async(10, metadata={"eval_loss": 0.1}).wait(60)
        c.save_async(10, metadata={"eval_loss": 0.5}).wait(60)  # the best step re-saved, now worse
        best_after_resave = find_best_checkpoint(output_dir)
        c.save_async(11, metadata={"eval_loss": 0.4}).wait(60)
        on_disk = steps_on_disk(output_dir)
    assert 5 in on_disk, f"checkpoint-5 (eval_loss 0.3, the best on disk) was deleted by retention: {on_disk}"
    assert best_after_resave is not None and best_after_resave.name == "checkpoint-5", best_after_resave


def test_a_crash_between_the_commit_rename_and_the_best_mark_does_not_lose_the_best(endpoint, output_dir, monkeypatch):
    """kill -9 of the daemon right after the rename of step 2 (eval_loss 0.1, the best by far), before
    update_best ran: checkpoint-2 is committed but the mark still names step 1 (0.9). Nothing ever ranks
    checkpoint-2 again (no recovery on the next daemon's start, update_best looks only at the new save), so
    the next save (step 3, 0.8) takes the mark and retention (limit 1) deletes checkpoint-2 -- the best
    checkpoint is lost to a crash window the mark was meant to survive."""
    comps = [StateComponent("weights", Box(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, best_metric="eval_loss") as c:
        c.save_async(1, metadata={"eval_loss": 0.9}).wait(60)
    # The embedded daemon lingers 10 s after its last client: stop it, so the next client starts one that
    # reads CKPTD_TEST_FAULTS (otherwise the old daemon serves the next client and no fault fires).
    stop_daemon(endpoint)
    monkeypatch.setenv("CKPTD_TEST_FAULTS", "after_rename=crash@1")
    c = CheckpointClient(output_dir, comps, best_metric="eval_loss")
    try:
        h = c.save_async(2, metadata={"eval_loss": 0.1})
        with contextlib.suppress(CheckpointError):
            h.wait(60)
    finally:
        c.close(wait=False)
    monkeypatch.delenv("CKPTD_TEST_FAULTS")
    assert 2 in steps_on_disk(output_dir), "precondition: the rename happened before the crash"
    from ckptd import format as fmt

    mark = fmt.read_best_mark(output_dir)
    assert mark is not None and mark.step == 1, f"precondition: the crash came before update_best, mark {mark}"
    with CheckpointClient(output_dir, comps, save_total_limit=1, best_metric="eval_loss") as c:
        c.save_async(3, metadata={"eval_loss": 0.8}).wait(60)
    on_disk = steps_on_disk(output_dir)
    assert 2 in on_disk, f"checkpoint-2 (eval_loss 0.1, the best) was deleted after the crash: {on_disk}"


# --------------------------------------------------------------------------------------- the best mark


def write_mark(output_dir, doc_text: str) -> None:
    (output_dir / "checkpoints" / ".ckptd-best.json").write_text(doc_text)


def test_a_non_finite_value_in_the_best_mark_does_not_freeze_the_best_forever(endpoint, output_dir):
    """A mark whose value is NaN (Python's json accepts the NaN literal; read_best_mark checks only the type)
    names a committed checkpoint. is_better(x, nan) is False for every x, so no later save is ever better:
    the best is frozen on checkpoint-1 for the rest of the run, and retention keeps it forever. A mark that
    is not what ckptd writes (it writes with allow_nan=False) must be treated as damaged."""
    comps = [StateComponent("weights", Box(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, best_metric="eval_loss") as c:
        c.save_async(1, metadata={"eval_loss": 0.9}).wait(60)
        write_mark(output_dir, '{"step": 1, "metric": "eval_loss", "value": NaN, "greater_is_better": false}')
        c.save_async(2, metadata={"eval_loss": 0.1}).wait(60)
    best = find_best_checkpoint(output_dir)
    assert best is not None and best.name == "checkpoint-2", f"a NaN mark froze the best on {best}"


def test_a_damaged_best_mark_error_says_to_remove_the_mark_not_to_resume_from_an_older_checkpoint(endpoint, output_dir):
    """A best mark that is not JSON: load('best') and 'ckptd ls' report load_json's generic text "the file is
    damaged, resume from an older checkpoint" -- wrong advice (every checkpoint is fine; only the mark is
    bad) and it never says what to do (remove .ckptd-best.json, set_best_checkpoint again), which
    read_best_mark says for every other kind of damage."""
    comps = [StateComponent("weights", Box(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps) as c:
        c.save_async(1).wait(60)
        write_mark(output_dir, "{not json")
        with pytest.raises(CheckpointError) as e:
            c.load("best")
    msg = str(e.value)
    assert "older checkpoint" not in msg and "mark" in msg and "remove" in msg, msg


def test_a_fifo_best_mark_is_reported_as_what_it_is(endpoint, output_dir):
    """.ckptd-best.json replaced by a FIFO: 'ckptd ls' does not hang (good) but says the mark is "found no
    file", which is false (something is there, and it must be removed by hand): the message must name what
    was found (a FIFO / not a regular file)."""
    comps = [StateComponent("weights", Box(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps) as c:
        c.save_async(1).wait(60)
    os.mkfifo(output_dir / "checkpoints" / ".ckptd-best.json")
    r = ckptd("ls", str(output_dir))
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if ".ckptd-best.json" in x)
    assert "no file" not in line and ("fifo" in line.lower() or "not a regular file" in line), line


# ------------------------------------------------------------------------------------------ ckptd drop


def test_ckptd_drop_of_a_required_component_does_not_promise_a_resume_that_then_fails(endpoint, output_dir):
    """'ckptd drop CKPT optimizer' on a component the manifest records as required=True: drop succeeds and
    prints "load('latest') resumes from it without 'optimizer'", but load('latest') then raises (a required
    component missing is fatal, no fallback to checkpoint-1), so the whole run can no longer resume from
    'latest'. drop must refuse a required component (the manifest says it is one), or at least not promise
    a resume."""
    model, opt = Box(1.0), Box(2.0)
    comps = [
        StateComponent("model_state", model, SharingPattern.GLOBAL),
        StateComponent("optimizer", opt, SharingPattern.GLOBAL),  # required=True
    ]
    with CheckpointClient(output_dir, comps) as c:
        c.save_async(1).wait(60)
        c.save_async(2).wait(60)
    ckpt = output_dir / "checkpoints" / "checkpoint-2"
    r = ckptd("drop", str(ckpt), "optimizer")
    if r.returncode != 0:
        return  # refused: fine
    with CheckpointClient(output_dir, comps) as c:
        try:
            loaded = c.load("latest")
        except CheckpointError as e:
            pytest.fail(f"drop said {r.stdout.strip()!r}, but load('latest') raised: {e}")
    assert loaded is not None


# ------------------------------------------------------------------------------- set_best on two ranks

REPO = Path(__file__).resolve().parents[2]

SET_BEST_WORKER = r"""
import json, os, sys, time
import torch
import torch.distributed as dist
from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent

class Box:
    def __init__(self): self.t = torch.zeros(64)
    def state_dict(self): return {"t": self.t}
    def load_state_dict(self, sd): self.t = sd["t"].clone()

out, results = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
res = {}
with CheckpointClient(out, [StateComponent("w", Box(), SharingPattern.GLOBAL)]) as c:
    c.save_async(1).wait(60)
    for case, fn in (
        ("mark_missing", lambda: c.set_best_checkpoint(7)),
        ("mark_then_load_best", lambda: (c.set_best_checkpoint(1), c.load("best"))[1]),
    ):
        try:
            r = fn()
            res[case] = {"ok": True, "value": str(r)}
        except CheckpointError as e:
            res[case] = {"ok": False, "error": str(e)}
        dist.barrier()
os.makedirs(results, exist_ok=True)
with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
    json.dump(res, f)
dist.destroy_process_group()
"""


def test_set_best_checkpoint_on_every_rank_agrees_and_load_best_then_sees_the_mark(endpoint, tmp_path):
    """The docstring says "Every rank may call it; rank 0 marks", but it is not collective: on rank != 0 it
    returns a path at once without asking anyone. (a) set_best_checkpoint(7) with no checkpoint-7 raises on
    rank 0 and *succeeds* on rank 1 -- the ranks' control flow diverges (the next collective of the
    script hangs or mismatches). (b) set_best_checkpoint(1) then load("best") on both ranks: rank 1 reads
    the mark before rank 0's daemon has written it, so load raises "no checkpoint is marked best" on rank 1
    (or the misleading "ranks see different checkpoints ... output_dir must be shared")."""
    import signal

    worker = tmp_path / "set_best_worker.py"
    worker.write_text(SET_BEST_WORKER)
    out, results = tmp_path / "out", tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(out),
        str(results),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=str(REPO)
    )
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun hung; output:\n{output}")
    assert proc.returncode == 0, output
    r0 = json.loads((results / "rank0.json").read_text())
    r1 = json.loads((results / "rank1.json").read_text())
    problems = []
    if r0["mark_missing"]["ok"] != r1["mark_missing"]["ok"]:
        problems.append(f"set_best_checkpoint(7): rank 0 {r0['mark_missing']} / rank 1 {r1['mark_missing']}")
    if not (r0["mark_then_load_best"]["ok"] and r1["mark_then_load_best"]["ok"]):
        problems.append(
            f"set_best_checkpoint(1); load('best'): rank 0 {r0['mark_then_load_best']} / "
            f"rank 1 {r1['mark_then_load_best']}"
        )
    assert not problems, "\n".join(problems)


def test_set_best_checkpoint_on_a_read_only_client_says_it_only_loads(endpoint, output_dir):
    """CheckpointClient(read_only=True) has no daemon link; set_best_checkpoint does ``assert self._link is
    not None`` and so raises a bare AssertionError (an AttributeError on None under python -O) instead of
    the CheckpointError every other writing call gives ("opened with read_only=True; it only loads")."""
    comps = [StateComponent("weights", Box(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps) as c:
        c.save_async(1).wait(60)
    with CheckpointClient(output_dir, comps, read_only=True) as r:
        try:
            r.set_best_checkpoint(1)
        except CheckpointError as e:
            assert "read_only" in str(e), e
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"set_best_checkpoint on a read-only client raised {type(e).__name__}: {e!r}")


def test_set_best_checkpoint_behind_a_slow_commit_does_not_report_a_failure_that_then_takes_effect(
    endpoint, output_dir, monkeypatch
):
    """set_best goes into the daemon's one commit thread, behind any commit in progress, but the client waits
    only heartbeat_timeout_s (a liveness bound for queries, 15 s by default; 1 s here) for the reply. A
    commit that takes longer (here a 3 s stall before the rename; in real life hashing and fsyncing a big
    checkpoint) makes set_best_checkpoint raise "did not answer a set_best request" -- and then the daemon
    writes the mark anyway. The caller is told it failed while it took effect."""
    import time

    monkeypatch.setenv("CKPTD_TEST_FAULTS", "before_rename=stall@2")
    comps = [StateComponent("weights", Box(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, heartbeat_timeout_s=1.0) as c:
        c.save_async(1).wait(60)
        h = c.save_async(2)
        time.sleep(0.7)  # the commit of step 2 is in the commit thread now, stalled before its rename
        error = None
        try:
            c.set_best_checkpoint(1)
        except CheckpointError as e:
            error = e
        h.wait(60)
        time.sleep(0.5)
    best = find_best_checkpoint(output_dir)
    if error is not None:
        assert best is None, f"set_best_checkpoint(1) raised {error!r}, yet {best} was marked best afterwards"


def test_gc_keep_every_n_steps_without_save_total_limit_is_refused_not_ignored(endpoint, output_dir):
    """'ckptd gc OUT --dry-run --keep-every-n-steps 3' (the user forgot --save-total-limit): cmd_gc takes the
    retention preview only when --save-total-limit is given, so --keep-every-n-steps is silently dropped and
    the ordinary temp/trash dry run is printed as if it answered the question. It must be a usage error
    (exit 2) that says --keep-every-n-steps needs --save-total-limit."""
    comps = [StateComponent("weights", Box(), SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps) as c:
        for step in (1, 2, 3):
            c.save_async(step).wait(60)
    r = ckptd("gc", str(output_dir), "--dry-run", "--keep-every-n-steps", "3")
    assert r.returncode == 2 and "--save-total-limit" in r.stderr, (r.returncode, r.stdout, r.stderr)
