#!/usr/bin/env python3
"""Training-loop overhead of checkpointing: a real loop (model, AdamW, a save every N steps) with ckptd, with
torch.distributed.checkpoint.async_save and with no checkpoint at all, measured side by side in ONE run
(DESIGN.md §8, "training-loop overhead" row).

    python benchmarks/train_overhead.py                       # MLP 6 x Linear(2048, 2048), ~300 MB of state, CPU
    python benchmarks/train_overhead.py --repeats 9 --json out.json
    python benchmarks/train_overhead.py --model transformer --steps 20
    python benchmarks/train_overhead.py --device cuda         # adds the dcp-stager mode
    python benchmarks/train_overhead.py --config nice10="--nice 10" --config nice19="--nice 19"

Every repeat runs the whole loop once per mode, the order of the modes rotating from repeat to repeat; one
shorter warm-up loop per mode comes first and is not counted. Modes:

* ``none``: the loop, no checkpoint.
* ``ckptd``: a CheckpointClient (model and optimizer REPLICATED, RNGState PER_RANK) on a private embedded
  daemon, ``save_async`` every ``--save-every`` steps, ``client.wait()`` at the end counted in the loop time.
* ``ckptd:NAME`` (one per ``--config NAME=ARGS``): the same loop, its own client and output dir, against a
  daemon this script starts with ``python -m ckptd serve --endpoint <a private one> ARGS`` (daemon settings
  side by side; each gets its own overhead, breakdown, DCP ratio and verdicts).
* ``dcp``: ``dcp.async_save({"model": ..., "optim": ...})`` in a single-process gloo group (default stager,
  thread executor); each save first waits for the previous one's future, and the loop ends with the last one.
* ``dcp-stager``: the same with ``async_stager=DefaultStager(StagingOptions(use_async_staging=True, ...))``,
  the staging future awaited before the next ``optimizer.step()``. CUDA only (the stager's non-blocking copy
  needs an accelerator); skipped with a message otherwise.

The overhead of a mode is its median loop time minus that of ``none``. ``--breakdown`` (on by default) splits
each ckptd-like mode's overhead into the visible stall, the wait at the end, the step-time inflation of the
steps that ran while a save was in flight, and the rest; it also reports the daemon's CPU time and the page
cache growth.
See benchmarks/README.md for every row and docs/benchmarks.md for figures.
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
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptd import protocol as proto

MiB = 1024**2
GiB = 1024**3
ALL_MODES = ("none", "ckptd", "dcp", "dcp-stager")
CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a --config NAME: mode ckptd:NAME, dir ckptd-NAME
# DESIGN.md §8, training-loop overhead row
OVERHEAD_MAX = 0.05
OVERHEAD_GOAL = 0.02
DCP_RATIO_MIN = 10.0
DAEMON_STOP_S = 15.0
DAEMON_START_S = 30.0  # a --config daemon must answer within this
CLK_TCK = os.sysconf("SC_CLK_TCK")


def fail(msg: str, code: int = 2) -> None:
    print(f"train_overhead.py: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def fmt_s(s: float, signed: bool = False) -> str:
    if s != s:  # nan
        return "n/a"
    sign = "+" if signed and s >= 0 else ("-" if s < 0 else "")
    a = abs(s)
    if a < 1.0:
        return f"{sign}{a * 1e3:.0f} ms" if a >= 0.1 else f"{sign}{a * 1e3:.1f} ms"
    return f"{sign}{a:.2f} s"


def fmt_pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:+.1f} %"


def is_ckptd_mode(mode: str) -> bool:
    """``ckptd`` (the embedded daemon) or ``ckptd:NAME`` (a daemon started with a --config's arguments)."""
    return mode == "ckptd" or mode.startswith("ckptd:")


def rotate(items: list[Any], r: int) -> list[Any]:
    k = r % len(items)
    return items[k:] + items[:k]


# ------------------------------------------------------------------------------------------ the training loop


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model == "mlp":
        layers: list[torch.nn.Module] = []
        for i in range(args.layers):
            layers.append(torch.nn.Linear(args.width, args.width))
            if i < args.layers - 1:
                layers.append(torch.nn.GELU())
        return torch.nn.Sequential(*layers)
    layer = torch.nn.TransformerEncoderLayer(
        d_model=args.width,
        nhead=args.heads,
        dim_feedforward=4 * args.width,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return torch.nn.TransformerEncoder(layer, num_layers=args.layers, enable_nested_tensor=False)


class Trainer:
    """The model, AdamW and a few fixed batches (cycled), the same for every mode."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.device = args.device
        self.model = build_model(args).to(args.device)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        shape = (args.batch, args.width) if args.model == "mlp" else (args.batch, args.seq, args.width)
        self.batches = [
            (torch.randn(shape, device=args.device), torch.randn(shape, device=args.device)) for _ in range(4)
        ]
        self.i = 0

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step(self, before_optimizer_step: Callable[[], None] | None = None) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        if before_optimizer_step is not None:
            before_optimizer_step()
        self.optim.step()
        self.sync()

    def state_bytes(self) -> int:
        n = 0
        for t in list(self.model.state_dict().values()) + [
            v for s in self.optim.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        ]:
            n += t.numel() * t.element_size()
        return n


# --------------------------------------------------------------------------------------------- measurements


def daemon_pid(endpoint: str) -> int | None:
    path = proto.ipc_path(endpoint)
    try:
        text = Path(path + ".lock").read_text().strip()
        return int(text) if text else None
    except (OSError, TypeError, ValueError):
        return None


def is_our_daemon(pid: int, endpoint: str) -> bool:
    """The pid is still a ckptd daemon serving this endpoint (not a recycled pid, not a zombie)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"ckptd" in cmd and endpoint.encode() in cmd


def proc_cpu_s(pid: int | None) -> float:
    """utime + stime of a process (all its threads), in seconds; nan if unreadable."""
    if pid is None:
        return float("nan")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)
    except (OSError, ValueError, IndexError):
        return float("nan")


def meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cached_bytes() -> float:
    v = meminfo("Cached")
    return float("nan") if v is None else float(v)


@dataclass
class Loop:
    """One timed (or warm-up) run of the loop in one mode; all times in seconds."""

    mode: str
    repeat: int
    total_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    inflight: list[bool] = field(default_factory=list)  # a save of this mode was in flight during the step
    save_call_s: list[float] = field(default_factory=list)  # save_async / async_save call (visible stall)
    staged_s: list[float] = field(default_factory=list)  # ckptd handle.staged_s
    collective_s: list[float] = field(default_factory=list)  # ckptd handle.collective_s
    hook_wait_s: list[float] = field(default_factory=list)  # ckptd handle.hook_wait_s (overlapped staging), if any
    overlapped_bytes: list[int] = field(default_factory=list)  # ckptd handle.overlapped_bytes, if any
    wait_prev_s: list[float] = field(default_factory=list)  # dcp: blocked on the previous save before a new one
    staging_wait_s: list[float] = field(default_factory=list)  # dcp-stager: staging future before optim.step
    poll_s: float = 0.0  # ckptd: handle.done() calls after each step (the benchmark's in-flight probe)
    end_wait_s: float = 0.0  # client.wait() / the last future, at the end of the loop
    daemon_cpu_s: float = float("nan")  # the mode's own daemon; for none/dcp modes the `ckptd` mode's (idle) one
    cached_delta: float = float("nan")  # Cached (page cache) after minus before, bytes
    loadavg: float = float("nan")  # 1-minute load average when the loop ended (other processes' load)


class Ckptd:
    def __init__(self, out: Path, trainer: Trainer, endpoint: str, save_total_limit: int | None) -> None:
        from client import CheckpointClient, RNGState, SharingPattern, StateComponent

        self.out = out
        comps = [
            StateComponent("model", trainer.model, SharingPattern.REPLICATED),
            StateComponent("optimizer", trainer.optim, SharingPattern.REPLICATED),
            StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        ]
        self.client = CheckpointClient(out, comps, endpoint=endpoint, save_total_limit=save_total_limit)
        link = getattr(self.client, "_link", None)
        self.process = getattr(link, "process", None)  # the embedded daemon, if this client started it

    def clear(self) -> None:
        from client import list_checkpoints

        for p in list_checkpoints(self.out):
            shutil.rmtree(p, ignore_errors=True)


def spawn_daemon(endpoint: str, daemon_args: list[str]) -> subprocess.Popen:
    """``python -m ckptd serve --endpoint ENDPOINT ARGS`` (a --config daemon), its output in ``<socket>.log``.
    Same process group as this script: a Ctrl-C reaches it too (stop_daemon reaps it either way)."""
    cmd = [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, *daemon_args]
    path = proto.ipc_path(endpoint)
    assert path is not None
    with open(path + ".log", "wb") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_for_daemon(mode: str, endpoint: str, process: subprocess.Popen) -> None:
    """Until the daemon just spawned answers a status request; fail (exit status 2) if it exits or is mute."""
    from ckptd.cli import request_status

    deadline = time.monotonic() + DAEMON_START_S
    while request_status(endpoint, 0.5) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            path = proto.ipc_path(endpoint)
            try:
                tail = Path(f"{path}.log").read_text(errors="replace").strip().splitlines()[-10:]
            except OSError:
                tail = []
            why = (
                f"exited with {process.returncode}"
                if process.poll() is not None
                else f"did not answer within {DAEMON_START_S:g} s"
            )
            fail(f"{mode}: '{shlex.join(process.args)}' {why}" + "".join(f"\n  | {line}" for line in tail))


class Runner:
    def __init__(
        self,
        args: argparse.Namespace,
        trainer: Trainer,
        work: Path,
        endpoints: dict[str, str],
        configs: dict[str, list[str]],
    ) -> None:
        self.args = args
        self.t = trainer
        self.work = work
        self.endpoints = endpoints  # ckptd-like mode -> its endpoint
        self.configs = configs  # --config NAME -> the `ckptd serve` arguments
        self.global_step = 0  # increases across every loop, so ckptd's step numbers never repeat
        self.cks: dict[str, Ckptd] = {}  # ckptd-like mode -> its client
        self.procs: dict[str, subprocess.Popen] = {}  # ckptd:NAME -> the daemon this script started
        self.dcp: Any = None
        self.stager: Any = None
        self.owned_group = False

    # -- setup / teardown

    def open(self, modes: list[str]) -> None:
        for m in modes:
            if m == "ckptd":  # the client starts its own (embedded) daemon at the endpoint
                self.cks[m] = Ckptd(self.work / "ckptd", self.t, self.endpoints[m], self.args.save_total_limit)
            elif is_ckptd_mode(m):
                name = m.split(":", 1)[1]
                self.procs[m] = spawn_daemon(self.endpoints[m], self.configs[name])
                wait_for_daemon(m, self.endpoints[m], self.procs[m])
                ck = Ckptd(self.work / f"ckptd-{name}", self.t, self.endpoints[m], self.args.save_total_limit)
                self.cks[m] = ck
                if ck.process is not None:  # cannot happen: ours answered first
                    fail(f"{m}: the client started a daemon of its own instead of using ours at {ck.client.endpoint}")
        if "dcp" in modes or "dcp-stager" in modes:
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp

            self.dcp = dcp
            if not dist.is_initialized():
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
                self.owned_group = True
        if "dcp-stager" in modes:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self.stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=True,
                    use_shared_memory=False,
                    use_async_staging=True,
                    use_non_blocking_copy=True,
                )
            )

    def close(self) -> dict[str, str]:
        """Close every client, then stop every daemon (each endpoint's, found by its lock file even where
        setup failed half-way), at most DAEMON_STOP_S each, all at once. Returns what happened, per mode."""
        for ck in self.cks.values():
            with contextlib.suppress(Exception):
                ck.client.close(wait=False)
        what: dict[str, str] = {}
        if self.endpoints:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(self.endpoints)) as ex:
                futs = {
                    # ckptd:NAME: the daemon this script started; ckptd: the one its client started, if it did
                    m: ex.submit(stop_daemon, ep, self.procs.get(m) or getattr(self.cks.get(m), "process", None))
                    for m, ep in self.endpoints.items()
                }
            what = {m: f.result() for m, f in futs.items()}
        if self.stager is not None:
            with contextlib.suppress(Exception):
                self.stager.close()
        if self.owned_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        return what

    def clear(self) -> None:
        """Remove every checkpoint written so far (untimed, between loops)."""
        for ck in self.cks.values():
            ck.clear()
        shutil.rmtree(self.work / "dcp", ignore_errors=True)

    # -- loops

    def run(self, mode: str, repeat: int, steps: int) -> Loop:
        gc.collect()
        self.t.sync()
        loop = Loop(mode, repeat)
        proc = self.procs.get(mode)
        if proc is not None and proc.poll() is not None:
            fail(f"{mode}: its daemon exited with {proc.returncode} (log {proto.ipc_path(self.endpoints[mode])}.log)")
        # The daemon whose CPU time counts: the mode's own; for the other modes the `ckptd` mode's (idle) one.
        ep = self.endpoints.get(mode if is_ckptd_mode(mode) else "ckptd")
        pid = daemon_pid(ep) if ep is not None else None
        cpu0, cache0 = proc_cpu_s(pid), cached_bytes()
        if mode == "none":
            self._none(loop, steps)
        elif is_ckptd_mode(mode):
            self._ckptd(loop, steps, self.cks[mode])
        else:
            self._dcp(loop, steps, stager=mode == "dcp-stager")
        loop.daemon_cpu_s = proc_cpu_s(pid) - cpu0
        loop.cached_delta = cached_bytes() - cache0
        loop.loadavg = os.getloadavg()[0]
        return loop

    def _none(self, loop: Loop, steps: int) -> None:
        pc = time.perf_counter
        t0 = pc()
        for _ in range(steps):
            ts = pc()
            self.t.step()
            loop.step_s.append(pc() - ts)
            loop.inflight.append(False)
            self.global_step += 1
        loop.total_s = pc() - t0

    def _ckptd(self, loop: Loop, steps: int, ck: Ckptd) -> None:
        client = ck.client
        every = self.args.save_every
        pc = time.perf_counter
        pending: list[Any] = []
        handles: list[Any] = []
        t0 = pc()
        for i in range(1, steps + 1):
            busy = bool(pending)
            ts = pc()
            self.t.step()
            loop.step_s.append(pc() - ts)
            loop.inflight.append(busy)
            self.global_step += 1
            if pending:
                tp = pc()
                pending = [h for h in pending if not h.done()]
                loop.poll_s += pc() - tp
            if i % every == 0:
                tc = pc()
                h = client.save_async(self.global_step)
                loop.save_call_s.append(pc() - tc)
                loop.staged_s.append(h.staged_s)
                loop.collective_s.append(h.collective_s)
                pending.append(h)
                handles.append(h)
        tw = pc()
        client.wait()
        end = pc()
        loop.end_wait_s = end - tw
        loop.total_s = end - t0
        # Overlapped staging (when the client has it): the copy after save_async returned, and how long the
        # optimizer's pre-step hook (part of a step's time) waited for it. Final once the saves committed.
        for h in handles:
            loop.hook_wait_s.append(float(getattr(h, "hook_wait_s", 0.0)))
            loop.overlapped_bytes.append(int(getattr(h, "overlapped_bytes", 0)))

    def _dcp(self, loop: Loop, steps: int, stager: bool) -> None:
        dcp = self.dcp
        every = self.args.save_every
        pc = time.perf_counter
        upload: Any = None  # the previous save's completion future
        staging: list[Any] = []  # dcp-stager: the staging future, awaited before the next optimizer.step()

        def before_optimizer_step() -> None:
            if staging:
                tw = pc()
                staging.pop().result()
                loop.staging_wait_s.append(pc() - tw)

        t0 = pc()
        for i in range(1, steps + 1):
            busy = upload is not None and not upload.done()
            ts = pc()
            self.t.step(before_optimizer_step if stager else None)
            loop.step_s.append(pc() - ts)
            loop.inflight.append(busy)
            self.global_step += 1
            if i % every == 0:
                if upload is not None:
                    tw = pc()
                    upload.result()
                    loop.wait_prev_s.append(pc() - tw)
                tc = pc()
                state = {"model": self.t.model.state_dict(), "optim": self.t.optim.state_dict()}
                path = str(self.work / "dcp" / f"step-{self.global_step}")
                if stager:
                    resp = dcp.async_save(state, checkpoint_id=path, async_stager=self.stager)
                    if hasattr(resp, "upload_completion"):
                        staging.append(resp.staging_completion)
                        upload = resp.upload_completion
                    else:  # a torch that returns a plain future even with an async stager
                        upload = resp
                else:
                    upload = dcp.async_save(state, checkpoint_id=path)
                loop.save_call_s.append(pc() - tc)
        tw = pc()
        if staging:
            staging.pop().result()
        if upload is not None:
            upload.result()
        end = pc()
        loop.end_wait_s = end - tw
        loop.total_s = end - t0


def stop_daemon(endpoint: str, process: subprocess.Popen | None) -> str:
    """SIGTERM the daemon serving ``endpoint`` (the pid in ``<socket>.lock``), wait for it, SIGKILL after
    DAEMON_STOP_S; reap it if it is our child; remove its socket, lock and log. Returns what happened."""
    pid = daemon_pid(endpoint)
    if pid is None and process is not None and process.poll() is None:
        pid = process.pid
    what = "no daemon"
    if pid and is_our_daemon(pid, endpoint):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DAEMON_STOP_S
        while time.monotonic() < deadline:
            if process is not None and process.pid == pid and process.poll() is not None:
                break
            if not is_our_daemon(pid, endpoint):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            what = f"pid {pid} killed after {DAEMON_STOP_S:g} s"
        if what == "no daemon":
            what = f"pid {pid} stopped"
    if process is not None:
        with contextlib.suppress(Exception):
            process.wait(timeout=5)
    path = proto.ipc_path(endpoint)
    if path is not None:
        for suffix in ("", ".lock", ".log", ".log.1"):
            with contextlib.suppress(OSError):
                os.unlink(path + suffix)
    return what


# ------------------------------------------------------------------------------------------------ reporting


def ckptd_parts(ck: Loop, none: Loop) -> dict[str, float]:
    """A ckptd-like mode's overhead in one repeat (its loop minus the `none` loop of the same repeat), split into parts
    that add up to it exactly: the remainder is loop glue (timer reads, list appends, the save-every check)."""
    idle = [t for t, b in zip(ck.step_s, ck.inflight, strict=True) if not b]
    busy = [t for t, b in zip(ck.step_s, ck.inflight, strict=True) if b]
    ref = med(idle) if idle else med(none.step_s)
    inflation = sum(t - ref for t in busy)
    step_diff = sum(ck.step_s) - sum(none.step_s)
    stall = sum(ck.save_call_s)
    overhead = ck.total_s - none.total_s
    glue = overhead - stall - ck.end_wait_s - ck.poll_s - step_diff
    return {
        "overhead": overhead,
        "stall": stall,
        "staged": sum(ck.staged_s),
        "collective": sum(ck.collective_s),
        "handoff": stall - sum(ck.staged_s) - sum(ck.collective_s),
        "end_wait": ck.end_wait_s,
        "inflation": inflation,
        "inflation_vs_none": sum(t - med(none.step_s) for t in busy),
        "hook_wait": sum(ck.hook_wait_s),
        "overlapped_mib": sum(ck.overlapped_bytes) / MiB,
        "other_steps": step_diff - inflation,
        "poll": ck.poll_s,
        "glue": glue,
        "busy_steps": float(len(busy)),
        "idle_steps": float(len(idle)),
        "idle_step_med": ref,
        "busy_step_med": med(busy),
        "none_step_med": med(none.step_s),
        "daemon_cpu": ck.daemon_cpu_s,
        "cached_delta": ck.cached_delta,
    }


def print_breakdown(parts: list[dict[str, float]], bare: float, saves: int, mode: str = "ckptd") -> dict[str, float]:
    agg = {k: mean([p[k] for p in parts]) for k in parts[0]}
    agg_med = {k: med([p[k] for p in parts]) for k in parts[0]}
    n = len(parts)
    print(
        f"\n{mode} overhead breakdown (per loop of {saves} saves; mean over {n} repeats, which adds up, "
        f"and median; each repeat paired with that repeat's `none` loop):"
    )
    rows = [
        ("visible stall: save_async calls", "stall", True),
        ("  of which staged (handle.staged_s)", "staged", False),
        ("  of which collective (handle.collective_s)", "collective", False),
        ("  of which hand-off (STAGE round trip, handle)", "handoff", False),
        ("blocked in client.wait() at the end", "end_wait", True),
        ("step inflation while a save is in flight", "inflation", True),
        ("  incl. optimizer pre-step hook waits (hook_wait_s)", "hook_wait", False),
        ("other step-time difference vs `none` (unattributed)", "other_steps", True),
        ("handle.done() probes (benchmark instrumentation)", "poll", True),
        ("loop glue (unattributed)", "glue", True),
    ]
    w = max(len(r[0]) for r in rows) + 2
    print(f"  {'part':<{w}}{'mean':>10}{'median':>10}{'% of bare':>11}")
    for label, key, _ in rows:
        print(f"  {label:<{w}}{fmt_s(agg[key], True):>10}{fmt_s(agg_med[key], True):>10}{fmt_pct(agg[key] / bare):>11}")
    total = sum(agg[k] for _, k, top in rows if top)
    print(
        f"  {f'= measured overhead ({mode} loop - none loop)':<{w}}{fmt_s(agg['overhead'], True):>10}"
        f"{fmt_s(agg_med['overhead'], True):>10}{fmt_pct(agg['overhead'] / bare):>11}"
    )
    if abs(total - agg["overhead"]) > 1e-6 * max(1.0, abs(total)):  # cannot happen: the glue row is the rest
        print(f"  (the parts add up to {fmt_s(total, True)}, not to the overhead: a bug of this script)")
    unattributed = agg["other_steps"] + agg["glue"]
    print(f"  unattributed: {fmt_s(unattributed, True)} ({fmt_pct(unattributed / bare)} of the bare loop)")
    print(
        f"\n  steps with a save in flight: {agg['busy_steps']:.1f} of each loop, median "
        f"{fmt_s(agg_med['busy_step_med'])} vs {fmt_s(agg_med['idle_step_med'])} with nothing in flight "
        f"({fmt_pct(agg_med['busy_step_med'] / agg_med['idle_step_med'] - 1)}); `none` steps "
        f"{fmt_s(agg_med['none_step_med'])}; the inflation against the `none` steps' median instead: "
        f"{fmt_s(agg['inflation_vs_none'], True)} per loop (the reference step time is itself noisy)"
    )
    if agg["overlapped_mib"] > 0:
        print(
            f"  overlapped staging: {agg['overlapped_mib'] / saves:.0f} MiB per save copied after save_async "
            f"returned; the optimizer's pre-step hook waited {fmt_s(agg['hook_wait'] / saves)} per save for it "
            "(inside the step times above, so inside the inflation row when that step counts as in flight)"
        )
    cpu = agg["daemon_cpu"]
    if cpu == cpu:
        print(
            f"  daemon CPU time (utime+stime, /proc/<pid>/stat) during the loop: {fmt_s(cpu)} per loop "
            f"({fmt_s(cpu / saves)} per save); {100 * cpu / bare:.1f} % of one bare loop's wall time "
            f"(on {os.cpu_count()} CPUs it competes with the training threads)"
        )
    else:
        print("  daemon CPU time: not measured (no daemon pid found in the endpoint's lock file)")
    cache = agg["cached_delta"]
    if cache == cache:
        print(f"  page cache (Cached, /proc/meminfo) growth over the loop: {cache / MiB:+.0f} MiB per loop")
    return agg


def summarize(loops: list[Loop], modes: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for m in modes:
        xs = [lp.total_s for lp in loops if lp.mode == m]
        out[m] = {"median": med(xs), "min": min(xs), "max": max(xs)}
    return out


def print_modes(
    summary: dict[str, dict[str, float]], loops: list[Loop], modes: list[str]
) -> dict[str, dict[str, float]]:
    """The modes table; returns, per mode, its overhead three ways: ``median`` (median loop minus `none`'s,
    the headline), ``paired`` (median over repeats of the loop minus that repeat's `none` loop) and ``min``
    (fastest loop minus `none`'s fastest: the least disturbed pair on a shared machine)."""
    bare = summary["none"]["median"]
    none_by_rep = {lp.repeat: lp.total_s for lp in loops if lp.mode == "none"}
    wn = max(12, max(len(m) for m in modes) + 2)
    print(
        f"\n{'mode':<{wn}}{'loop median':>12}{'min – max':>22}{'overhead':>12}{'% of bare':>11}{'paired':>11}"
        f"{'of minima':>20}"
    )
    overhead: dict[str, dict[str, float]] = {}
    for m in modes:
        s = summary[m]
        o = {
            "median": s["median"] - bare,
            "paired": med([lp.total_s - none_by_rep[lp.repeat] for lp in loops if lp.mode == m]),
            "min": s["min"] - summary["none"]["min"],
        }
        overhead[m] = o
        rng = f"{fmt_s(s['min'])} – {fmt_s(s['max'])}"
        if m == "none":
            print(f"{m:<{wn}}{fmt_s(s['median']):>12}{rng:>22}")
            continue
        mins = f"{fmt_s(o['min'], True)} ({fmt_pct(o['min'] / summary['none']['min'])})"
        print(
            f"{m:<{wn}}{fmt_s(s['median']):>12}{rng:>22}{fmt_s(o['median'], True):>12}{fmt_pct(o['median'] / bare):>11}"
            f"{fmt_s(o['paired'], True):>11}{mins:>20}"
        )
    print(
        "(overhead = median loop time minus `none`'s; paired = median over repeats of (mode - `none` of that "
        "repeat); of minima = fastest loop minus `none`'s fastest, in % of `none`'s fastest)"
    )
    return overhead


def print_dcp_parts(loops: list[Loop], mode: str) -> None:
    ls = [lp for lp in loops if lp.mode == mode]
    if not ls:
        return
    print(f"\n{mode} per loop (median over repeats):")
    rows = [
        ("async_save calls (blocking part)", [sum(lp.save_call_s) for lp in ls]),
        ("waits for the previous save before a new one", [sum(lp.wait_prev_s) for lp in ls]),
        ("wait for the last save at the end", [lp.end_wait_s for lp in ls]),
    ]
    if mode == "dcp-stager":
        rows.append(("staging future waits before optimizer.step()", [sum(lp.staging_wait_s) for lp in ls]))
    busy = [t for lp in ls for t, b in zip(lp.step_s, lp.inflight, strict=True) if b]
    idle = [t for lp in ls for t, b in zip(lp.step_s, lp.inflight, strict=True) if not b]
    for label, xs in rows:
        print(f"  {label:<50}{fmt_s(med(xs)):>10}")
    if busy and idle:
        print(
            f"  step time with a save uploading {fmt_s(med(busy))} vs {fmt_s(med(idle))} without "
            f"({fmt_pct(med(busy) / med(idle) - 1)})"
        )
    cache = med([lp.cached_delta for lp in ls])
    if cache == cache:
        print(f"  page cache growth over the loop: {cache / MiB:+.0f} MiB")


def make_verdicts(
    modes: list[str], overhead: dict[str, dict[str, float]], bare: float, summary: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """DESIGN.md §8 verdicts on the medians, for each ckptd-like mode (``ckptd``, ``ckptd:NAME``): its overhead,
    then DCP's overhead over it. An overhead at or below zero is noise, not a result: the verdict is then
    INCONCLUSIVE rather than PASS, and the ratio is not formed."""
    out: list[dict[str, Any]] = []
    for ck in (m for m in modes if is_ckptd_mode(m)):
        out += _verdicts_of(ck, modes, overhead, bare, summary)
    return out


def _verdicts_of(
    ck: str, modes: list[str], overhead: dict[str, dict[str, float]], bare: float, summary: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ov = overhead[ck]["median"]
    frac = ov / bare
    spread = max(summary[m]["max"] / summary[m]["min"] for m in ("none", ck))
    if ov <= 0:
        verdict = "INCONCLUSIVE (overhead <= 0: noise)"
    else:
        verdict = "PASS" if frac <= OVERHEAD_MAX else "MISS"
        verdict += f" (2 % goal {'met' if frac <= OVERHEAD_GOAL else 'not met'})"
    if spread > 1.25:
        verdict += f"; loop times spread {spread:.1f}x"
    paired, mins = overhead[ck]["paired"], overhead[ck]["min"]
    out.append(
        {
            "target": f"{ck} overhead <= 5 % of the bare loop",
            "mode": ck,
            "measured": f"{fmt_s(ov, True)} ({fmt_pct(frac)}); paired {fmt_pct(paired / bare)}, "
            f"of minima {fmt_pct(mins / summary['none']['min'])}",
            "value": frac,
            "bound": OVERHEAD_MAX,
            "verdict": verdict,
            "pass": ov > 0 and frac <= OVERHEAD_MAX,
        }
    )
    for m in ("dcp", "dcp-stager"):
        if m not in modes:
            continue

        def ratio(key: str, m: str = m) -> str:
            c, d = overhead[ck][key], overhead[m][key]
            return f"{d / c:.1f}x" if c > 0 else "n/a"

        c, d = overhead[ck]["median"], overhead[m]["median"]
        x = d / c if c > 0 else float("nan")
        if c <= 0:
            verdict = f"INCONCLUSIVE ({ck}'s overhead <= 0: noise)"
        else:
            verdict = "PASS" if x >= DCP_RATIO_MIN else "MISS"
        out.append(
            {
                "target": f"{m} overhead / {ck} overhead >= 10",
                "mode": ck,
                "measured": f"{ratio('median')} ({fmt_s(d, True)} vs {fmt_s(c, True)}); paired {ratio('paired')}, "
                f"of minima {ratio('min')}",
                "value": x,
                "bound": DCP_RATIO_MIN,
                "verdict": verdict,
                "pass": c > 0 and x >= DCP_RATIO_MIN,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training-loop overhead of checkpointing: ckptd vs DCP async_save vs no checkpoint "
        "(one run, interleaved repeats, medians; DESIGN.md §8)."
    )
    p.add_argument("--model", choices=["mlp", "transformer"], default="mlp")
    p.add_argument("--width", type=int, default=None, help="hidden size (default 2048 MLP, 512 transformer)")
    p.add_argument("--layers", type=int, default=6, help="Linear layers / encoder layers (default 6)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64 MLP, 8 transformer)")
    p.add_argument("--seq", type=int, default=64, help="transformer sequence length (default 64)")
    p.add_argument("--heads", type=int, default=8, help="transformer attention heads (default 8)")
    p.add_argument("--steps", type=int, default=40, help="steps per loop (default 40)")
    p.add_argument("--save-every", type=int, default=5, help="a save every N steps (default 5)")
    p.add_argument("--warmup-steps", type=int, default=None, help="steps of the warm-up loop (default 2 saves)")
    p.add_argument("--repeats", type=int, default=5, help="timed loops per mode (default 5)")
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated subset of {','.join(ALL_MODES)} and of the ckptd:NAME modes of --config (default: "
        "all; every --config's mode runs unless --modes names some ckptd:NAME, then only those)",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="also mode ckptd:NAME: the ckptd loop against a daemon this script starts with 'python -m ckptd "
        "serve --endpoint <its own> ARGS' (ARGS shell-split, may be empty; repeatable)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dir", type=Path, default=None, help="where files go (a fresh temp dir inside it)")
    p.add_argument("--save-total-limit", type=int, default=2, help="ckptd save_total_limit (default 2; 0: none)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write every raw value to OUT")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("-v", "--verbose", action="store_true", help="log ckptd client messages (INFO)")
    args = p.parse_args(argv)
    if args.width is None:
        args.width = 2048 if args.model == "mlp" else 512
    if args.batch is None:
        args.batch = 64 if args.model == "mlp" else 8
    if args.warmup_steps is None:
        args.warmup_steps = 2 * args.save_every
    if min(args.steps, args.save_every, args.repeats, args.width, args.layers, args.batch) < 1:
        p.error("--steps, --save-every, --repeats, --width, --layers and --batch must be positive")
    if args.warmup_steps < args.save_every:
        p.error("--warmup-steps must cover at least one save (>= --save-every)")
    if args.save_every > args.steps:
        p.error("--save-every larger than --steps: the loop would not save")
    configs: dict[str, list[str]] = {}
    for c in args.config:
        name, sep, rest = c.partition("=")
        if not sep or not CONFIG_NAME.fullmatch(name):
            p.error(f"--config {c!r}: expected NAME=ARGS, NAME of letters, digits, '.', '_', '-' (ARGS may be empty)")
        if name in configs:
            p.error(f"--config {name}: given twice")
        try:
            daemon_args = shlex.split(rest)
        except ValueError as e:
            p.error(f"--config {c!r}: {e}")
        if any(a == "--endpoint" or a.startswith("--endpoint=") for a in daemon_args):
            p.error(f"--config {c!r}: no --endpoint (each config's daemon gets a private one)")
        configs[name] = daemon_args
    modes = [m.strip() for m in (args.modes or ",".join(ALL_MODES)).split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES and not (m.startswith("ckptd:") and m[6:] in configs)]
    if bad or "none" not in modes:
        p.error(
            f"--modes: unknown {bad} (a ckptd:NAME mode needs a --config NAME=ARGS)"
            if bad
            else "--modes must include none (the baseline)"
        )
    picked = [n for n in configs if f"ckptd:{n}" in modes] or list(configs)
    args.configs = {n: configs[n] for n in picked}
    args.modes = []
    for m in ALL_MODES:  # the ckptd:NAME modes right after ckptd, in --config order
        if m in modes:
            args.modes.append(m)
        if m == "ckptd":
            args.modes += [f"ckptd:{n}" for n in picked]
    args.save_total_limit = args.save_total_limit or None
    return args


def code_version() -> str:
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


def dirty_files() -> list[str]:
    """The client/ckptd files that differ from the commit measured (other work in progress lands there)."""
    try:
        import client

        root = Path(client.__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "client", "ckptd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return [line[3:] for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def _terminate(signum: int, frame: Any) -> None:
    # Unwind through the finally blocks (daemon, files, process group); a second signal must not cut that short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        fail(f"--device cuda was requested but CUDA is not available (torch {torch.__version__}); use --device cpu")
    skipped: dict[str, str] = {}
    if "dcp-stager" in args.modes and not cuda:
        skipped["dcp-stager"] = (
            "no CUDA: DefaultStager's use_async_staging / use_non_blocking_copy need an accelerator "
            "(torch raises 'Non-blocking copy requires that the current accelerator is available.')"
        )
        args.modes.remove("dcp-stager")
    base = args.dir if args.dir is not None else Path(tempfile.gettempdir())
    if not base.is_dir():
        fail(f"--dir {base} is not a directory")
    trainer = Trainer(args)
    trainer.step()  # AdamW's moments exist from here on: the state has its full size
    nbytes = trainer.state_bytes()
    need = nbytes * (2 * (args.steps // args.save_every) + 4)  # DCP keeps every save of a loop
    free = shutil.disk_usage(base).free
    if free < need:
        fail(f"{free / GiB:.1f} GiB free in {base}, the run needs about {need / GiB:.1f} GiB; pass --dir elsewhere")
    work = Path(tempfile.mkdtemp(prefix="ckptd-overhead-", dir=base))
    rt = proto.runtime_dir()
    proto.ensure_private_dir(rt)
    token = secrets.token_hex(4)
    endpoints = {"ckptd": f"ipc://{rt}/bench-overhead-{token}.sock"} if "ckptd" in args.modes else {}
    for i, name in enumerate(args.configs, 1):  # each in the same private (0700) runtime dir
        endpoints[f"ckptd:{name}"] = f"ipc://{rt}/bench-overhead-{token}-{i}.sock"
    saves = args.steps // args.save_every
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "ckptd_commit": code_version(),
        "ckptd_dirty_files": dirty_files(),
        "loadavg": os.getloadavg(),
    }
    desc = (
        f"MLP {args.layers} x Linear({args.width}, {args.width}) + GELU, batch {args.batch}"
        if args.model == "mlp"
        else f"transformer encoder {args.layers} x d_model {args.width}, {args.heads} heads, batch {args.batch} x "
        f"seq {args.seq}"
    )
    print(
        f"ckptd training-loop overhead, {env['date']}: {desc}, AdamW, {nbytes / MiB:.0f} MiB of state, "
        f"{args.steps} steps, a save every {args.save_every} ({saves} saves); {args.device}, {env['cpus']} CPUs, "
        f"torch {torch.__version__} ({env['torch_threads']} threads); ckptd {env['ckptd_commit']}; load average "
        f"{env['loadavg'][0]:.2f}; modes {', '.join(args.modes)}; {args.repeats} interleaved repeats after a "
        f"{args.warmup_steps}-step warm-up loop per mode; files in {work}"
    )
    for name, daemon_args in args.configs.items():
        ep = endpoints[f"ckptd:{name}"]
        print(f"mode ckptd:{name}: python -m ckptd serve --endpoint {ep} {shlex.join(daemon_args)}".rstrip())
    for m, why in skipped.items():
        print(f"mode {m} skipped: {why}")
    runner = Runner(args, trainer, work, endpoints, args.configs)
    loops: list[Loop] = []
    warmups: list[Loop] = []
    stopped: dict[str, str] = {}
    t_start = time.monotonic()
    try:
        runner.open(args.modes)
        print("  warm-up ...", flush=True)
        for m in args.modes:
            warmups.append(runner.run(m, 0, args.warmup_steps))
            runner.clear()
        for r in range(1, args.repeats + 1):
            order = rotate(args.modes, r - 1)
            got = []
            for m in order:
                lp = runner.run(m, r, args.steps)
                loops.append(lp)
                got.append(f"{m} {fmt_s(lp.total_s)}")
                runner.clear()
            print(f"  repeat {r}/{args.repeats}: " + ", ".join(got) + f" (load {lp.loadavg:.1f})", flush=True)
    finally:
        # No second Ctrl-C or SIGTERM may cut the cleanup short (every step of it is bounded in time).
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stopped = runner.close()
            shutil.rmtree(work, ignore_errors=True)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    wall = time.monotonic() - t_start
    env["loadavg_end"] = os.getloadavg()
    daemons = "; ".join(f"{m} {what}" for m, what in stopped.items()) or "none"
    print(f"(run took {wall:.0f} s; load average at the end {env['loadavg_end'][0]:.2f}; daemons: {daemons})")

    summary = summarize(loops, args.modes)
    bare = summary["none"]["median"]
    overhead = print_modes(summary, loops, args.modes)
    for m in ("dcp", "dcp-stager"):
        print_dcp_parts(loops, m)

    parts: dict[str, list[dict[str, float]]] = {}
    agg: dict[str, dict[str, float]] = {}
    if args.breakdown:
        none_by_rep = {lp.repeat: lp for lp in loops if lp.mode == "none"}
        for m in (m for m in args.modes if is_ckptd_mode(m)):
            parts[m] = [ckptd_parts(lp, none_by_rep[lp.repeat]) for lp in loops if lp.mode == m]
            agg[m] = print_breakdown(parts[m], bare, saves, m)

    verdicts = make_verdicts(args.modes, overhead, bare, summary)
    if verdicts:
        print()
        w = max(len(v["target"]) for v in verdicts) + 2
        wm = max(len(v["measured"]) for v in verdicts) + 2
        print(f"{'DESIGN.md §8 training-loop overhead':<{w}}{'measured':<{wm}}verdict")
        for v in verdicts:
            print(f"{v['target']:<{w}}{v['measured']:<{wm}}{v['verdict']}")
    noisy = [
        f"{m} ({summary[m]['max'] / summary[m]['min']:.2f}x)"
        for m in args.modes
        if summary[m]["min"] > 0 and summary[m]["max"] / summary[m]["min"] > 1.25
    ]
    if noisy:
        print(
            "\nnoisy (max/min loop time over repeats > 1.25): " + "; ".join(noisy) + ". An overhead of a few % is "
            "within that spread; rerun with more --repeats on a quieter machine before trusting a verdict."
        )

    if args.json is not None:
        out = {
            "environment": env,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "state_bytes": nbytes,
            "skipped": skipped,
            "summary_s": summary,
            "overhead_s": overhead,
            "verdicts": verdicts,
            "daemon_configs": {
                n: {"mode": f"ckptd:{n}", "endpoint": endpoints[f"ckptd:{n}"], "serve_args": a}
                for n, a in args.configs.items()
            },
            "daemons_stopped": stopped,
            "ckptd_breakdown_per_repeat": parts.get("ckptd", []),  # the `ckptd` mode's, as before
            "ckptd_breakdown_mean": agg.get("ckptd", {}),
            "breakdown_per_repeat": parts,  # every ckptd-like mode's
            "breakdown_mean": agg,
            "loops": [asdict(lp) for lp in loops],
            "warmup_loops": [asdict(lp) for lp in warmups],
            "run_s": wall,
        }
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
