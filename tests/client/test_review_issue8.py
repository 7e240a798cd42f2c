"""Review of issue 8 (overlapped staging, small-tensor staging fast path): reproductions of defects.

Real daemon processes (the ``endpoint`` fixture), real slabs, real files; no mocks. Each test fails on the code
it was written against and names the behaviour it proves wrong.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent, find_latest_checkpoint

pytestmark = pytest.mark.timeout(180)


def saved_model(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


class Holder:
    """A model component over plain tensors (a flat {name: tensor} state_dict)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.tensors.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in sd.items():
                self.tensors[k].copy_(v)


# --------------------------------------------------------------------------------------- overlapped staging


def test_embedding_max_norm_forward_after_save_async_never_reaches_the_checkpoint(
    endpoint: str, tmp_path: Path
) -> None:
    """Overlapped staging (on by default) assumes forward never writes a parameter (client/overlap.py module
    docstring, docs/concepts.md). torch.nn.Embedding(max_norm=...) does: its forward renormalises the rows it
    looks up *in place* (torch.embedding_renorm_). The copy thread still copies the weight while the next
    forward runs, so the checkpoint holds rows renormalised after save_async: not the values at the call."""
    torch.manual_seed(0)
    rows, dim = 1 << 16, 1024  # 256 MiB of weight
    emb = torch.nn.Embedding(rows, dim, max_norm=1.0)
    opt = torch.optim.SGD(emb.parameters(), lr=0.0)
    comps = [
        StateComponent("model", emb, SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
    ]
    idx = torch.arange(rows - 4096, rows)  # the last rows: the copy thread reaches them last
    torn = []
    with CheckpointClient(tmp_path / "out", comps) as client:
        for step in (1, 2, 3):
            with torch.no_grad():
                emb.weight.normal_()  # rows of norm ~32, well over max_norm
            before = emb.weight.detach().clone()
            h = client.save_async(step)
            assert h.overlapped_bytes == 0  # a weight its module's forward writes is copied before the return
            loss = emb(idx).sum()  # the next step's forward: renormalises rows idx in place
            opt.zero_grad()
            loss.backward()
            opt.step()  # lr 0: changes nothing; its pre-step hook waits for the copy and hands off
            saved = saved_model(h.wait(60))["weight"]
            if not torch.equal(saved, before):
                bad = (saved != before).any(dim=1).nonzero().flatten()
                torn.append((step, len(bad), int(bad.min()), int(bad.max())))
    assert not torn, f"checkpoint rows changed by the forward after save_async (step, rows, first, last): {torn}"


def test_a_parameter_written_in_place_before_the_hand_off_drops_that_save_and_turns_overlap_off(
    endpoint: str, tmp_path: Path
) -> None:
    """Any other in-place write of a deferred tensor between save_async and the hand-off (here a forward that
    rescales a parameter under no_grad) is caught by its version counter: that save is dropped with an error
    naming the tensor, nothing torn is committed, and the client's next saves copy everything up front."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16 << 20))  # 64 MiB: deferred
    opt = torch.optim.SGD([w], lr=0.0)
    comps = [
        StateComponent("model", Holder({"w": w}), SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
    ]
    with CheckpointClient(tmp_path / "out", comps) as client:
        h = client.save_async(1)
        assert h.overlapped_bytes > 0
        with torch.no_grad():
            w.mul_(2.0)  # a forward that writes the parameter
        w.grad = torch.zeros_like(w)
        opt.step()  # the hook finds the write
        with pytest.raises(CheckpointError, match=r"model\.w changed in place after save_async"):
            h.wait(60)
        assert not (tmp_path / "out" / "checkpoints" / "checkpoint-1").exists()
        before = w.detach().clone()
        h2 = client.save_async(2)
        assert h2.overlapped_bytes == 0  # overlapped staging is off now
        with torch.no_grad():
            w.mul_(2.0)
        opt.step()
        assert torch.equal(saved_model(h2.wait(60))["w"], before)


def test_an_optimizer_replaced_on_its_stateful_cannot_step_into_a_save_still_being_copied(
    endpoint: str, tmp_path: Path
) -> None:
    """The optimizers are found (and hooked) once, at construction (Overlap.for_components), but which tensors
    are deferred is decided at every save from those same optimizers' param_groups. A stateful that holds its
    optimizer in an attribute (the documented get_state_dict recipe) and replaces it (a new optimizer after
    warm-up, a restart of the optimizer) keeps the parameters deferred while the optimizer that now steps them
    has no pre-step hook: its step() writes the parameters while the copy thread is still copying them."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(32 << 20))  # 128 MiB, first in the file
    b = torch.nn.Parameter(torch.randn(8 << 20))  # 32 MiB, copied after a

    class Trainer:
        def __init__(self) -> None:
            self.optimizer = torch.optim.SGD([b, a], lr=1.0, foreach=False)

        def state_dict(self) -> dict[str, torch.Tensor]:
            return {"a": a.detach(), "b": b.detach()}

        def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
            with torch.no_grad():
                a.copy_(sd["a"])
                b.copy_(sd["b"])

    trainer = Trainer()
    comps = [StateComponent("model", trainer, SharingPattern.REPLICATED)]
    torn = []
    with CheckpointClient(tmp_path / "out", comps) as client:
        trainer.optimizer = torch.optim.SGD([b, a], lr=1.0, foreach=False)  # replaced: b is stepped first
        for step in (1, 2, 3):
            a.grad = torch.ones_like(a)
            b.grad = torch.ones_like(b)
            before = {"a": a.detach().clone(), "b": b.detach().clone()}
            h = client.save_async(step)
            assert h.overlapped_bytes == (a.numel() + b.numel()) * 4
            trainer.optimizer.step()  # the optimizer that trains now: b -= 1 while the copy is still on a
            saved = saved_model(h.wait(60))
            torn += [(step, k) for k in ("a", "b") if not torch.equal(saved[k], before[k])]
    assert not torn, f"values from the step after save_async reached the checkpoint: {torn}"


def test_a_save_whose_next_step_comes_after_timeout_s_still_commits(endpoint: str, tmp_path: Path) -> None:
    """save_async fixes the save's deadline (time.time() + timeout_s) at the call, but with overlapped staging
    the part is handed to the daemon only at the optimizer's next step(). A loop that evaluates (or does
    anything longer than timeout_s, 300 s by default) between a save and its next step loses that save: the
    daemon refuses a hand-off past its deadline. With overlap_staging=False the same save commits within
    a second; the copy thread itself was done after a few milliseconds."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(1 << 20))  # 4 MiB: deferred
    opt = torch.optim.SGD([w], lr=0.1)
    comps = [
        StateComponent("model", Holder({"w": w}), SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
    ]
    with CheckpointClient(tmp_path / "out", comps, timeout_s=3.0) as client:
        h = client.save_async(1)
        assert h.overlapped_bytes > 0
        time.sleep(4.0)  # an evaluation after the save (no client call, no step)
        opt.step()  # the hook hands the part off now
        try:
            path = h.wait(30)
        except CheckpointError as e:
            pytest.fail(f"a save staged long before its deadline was lost: {e}")
        assert path.name == "checkpoint-1"


def test_sigterm_while_the_pre_step_hook_waits_for_the_copy_still_commits_the_save(
    endpoint: str, tmp_path: Path
) -> None:
    """install_preemption_handler: without preemption points, a SIGTERM makes the handler 'wait for the saves
    in flight and exit'. The optimizer's pre-step hook calls _finish_overlap outside any client call (_depth
    is 0, so the signal is handled at once, inside it) and _finish_overlap drops ``pending`` *before* it joins
    the copy. The handler then waits for a handle that is in flight but was never handed off: its heartbeat
    asks the daemon, which does not know the txn, and the save is abandoned as if the daemon had restarted
    ('ckptd does not know this save'), the slab destroyed under the still running copy thread. The save,
    fully staged, is lost."""
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(64 << 20))  # 256 MiB, and as much again of momentum
    opt = torch.optim.SGD([big], lr=0.1, momentum=0.9)
    big.grad = torch.ones_like(big)
    opt.step()
    comps = [
        StateComponent("model", Holder({"big": big}), SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
    ]
    out = tmp_path / "out"
    previous = signal.getsignal(signal.SIGTERM)
    client = CheckpointClient(out, comps)
    try:
        client.install_preemption_handler(timeout_s=30)
        h = client.save_async(1)
        assert client._overlap is not None and client._overlap.pending is not None
        copying = client._overlap.pending.copying
        fired = threading.Event()

        def sigterm_inside_the_hook() -> None:
            # The hook has taken the pending hand-off and now waits for the copy thread: the signal lands there.
            deadline = time.monotonic() + 30
            while client._depth == 0 and time.monotonic() < deadline:  # until the hook's call has begun
                time.sleep(0.0005)
            time.sleep(0.002)
            if not copying.done():
                fired.set()
                os.kill(os.getpid(), signal.SIGTERM)

        t = threading.Thread(target=sigterm_inside_the_hook, daemon=True)
        t.start()
        exited = None
        try:
            opt.step()
            time.sleep(1.0)  # (a signal sent just as the hook returned is handled by now)
        except SystemExit as e:
            exited = e.code
        t.join(5)
        if not fired.is_set():
            pytest.skip("the copy finished before the signal could be sent inside the hook")
        assert exited == 128 + signal.SIGTERM
        latest = find_latest_checkpoint(out)
        assert latest is not None and latest.name == "checkpoint-1", (
            f"the save in flight at SIGTERM was lost: latest={latest}, handle error={h.error!r}"
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        client.close(wait=False)


TRAINER = r"""
import os, signal, sys, threading, time
import torch
from client import CheckpointClient, SharingPattern, StateComponent

# Ctrl-C must be deliverable whatever the launching process left (an ignored or blocked SIGINT is inherited).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

class Holder:
    def __init__(self, t): self.t = t
    # A transposed view of the parameter (shares its storage, so it is deferred): a slow, strided copy.
    def state_dict(self): return {"big": self.t.detach().view(2, -1).t()}
    def load_state_dict(self, sd): pass

torch.manual_seed(0)
big = torch.nn.Parameter(torch.zeros(256 << 20))  # 1 GiB, and as much again of momentum: a copy of ~1 s
opt = torch.optim.SGD([big], lr=0.1, momentum=0.9)
big.grad = torch.ones_like(big)
opt.step()
big.grad = None
comps = [StateComponent("model", Holder(big), SharingPattern.REPLICATED),
         StateComponent("optimizer", opt, SharingPattern.REPLICATED)]
client = CheckpointClient(sys.argv[1], comps)
h = client.save_async(1)
copying = client._overlap.pending.copying

def ctrl_c_inside_the_hook():
    while client._depth == 0:  # until the hook's call has begun
        time.sleep(0.0005)
    time.sleep(0.002)
    if not copying.done():
        print("SIGINT sent while the hook waits for the copy", flush=True)
        os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=ctrl_c_inside_the_hook, daemon=True).start()
try:
    opt.step()
    time.sleep(1.0)
except KeyboardInterrupt:
    print("KeyboardInterrupt; closing", flush=True)
    t0 = time.monotonic()
    client.close(wait=False)  # the usual 'leave the rest to the daemon' on Ctrl-C
    print(f"closed in {time.monotonic() - t0:.3f} s; copy done: {copying.done()}", flush=True)
    sys.exit(0)
print("no interrupt", flush=True)
client.close()
"""


def test_ctrl_c_while_the_pre_step_hook_waits_then_close_does_not_crash_the_trainer(
    endpoint: str, tmp_path: Path
) -> None:
    """A KeyboardInterrupt raised inside the optimizer's pre-step hook (Ctrl-C while step() waits for the
    copy) leaves the copy thread running with ``Overlap.pending`` already cleared: _finish_overlap sets it to
    None *before* it joins the copy (client/client.py). A following close(wait=False) then finds nothing to
    join (Overlap.close joins only ``pending``) and unmaps the slab (Slab.destroy: torch.frombuffer views do
    not pin the mmap, so mm.close() succeeds) while the copy thread still writes into it: the trainer dies
    of SIGSEGV instead of closing. Run in a subprocess, a real trainer; the deferred tensor is a transposed
    view of a 1 GiB parameter (plus 1 GiB of momentum), so the copy is still running when close() unmaps."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)}
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=env
    )
    if "SIGINT sent" not in r.stdout:
        pytest.skip(f"the copy finished before the interrupt could land inside the hook: {r.stdout}")
    assert r.returncode == 0, f"trainer exited {r.returncode}: stdout={r.stdout!r} stderr tail={r.stderr[-2000:]!r}"
    assert "closed" in r.stdout


LAST_LINE = r"""
import sys
import torch
from client import CheckpointClient, SharingPattern, StateComponent

torch.manual_seed(0)
model = torch.nn.Linear(1024, 1024)  # 4 MiB of weight: deferred with overlapped staging
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(torch.randn(8, 1024)).sum().backward()
opt.step()
comps = [StateComponent("model", model, SharingPattern.REPLICATED),
         StateComponent("optimizer", opt, SharingPattern.REPLICATED)]
client = CheckpointClient(sys.argv[1], comps, overlap_staging=sys.argv[2] == "on")
client.save_async(1)
print("save_async returned", flush=True)
# the script's last line: the interpreter exits normally, without close()
"""


def _run_last_line(tmp_path: Path, overlap: str) -> tuple[subprocess.CompletedProcess, Path | None]:
    script = tmp_path / "last_line.py"
    script.write_text(LAST_LINE)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)}
    out = tmp_path / f"out-{overlap}"
    r = subprocess.run(
        [sys.executable, str(script), str(out), overlap], capture_output=True, text=True, timeout=120, env=env
    )
    deadline = time.monotonic() + 20
    while find_latest_checkpoint(out) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return r, find_latest_checkpoint(out)


def test_a_save_async_on_the_last_line_of_a_script_still_commits(endpoint: str, tmp_path: Path) -> None:
    """A save handed off commits even when the trainer exits right after (docs/guarantees.md, first row; the
    client's own comments name 'a script's last line, SystemExit' as an exit without close()). With
    overlapped staging, on by default, save_async returns before the hand-off, and nothing hands it off at
    interpreter exit (no atexit / finalizer calls _finish_overlap; the copy thread is a daemon thread): a
    final save_async followed by a normal exit is silently lost. With overlap_staging=False the very same
    script's save commits (checked here first). guarantees.md only admits the loss for kill -9."""
    r, ckpt = _run_last_line(tmp_path, "off")
    assert r.returncode == 0 and ckpt is not None and ckpt.name == "checkpoint-1", (r.returncode, r.stderr[-1500:])
    r, ckpt = _run_last_line(tmp_path, "on")
    assert r.returncode == 0, r.stderr[-1500:]
    assert "save_async returned" in r.stdout
    assert ckpt is not None and ckpt.name == "checkpoint-1", "the final save of a script that exits normally was lost"


# ---------------------------------------------------------------------------------- small-tensor staging


def test_a_tie_after_a_view_starting_at_the_same_address_is_stored_once(endpoint: str, tmp_path: Path) -> None:
    """tied_groups anchors every tensor that starts at one data pointer on the *first* of them and only
    compares the others with that anchor. When the first is a shorter view starting at the same address
    (``a[:2]``, what the docstring itself names), a real tie that follows (``y`` and ``z``, both ``a``) is
    never compared with itself: it is stored twice and left out of metadata.tied_weights."""
    import json

    a = torch.randn(4096)
    state = {"x": a[:2], "y": a, "z": a}
    comps = [StateComponent("model", Holder(state), SharingPattern.REPLICATED)]
    with CheckpointClient(tmp_path / "out", comps) as client:
        ckpt = client.save_async(1).wait(60)
    saved = saved_model(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    tied = index["metadata"].get("tied_weights", [])
    assert torch.equal(saved["y"], a)
    assert ["y", "z"] in tied, f"y and z are the same memory, stored {sorted(saved)}; tied_weights={tied}"
    assert "z" not in saved
