"""Review of the daemon's write pacing (b903058): reproductions of defects. Real daemon processes (the
``endpoint`` fixture), real sealed memfd slabs, real files, the real client; no mocks."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptd import format as fmt
from ckptd.protocol import MsgType
from client import CheckpointClient, SharingPattern, StateComponent
from tests.ckptd.harness import Harness, outcome
from tests.ckptd.test_write_pacing import ENV, MiB, files_of, stage, start

pytestmark = pytest.mark.timeout(120)


class Weights:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": self.t}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.t.copy_(sd["w"])


def test_a_paced_first_save_does_not_make_the_next_save_async_wait(
    harness: Harness, endpoint: str, tmp_path: Path
) -> None:
    """pacing.py: 'Whatever the mode, pacing never costs a save its deadline or makes the trainer wait'; the
    lift for back-pressure is 'once the next save is due by the measured rhythm'. The first save of an output
    dir has no rhythm (Pace.due_at is None, server.plan_pace), and with the default single staging slab the
    next save cannot be handed over before the slab is released (so the 'later save handed over' lift cannot
    fire either): the trainer's next save_async waits the whole paced write, bounded only by half of
    timeout_s (150 s by default). Here 8 MiB at 1 MiB/s: save_async(2) stalls for about 8 s."""
    start(harness, "--max-write-rate", "1MiB/s")
    w = torch.randn(2 << 20)  # 8 MiB
    comps = [StateComponent("weights", Weights(w), SharingPattern.GLOBAL)]
    with CheckpointClient(tmp_path / "out", comps, endpoint=endpoint) as client:
        h1 = client.save_async(1)
        t0 = time.monotonic()
        h2 = client.save_async(2)
        stall = time.monotonic() - t0
        h1.wait(60)
        h2.wait(60)
    assert stall < 2.0, f"save_async(2) waited {stall:.1f} s for the paced write of save 1 (back-pressure)"


def test_paced_saves_do_not_cost_another_output_dirs_save_its_deadline(harness: Harness, tmp_path: Path) -> None:
    """A paced writer sleeps inside a thread of the daemon's one writer pool (io_pool, --writer-threads,
    default 4), which every transaction of every output dir shares for write_part, sync_part and vetoes.
    Four paced saves (four jobs, or four ranks of one node's job, in other output dirs) take every writer
    thread for as long as their pacing lasts; the pacing lift only looks at saves of the *same* output dir
    (server.plan_pace). A save of another dir then cannot even start writing, and misses its deadline:
    'pacing never costs a save its deadline' does not hold."""
    start(harness, "--max-write-rate", "2MiB/s")  # shared bucket: 32 MiB below take ~16 s
    peer = harness.peer()
    paced = []
    for i in range(4):
        shm = harness.shm(12 * MiB)
        specs, _ = files_of(shm, 4, 2, seed=i)  # 4 files of 2 MiB
        paced.append(stage(peer, shm, tmp_path / f"job{i}", 1, specs, timeout_s=60.0))
    time.sleep(0.5)  # every writer thread is now sleeping in a paced write
    shm = harness.shm(2 * MiB)
    specs, datas = files_of(shm, 1, 1, seed=9)
    t0 = time.monotonic()
    txn = stage(peer, shm, tmp_path / "other", 1, specs, timeout_s=4.0)
    try:
        kind, body = outcome(peer, txn, timeout_s=30)
    except AssertionError:
        pytest.fail("a 1 MiB save with a 4 s timeout got no outcome within 30 s (queued behind paced writers)")
    elapsed = time.monotonic() - t0
    assert kind == MsgType.COMMITTED, f"1 MiB save with a 4 s timeout: {kind.name} after {elapsed:.1f} s: {body}"
    path = Path(body["path"])
    assert (path / specs[0].path).read_bytes() == datas[0]
    assert fmt.verify_checkpoint(path)
    for t in paced:
        peer.request(MsgType.ABORT, txn=t, reason="test done")


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # this machine is shared: a runaway stays small


def test_a_huge_cpu_affinity_range_is_refused_at_once(endpoint: str) -> None:
    """parse_cpu_list builds the set of every CPU in a range before it checks any against the allowed ones:
    '--cpu-affinity 0-4000000000' (a typo, or 0-$((2**32))) tries to materialise four billion ints; the
    daemon grows without bound (here capped at 6 GiB of address space, so it dies of MemoryError with a
    traceback) instead of exiting 2 with the 'may not run on' message that '4096' gets."""
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, "--cpu-affinity", "0-4000000000"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **ENV},
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("ckptd serve --cpu-affinity 0-4000000000 ran for 60 s instead of refusing the option")
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr and "may not run on" in r.stderr, r.stderr[-1500:]
    assert elapsed < 15, elapsed
