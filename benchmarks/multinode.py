#!/usr/bin/env python3
"""Multi-node benchmark: the save path's one collective and the time to committed, across world sizes and
(simulated) nodes, measured side by side in ONE run with interleaved repeats and medians.

    python benchmarks/multinode.py                      # 3 repeats, 5 saves per launch, 64 MiB per rank
    python benchmarks/multinode.py --repeats 5 --mib 256 --json out.json

Every repeat launches each layout once, the order rotating from repeat to repeat. A layout is N nodes × P
ranks: one ``python -m torch.distributed.run`` per node (``--standalone`` for one node), started concurrently,
each with its own ``CKPTD_NODE_ID`` and ``CKPTD_ENDPOINT`` (a private embedded daemon per node) and
``CKPTD_PEER_HOST=127.0.0.1`` (DESIGN.md §5: several simulated nodes on one machine). The ranks run
``benchmarks/multinode_worker.py``:

1. collective: 1 MiB PER_RANK per rank (``--small-mib``), so the snapshot agreement (one ``all_gather_object``
   over gloo, ``handle.collective_s``) dominates; layouts 1×1, 1×2, 1×4, 1×8, 2×2 and 2×4.
2. commit: ``--mib`` MiB PER_RANK per rank, the same total bytes on 1 node × 4 ranks and 2 nodes × 2 ranks:
   time from ``save_async`` until ``handle.wait()`` returns (run in the 1×4 and 2×2 launches, after phase 1).

Each launch makes one warm-up save per phase (not counted) and ``--saves`` timed saves. Per save, the
collective is the median over ranks, the stall and the time to committed the maximum over ranks (the job is in
lockstep: it goes on when its slowest rank does). Reported values are medians over every timed save of every
repeat; ratios are ratios of medians. All files go to a fresh temp dir (``--dir``, default ``$TMPDIR`` or
/tmp) that is removed at the end; every daemon a launch started is stopped (SIGTERM to the pid in
``<socket>.lock``) right after its launch, also on failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptd import protocol as proto

MiB = 1024**2
HERE = Path(__file__).resolve().parent
WORKER = HERE / "multinode_worker.py"
COLLECTIVE_LAYOUTS = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 2), (2, 4)]
COMMIT_LAYOUTS = [(1, 4), (2, 2)]  # the same total bytes: 4 ranks of --mib MiB each
DAEMON_STOP_S = 15.0


def fail(msg: str, code: int = 2) -> None:
    print(f"multinode.py: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_s(s: float) -> str:
    if s != s:  # nan
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def label(layout: tuple[int, int]) -> str:
    return f"{layout[0]}×{layout[1]}"


# ---------------------------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_endpoint(node: int) -> str:
    rt = proto.runtime_dir()
    proto.ensure_private_dir(rt)
    return f"ipc://{rt}/mnb-{secrets.token_hex(3)}-n{node}.sock"


def daemon_pid(endpoint: str) -> int | None:
    path = proto.ipc_path(endpoint)
    try:
        text = Path(path + ".lock").read_text().strip()
        return int(text) if text else None
    except (OSError, TypeError, ValueError):
        return None


def is_our_daemon(pid: int, endpoint: str) -> bool:
    """The pid is still a ckptd daemon serving this endpoint (not a recycled pid)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"ckptd" in cmd and endpoint.encode() in cmd


def stop_daemon(endpoint: str) -> str:
    """SIGTERM the daemon serving ``endpoint`` (if any), wait for it, SIGKILL after DAEMON_STOP_S; remove its
    socket, lock and log. Returns what happened, for the log line."""
    pid = daemon_pid(endpoint)
    what = "no daemon"
    if pid and is_our_daemon(pid, endpoint):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DAEMON_STOP_S
        while is_our_daemon(pid, endpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_our_daemon(pid, endpoint):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            what = f"pid {pid} killed"
        else:
            what = f"pid {pid} stopped"
    path = proto.ipc_path(endpoint)
    if path is not None:
        for suffix in ("", ".lock", ".log", ".log.1"):
            with contextlib.suppress(OSError):
                os.unlink(path + suffix)
    return what


@dataclass
class Launch:
    layout: tuple[int, int]
    procs: list[subprocess.Popen] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)


LIVE: list[Launch] = []  # launches whose processes or daemons may still run (cleaned up on any exit)


def worker_pids(parent: int) -> list[int]:
    """The benchmark's rank processes that ``parent`` (a torchrun) started: torchrun puts each rank in a session
    of its own, so killing torchrun's process group would not reach them."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == parent and WORKER.name.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def is_worker(pid: int) -> bool:
    try:
        return WORKER.name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_launch(launch: Launch) -> None:
    """Stop a launch still running: SIGTERM to each torchrun (it stops its ranks), then SIGKILL to whatever is
    left of the torchruns and of their ranks."""
    running = [p for p in launch.procs if p.poll() is None]
    if not running:
        return
    ranks = [pid for p in running for pid in worker_pids(p.pid)]
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        any(p.poll() is None for p in running) or any(is_worker(pid) for pid in ranks)
    ):
        time.sleep(0.1)
    for p in running:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    for pid in ranks:
        if is_worker(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for p in running:
        with contextlib.suppress(Exception):
            p.wait(timeout=10)


def cleanup(launch: Launch, keep_logs: Path | None = None) -> list[str]:
    kill_launch(launch)
    if keep_logs is not None:
        for ep in launch.endpoints:
            log = proto.ipc_path(ep) + ".log"
            with contextlib.suppress(OSError):
                shutil.copy(log, keep_logs / Path(log).name)
    done = [stop_daemon(ep) for ep in launch.endpoints]
    with contextlib.suppress(ValueError):
        LIVE.remove(launch)
    return done


def run_launch(
    layout: tuple[int, int], tag: str, out: Path, results: Path, args: argparse.Namespace, commit: bool
) -> dict[int, dict[str, Any]]:
    nnodes, nproc = layout
    launch = Launch(layout)
    LIVE.append(launch)
    port = free_port()
    worker_args = [str(WORKER), "--tag", tag, "--out", str(out), "--results", str(results)]
    worker_args += ["--small-mib", str(args.small_mib), "--saves", str(args.saves)]
    worker_args += ["--mib", str(args.mib if commit else 0)]
    logs: list[Path] = []
    failed: list[str] = []
    results.mkdir(parents=True, exist_ok=True)
    t_launch = time.time()
    try:
        for n in range(nnodes):
            ep = node_endpoint(n)
            launch.endpoints.append(ep)
            cmd = [sys.executable, "-m", "torch.distributed.run"]
            if nnodes == 1:
                cmd += ["--standalone", "--nnodes=1"]
            else:
                cmd += [f"--nnodes={nnodes}", f"--node-rank={n}", "--master-addr=127.0.0.1", f"--master-port={port}"]
            cmd += [f"--nproc-per-node={nproc}", *worker_args]
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                "CKPTD_NODE_ID": f"bench-node-{n}",
                proto.ENDPOINT_ENV: ep,
                "CKPTD_PEER_HOST": "127.0.0.1",
            }
            log = results / f"{tag}_node{n}.log"
            logs.append(log)
            with open(log, "wb") as fh:
                launch.procs.append(
                    subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
                )
        deadline = time.monotonic() + args.launch_timeout
        for n, p in enumerate(launch.procs):
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed.append(f"node {n} still running after {args.launch_timeout} s")
                kill_launch(launch)
            if p.returncode not in (0, None) and not failed:
                failed.append(f"node {n} exited with {p.returncode}")
    finally:
        t_end = time.time()
        stopped = cleanup(launch, keep_logs=results if failed else None)
        if args.verbose:
            print(f"    daemons: {', '.join(stopped)}", flush=True)
    if failed:
        tails = "\n".join(
            f"===== node {n} ({log}) =====\n{log.read_text(errors='replace')[-4000:]}" for n, log in enumerate(logs)
        )
        raise RuntimeError(f"launch {label(layout)} failed: {'; '.join(failed)}\n{tails}")
    found = {}
    for r in range(nnodes * nproc):
        path = results / f"{tag}_rank{r}.json"
        if not path.exists():
            raise RuntimeError(f"launch {label(layout)}: rank {r} wrote no result (logs in {results})")
        found[r] = json.loads(path.read_text())
    if args.verbose:
        marks = [rec["marks"] for rec in found.values()]
        parts = [f"ranks in main() after {max(m['main'] for m in marks) - t_launch:.1f} s"]
        parts.append(f"process group {max(m['init'] for m in marks) - t_launch:.1f} s")
        parts.append(f"collective phase done {max(m['collective'] for m in marks) - t_launch:.1f} s")
        if commit:
            parts.append(f"commit phase done {max(m['commit'] for m in marks) - t_launch:.1f} s")
        parts.append(f"launch ended {t_end - t_launch:.1f} s")
        print(f"    {', '.join(parts)}", flush=True)
    return found


# --------------------------------------------------------------------------------------------- aggregation


@dataclass
class Series:
    """Per layout and phase: every timed save's job-level figures, and the per-repeat medians."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    per_repeat: dict[str, list[float]] = field(default_factory=dict)
    warmup: dict[str, list[float]] = field(default_factory=dict)
    vote_bytes: list[int] = field(default_factory=list)
    bytes_per_save: int = 0

    def m(self, key: str) -> float:
        return med(self.samples.get(key, []))


def job_level(ranks: dict[int, dict[str, Any]], phase: str) -> tuple[list[dict[str, float]], list[int], int]:
    """Per save: collective median over ranks, stall / committed / staged max over ranks."""
    recs = [ranks[r][phase] for r in sorted(ranks)]
    count = len(recs[0]["saves"])
    rows = []
    for i in range(count):
        s = [rec["saves"][i] for rec in recs]
        rows.append(
            {
                "warmup": s[0]["warmup"],
                "collective": med([x["collective_s"] for x in s]),
                "collective_max": max(x["collective_s"] for x in s),
                "stall": max(x["stall_s"] for x in s),
                "staged": max(x["staged_s"] for x in s),
                "handoff": med([x["stall_s"] - x["staged_s"] - x["collective_s"] for x in s]),
                "committed": max(x["committed_s"] for x in s),
            }
        )
    votes = [b for rec in recs for b in rec["vote_bytes"]]
    nbytes = sum(rec["saves"][-1]["bytes_staged"] for rec in recs)
    return rows, votes, nbytes


def add(series: Series, rows: list[dict[str, float]], votes: list[int], nbytes: int) -> None:
    timed = [r for r in rows if not r["warmup"]]
    for key in rows[0]:
        if key == "warmup":
            continue
        vals = [r[key] for r in timed]
        series.samples.setdefault(key, []).extend(vals)
        series.per_repeat.setdefault(key, []).append(med(vals))
        series.warmup.setdefault(key, []).extend(r[key] for r in rows if r["warmup"])
    series.vote_bytes.extend(votes)
    series.bytes_per_save = nbytes


def spread(series: Series, key: str) -> str:
    reps = series.per_repeat.get(key, [])
    if len(reps) < 2:
        return ""
    return f"{fmt_s(min(reps))}–{fmt_s(max(reps))}"


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  " + "  ".join("-" * w for w in widths))
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def report(
    coll: dict[tuple[int, int], Series], comm: dict[tuple[int, int], Series], args: argparse.Namespace
) -> dict[str, Any]:
    print(
        "\n1. The save path's one collective (snapshot agreement, all_gather_object over gloo), "
        f"{args.small_mib:g} MiB "
        f"PER_RANK per rank; medians over {args.repeats} repeats × {args.saves} saves"
    )
    base = coll.get((1, 2))
    rows = []
    for layout in COLLECTIVE_LAYOUTS:
        s = coll[layout]
        c = s.m("collective")
        ratio = "—" if base is None or layout == (1, 2) or layout == (1, 1) else f"{c / base.m('collective'):.2f}×"
        if layout == (1, 1):
            ratio = "(no collective)"
        vb = f"{min(s.vote_bytes)}–{max(s.vote_bytes)} B" if s.vote_bytes else "—"
        rows.append(
            [
                label(layout),
                str(layout[0] * layout[1]),
                fmt_s(c),
                spread(s, "collective"),
                ratio,
                fmt_s(s.m("collective_max")),
                fmt_s(s.m("stall")),
                fmt_s(s.m("staged")),
                fmt_s(s.m("handoff")),
                vb,
            ]
        )
    table(
        [
            "nodes×ranks",
            "world",
            "collective",
            "per-repeat",
            "vs 1×2",
            "slowest rank",
            "stall",
            "staged",
            "hand-off",
            "vote/rank",
        ],
        rows,
    )
    ratios: dict[str, float] = {}
    for multi, single in (((2, 2), (1, 4)), ((2, 4), (1, 8))):
        if multi in coll and single in coll:
            a, b = coll[multi], coll[single]
            ratios[f"collective {label(multi)}/{label(single)}"] = a.m("collective") / b.m("collective")
            ratios[f"stall {label(multi)}/{label(single)}"] = a.m("stall") / b.m("stall")
    for k, v in ratios.items():
        print(f"  {k} (same world, 2 nodes / 1 node): {v:.2f}×")
    print("  collective: median over ranks per save (1×1 has no group, so no collective); slowest rank: the rank")
    print("  that waited longest in it; stall = staged + collective + hand-off (slowest rank per save; the parts are")
    print("  medians over ranks); vote/rank: the pickled object each rank contributes (all_gather_object pads every")
    print("  rank's to the largest and gathers world × that, after a first all_gather of the sizes).")

    out: dict[str, Any] = {"collective": {}, "commit": {}, "ratios": ratios}
    for layout, s in coll.items():
        out["collective"][label(layout)] = {
            "median_s": {k: s.m(k) for k in s.samples},
            "per_repeat_median_s": s.per_repeat,
            "samples_s": s.samples,
            "warmup_s": s.warmup,
            "vote_bytes_min_max": [min(s.vote_bytes), max(s.vote_bytes)] if s.vote_bytes else None,
        }
    if comm:
        one, two = comm.get((1, 4)), comm.get((2, 2))
        total = (one or two).bytes_per_save
        print(
            f"\n2. Time to committed, the same {total / MiB:.0f} MiB per save "
            f"({args.mib:g} MiB PER_RANK per rank, 4 ranks); "
            f"medians over {args.repeats} repeats × {args.saves} saves"
        )
        rows = []
        for layout in COMMIT_LAYOUTS:
            s = comm[layout]
            bg = s.m("committed") - s.m("stall")
            bw = f"{s.bytes_per_save / MiB / bg:.0f} MiB/s" if bg > 0 else "—"
            rows.append(
                [
                    label(layout),
                    fmt_s(s.m("stall")),
                    fmt_s(s.m("collective")),
                    fmt_s(s.m("committed")),
                    spread(s, "committed"),
                    bw,
                    fmt_s(med(s.warmup.get("committed", []))),
                ]
            )
        table(
            [
                "nodes×ranks",
                "stall",
                "collective",
                "time to committed",
                "per-repeat",
                "bytes/(committed−stall)",
                "warm-up committed",
            ],
            rows,
        )
        if one and two:
            r = two.m("committed") / one.m("committed")
            rs = two.m("stall") / one.m("stall")
            ratios["committed 2×2/1×4"] = r
            ratios["stall 2×2/1×4 (commit phase)"] = rs
            per = [b / a for a, b in zip(one.per_repeat["committed"], two.per_repeat["committed"], strict=False)]
            print(
                f"  time to committed, 2 nodes / 1 node: {r:.2f}× (per repeat: {' '.join(f'{x:.2f}×' for x in per)}); "
                f"stall: {rs:.2f}×"
            )
        for layout, s in comm.items():
            out["commit"][label(layout)] = {
                "bytes_per_save": s.bytes_per_save,
                "median_s": {k: s.m(k) for k in s.samples},
                "per_repeat_median_s": s.per_repeat,
                "samples_s": s.samples,
                "warmup_s": s.warmup,
            }
    return out


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Multi-node benchmark: the save path's collective at world 1-8 on one node and on 2 simulated "
        "nodes, and time to committed on 1×4 vs 2×2 (interleaved repeats, medians, ratios).",
    )
    p.add_argument("--repeats", type=int, default=3, help="launches of every layout, order rotating (default 3)")
    p.add_argument(
        "--mib", type=float, default=64, help="PER_RANK MiB per rank for the commit comparison (default 64; 0 skips it)"
    )
    p.add_argument("--small-mib", type=float, default=1, help="PER_RANK MiB per rank for the collective (default 1)")
    p.add_argument("--saves", type=int, default=5, help="timed saves per phase and launch, after a warm-up (default 5)")
    p.add_argument("--dir", type=Path, default=None, help="where files are written (a fresh temp dir inside it)")
    p.add_argument("--launch-timeout", type=float, default=300, help="seconds one launch may take (default 300)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the numbers to OUT")
    p.add_argument("-v", "--verbose", action="store_true", help="say what each launch took and which daemons stopped")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.saves < 1 or args.small_mib <= 0 or args.mib < 0:
        p.error("--repeats and --saves must be positive, --small-mib > 0, --mib >= 0")
    return args


def code_version() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "client", "ckptd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_disk(base: Path, args: argparse.Namespace) -> None:
    # At most two checkpoints of the commit phase exist at once (the worker deletes the older one), plus slack.
    need = 2 * 4 * args.mib * MiB * 1.2 + 256 * MiB
    free = shutil.disk_usage(base).free
    if free < need:
        fail(
            f"{base} has {free / MiB:.0f} MiB free; --mib {args.mib:g} needs about {need / MiB:.0f} MiB: "
            "lower --mib or use --dir"
        )


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    base = args.dir if args.dir is not None else Path(tempfile.gettempdir())
    if not base.is_dir():
        fail(f"--dir {base} is not a directory")
    if args.mib > 0:
        check_disk(base, args)
    work = Path(tempfile.mkdtemp(prefix="ckptd-mn-bench-", dir=base))
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ckptd_commit": code_version(),
    }
    print(
        f"ckptd multi-node benchmark, {env['date']}: {env['cpus']} CPUs ({env['cpus_usable']} usable), "
        f"load {env['loadavg_start'][0]:.2f}, torch {torch.__version__}, Python {env['python']}; "
        f"ckptd {env['ckptd_commit']}; "
        f"{args.repeats} interleaved repeats × {args.saves} saves after a warm-up save, medians; simulated nodes = one "
        f"torchrun per node on this machine, peers on 127.0.0.1; files in {work}",
        flush=True,
    )
    launches: list[tuple[tuple[int, int], bool]] = [
        (lay, lay in COMMIT_LAYOUTS and args.mib > 0) for lay in COLLECTIVE_LAYOUTS
    ]
    coll: dict[tuple[int, int], Series] = {lay: Series() for lay in COLLECTIVE_LAYOUTS}
    comm: dict[tuple[int, int], Series] = {lay: Series() for lay in COMMIT_LAYOUTS} if args.mib > 0 else {}
    t_start = time.monotonic()
    try:
        for r in range(args.repeats):
            k = r % len(launches)
            order = launches[k:] + launches[:k]
            for layout, commit in order:
                tag = f"r{r}_{layout[0]}x{layout[1]}"
                t0 = time.monotonic()
                print(
                    f"  repeat {r + 1}/{args.repeats}: {label(layout)}{' (+ commit phase)' if commit else ''} ...",
                    end="",
                    flush=True,
                )
                ranks = run_launch(layout, tag, work / tag / "out", work / tag / "results", args, commit)
                add(coll[layout], *job_level(ranks, "collective"))
                if commit:
                    add(comm[layout], *job_level(ranks, "commit"))
                shutil.rmtree(work / tag, ignore_errors=True)
                print(f" {time.monotonic() - t0:.1f} s", flush=True)
    except RuntimeError as e:
        print(f"\n{e}", file=sys.stderr)
        return 1
    finally:
        for launch in list(LIVE):
            cleanup(launch)
        shutil.rmtree(work, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg()
    env["wall_s"] = time.monotonic() - t_start
    out = report(coll, comm, args)
    print(f"\nload average at the end {env['loadavg_end'][0]:.2f}; wall time {env['wall_s']:.0f} s")
    out["environment"] = env
    out["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
