#!/usr/bin/env python3
"""Side-by-side checkpoint stall benchmark: ckptd vs a memcpy floor, torch.save, DCP async_save and raw I/O.

Everything is measured in ONE run on ONE state, the measurements of each repeat interleaved (the order rotates
every repeat) so that machine noise hits every side, and medians are compared against the targets of
DESIGN.md §8. See benchmarks/README.md for what each row means and docs/benchmarks.md for the methodology.

    python benchmarks/stall.py                          # 1 GiB of fp32 in 64 tensors, CPU
    python benchmarks/stall.py --small-tensors 10000    # 64 MiB in 10,000 tensors vs in 1 tensor
    python benchmarks/stall.py --device cuda --dtype bfloat16 --size-mib 4096 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MiB = 1024**2
GiB = 1024**3
RAW_WRITE_CHUNK = 64 * MiB
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
# DESIGN.md §8
STALL_FLOOR_FACTOR = 1.25
STALL_FLOOR_SLACK_S = 0.020
DCP_FACTOR = {"cpu": 3.0, "cuda": 10.0}
COMMIT_FACTOR = 1.15
THROUGHPUT_FACTOR = 0.9
SMALL_TENSOR_FACTOR = 2.0


def fail(msg: str, code: int = 2) -> None:
    print(f"stall.py: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


# ------------------------------------------------------------------------------------------------- state


class DictState:
    """A Stateful over a flat {name: tensor} dict (what ckptd's StateComponent needs)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.tensors = dict(state_dict)


def make_state(total_bytes: int, count: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """``count`` tensors of ``dtype`` holding ``total_bytes`` together (sizes differ by at most one element)."""
    elem = torch.empty((), dtype=dtype).element_size()
    numel = total_bytes // elem
    if numel < count:
        fail(f"{total_bytes} bytes of {dtype} cannot fill {count} tensors; raise --size-mib or lower the count")
    base, extra = divmod(numel, count)
    out: dict[str, torch.Tensor] = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(count):
        n = base + (1 if i < extra else 0)
        if dtype.is_floating_point:
            t = torch.empty(n, dtype=dtype, device=device).uniform_(-1, 1, generator=gen)
        else:
            info = torch.iinfo(dtype)
            t = torch.randint(info.min, info.max, (n,), dtype=dtype, device=device, generator=gen)
        # 2-D where it divides evenly, like real weights; the shape does not change the byte count.
        out[f"layers.{i}.weight"] = t.view(-1, 256) if n % 256 == 0 and n >= 256 else t
    return out


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Floor:
    """Copy of the state into preallocated host memory: pinned + non-blocking D2H on CUDA, copy_ on CPU.

    The destination is one flat buffer (the shape of ckptd's slab) viewed as one tensor per source; the same
    buffer is the source of the raw write+fsync baseline.
    """

    def __init__(self, state: dict[str, torch.Tensor], device: str) -> None:
        self.device = device
        total = state_bytes(state)
        self.flat = torch.empty(total, dtype=torch.uint8, pin_memory=device == "cuda")
        self.flat.fill_(0)  # fault every page in now, never inside a timed copy
        self.pairs = []
        off = 0
        for t in state.values():
            n = t.numel() * t.element_size()
            self.pairs.append((self.flat[off : off + n].view(t.dtype).view(t.shape), t))
            off += n

    def run(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.device == "cuda":
                for dst, src in self.pairs:
                    dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize()
            else:
                for dst, src in self.pairs:
                    dst.copy_(src)
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- baselines


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_write(buf: torch.Tensor, path: Path) -> tuple[float, float]:
    """Sequential write of ``buf`` from memory into a new file, then fsync; the file is removed after.

    Returns (total, time spent in write() before the fsync)."""
    mv = memoryview(buf.numpy()).cast("B")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        pos = 0
        while pos < len(mv):
            pos += os.write(fd, mv[pos : pos + RAW_WRITE_CHUNK])
        t1 = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt, t1 - t0


def torch_save(state: dict[str, torch.Tensor], path: Path, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


class DCP:
    """torch.distributed.checkpoint.async_save in a single-process gloo group (its default stager)."""

    def __init__(self) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        self.dist, self.dcp = dist, dcp
        self.owned_group = False
        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            self.owned_group = True

    def run(self, state: dict[str, torch.Tensor], path: Path, device: str) -> tuple[float, float]:
        sync(device)
        t0 = time.perf_counter()
        fut = self.dcp.async_save(state, checkpoint_id=str(path))
        t1 = time.perf_counter()
        fut.result()
        t2 = time.perf_counter()
        shutil.rmtree(path)
        return t1 - t0, t2 - t0

    def close(self) -> None:
        if self.owned_group and self.dist.is_initialized():
            self.dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ ckptd


class Breakdown:
    """Optional (--breakdown): time the parts of save_async by wrapping the client's internals from outside.

    Read-only instrumentation; adds a few microseconds per save. Parts that cannot be found are skipped.
    """

    PARTS = [
        ("staging", "component_images", "state walk + safetensors headers"),
        ("staging", "layout", "slab layout"),
        ("client", "_acquire_slab", "acquire slab (back-pressure / allocation)"),
        ("staging", "copy_into", "copy into the slab"),
        ("client", "_all_gather", "snapshot collective"),
        ("client", "_stage_request", "build STAGE message"),
        ("link", "request", "STAGE round trip to the daemon"),
    ]

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.current: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []
        self.released_at: float | None = None  # when the client learnt that the daemon released the slab

    def install(self, client: Any) -> None:
        from client import staging

        for where, name, label in self.PARTS:
            if where == "staging":
                owner: Any = staging
            elif where == "client":
                owner = client
            else:
                owner = getattr(client, "_link", None)
            orig = getattr(owner, name, None) if owner is not None else None
            if orig is None:
                continue
            setattr(owner, name, self._wrap(orig, label))
            if where == "staging":
                self._undo.append(lambda o=owner, n=name, f=orig: setattr(o, n, f))
            else:
                self._undo.append(lambda o=owner, n=name: o.__dict__.pop(n, None))
        release = getattr(client, "_release_slab", None)
        if release is not None:

            def released(*args: Any, **kwargs: Any) -> Any:
                if self.released_at is None:
                    self.released_at = time.perf_counter()
                return release(*args, **kwargs)

            client._release_slab = released
            self._undo.append(lambda o=client: o.__dict__.pop("_release_slab", None))

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[label] = self.current.get(label, 0.0) + time.perf_counter() - t0

        return timed

    def start(self) -> None:
        self.current = {}
        self.released_at = None

    def finish(self, total: float) -> None:
        accounted = sum(self.current.values())
        self.current["other (checks, handle, Python glue)"] = total - accounted
        for k, v in self.current.items():
            self.samples.setdefault(k, []).append(v)

    def uninstall(self) -> None:
        for undo in self._undo:
            undo()
        self._undo.clear()


class Ckptd:
    """One CheckpointClient on a private endpoint (the embedded daemon), over one flat state."""

    def __init__(self, out: Path, state: dict[str, torch.Tensor], endpoint: str, device: str) -> None:
        from client import CheckpointClient, SharingPattern, StateComponent

        self.out, self.device, self.step = out, device, 0
        comps = [StateComponent("model", DictState(state), SharingPattern.GLOBAL)]
        self.client = CheckpointClient(out, comps, endpoint=endpoint)
        self.breakdown: Breakdown | None = None

    def run(self) -> tuple[float, float, float, float | None]:
        """(stall, time to committed, staged_s, slab released) of one save, in seconds from the call; the
        checkpoint is removed after (untimed). The release time is known only with --breakdown."""
        self.step += 1
        sync(self.device)
        if self.breakdown is not None:
            self.breakdown.start()
        t0 = time.perf_counter()
        handle = self.client.save_async(self.step)
        t1 = time.perf_counter()
        if self.breakdown is not None:
            self.breakdown.finish(t1 - t0)
        path = handle.wait()
        t2 = time.perf_counter()
        released = None
        if self.breakdown is not None and self.breakdown.released_at is not None:
            released = self.breakdown.released_at - t0
        shutil.rmtree(path)
        return t1 - t0, t2 - t0, handle.staged_s, released

    def close(self) -> None:
        if self.breakdown is not None:
            self.breakdown.uninstall()
        self.client.close()


def stop_embedded_daemon(clients: list[Ckptd], endpoint: str, owned_endpoint: bool) -> None:
    """The embedded daemon idles out by itself; we started it, so stop it now and remove its files."""
    for c in clients:
        proc = getattr(getattr(c.client, "_link", None), "process", None)
        if isinstance(proc, subprocess.Popen) and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    if owned_endpoint and endpoint.startswith("ipc://"):
        sock = endpoint[len("ipc://") :]
        for suffix in ("", ".lock", ".log"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock + suffix)


def default_endpoint() -> str:
    d = f"/tmp/ckptd-{os.getuid()}"
    return f"ipc://{d}/bench-{os.getpid()}.sock"


# ------------------------------------------------------------------------------------------ resources


def meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fit_size(args: argparse.Namespace, base: Path, elem: int) -> int:
    """The state size in bytes: --size-mib, shrunk (with a message) to what disk and RAM can hold."""
    want = args.size_mib * MiB
    small = args.small_tensors is not None
    # disk: a ckptd checkpoint (two in small mode) + torch.save file + DCP directory + raw file, ~4x
    disk_factor = 4.0
    # RAM: state + floor buffer + slab(s) (memfds: RAM, not /dev/shm) + DCP's staged copy (+ slack)
    # (small mode holds two states, two floor buffers and two slabs)
    ram_factor = (6.5 if small else 4.5) if args.device == "cpu" else (4.5 if small else 3.5)
    limits = []
    free_disk = shutil.disk_usage(base).free
    limits.append(("disk", base, free_disk, disk_factor))
    ram = meminfo_available()
    if ram is not None:
        limits.append(("memory (MemAvailable)", None, ram, ram_factor))
    size = want
    for what, where, free, factor in limits:
        cap = int(free / factor)
        if cap < size:
            size = cap
            at = f" on {where}" if where else ""
            print(
                f"stall.py: only {free / GiB:.2f} GiB of {what} free{at}; the benchmark needs about "
                f"{factor:g}x the state ({want * factor / GiB:.2f} GiB for {args.size_mib} MiB); "
                f"shrinking the state to {cap // MiB} MiB",
                file=sys.stderr,
            )
    if args.device == "cuda":
        free_gpu, _ = torch.cuda.mem_get_info()
        cap = int(free_gpu / (2.4 if small else 1.2))
        if cap < size:
            print(
                f"stall.py: only {free_gpu / GiB:.2f} GiB free on the GPU; shrinking the state to {cap // MiB} MiB",
                file=sys.stderr,
            )
            size = cap
    size = size // MiB * MiB
    if size < MiB:
        fail("not enough disk, shared memory or RAM for even a 1 MiB state; free some space or pass --dir elsewhere")
    return size // elem * elem


# ------------------------------------------------------------------------------------------- reporting


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_s(s: float) -> str:
    if s != s:  # nan
        return "n/a"
    return f"{s * 1000:.1f} ms" if s < 1.0 else f"{s:.3f} s"


def fmt_bw(nbytes: int, s: float) -> str:
    return f"{nbytes / s / GiB:.2f} GiB/s" if s > 0 else "n/a"


@dataclass
class Target:
    name: str
    measured: str
    limit: str
    ok: bool
    value: float
    bound: float

    def row(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "measured": self.measured,
            "limit": self.limit,
            "value": self.value,
            "bound": self.bound,
            "pass": self.ok,
        }


@dataclass
class Results:
    samples: dict[str, list[float]] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float, warmup: bool) -> None:
        if warmup:
            self.first[key] = value
        else:
            self.samples.setdefault(key, []).append(value)

    def m(self, key: str) -> float:
        return med(self.samples.get(key, []))


def print_times(rows: list[tuple[str, str, int | None]], res: Results) -> None:
    w = max(len(r[0]) for r in rows) + 2
    print(f"{'measurement':<{w}}{'median':>10}{'min':>10}{'max':>10}{'warm-up':>10}   bandwidth")
    for label, key, nbytes in rows:
        xs = res.samples.get(key, [])
        if not xs:
            continue
        bw = fmt_bw(nbytes, med(xs)) if nbytes else ""
        first = fmt_s(res.first[key]) if key in res.first else ""
        print(f"{label:<{w}}{fmt_s(med(xs)):>10}{fmt_s(min(xs)):>10}{fmt_s(max(xs)):>10}{first:>10}   {bw}")


def print_noise(rows: list[tuple[str, str, int | None]], res: Results) -> None:
    """Say which rows varied a lot between repeats: their medians, and the ratios built on them, are fragile."""
    noisy = []
    for label, key, _ in rows:
        xs = res.samples.get(key, [])
        if len(xs) >= 2 and min(xs) > 0 and max(xs) / min(xs) > 2.0:
            noisy.append(f"{label.strip()} ({max(xs) / min(xs):.1f}x)")
    if noisy:
        print(
            "\nnoisy (max/min over repeats > 2): "
            + "; ".join(noisy)
            + ". Medians of few repeats may flip a verdict; rerun with more --repeats (see docs/benchmarks.md)."
        )


def print_targets(targets: list[Target], info: list[tuple[str, str]]) -> None:
    print()
    w = max([len(t.name) for t in targets] + [len(i[0]) for i in info]) + 2
    wm = max([len(t.measured) for t in targets] + [len(i[1]) for i in info]) + 2
    print(f"{'ratio (DESIGN.md §8)':<{w}}{'measured':<{wm}}{'target':<28}verdict")
    for t in targets:
        print(f"{t.name:<{w}}{t.measured:<{wm}}{t.limit:<28}{'PASS' if t.ok else 'MISS'}")
    for name, value in info:
        print(f"{name:<{w}}{value:<{wm}}{'(no target)':<28}")


def print_breakdown(bd: Breakdown | None, title: str) -> dict[str, float]:
    if bd is None or not bd.samples:
        return {}
    out = {k: med(v) for k, v in bd.samples.items()}
    print(f"\nsave_async breakdown{title} (median of repeats, --breakdown):")
    for k, v in sorted(out.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<44}{fmt_s(v):>10}")
    return out


# ------------------------------------------------------------------------------------------------ modes


def rotate(items: list[Any], r: int) -> list[Any]:
    k = r % len(items)
    return items[k:] + items[:k]


def run_main(args: argparse.Namespace, work: Path, endpoint: str, size: int, dtype: torch.dtype) -> dict[str, Any]:
    dev = args.device
    print(f"generating {size / MiB:.0f} MiB of {args.dtype} in {args.tensors} tensors on {dev} ...", flush=True)
    state = make_state(size, args.tensors, dtype, dev)
    nbytes = state_bytes(state)
    floor = Floor(state, dev)
    res = Results()
    ck = Ckptd(work / "ckptd", state, endpoint, dev)
    clients = [ck]
    dcp = None if args.no_dcp else DCP()
    try:
        if args.breakdown:
            ck.breakdown = Breakdown()
            ck.breakdown.install(ck.client)

        def m_ckptd(w: bool, r: int) -> None:
            # The floor is measured right before and right after each save, so that both halves of the
            # headline ratio see the same machine state (two floor samples per repeat).
            before = floor.run()
            stall, committed, staged, released = ck.run()
            after = floor.run()
            res.add("floor", before, w)
            res.add("floor", after, w)
            res.add("floor_pair", (before + after) / 2, w)
            res.add("ckptd_stall", stall, w)
            res.add("ckptd_committed", committed, w)
            res.add("ckptd_staged", staged, w)
            if released is not None:
                res.add("ckptd_released", released, w)
                res.add("ckptd_after_release", committed - released, w)

        def m_torch_save(w: bool, r: int) -> None:
            res.add("torch_save", torch_save(state, work / "torch_save.pt", dev), w)

        def m_dcp(w: bool, r: int) -> None:
            assert dcp is not None
            blocking, durable = dcp.run(state, work / "dcp", dev)
            res.add("dcp_blocking", blocking, w)
            res.add("dcp_durable", durable, w)

        def m_raw(w: bool, r: int) -> None:
            total, written = raw_write(floor.flat, work / "raw.bin")
            res.add("raw_write", total, w)
            res.add("raw_write_part", written, w)
            res.add("raw_fsync_part", total - written, w)

        methods = [m_ckptd, m_raw]
        if not args.no_torch_save:
            methods.append(m_torch_save)
        if dcp is not None:
            methods.append(m_dcp)
        for r in range(args.repeats + 1):
            warm = r == 0
            tag = "warm-up" if warm else f"repeat {r}/{args.repeats}"
            print(f"  {tag} ...", flush=True)
            order = methods if warm else rotate(methods, r - 1)
            for fn in order:
                gc.collect()
                fn(warm, r)
            if warm and ck.breakdown is not None:
                ck.breakdown.samples.clear()
    finally:
        with contextlib.suppress(Exception):
            ck.close()
        stop_embedded_daemon(clients, endpoint, args.endpoint is None)
        if dcp is not None:
            dcp.close()

    floor_s = res.m("floor")
    stall = res.m("ckptd_stall")
    committed = res.m("ckptd_committed")
    raw = res.m("raw_write")
    print()
    rows = [
        ("memcpy floor (preallocated" + (", pinned D2H)" if dev == "cuda" else ")"), "floor", nbytes),
        ("ckptd save_async stall", "ckptd_stall", nbytes),
        ("  of which staged (handle.staged_s)", "ckptd_staged", None),
        ("ckptd time to committed", "ckptd_committed", nbytes),
        ("  slab released (files written)", "ckptd_released", None),
        ("  then fsync + commit", "ckptd_after_release", None),
        ("raw write + fsync", "raw_write", nbytes),
        ("  write() part", "raw_write_part", None),
        ("  fsync part", "raw_fsync_part", None),
        ("torch.save + fsync (blocking)", "torch_save", nbytes),
        ("DCP async_save blocking", "dcp_blocking", None),
        ("DCP async_save until durable", "dcp_durable", nbytes),
    ]
    print_times(rows, res)
    print_noise(rows, res)
    targets: list[Target] = []
    info: list[tuple[str, str]] = []
    bound = STALL_FLOOR_FACTOR * floor_s + STALL_FLOOR_SLACK_S
    targets.append(
        Target(
            "ckptd stall vs memcpy floor",
            f"{stall / floor_s:.2f}x floor ({fmt_s(stall)} vs {fmt_s(floor_s)})",
            f"<= 1.25x + 20 ms = {fmt_s(bound)}",
            stall <= bound,
            stall,
            bound,
        )
    )
    if dcp is not None:
        f = DCP_FACTOR[dev]
        x = res.m("dcp_blocking") / stall
        targets.append(
            Target(
                "DCP async_save blocking / ckptd stall",
                f"{x:.2f}x lower ({fmt_s(res.m('dcp_blocking'))})",
                f">= {f:g}x lower ({dev})",
                x >= f,
                x,
                f,
            )
        )
    x = committed / (stall + raw)
    targets.append(
        Target(
            "ckptd committed / (stall + raw write)",
            f"{x:.2f}x ({fmt_s(committed)} vs {fmt_s(stall + raw)})",
            "<= 1.15x",
            x <= COMMIT_FACTOR,
            x,
            COMMIT_FACTOR,
        )
    )
    bg = committed - stall
    x = raw / bg if bg > 0 else float("nan")
    targets.append(
        Target(
            "background write bw / raw write bw",
            f"{x:.2f}x ({fmt_bw(nbytes, bg)} vs {fmt_bw(nbytes, raw)})",
            ">= 0.9x",
            x >= THROUGHPUT_FACTOR,
            x,
            THROUGHPUT_FACTOR,
        )
    )
    if "torch_save" in res.samples:
        info.append(("torch.save blocking / ckptd stall", f"{res.m('torch_save') / stall:.1f}x lower"))
    if dcp is not None:
        info.append(("DCP until durable / ckptd committed", f"{res.m('dcp_durable') / committed:.2f}x"))
    pairs = [s / f for s, f in zip(res.samples["ckptd_stall"], res.samples["floor_pair"], strict=True)]
    info.append(("ckptd stall / adjacent floor, per save", " ".join(f"{x:.2f}x" for x in pairs)))
    if "ckptd_stall" in res.first:
        info.append(("ckptd first save (slab allocation)", fmt_s(res.first["ckptd_stall"])))
    print_targets(targets, info)
    bd = print_breakdown(ck.breakdown, "")
    return result_record("main", nbytes, args.tensors, res, targets, info, bd)


def run_small(args: argparse.Namespace, work: Path, endpoint: str, size: int, dtype: torch.dtype) -> dict[str, Any]:
    dev = args.device
    n = args.small_tensors
    print(f"generating {size / MiB:.0f} MiB of {args.dtype} as {n} tensors and as 1 tensor on {dev} ...", flush=True)
    many = make_state(size, n, dtype, dev)
    one = make_state(size, 1, dtype, dev)
    nbytes = state_bytes(many)
    floor_many, floor_one = Floor(many, dev), Floor(one, dev)
    res = Results()
    clients: list[Ckptd] = []
    try:
        ck_many = Ckptd(work / "many", many, endpoint, dev)
        clients.append(ck_many)
        ck_one = Ckptd(work / "one", one, endpoint, dev)
        clients.append(ck_one)
        if args.breakdown:
            ck_many.breakdown = Breakdown()
            ck_many.breakdown.install(ck_many.client)

        def m_ck(c: Ckptd, key: str) -> Callable[[bool], None]:
            def go(w: bool) -> None:
                stall, committed, staged, _ = c.run()
                res.add(f"{key}_stall", stall, w)
                res.add(f"{key}_committed", committed, w)
                res.add(f"{key}_staged", staged, w)

            return go

        def m_floor(f: Floor, key: str) -> Callable[[bool], None]:
            return lambda w: res.add(f"{key}_floor", f.run(), w)

        methods = [m_ck(ck_many, "many"), m_ck(ck_one, "one"), m_floor(floor_many, "many"), m_floor(floor_one, "one")]
        for r in range(args.repeats + 1):
            warm = r == 0
            print(f"  {'warm-up' if warm else f'repeat {r}/{args.repeats}'} ...", flush=True)
            for fn in methods if warm else rotate(methods, r - 1):
                gc.collect()
                fn(warm)
            if warm and ck_many.breakdown is not None:
                ck_many.breakdown.samples.clear()
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()
        stop_embedded_daemon(clients, endpoint, args.endpoint is None)

    print()
    rows = [
        (f"ckptd save_async stall, {n} tensors", "many_stall", nbytes),
        ("ckptd save_async stall, 1 tensor", "one_stall", nbytes),
        (f"  staged (handle.staged_s), {n} tensors", "many_staged", None),
        ("  staged (handle.staged_s), 1 tensor", "one_staged", None),
        (f"memcpy floor, {n} tensors", "many_floor", nbytes),
        ("memcpy floor, 1 tensor", "one_floor", nbytes),
        (f"ckptd time to committed, {n} tensors", "many_committed", nbytes),
        ("ckptd time to committed, 1 tensor", "one_committed", nbytes),
    ]
    print_times(rows, res)
    print_noise(rows, res)
    x = res.m("many_stall") / res.m("one_stall")
    targets = [
        Target(
            f"stall {n} tensors / stall 1 tensor",
            f"{x:.2f}x ({fmt_s(res.m('many_stall'))} vs {fmt_s(res.m('one_stall'))})",
            "<= 2x",
            x <= SMALL_TENSOR_FACTOR,
            x,
            SMALL_TENSOR_FACTOR,
        )
    ]
    info = [
        (f"memcpy floor {n} / 1 tensor", f"{res.m('many_floor') / res.m('one_floor'):.2f}x"),
        (f"stall {n} tensors / its memcpy floor", f"{res.m('many_stall') / res.m('many_floor'):.2f}x"),
        (f"per-tensor stall overhead ({n} tensors)", f"{(res.m('many_stall') - res.m('one_stall')) / n * 1e6:.1f} us"),
    ]
    print_targets(targets, info)
    bd = print_breakdown(clients[0].breakdown if clients else None, f", {n} tensors")
    return result_record("small_tensors", nbytes, n, res, targets, info, bd)


def result_record(
    mode: str, nbytes: int, tensors: int, res: Any, targets: list[Any], info: list[Any], bd: Any
) -> dict[str, Any]:
    """What --json writes for one mode."""
    return {
        "mode": mode,
        "bytes": nbytes,
        "tensors": tensors,
        "samples_s": res.samples,
        "warmup_s": res.first,
        "median_s": {k: med(v) for k, v in res.samples.items()},
        "targets": [t.row() for t in targets],
        "info": dict(info),
        "breakdown_median_s": bd,
    }


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Checkpoint stall benchmark: ckptd vs memcpy, torch.save, DCP async_save and raw I/O "
        "(one state, interleaved repeats, medians; targets from DESIGN.md §8).",
    )
    p.add_argument(
        "--size-mib", type=int, default=None, help="total state size (default 1024; 64 with --small-tensors)"
    )
    p.add_argument("--tensors", type=int, default=64, help="number of tensors in the state (default 64)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=3, help="measured repeats after one warm-up (default 3)")
    p.add_argument("--dir", type=Path, default=None, help="where files are written (a fresh temp dir inside it)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the numbers to OUT")
    p.add_argument(
        "--small-tensors",
        type=int,
        default=None,
        metavar="N",
        help="instead: compare the stall of N tensors with 1 tensor of the same total size (default 64 MiB)",
    )
    p.add_argument("--endpoint", default=None, help="daemon endpoint (default: a private embedded daemon)")
    p.add_argument("--no-dcp", action="store_true", help="skip torch.distributed.checkpoint.async_save")
    p.add_argument("--no-torch-save", action="store_true", help="skip torch.save")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of save_async")
    p.add_argument("-v", "--verbose", action="store_true", help="log ckptd client messages (INFO)")
    args = p.parse_args(argv)
    if args.size_mib is None:
        args.size_mib = 64 if args.small_tensors is not None else 1024
    if args.size_mib < 1 or args.tensors < 1 or args.repeats < 1:
        p.error("--size-mib, --tensors and --repeats must be positive")
    if args.small_tensors is not None and args.small_tensors < 2:
        p.error("--small-tensors needs N >= 2")
    return args


def environment(args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    env["ckptd_commit"] = code_version()
    return env


def code_version() -> str:
    """The commit of the ckptd/client code measured (``+dirty`` when its files differ from it)."""
    try:
        import client

        root = Path(client.__file__).resolve().parent.parent
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "client", "ckptd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _terminate(signum: int, frame: Any) -> None:
    # Unwind through the finally blocks (files, daemon, slab, process group); a second signal must not cut
    # that cleanup short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail(
            "--device cuda was requested but CUDA is not available "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); run on a GPU machine or use "
            "--device cpu"
        )
    dtype = DTYPES[args.dtype]
    base = args.dir if args.dir is not None else Path(tempfile.gettempdir())
    if not base.is_dir():
        fail(f"--dir {base} is not a directory")
    endpoint = args.endpoint or default_endpoint()
    elem = torch.empty((), dtype=dtype).element_size()
    size = fit_size(args, base, elem)
    work = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=base))
    env = environment(args)
    count = args.small_tensors if args.small_tensors is not None else args.tensors
    gpu = f" ({env['gpu']})" if "gpu" in env else ""
    print(
        f"ckptd stall benchmark, {env['date']}: {size / MiB:.0f} MiB {args.dtype} in {count} tensors on "
        f"{args.device}{gpu}, {env['cpus']} CPUs, torch {torch.__version__}; "
        f"{args.repeats} interleaved repeats after a warm-up, medians; ckptd {env['ckptd_commit']}; files in {work}"
    )
    try:
        if args.small_tensors is not None:
            out = run_small(args, work, endpoint, size, dtype)
        else:
            out = run_main(args, work, endpoint, size, dtype)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["environment"] = env
    out["config"] = {
        "size_mib": size / MiB,
        "requested_size_mib": args.size_mib,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "dir": str(base),
    }
    ok = all(t["pass"] for t in out["targets"])
    print(
        f"\n{'all targets met' if ok else 'some targets missed'} ({sum(t['pass'] for t in out['targets'])}"
        f"/{len(out['targets'])} PASS)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
