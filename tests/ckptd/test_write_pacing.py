"""Write pacing, CPU placement and page-cache hygiene of the real daemon (``ckptd serve --max-write-rate``,
``--cpu-affinity``, ``--ionice``, POSIX_FADV_DONTNEED after fsync): real daemon processes, real sealed memfd
slabs, real files. No mocks.

Pacing may slow a save down, never past its deadline, never while a later save waits behind it, and a
paced save still aborts at once.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptd import format as fmt
from ckptd import pacing
from ckptd.protocol import ComponentSpec, FileSpec, MsgType
from tests.ckptd.harness import Daemon, Harness, Peer, Shm, commit_info, outcome, st_bytes, stage_req

pytestmark = pytest.mark.timeout(60)

MiB = 2**20
# The daemons run this checkout's ckptd, whatever an installed (editable) ckptd points at.
REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def start(harness: Harness, *args: str) -> Daemon:
    return harness.start(*args, env=ENV)


def files_of(shm: Shm, n_files: int, mib_each: int, seed: int = 0) -> tuple[list[FileSpec], list[bytes]]:
    """``n_files`` GLOBAL components ``c0``.. of ``mib_each`` MiB of fp32 each, laid into ``shm``."""
    g = torch.Generator().manual_seed(seed)
    specs, datas = [], []
    for i in range(n_files):
        data = st_bytes({"w": torch.rand(mib_each * MiB // 4, generator=g)})
        specs.append(
            FileSpec(
                path=fmt.component_filename(f"c{i}", "global"),
                offset=shm.put(data),
                length=len(data),
                component=f"c{i}",
            )
        )
        datas.append(data)
    return specs, datas


def stage(peer: Peer, shm: Shm, out: Path, step: int, specs: list[FileSpec], timeout_s: float = 30.0) -> str:
    comps = [ComponentSpec(s.component, "global", [0]) for s in specs]
    req = stage_req(shm, out, step, specs, timeout_s=timeout_s, commit=commit_info(*comps))
    t, _, body = peer.stage(req)
    assert t == MsgType.ACCEPTED, body
    return req.txn


def set_rhythm(harness: Harness, peer: Peer, out: Path, gap_s: float) -> None:
    """Commit a small save of ``out`` (step 0) and let ``gap_s`` pass: the first save of an output dir is never
    paced (no interval to plan with), and the next one is due ``gap_s`` after its hand-off."""
    shm = harness.shm(2 * MiB)
    specs, _ = files_of(shm, 1, 1, seed=7)
    committed(peer, stage(peer, shm, out, 0, specs))
    time.sleep(gap_s)


def committed(peer: Peer, txn: str, timeout_s: float = 30.0) -> Path:
    kind, body = outcome(peer, txn, timeout_s)
    assert kind == MsgType.COMMITTED, body
    return Path(body["path"])


# ------------------------------------------------------------------------------------------ option parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200MiB/s", 200 * MiB),
        ("1GB/s", 10**9),
        ("1.5 GiB/s", 1.5 * 2**30),
        ("500M", 500 * 10**6),
        ("64mib", 64 * MiB),
    ],
)
def test_rates_parse(text: str, expected: float) -> None:
    assert pacing.parse_write_rate(text).bytes_per_s == pytest.approx(expected)


def test_auto_and_off_parse() -> None:
    assert pacing.parse_write_rate("auto").auto_fraction == pacing.AUTO_FRACTION
    assert pacing.parse_write_rate("auto:0.3").auto_fraction == 0.3
    for off in ("off", "none", "0"):
        assert not pacing.parse_write_rate(off).enabled
    assert pacing.parse_ionice("idle") == pacing.IoPriority(pacing.IOPRIO_CLASS_IDLE, 0)
    assert pacing.parse_ionice("best-effort:7") == pacing.IoPriority(pacing.IOPRIO_CLASS_BE, 7)
    assert pacing.parse_ionice("be") == pacing.IoPriority(pacing.IOPRIO_CLASS_BE, 4)
    cpu = min(os.sched_getaffinity(0))
    assert pacing.parse_cpu_list(str(cpu)) == {cpu}
    assert pacing.parse_cpu_list(f"{cpu}-{cpu},{cpu}") == {cpu}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--max-write-rate", "fast"], ["'fast' is not a rate", "e.g. '200MiB/s'"]),
        (["--max-write-rate", "10KiB/s"], ["below 1 MiB/s", "pass at least '1MiB/s'"]),
        (["--max-write-rate", "auto:2"], ["from 0.05 to 0.9", "'auto:0.5'"]),
        (["--cpu-affinity", "4096"], ["CPU(s) [4096]", "may not run on", "pick CPUs from that list"]),
        (["--cpu-affinity", "1-0"], ["not a CPU number or range", "'0,2-3'"]),
        (["--ionice", "rt"], ["realtime", "'idle' or 'best-effort[:LEVEL]'"]),
        (["--ionice", "best-effort:9"], ["0 (highest) to 7 (lowest)"]),
        (["--ionice", "loud"], ["not an I/O class"]),
        (["--writer-threads", "0"], ["expected at least 1"]),
    ],
)
def test_bad_options_exit_2_saying_what_to_pass(endpoint: str, args: list[str], says: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **ENV},
    )
    assert r.returncode == 2, r
    assert r.stderr.startswith("ckptd serve: "), r.stderr
    assert "Traceback" not in r.stderr
    for s in says:
        assert s in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------ placement


def test_cpu_affinity_and_ionice_apply_to_every_daemon_thread(harness: Harness) -> None:
    cpu = min(os.sched_getaffinity(0))
    d = start(harness, "--cpu-affinity", str(cpu), "--ionice", "idle")
    tids = [int(t) for t in os.listdir(f"/proc/{d.proc.pid}/task")]
    assert len(tids) > 1  # the ZeroMQ I/O thread at least, started after the options took effect
    for tid in tids:
        assert os.sched_getaffinity(tid) == {cpu}, tid
        assert pacing.get_ionice(tid).io_class == pacing.IOPRIO_CLASS_IDLE, tid
    assert os.sched_getaffinity(0) != {cpu} or len(os.sched_getaffinity(0)) == 1  # this process is untouched


# ------------------------------------------------------------------------------------------ pacing


def test_fixed_rate_bounds_throughput_and_the_save_commits(harness: Harness, output_dir: Path) -> None:
    """(Not the first save of the dir: that one is never paced, see test_review_pacing.py.)"""
    start(harness, "--max-write-rate", "32MiB/s")
    peer = harness.peer()
    set_rhythm(harness, peer, output_dir, 3.0)
    shm = harness.shm(40 * MiB)
    specs, datas = files_of(shm, 4, 8)  # 32 MiB: at 32 MiB/s at least 1 s (less the bucket's 50 ms burst)
    total = sum(len(d) for d in datas) / MiB
    t0 = time.monotonic()
    txn = stage(peer, shm, output_dir, 1, specs)
    path = committed(peer, txn)
    elapsed = time.monotonic() - t0
    assert elapsed >= total / 32 - pacing.BURST_S - 0.05, elapsed
    assert elapsed < 10, elapsed
    for spec, data in zip(specs, datas, strict=True):
        assert (path / spec.path).read_bytes() == data
    assert fmt.verify_checkpoint(path)


def test_auto_paces_but_never_past_the_deadline(harness: Harness, output_dir: Path) -> None:
    """auto:0.9 with saves 1.5 s apart wants 1.35 s per save; a save with a 1.6 s timeout must still
    commit in time (its writes are due by half its budget less a margin), and it is paced (not instant)."""
    start(harness, "--max-write-rate", "auto:0.9")
    peer = harness.peer()
    shm = harness.shm(40 * MiB)
    specs, _ = files_of(shm, 4, 8)
    for step in (1, 2):  # the rhythm: hand-offs 1.5 s apart; the first save of a dir goes at full speed
        t0 = time.monotonic()
        committed(peer, stage(peer, shm, output_dir, step, specs))
        if step == 1:
            first = time.monotonic() - t0
        time.sleep(max(0.0, 1.5 - (time.monotonic() - t0)))
    t0 = time.monotonic()
    txn = stage(peer, shm, output_dir, 3, specs, timeout_s=1.6)
    path = committed(peer, txn, timeout_s=5)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.6, f"committed {elapsed:.2f} s after the hand-off, past its 1.6 s timeout"
    assert elapsed >= 0.35, f"not paced: {elapsed:.2f} s (the unpaced first save took {first:.2f} s)"
    assert fmt.verify_checkpoint(path)


def test_a_paced_save_aborts_within_a_second(harness: Harness, output_dir: Path) -> None:
    start(harness, "--max-write-rate", "8MiB/s")  # 32 MiB: 4 s if left alone
    peer = harness.peer()
    set_rhythm(harness, peer, output_dir, 6.0)
    shm = harness.shm(40 * MiB)
    specs, _ = files_of(shm, 4, 8)
    txn = stage(peer, shm, output_dir, 1, specs)
    time.sleep(0.6)  # well into the paced write
    t0 = time.monotonic()
    t, _, state = peer.request(MsgType.ABORT, txn=txn, reason="test says stop")
    assert t == MsgType.TXN_STATE, state
    kind, body = outcome(peer, txn, timeout_s=5)
    assert kind == MsgType.ABORTED, body
    assert time.monotonic() - t0 < 1.0, f"the abort took {time.monotonic() - t0:.2f} s"
    assert not any(p.name.startswith(".tmp-") for p in (output_dir / "checkpoints").iterdir())


def test_a_later_save_lifts_the_pacing_of_the_one_ahead(harness: Harness, output_dir: Path) -> None:
    """Back-pressure must not grow: once a second save (second slab) is handed over behind a paced one, the
    paced one goes at full speed, and both commit long before the rate alone would allow."""
    start(harness, "--max-write-rate", "8MiB/s")
    peer = harness.peer()
    set_rhythm(harness, peer, output_dir, 6.0)
    shm_a, shm_b = harness.shm(40 * MiB), harness.shm(40 * MiB)
    specs_a, _ = files_of(shm_a, 4, 8)
    specs_b, _ = files_of(shm_b, 4, 8, seed=1)
    t0 = time.monotonic()
    a = stage(peer, shm_a, output_dir, 1, specs_a)
    time.sleep(0.3)
    b = stage(peer, shm_b, output_dir, 2, specs_b)
    committed(peer, a)
    committed(peer, b)
    elapsed = time.monotonic() - t0
    # Unlifted, save 1 takes 4 s at 8 MiB/s. Lifted, it finishes at once; save 2 is due 0.3 s after save 1
    # by the rhythm that makes (the shortest recent interval), so it is not held back either.
    assert elapsed < 2.5, f"both saves took {elapsed:.2f} s: the paced save ahead was not lifted"


def test_stop_lifts_pacing_so_the_grace_suffices(harness: Harness, output_dir: Path) -> None:
    d = start(harness, "--max-write-rate", "4MiB/s", "--grace", "3")  # 32 MiB: 8 s paced
    peer = harness.peer()
    set_rhythm(harness, peer, output_dir, 9.0)
    shm = harness.shm(40 * MiB)
    specs, _ = files_of(shm, 4, 8)
    txn = stage(peer, shm, output_dir, 1, specs)
    time.sleep(0.3)
    d.proc.terminate()
    committed(peer, txn, timeout_s=5)
    d.proc.wait(10)


# ------------------------------------------------------------------------------------------ page cache


def resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (mincore over a private mapping of it, untouched)."""
    size = path.stat().st_size
    page = mmap.PAGESIZE
    n = (size + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        anchor = ctypes.c_char.from_buffer(mm)  # only for the address: no page is touched
        rc = libc.mincore(ctypes.addressof(anchor), size, vec)
        del anchor
        assert rc == 0, os.strerror(ctypes.get_errno())
    finally:
        mm.close()
    return sum(v & 1 for v in vec) / n


@pytest.mark.parametrize("keep", [False, True])
def test_buffered_writes_leave_no_pages_in_the_page_cache(harness: Harness, output_dir: Path, keep: bool) -> None:
    start(harness, "--no-direct-io", *(["--keep-page-cache"] if keep else []))
    peer = harness.peer()
    shm = harness.shm(20 * MiB)
    specs, _ = files_of(shm, 2, 8)
    path = committed(peer, stage(peer, shm, output_dir, 1, specs))
    fractions = [resident_fraction(path / s.path) for s in specs]
    if keep:
        assert min(fractions) > 0.5, fractions  # the control: without the advice the pages stay
    else:
        assert max(fractions) < 0.05, fractions
