"""Training-step slowdown while ckptd writes checkpoints in the background (DESIGN.md §8), per daemon setting.

Runs a CPU training loop (an MLP, AdamW) in intervals of --every seconds: an interval that starts by
handing a save of --state-mib MiB to ckptd (it lasts until the save has committed, at least --every s),
then one without a save, alternating, so that both kinds see the same machine (other load drifts). Every
daemon setting (--config NAME=ARGS, each a ``ckptd serve ARGS`` this script starts) runs once per round,
the settings rotating from round to round (--repeats rounds; before the timed intervals, --warmup-saves
untimed ones, from which auto pacing learns the interval between hand-offs: 2 × --every). Reported, as
medians over rounds:

* slowdown: median step time of the steps that ran while a save was in flight against the median step
  time of the intervals without one (the §8 row);
* overhead: steps per second without saves over steps per second in the intervals with a save (the
  save_async stall and any back-pressure included), less one: what a save costs the loop;
* busy s: seconds per save that steps ran with a save in flight (about its write time);
* save_async: its median duration (the stall, plus any wait for the slab);
* daemon CPU: utime+stime of the daemon process (all threads, /proc/<pid>/stat) per GiB written;
* cache: growth of the page cache (/proc/meminfo Cached) from a hand-off to its commit, as a share of the
  bytes saved (machine-wide: other processes move it too).

Examples:

    python benchmarks/slowdown.py                              # the daemon's defaults
    python benchmarks/slowdown.py --config off= --config auto="--max-write-rate auto" \\
        --config 200M="--max-write-rate 200MiB/s" --repeats 5
    python benchmarks/slowdown.py --max-write-rate auto --daemon-nice 19 --cpu-affinity 1 --ionice idle
    python benchmarks/slowdown.py --embedded                   # also the daemon a CheckpointClient starts
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckptd import protocol as proto
from ckptd.cli import request_status
from client import CheckpointClient, SharingPattern, StateComponent

GiB = 2**30
TICKS = os.sysconf("SC_CLK_TCK")


class Blob:
    def __init__(self, mib: int, tensors: int = 64) -> None:
        n = mib * 2**20 // 4 // tensors
        self.tensors = {f"t{i}": torch.randn(n) for i in range(tensors)}

    def state_dict(self) -> dict:
        return dict(self.tensors)

    def load_state_dict(self, state: dict) -> None:
        self.tensors = dict(state)


@dataclass
class Round:
    base: list[float] = field(default_factory=list)  # step times of the intervals without a save
    during: list[float] = field(default_factory=list)  # step times while a save was in flight
    save_s: float = 0.0  # wall time of the intervals with a save (stall and back-pressure included)
    save_steps: int = 0
    free_s: float = 0.0  # wall time of the intervals without a save
    free_steps: int = 0
    stalls: list[float] = field(default_factory=list)  # save_async durations
    cpu_s: float = 0.0  # daemon utime+stime over the intervals with a save (each save committed in it)
    written: int = 0  # bytes
    cache_growth: list[int] = field(default_factory=list)  # page cache (meminfo Cached) after a save's commit

    @property
    def slowdown(self) -> float:
        return statistics.median(self.during) / statistics.median(self.base) - 1 if self.during else 0.0

    @property
    def overhead(self) -> float:
        """Steps per second without saves over steps per second with them, less one."""
        return (self.free_steps / self.free_s) / (self.save_steps / self.save_s) - 1


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15)


def cached_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def start_daemon(args_text: str, endpoint: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, *shlex.split(args_text)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while request_status(endpoint, 0.5) is None:
        if proc.poll() is not None:
            raise SystemExit(f"'{' '.join(cmd)}' exited with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"'{' '.join(cmd)}' did not answer within 30 s")
    return proc


def stop_daemon(proc: subprocess.Popen | None, endpoint: str) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    path = proto.ipc_path(endpoint)
    for suffix in ("", ".lock", ".log"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def one_round(args: argparse.Namespace, daemon_args: str | None, blob: Blob, step, work: str) -> Round:
    """One setting, once: warm-up saves at the cadence, then --saves timed saves, then as long without."""
    endpoint = f"ipc://{proto.runtime_dir()}/slowdown-{os.getpid()}-{secrets.token_hex(3)}.sock"
    proc = start_daemon(daemon_args, endpoint) if daemon_args is not None else None
    out = tempfile.mkdtemp(prefix="run-", dir=work)
    r = Round()
    try:
        with CheckpointClient(out, [StateComponent("state", blob, SharingPattern.GLOBAL)], endpoint=endpoint) as c:
            status = request_status(endpoint, 5.0)
            assert status is not None, "the daemon does not answer"
            pid = int(status["pid"])

            def with_save(save_step: int, timed: bool) -> None:
                """One interval: hand a save over, train until --every s passed and the save committed."""
                cpu0, cached0 = cpu_seconds(pid), cached_bytes()
                t0 = time.perf_counter()
                h = c.save_async(save_step)
                stall = time.perf_counter() - t0
                steps = []
                while time.perf_counter() - t0 < args.every or not h.done():
                    busy = not h.done()
                    dt = step()
                    steps.append(dt)
                    if timed:
                        (r.during if busy else r.base).append(dt)
                h.wait()
                growth = cached_bytes() - cached0
                if timed:
                    r.cache_growth.append(growth)
                    r.save_s += time.perf_counter() - t0
                    r.save_steps += len(steps)
                    r.stalls.append(stall)
                    r.cpu_s += cpu_seconds(pid) - cpu0
                    r.written += args.state_mib * 2**20

            def without_save(timed: bool) -> None:
                t0 = time.perf_counter()
                n = 0
                while time.perf_counter() - t0 < args.every:
                    dt = step()
                    n += 1
                    if timed:
                        r.base.append(dt)
                if timed:
                    r.free_s += time.perf_counter() - t0
                    r.free_steps += n

            c.save_async(0).wait()  # allocates the slab
            for _ in range(10):
                step()
            for k in range(args.warmup_saves):  # the daemon learns the interval between hand-offs (auto pacing)
                with_save(1 + k, timed=False)
                without_save(timed=False)
            for k in range(args.saves):  # save and no-save intervals alternate: both see the same machine
                with_save(100 + k, timed=True)
                without_save(timed=True)
            if proc is None:
                c.close()
    finally:
        stop_daemon(proc, endpoint)
        shutil.rmtree(out, ignore_errors=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-mib", type=int, default=1024, help="bytes per save (default 1024 MiB)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; every setting once per round (default 3)")
    ap.add_argument("--width", type=int, default=1024, help="MLP width (default 1024)")
    ap.add_argument("--every", type=float, default=3.0, help="seconds per interval (default 3)")
    ap.add_argument("--saves", type=int, default=3, help="timed saves per round and setting (default 3)")
    ap.add_argument("--warmup-saves", type=int, default=2, help="untimed saves at the cadence first (default 2)")
    ap.add_argument("--dir", default=None, help="where the checkpoints go (a temp dir inside it)")
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="a daemon setting: NAME, then the 'ckptd serve' arguments (repeatable; interleaved per round)",
    )
    ap.add_argument("--embedded", action="store_true", help="also measure the client's own embedded daemon")
    one = ap.add_argument_group("one setting (when no --config is given)")
    one.add_argument("--max-write-rate", default=None)
    one.add_argument("--daemon-nice", type=int, default=None)
    one.add_argument("--cpu-affinity", default=None)
    one.add_argument("--ionice", default=None)
    one.add_argument("--writer-threads", type=int, default=None)
    one.add_argument("--no-direct-io", action="store_true")
    one.add_argument("--keep-page-cache", action="store_true")
    args = ap.parse_args()

    configs: list[tuple[str, str | None]] = []
    for c in args.config:
        name, sep, rest = c.partition("=")
        if not sep:
            ap.error(f"--config {c!r}: expected NAME=ARGS (ARGS may be empty)")
        configs.append((name, rest))
    if not configs:
        extra = []
        for flag, value in (
            ("--max-write-rate", args.max_write_rate),
            ("--nice", args.daemon_nice),
            ("--cpu-affinity", args.cpu_affinity),
            ("--ionice", args.ionice),
            ("--writer-threads", args.writer_threads),
        ):
            if value is not None:
                extra += [flag, str(value)]
        extra += ["--no-direct-io"] if args.no_direct_io else []
        extra += ["--keep-page-cache"] if args.keep_page_cache else []
        configs.append(("daemon " + " ".join(extra) if extra else "daemon defaults", shlex.join(extra)))
    if args.embedded:
        configs.append(("embedded", None))

    model = torch.nn.Sequential(
        torch.nn.Linear(args.width, args.width), torch.nn.GELU(), torch.nn.Linear(args.width, args.width)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, args.width)

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    proto.ensure_private_dir(proto.runtime_dir())
    work = tempfile.mkdtemp(prefix="ckptd-slowdown-", dir=args.dir)
    blob = Blob(args.state_mib)
    for _ in range(20):
        step()
    results: dict[str, list[Round]] = {name: [] for name, _ in configs}
    try:
        for rnd in range(args.repeats):
            order = configs[rnd % len(configs) :] + configs[: rnd % len(configs)]
            for name, daemon_args in order:
                results[name].append(one_round(args, daemon_args, blob, step, work))
                r = results[name][-1]
                print(
                    f"  round {rnd + 1} {name}: slowdown {100 * r.slowdown:+.1f} %, overhead "
                    f"{100 * r.overhead:+.1f} %, cpu {r.cpu_s / (r.written / GiB):.2f} s/GiB, "
                    f"{len(r.during)} busy steps",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"state {args.state_mib} MiB, intervals of {args.every:g} s, {args.saves} timed saves x {args.repeats} rounds, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; medians over rounds"
    )
    print(
        f"{'setting':<34} {'step ms':>8} {'slowdown':>9} {'overhead':>9} {'save_async':>10} {'busy s':>7} "
        f"{'CPU s/GiB':>9} {'cache':>6}"
    )
    for name, rounds in results.items():
        base = [statistics.median(r.base) for r in rounds]
        slow = [r.slowdown for r in rounds if r.during]
        over = [r.overhead for r in rounds]
        stall = [statistics.median(r.stalls) for r in rounds]
        busy = [len(r.during) * statistics.median(r.during) / args.saves for r in rounds if r.during]
        cpu = [r.cpu_s / (r.written / GiB) for r in rounds]
        cache = [statistics.median(r.cache_growth) / (args.state_mib * 2**20) for r in rounds]
        print(
            f"{name[:34]:<34} {1e3 * statistics.median(base):8.2f} {100 * statistics.median(slow or [0]):+8.1f}% "
            f"{100 * statistics.median(over):+8.1f}% {1e3 * statistics.median(stall):8.0f}ms "
            f"{statistics.median(busy or [0]):7.2f} {statistics.median(cpu):9.2f} {statistics.median(cache):+6.2f}"
        )
    print("slowdown: step time with a save in flight vs without (target <= 5 % on the 2-core CI machine);")
    print("overhead: steps/s without saves vs with (stall, back-pressure included); busy s: per save, the time")
    print("steps ran with it in flight")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
