#!/usr/bin/env python3
"""Sharded-state benchmark: ckptd (SHARDED components) vs torch.distributed.checkpoint on the same FSDP2 state
at world 4 (torchrun --standalone, gloo, CPU), measured side by side with interleaved saves, medians and ratios.

    python benchmarks/sharded.py                       # 256 MiB of state, 3 repeats × 3 timed rounds
    python benchmarks/sharded.py --repeats 5 --mib 512 --json out.json

Every repeat is ONE ``python -m torch.distributed.run --standalone --nproc_per_node 4`` launch of
``benchmarks/sharded_worker.py`` with its own ``CKPTD_ENDPOINT`` (a private embedded daemon). The ranks build an
FSDP2 MLP (4 Linear layers, one of them with a row count that does not split evenly over 4 ranks) with AdamW
after one training step: parameters plus both moments come to about ``--mib`` MiB. A launch runs a warm-up round
(not counted) and ``--saves`` timed rounds. A round saves once with each method, in an order that rotates from
round to round and from repeat to repeat:

1. ckptd: ``client.save_async(step)`` of components ``model`` and ``optimizer``, both ``SharingPattern.SHARDED``
   (blocking = the call; committed = until ``handle.wait()`` returns);
2. DCP ``async_save`` of ``{"model": msd, "optim": osd}`` from ``get_state_dict(model, optim)`` (blocking = the
   ``get_state_dict`` and the call; durable = until ``future.result()`` returns);
3. DCP ``save`` (synchronous) of the same dict.

Then both loads of this round's checkpoints, order rotating: ``client.load(path)`` and ``get_state_dict`` +
``dcp.load`` + ``set_state_dict``. Each load is checked (the state is zeroed before, untimed, and its per-shard
sums compared after). Both read a warm page cache: rank 0 reads every file once, untimed, before the loads
(``--no-prewarm`` skips that; the page-cache residency before that read is reported either way).

Per save and load the figure is the slowest rank's (the job goes on when its slowest rank does). Reported values
are medians over every timed round of every repeat, with the min–max of those samples; ratios are ratios of
medians. All files go to a fresh temp dir (``--dir``, default ``$TMPDIR`` or /tmp); the worker removes each
round's checkpoints after measuring them (untimed) and the driver removes the temp dir at the end. The daemon a
launch started is stopped (SIGTERM to the pid in ``<socket>.lock``) right after its launch, also on failure or
SIGTERM. Before that, the daemon's log gives, per save, its own time from the transaction's opening to the commit
and the part of it spent checking and hashing the shared files once every rank's regions are in.
``--daemon-nice N`` starts the daemon (``ckptd serve --nice N``) before each launch instead of letting the ranks
start an embedded one (nice 10).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ckptd import protocol as proto

MiB = 1024**2
HERE = Path(__file__).resolve().parent
WORKER = HERE / "sharded_worker.py"
WORLD = 4
DAEMON_STOP_S = 15.0
SAVE_ROWS = [
    ("ckptd", "ckptd save_async (SHARDED)", "stall", "committed"),
    ("dcp_async", "DCP async_save", "blocking", "durable"),
    ("dcp_save", "DCP save (sync)", "blocking", "durable"),
]
LOAD_ROWS = [
    ("ckptd", "ckptd client.load(path)"),
    ("dcp", "get_state_dict + dcp.load + set_state_dict"),
]


def fail(msg: str, code: int = 2) -> None:
    print(f"sharded.py: error: {msg}", file=sys.stderr)
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


def fmt_range(xs: list[float]) -> str:
    return f"{fmt_s(min(xs))}–{fmt_s(max(xs))}" if len(xs) > 1 else ""


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  " + "  ".join("-" * w for w in widths))
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


# ---------------------------------------------------------------------------------------------- launching


def new_endpoint() -> str:
    rt = proto.runtime_dir()
    proto.ensure_private_dir(rt)
    return f"ipc://{rt}/bench-sharded-{secrets.token_hex(4)}.sock"


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


def stop_daemon(endpoint: str, keep_log: Path | None = None) -> str:
    """SIGTERM the daemon serving ``endpoint`` (if any), wait for it, SIGKILL after DAEMON_STOP_S; remove its
    socket, lock and log (copied to ``keep_log`` first if given). Returns what happened."""
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
            what = f"daemon pid {pid} killed"
        else:
            what = f"daemon pid {pid} stopped"
    path = proto.ipc_path(endpoint)
    if path is not None:
        if keep_log is not None:
            with contextlib.suppress(OSError):
                shutil.copy(path + ".log", keep_log)
        for suffix in ("", ".lock", ".log", ".log.1"):
            with contextlib.suppress(OSError):
                os.unlink(path + suffix)
    return what


TXN_OPENED = re.compile(r"txn (\w+) opened: step (\d+)")
TXN_HASHED = re.compile(r"txn (\w+): checked and hashed \d+ shared file\(s\), (\d+) bytes, in ([\d.]+) s")
TXN_COMMITTED = re.compile(r"committed \S+checkpoint-(\d+) \((\d+) bytes in ([\d.]+) s\)")


def daemon_phases(endpoint: str) -> dict[int, dict[str, float]]:
    """Per step, from the daemon's log: ``hash_s`` (commit-time check and hash of the shared files, after every
    part is written) and ``daemon_s`` (the daemon's own time from the transaction's opening to its commit). Empty
    if the log says neither (its wording is not an interface: the report then leaves these out)."""
    path = proto.ipc_path(endpoint)
    try:
        text = Path(path + ".log").read_text(errors="replace") if path else ""
    except OSError:
        return {}
    steps: dict[str, int] = {}
    out: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        if m := TXN_OPENED.search(line):
            steps[m.group(1)] = int(m.group(2))
        elif (m := TXN_HASHED.search(line)) and m.group(1) in steps:
            out.setdefault(steps[m.group(1)], {})["hash_s"] = float(m.group(3))
        elif m := TXN_COMMITTED.search(line):
            out.setdefault(int(m.group(1)), {})["daemon_s"] = float(m.group(3))
    return out


def start_daemon(endpoint: str, nice: int, output_dir: Path) -> subprocess.Popen:
    """``ckptd serve`` at ``endpoint`` with ``--nice``, logging where an embedded daemon would; returns once it
    has written its lock file (the clients then find it there instead of starting one)."""
    path = proto.ipc_path(endpoint)
    assert path is not None
    cmd = [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, "--nice", str(nice)]
    cmd += ["--output-dir", str(output_dir)]
    with open(path + ".log", "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True
        )
    deadline = time.monotonic() + 60
    while daemon_pid(endpoint) != proc.pid or not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
            raise RuntimeError(f"ckptd serve --nice {nice} did not start: {Path(path + '.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def worker_pids(parent: int) -> list[int]:
    """The rank processes that ``parent`` (a torchrun) started: torchrun puts each rank in a session of its own,
    so killing torchrun's process group would not reach them."""
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


def kill_launch(proc: subprocess.Popen) -> None:
    """Stop a torchrun still running: SIGTERM (it stops its ranks), then SIGKILL to what is left of it and them."""
    if proc.poll() is not None:
        return
    ranks = worker_pids(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (proc.poll() is None or any(is_worker(pid) for pid in ranks)):
        time.sleep(0.1)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        if is_worker(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


LIVE: list[list[Any]] = []  # [torchrun or None, endpoint] of the launch in progress, cleaned up on any exit


def run_launch(r: int, work: Path, args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    tag = f"r{r}"
    out, results = work / tag / "out", work / tag / "results"
    results.mkdir(parents=True, exist_ok=True)
    endpoint = new_endpoint()
    entry: list[Any] = [None, endpoint]
    daemon: subprocess.Popen | None = None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={WORLD}"]
    cmd += [str(WORKER), "--tag", tag, "--out", str(out), "--results", str(results)]
    cmd += ["--mib", str(args.mib), "--saves", str(args.saves), "--repeat", str(r)]
    if args.no_prewarm:
        cmd.append("--no-prewarm")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", proto.ENDPOINT_ENV: endpoint}
    log = results / f"{tag}.log"
    failed: str | None = None
    t_launch = time.time()
    phases: dict[int, dict[str, float]] = {}
    try:
        LIVE.append(entry)
        if args.daemon_nice is not None:
            (out / "ckptd").mkdir(parents=True, exist_ok=True)
            daemon = start_daemon(endpoint, args.daemon_nice, out / "ckptd")
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        entry[0] = proc
        try:
            proc.wait(timeout=args.launch_timeout)
        except subprocess.TimeoutExpired:
            failed = f"still running after {args.launch_timeout:g} s"
            kill_launch(proc)
        if failed is None and proc.returncode != 0:
            failed = f"exited with {proc.returncode}"
    finally:
        t_end = time.time()
        if entry[0] is not None:
            kill_launch(entry[0])
        phases = daemon_phases(endpoint)
        stopped = stop_daemon(endpoint, keep_log=results / "daemon.log" if failed else None)
        if daemon is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(timeout=10)  # stopped above (it is in its own session): reap it
        with contextlib.suppress(ValueError):
            LIVE.remove(entry)
        if args.verbose:
            print(f"\n    {stopped}", end="", flush=True)
    if failed:
        daemon_log = results / "daemon.log"
        tail = log.read_text(errors="replace")[-6000:]
        if daemon_log.exists():
            tail += f"\n===== daemon log =====\n{daemon_log.read_text(errors='replace')[-3000:]}"
        raise RuntimeError(f"launch {tag} {failed}\n===== torchrun output ({log}) =====\n{tail}")
    found = {}
    for rank in range(WORLD):
        path = results / f"{tag}_rank{rank}.json"
        if not path.exists():
            raise RuntimeError(f"launch {tag}: rank {rank} wrote no result\n{log.read_text(errors='replace')[-4000:]}")
        found[rank] = json.loads(path.read_text())
    found[0]["daemon_phases"] = phases
    if args.verbose:
        m = [rec["marks"] for rec in found.values()]
        print(
            f"\n    ranks in main() after {max(x['main'] for x in m) - t_launch:.1f} s, model built "
            f"{max(x['built'] for x in m) - t_launch:.1f} s, client {max(x['client'] for x in m) - t_launch:.1f} s, "
            f"rounds done {max(x['done'] for x in m) - t_launch:.1f} s, launch ended {t_end - t_launch:.1f} s",
            end="",
            flush=True,
        )
    return found


# --------------------------------------------------------------------------------------------- aggregation


PARTS = {"staged_s", "collective_s", "get_state_dict_s"}  # parts of a save: the median over ranks, not the max


def collect(ranks: dict[int, dict[str, Any]], r: int, data: dict[str, Any]) -> None:
    """Per round: the slowest rank's figure of each save and load (the median rank's for the parts of a save),
    appended to ``data``."""
    recs = [ranks[k] for k in sorted(ranks)]
    for i, rnd0 in enumerate(recs[0]["rounds"]):
        rounds = [rec["rounds"][i] for rec in recs]
        row: dict[str, Any] = {"repeat": r, "round": i, "warmup": rnd0["warmup"], "order": rnd0["order"]}
        for m in rnd0["save"]:
            row[f"save:{m}"] = {
                k: (med if k in PARTS else max)([x["save"][m][k] for x in rounds])
                for k in rnd0["save"][m].keys() - {"bytes_staged"}
            }
        row["ckptd_bytes_staged"] = sum(x["save"]["ckptd"]["bytes_staged"] for x in rounds)
        phase = recs[0].get("daemon_phases", {}).get(i + 1, {})  # the worker saves round i as step i + 1
        for k, v in phase.items():
            row["save:ckptd"][f"daemon_{k}" if k == "hash_s" else k] = v
        for m in rnd0["load"]:
            row[f"load:{m}"] = max(x["load"][m]["load_s"] for x in rounds)
        for k in ("disk_bytes", "resident_before_loads", "resident_after_prewarm"):
            if k in rnd0:
                row[k] = rnd0[k]
        data["rounds"].append(row)
    data["state_bytes"] = {
        k: sum(rec["local_bytes"][k] for rec in recs) for k in recs[0]["local_bytes"]
    }  # the same every launch
    data["d"] = recs[0]["d"]


def samples(data: dict[str, Any], key: str, field: str | None = None, warmup: bool = False) -> list[float]:
    out = []
    for row in data["rounds"]:
        if row["warmup"] != warmup or key not in row or (field is not None and field not in row[key]):
            continue
        out.append(row[key][field] if field else row[key])
    return out


def report(data: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    sb = data["state_bytes"]
    total = sb["params"] + sb["moments"]
    timed = sum(1 for row in data["rounds"] if not row["warmup"])
    disk = {m: med([row["disk_bytes"][m] for row in data["rounds"]]) for m, *_ in SAVE_ROWS}
    print(
        f"\nSharded state: {total / MiB:.0f} MiB in all (parameters {sb['params'] / MiB:.0f} MiB + AdamW moments "
        f"{sb['moments'] / MiB:.0f} MiB), FSDP2 over {WORLD} ranks (d = {data['d']}; 4 Linear layers, one of "
        f"{data['d'] + 1} rows), CPU, gloo; medians (min–max) over {timed} timed rounds ({args.repeats} launches × "
        f"{args.saves}), the slowest rank per round"
    )
    rows = []
    for m, name, blk, done in SAVE_ROWS:
        b = samples(data, f"save:{m}", "blocking_s")
        d = samples(data, f"save:{m}", "done_s")
        w = samples(data, f"save:{m}", "done_s", warmup=True)
        rows.append(
            [
                name,
                f"{blk} {fmt_s(med(b))}",
                fmt_range(b),
                f"{done} {fmt_s(med(d))}" if m != "dcp_save" else "= blocking",
                fmt_range(d) if m != "dcp_save" else "",
                f"{disk[m] / MiB:.0f} MiB",
                fmt_s(med(w)),
            ]
        )
    table(
        ["save", "blocks training", "min–max", "until committed/durable", "min–max", "on disk", "warm-up (done)"], rows
    )
    res_before = {m: [row["resident_before_loads"][m] for row in data["rounds"]] for m, _ in LOAD_ROWS}
    rows = []
    for m, name in LOAD_ROWS:
        v = samples(data, f"load:{m}")
        rb = [x for x in res_before[m] if x is not None]
        rows.append(
            [
                name,
                fmt_s(med(v)),
                fmt_range(v),
                f"{min(1.0, med(rb)) * 100:.0f} %" if rb else "—",
                fmt_s(med(samples(data, f"load:{m}", warmup=True))),
            ]
        )
    print()
    table(["load (world 4, same layout)", "time", "min–max", "in page cache before pre-read", "warm-up"], rows)

    def ratio(a: list[float], b: list[float]) -> float:
        return med(a) / med(b)

    ck_b, ck_d = samples(data, "save:ckptd", "blocking_s"), samples(data, "save:ckptd", "done_s")
    ratios = {
        "DCP async_save blocking / ckptd stall": ratio(samples(data, "save:dcp_async", "blocking_s"), ck_b),
        "DCP async_save durable / ckptd committed": ratio(samples(data, "save:dcp_async", "done_s"), ck_d),
        "dcp.save / ckptd stall": ratio(samples(data, "save:dcp_save", "blocking_s"), ck_b),
        "dcp.save / ckptd committed": ratio(samples(data, "save:dcp_save", "blocking_s"), ck_d),
        "dcp.load / ckptd load": ratio(samples(data, "load:dcp"), samples(data, "load:ckptd")),
    }
    print()
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}×")
    gsd = med(samples(data, "save:dcp_async", "get_state_dict_s"))
    staged = med(samples(data, "save:ckptd", "staged_s"))
    coll = med(samples(data, "save:ckptd", "collective_s"))
    print(
        f"  ckptd stall parts (median rank): staged {fmt_s(staged)}, collective {fmt_s(coll)}; "
        f"ckptd staged {med([row['ckptd_bytes_staged'] for row in data['rounds']]) / MiB:.0f} MiB per save (all ranks)"
    )
    hashed = samples(data, "save:ckptd", "daemon_hash_s")
    if hashed and len(hashed) == len(ck_d):
        dmn = samples(data, "save:ckptd", "daemon_s")
        print(
            f"  ckptd daemon (its log): transaction open to commit {fmt_s(med(dmn))}, of which the commit-time check "
            f"and hash of the shared files {fmt_s(med(hashed))}"
            + (f" ({fmt_range(hashed)})" if len(hashed) > 1 else "")
        )
    nice = 10 if args.daemon_nice is None else args.daemon_nice
    print(
        f"  The ckptd daemon writes at nice {nice}{' (its default)' if args.daemon_nice is None else ''}; DCP writes "
        "in the ranks' own threads at their priority."
    )
    print(f"  DCP blocking includes get_state_dict ({fmt_s(gsd)}, median rank).")
    print("  DCP on CPU stages synchronously: async_save's default stager copies the state inside the call; the")
    print("  overlapped stager (StagingOptions(use_async_staging=True)) requires CUDA.")
    if args.no_prewarm:
        print("  Loads: no pre-read (--no-prewarm): each reads whatever of its files the page cache holds (column).")
    else:
        print("  Loads: both read a warm page cache (rank 0 read every file once, untimed, right before), no disk")
        print("  reads; dropping the cache needs root, which the script does not assume. Each load was checked.")
    return ratios


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sharded-state benchmark: ckptd SHARDED save/load vs DCP async_save, save and load on the same "
        "FSDP2 state at world 4 (CPU, gloo; interleaved, medians, ratios).",
    )
    p.add_argument("--repeats", type=int, default=3, help="torchrun launches, order rotating (default 3)")
    p.add_argument("--saves", type=int, default=3, help="timed rounds per launch, after a warm-up round (default 3)")
    p.add_argument("--mib", type=float, default=256, help="parameters + AdamW moments, MiB in all (default 256)")
    p.add_argument("--dir", type=Path, default=None, help="where files are written (a fresh temp dir inside it)")
    p.add_argument("--no-prewarm", action="store_true", help="do not read the checkpoints into the page cache first")
    p.add_argument(
        "--daemon-nice",
        type=int,
        default=None,
        metavar="N",
        help="start the daemon with 'ckptd serve --nice N' before each launch (default: the ranks start an embedded "
        "daemon, nice 10)",
    )
    p.add_argument("--launch-timeout", type=float, default=600, help="seconds one launch may take (default 600)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write every raw value to OUT")
    p.add_argument("-v", "--verbose", action="store_true", help="say what each launch took and the daemon it stopped")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.saves < 1 or args.mib <= 0:
        p.error("--repeats and --saves must be positive, --mib > 0")
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


def check_resources(base: Path, args: argparse.Namespace) -> None:
    # One round's three checkpoints exist at once; RAM: each rank's shards, DCP's staging copy, ckptd's slab.
    need = 3 * args.mib * MiB * 1.2 + 256 * MiB
    free = shutil.disk_usage(base).free
    if free < need:
        fail(f"{base} has {free / MiB:.0f} MiB free; --mib {args.mib:g} needs about {need / MiB:.0f} MiB")
    with contextlib.suppress(OSError, ValueError, IndexError):
        avail = next(int(x.split()[1]) for x in open("/proc/meminfo") if x.startswith("MemAvailable")) * 1024
        if avail < 5 * args.mib * MiB + 2048 * MiB:
            fail(f"{avail / MiB:.0f} MiB of RAM available; --mib {args.mib:g} needs about 5 × that + 2 GiB")


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
    check_resources(base, args)
    work = Path(tempfile.mkdtemp(prefix="ckptd-sharded-bench-", dir=base))
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
        f"ckptd sharded-state benchmark, {env['date']}: {env['cpus']} CPUs ({env['cpus_usable']} usable), "
        f"load {env['loadavg_start'][0]:.2f}, torch {torch.__version__}, Python {env['python']}; "
        f"ckptd {env['ckptd_commit']}; {args.repeats} torchrun launches × (1 warm-up + {args.saves} timed rounds), "
        f"world {WORLD}, order rotating; files in {work}",
        flush=True,
    )
    data: dict[str, Any] = {"rounds": []}
    t_start = time.monotonic()
    try:
        for r in range(args.repeats):
            t0 = time.monotonic()
            print(f"  repeat {r + 1}/{args.repeats} ...", end="", flush=True)
            collect(run_launch(r, work, args), r, data)
            shutil.rmtree(work / f"r{r}", ignore_errors=True)
            print(f" {time.monotonic() - t0:.1f} s", flush=True)
    except RuntimeError as e:
        print(f"\n{e}", file=sys.stderr)
        return 1
    finally:
        for proc, endpoint in list(LIVE):
            if proc is not None:
                kill_launch(proc)
            stop_daemon(endpoint)
        shutil.rmtree(work, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg()
    env["wall_s"] = time.monotonic() - t_start
    ratios = report(data, args)
    print(f"\nload average at the end {env['loadavg_end'][0]:.2f}; wall time {env['wall_s']:.0f} s")
    if args.json is not None:
        out = {
            "environment": env,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "ratios": ratios,
            **data,
        }
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
