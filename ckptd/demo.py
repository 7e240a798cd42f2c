"""``ckptd demo``: async checkpoints, a real crash in the middle of a save, and a bit-exact resume.

Three trainer processes (``python -m client.demo``) run on the embedded daemon:
  1. a reference run without checkpoints records the loss of every step;
  2. a run that checkpoints every few steps and kills itself (SIGKILL) right after handing a save over;
  3. a run that resumes from ``latest`` and must reproduce the reference losses bit for bit.
The daemon finishes the save the crashed trainer handed over; the resume starts from that checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ckptd import format as fmt
from ckptd import protocol as proto


@dataclass
class DemoConfig:
    output_dir: Path | None = None
    steps: int = 30
    save_every: int = 5
    crash_at: int = 20
    width: int = 2048
    keep: bool = False


class Reporter:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)


def run_trainer(args: list[str], env: dict[str, str], rep: Reporter, label: str) -> tuple[int, list[str]]:
    """Run one trainer, relaying its progress; returns (exit code, output lines)."""
    cmd = [sys.executable, "-m", "client.demo", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        text = raw.rstrip("\n")
        lines.append(text)
        parts = text.split()
        if not parts:
            continue
        if parts[0] == "step":
            rep.line(f"  {label} step {int(parts[1]):3d}  loss {float(parts[3]):.6f}")
        elif parts[0] == "saved":
            rep.line(f"  {label} save_async(step={parts[1]}) returned after {float(parts[3]):.1f} ms")
        elif parts[0] == "committed":
            rep.line(f"  {label} committed {Path(parts[1]).name}")
        elif parts[0] == "crash":
            rep.line(
                f"  {label} kill -9 of the trainer now, one step after save_async (the save was handed off at "
                f"that step's optimizer.step()), while ckptd writes checkpoint-{parts[1]}"
            )
        elif parts[0] == "resumed":
            rep.line(f"  {label} load('latest') -> {Path(parts[1]).name}, resuming after step {parts[-1]}")
        elif "Error" in text or "Traceback" in text or "WARNING" in text:
            rep.line(f"  {label} {text}")
    return proc.wait(), lines


def run(cfg: DemoConfig, out: TextIO = sys.stdout) -> int:
    rep = Reporter(out)
    if not 0 < cfg.save_every <= cfg.crash_at < cfg.steps or cfg.crash_at % cfg.save_every:
        rep.line("ckptd demo: need 0 < save_every <= crash_at < steps, crash_at a multiple of save_every")
        return 2
    work = Path(cfg.output_dir) if cfg.output_dir else Path(tempfile.mkdtemp(prefix="ckptd-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "run"
    proto.ensure_private_dir(proto.runtime_dir())
    endpoint = f"ipc://{proto.runtime_dir()}/demo-{os.getpid()}.sock"
    env = {**os.environ, proto.ENDPOINT_ENV: endpoint, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    common = ["--output-dir", str(out_dir), "--steps", str(cfg.steps), "--width", str(cfg.width)]
    rep.line(f"ckptd demo: {cfg.steps} training steps, checkpoint every {cfg.save_every}, crash at {cfg.crash_at}")
    rep.line(f"  output {out_dir}, daemon endpoint {endpoint} (started by the trainer: embedded mode)")

    rep.line("[1/3] reference run, no checkpoints")
    t0 = time.perf_counter()
    ref_file = work / "losses-reference.json"
    rc, _ = run_trainer([*common, "--no-checkpoint", "--losses", str(ref_file)], env, Reporter(_Null()), "ref")
    if rc != 0:
        rep.line(f"  reference run failed with exit code {rc}")
        return 1
    reference = {int(k): v for k, v in json.loads(ref_file.read_text()).items()}
    rep.line(f"  {len(reference)} steps in {time.perf_counter() - t0:.1f} s")

    rep.line(f"[2/3] training with async checkpoints; the trainer kills itself at step {cfg.crash_at}")
    crash_file = work / "losses-crashed.json"
    rc, _ = run_trainer(
        [*common, "--save-every", str(cfg.save_every), "--crash-at", str(cfg.crash_at), "--losses", str(crash_file)],
        env,
        rep,
        "train ",
    )
    if rc != -signal.SIGKILL:
        rep.line(f"  expected the trainer to die by SIGKILL, it exited with {rc}")
        return 1
    rep.line("  trainer died (SIGKILL); waiting for ckptd to commit what it was handed")
    deadline = time.monotonic() + 120
    latest = None
    while time.monotonic() < deadline:
        latest = fmt.find_latest_checkpoint(out_dir)
        if latest is not None and latest.name == fmt.checkpoint_dirname(cfg.crash_at):
            break
        time.sleep(0.1)
    steps = [c.step for c in fmt.scan_checkpoints(out_dir)[0]]
    rep.line(f"  committed checkpoints: {', '.join(fmt.checkpoint_dirname(s) for s in steps) or 'none'}")
    if latest is None or latest.name != fmt.checkpoint_dirname(cfg.crash_at):
        rep.line(f"  checkpoint-{cfg.crash_at} was not committed after the crash")
        return 1
    result = fmt.verify_checkpoint(latest)
    rep.line(f"  verify {latest.name}: {'OK' if result else 'FAILED'} ({result.files_checked} files)")
    if not result:
        rep.line(str(result))
        return 1

    rep.line("[3/3] resume from 'latest' in a fresh process")
    resume_file = work / "losses-resumed.json"
    rc, _ = run_trainer(
        [*common, "--save-every", str(cfg.save_every), "--losses", str(resume_file)], env, rep, "resume"
    )
    if rc != 0:
        rep.line(f"  resumed run failed with exit code {rc}")
        return 1
    resumed = {int(k): v for k, v in json.loads(resume_file.read_text()).items()}
    compared = [s for s in sorted(resumed) if s > cfg.crash_at]
    mismatched = [s for s in compared if resumed[s] != reference.get(s)]
    if mismatched or not compared:
        s = mismatched[0] if mismatched else None
        rep.line(f"  MISMATCH at step {s}: resumed {resumed.get(s)} vs reference {reference.get(s)}")
        return 1
    rep.line(
        f"  resumed at step {cfg.crash_at + 1}; losses of steps {compared[0]}-{compared[-1]} equal the "
        f"uninterrupted run bit for bit ({len(compared)}/{len(compared)})"
    )
    rep.line(f"ckptd demo: OK. Checkpoints are in {out_dir / fmt.CHECKPOINTS_DIRNAME}; try 'ckptd ls {out_dir}'")
    # The private daemon exits by itself once idle; its log is only worth keeping when something failed.
    with contextlib.suppress(OSError):
        os.unlink(f"{proto.ipc_path(endpoint)}.log")
    return 0


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass
