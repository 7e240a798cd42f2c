"""Random kill -9 torture of trainer and daemon (DESIGN.md §5, §9; issue 5 "Must show").

Rounds of: a trainer (tests/client/torture_trainer.py, embedded daemon) resumes from ``load("latest")`` and
saves every step, each tensor filled with its step; at a random instant it is SIGKILLed, in some rounds
together with the daemon, or the daemon just before or just after it. After every round:

- the step a trainer resumes from is the newest committed step, and never goes backwards across rounds;
- every ``checkpoint-*`` verifies and holds exactly its own step's values (no other step's bytes, no mix);
- ``find_latest_checkpoint`` names the highest committed step;
- temp and trash entries left by the crash are gone once a daemon has started and a save has committed;
- no staging memory leaks: no /dev/shm slab of ours that no live process uses, and no slab (/dev/shm or
  memfd) of a dead trainer kept by a live process once the daemon has nothing in flight.

``CKPTD_TORTURE_ROUNDS`` (default 20) and ``CKPTD_TORTURE_SEED`` (default fixed) reproduce a run; the
failure message names the seed, each round, its kill plan and what broke.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ckptd import ownership
from client import find_latest_checkpoint
from tests import invariants as inv

ROUNDS = int(os.environ.get("CKPTD_TORTURE_ROUNDS", "20"))
SEED = int(os.environ.get("CKPTD_TORTURE_SEED", "5012026"))
BLOB_KIB = 2048  # + a small model: a few MiB of state, so 20 rounds fit in well under 90 s on 2 cores
LIMIT = 2  # save_total_limit: retention runs on nearly every commit
TXN_TIMEOUT_S = 8.0
TRAINER = Path(__file__).resolve().parent / "client" / "torture_trainer.py"
# The default timeout of a round's long waits: a hung daemon or trainer fails the round, never the CI job.
STUCK_S = 25.0
# How long a daemon may take to drop a dead trainer's slab once it has nothing in flight (it looks every 0.25 s).
LEAK_GRACE_S = 2.0

pytestmark = pytest.mark.timeout(60 + 20 * ROUNDS)


# ----------------------------------------------------------------------------------------- kill plans

MODES = (
    ("trainer", 0.35),  # the daemon outlives the trainer and finishes what was handed over
    ("both", 0.25),  # daemon and trainer at the same instant
    ("trainer-then-daemon", 0.2),  # the daemon dies while finishing the dead trainer's saves
    ("daemon-then-trainer", 0.2),  # the trainer sees its daemon die, may start another, then dies
)


@dataclass
class Plan:
    mode: str
    anchor: int  # 0: ``delay`` after the trainer process starts; k: ``delay`` after its k-th save_async returned
    delay: float
    gap: float  # between the two kills of a two-kill mode
    pause: float  # the trainer's "training" between saves: 0 hands saves over back to back

    @classmethod
    def draw(cls, rng: random.Random) -> Plan:
        mode = rng.choices([m for m, _ in MODES], [w for _, w in MODES])[0]
        pause = rng.choice((0.0, 0.005, 0.02))
        if rng.random() < 0.2:  # during start-up: client init, daemon start, load, the first staging
            return cls(mode, 0, rng.uniform(0.0, 1.2), rng.uniform(0.0, 0.3), pause)
        return cls(mode, rng.randint(1, 6), rng.uniform(0.0, 0.15), rng.uniform(0.0, 0.3), pause)

    def __str__(self) -> str:
        at = "after start" if self.anchor == 0 else f"after save_async #{self.anchor} returned"
        gap = f", second kill {self.gap * 1000:.0f} ms later" if "-then-" in self.mode else ""
        return f"kill {self.mode} {self.delay * 1000:.0f} ms {at}{gap}; saves {self.pause * 1000:.0f} ms apart"


class Stuck(Exception):
    """A round cannot go on (a trainer died on its own, hung, or survived SIGKILL): the torture stops there."""


# ------------------------------------------------------------------------------------------ processes


class Zygote:
    """torture_trainer.py --zygote: imports torch once, forks a trainer per round (see its docstring)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(TRAINER), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def fork(self, args: list[str], out: Path) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"args": args, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            raise AssertionError(f"the trainer zygote did not fork (rc={self.proc.poll()}): {self.log.name}")
        return int(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


@dataclass
class Trainer:
    pid: int
    out: Path
    started: float = field(default_factory=time.monotonic)
    gone: bool = False  # seen dead (its pid may be reused from then on)

    def lines(self) -> list[str]:
        try:
            return self.out.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def events(self, kind: str) -> list[list[str]]:
        return [ln.split(" ", 2) for ln in self.lines() if ln == kind or ln.startswith(kind + " ")]

    def tail(self, n: int = 15) -> str:
        return "\n    ".join(self.lines()[-n:])


# ------------------------------------------------------------------------------------------ the test


@dataclass
class Torture:
    endpoint: str
    output_dir: Path
    tmp: Path
    rng: random.Random
    zygote: Zygote
    trainers: list[Trainer] = field(default_factory=list)
    daemons: set[int] = field(default_factory=set)
    preexisting_slabs: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    commits: int = 0  # saves the trainers were told committed
    max_reported: int = 0  # the highest step a trainer was told committed
    reported_stale: set[str] = field(default_factory=set)

    # -- helpers --------------------------------------------------------------------------------------

    def is_mine(self, name: str) -> bool:
        if name in self.preexisting_slabs:
            return False
        return inv.creator_pid(name) in {t.pid for t in self.trainers} | {os.getpid()}

    def live_daemon(self) -> int | None:
        pid = inv.daemon_pid(self.endpoint)
        if pid is not None:
            self.daemons.add(pid)
        return pid

    def kill(self, pid: int | None) -> list[int]:
        if pid is None or inv.process_gone(pid):
            return []
        os.kill(pid, signal.SIGKILL)
        return [pid]

    def checkpoint_problems(self) -> list[str]:
        """Every checkpoint-<step> verifies and holds exactly <step> in every tensor."""
        problems = []
        for step in inv.committed_steps(self.output_dir):
            path = self.output_dir / "checkpoints" / f"checkpoint-{step}"
            problems += inv.checkpoint_problems(path, step, inv.filled_with(step))
        return problems

    def slab_leaks(self) -> list[str]:
        """Slabs of this test still held or lying in /dev/shm, with every trainer dead and the daemon idle.

        With a daemon of ours alive, it gets a short grace to drop a dead trainer's slab (it looks every
        0.25 s). With none alive, nothing of ours can clean up any more, so the first look decides: a later
        look could miss an orphan that another job's daemon on this machine swept in the meantime."""
        leaks = inv.slab_leaks(self.is_mine, may_hold=set(), watch=self.daemons)
        deadline = time.monotonic() + LEAK_GRACE_S
        while leaks and self.live_daemon() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
            leaks = inv.slab_leaks(self.is_mine, may_hold=set(), watch=self.daemons)
        return leaks

    def start_trainer(self, name: str, extra: tuple[str, ...] | list[str] = ()) -> Trainer:
        args = ["--out", str(self.output_dir), "--blob-kib", str(BLOB_KIB), "--limit", str(LIMIT)]
        args += ["--timeout", str(TXN_TIMEOUT_S), *extra]
        out = self.tmp / f"trainer-{name}.out"
        t = Trainer(self.zygote.fork(args, out), out)
        self.trainers.append(t)
        return t

    # -- one round ------------------------------------------------------------------------------------

    def round(self, r: int, previous_latest: int, leftovers: list[str]) -> tuple[int, list[str]]:
        plan = Plan.draw(self.rng)
        where = f"round {r} ({plan})"

        def broke(what: str) -> None:
            self.violations.append(f"{where}: {what}")

        t = self.start_trainer(str(r), ["--pause", str(plan.pause)])

        # Wait for the kill instant.
        deadline = time.monotonic() + STUCK_S
        while plan.anchor and len(t.events("SAVED")) < plan.anchor:
            if inv.process_gone(t.pid):
                t.gone = True
                raise Stuck(f"{where}: the trainer exited on its own:\n    {t.tail()}")
            if time.monotonic() > deadline:
                raise Stuck(f"{where}: no save_async #{plan.anchor} within {STUCK_S} s:\n    {t.tail()}")
            time.sleep(0.003)
        time.sleep(max(0.0, plan.delay - ((time.monotonic() - t.started) if plan.anchor == 0 else 0.0)))

        killed: list[int] = []
        if plan.mode == "trainer":
            killed += self.kill(t.pid)
        elif plan.mode == "both":
            killed += self.kill(self.live_daemon())
            killed += self.kill(t.pid)
        elif plan.mode == "trainer-then-daemon":
            killed += self.kill(t.pid)
            time.sleep(plan.gap)
            killed += self.kill(self.live_daemon())
        else:
            killed += self.kill(self.live_daemon())
            time.sleep(plan.gap)
            killed += self.kill(t.pid)
        if t.pid not in killed:
            t.gone = True
            raise Stuck(f"{where}: the trainer had exited before the kill:\n    {t.tail()}")
        still = inv.wait_gone(killed, 10.0)
        if still:
            raise Stuck(f"{where}: pids {still} survived SIGKILL for 10 s")
        t.gone = True

        # What the trainer saw.
        resumed = t.events("RESUMED")
        if resumed:
            step, verdict = int(resumed[0][1]), resumed[0][2]
            if verdict != "ok":
                broke(f"load('latest') restored checkpoint-{step} with wrong values: {verdict}")
            if step != previous_latest:
                broke(f"the trainer resumed from step {step}, the newest committed step was {previous_latest}")
        elif plan.anchor:
            broke(f"the trainer saved without reporting its resume:\n    {t.tail()}")
        committed_here = t.events("COMMITTED")
        self.commits += len(committed_here)
        self.max_reported = max([self.max_reported, *(int(e[1]) for e in committed_here)])

        # Let a surviving daemon finish what was handed over (it must, within the save timeout).
        daemon = self.live_daemon()
        if daemon is not None:
            problem = inv.wait_daemon_idle(self.endpoint, TXN_TIMEOUT_S + 10)
            if problem:
                broke(problem)
                self.kill(daemon)
                inv.wait_gone([daemon], 10.0)

        # Committed checkpoints: each verifies and holds its own step; latest only moves forward.
        for p in self.checkpoint_problems():
            broke(p)
        steps = inv.committed_steps(self.output_dir)
        latest = steps[-1] if steps else 0
        if latest < self.max_reported:
            broke(f"a trainer was told step {self.max_reported} committed, the newest checkpoint is {latest}")
        if latest < previous_latest:
            broke(f"the newest committed step went back from {previous_latest} to {latest} (left: {steps})")
        found = find_latest_checkpoint(self.output_dir)
        if (found.name if found else None) != (f"checkpoint-{latest}" if steps else None):
            broke(f"find_latest_checkpoint gives {found}, the highest committed step is {latest}")

        # The previous crash's temp/trash entries are gone once a daemon started and a save committed.
        # (Tombstones and veto records may stay until their save's deadline is past on every node; the
        # final check makes sure a sweep removes them then.)
        if committed_here:
            stale = sorted(set(leftovers) & set(inv.leftovers(self.output_dir)) - self.reported_stale)
            if stale:
                self.reported_stale.update(stale)  # each once: it would show again in every later round
                named = inv.describe_entries(self.output_dir, stale)
                broke(f"stale entries survived a daemon start and a commit: {named}")

        # No staging memory outlives its users: every trainer of this test is dead now.
        for leak in self.slab_leaks():
            broke(leak)
        # Count each leak once: the next round starts from a clean /dev/shm.
        inv.remove_orphaned_shm(self.is_mine)

        return max(latest, previous_latest), inv.leftovers(self.output_dir)

    def run(self) -> None:
        """ROUNDS rounds of kills, then a trainer that is not killed: it resumes the newest step bit-exactly,
        saves twice, closes, and leaves nothing behind."""
        latest, leftovers = 0, []
        for r in range(1, ROUNDS + 1):
            latest, leftovers = self.round(r, latest, leftovers)

        final = self.start_trainer("final", ["--steps", "2"])
        if inv.wait_gone([final.pid], 60.0):
            raise Stuck(f"the final trainer did not finish within 60 s:\n    {final.tail()}")
        final.gone = True
        if not final.events("DONE"):
            raise Stuck(f"the final trainer failed:\n    {final.tail()}")
        resumed = final.events("RESUMED")[:1]
        if [e[1:] for e in resumed] != [[str(latest), "ok"]]:
            self.violations.append(f"final resume: {resumed}; the newest committed step is {latest}")
        if [int(e[1]) for e in final.events("COMMITTED")] != [latest + 1, latest + 2]:
            self.violations.append(f"final saves did not both commit:\n    {final.tail()}")
        self.violations += [f"after the final saves: {p}" for p in self.checkpoint_problems()]
        if inv.committed_steps(self.output_dir)[-LIMIT:] != [latest + 1, latest + 2]:
            self.violations.append(f"after the final saves: checkpoints {inv.committed_steps(self.output_dir)}")
        if inv.leftovers(self.output_dir):
            self.violations.append(f"after the final saves: temp/trash entries {inv.leftovers(self.output_dir)}")
        never = inv.markers_never_swept(self.output_dir, ownership.SWEEP_MARGIN_S + TXN_TIMEOUT_S + 60)
        if never:
            self.violations.append(f"tombstones/veto records no sweep would ever remove: {never[:5]} ({len(never)})")
        self.violations += [f"after the final saves: {leak}" for leak in self.slab_leaks()]


@pytest.fixture
def torture(endpoint: str, output_dir: Path, tmp_path: Path) -> Iterator[Torture]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CKPTD_ENDPOINT": endpoint, "PYTHONUNBUFFERED": "1"}
    t = Torture(
        endpoint=endpoint,
        output_dir=output_dir,
        tmp=tmp_path,
        rng=random.Random(SEED),
        zygote=Zygote(env, tmp_path / "zygote.log"),
        preexisting_slabs=set(inv.shm_slabs()),
    )
    try:
        yield t
    finally:
        # Only pids that may still be ours: a trainer seen dead may have had its pid reused since.
        for tr in t.trainers:
            if not tr.gone:
                inv.kill_if_ours(tr.pid, TRAINER.name)
        t.zygote.close()
        for pid in t.daemons:
            inv.kill_if_ours(pid, endpoint)
        inv.wait_gone([tr.pid for tr in t.trainers] + sorted(t.daemons), 10.0)
        inv.remove_orphaned_shm(t.is_mine)


def test_random_sigkill_of_trainer_and_daemon_never_loses_corrupts_or_leaks(torture: Torture) -> None:
    t = torture
    try:
        t.run()
    except Stuck as e:
        t.violations.append(f"the torture stopped: {e}")
    if t.violations:
        pytest.fail(
            f"{len(t.violations)} violation(s) in {ROUNDS} rounds (CKPTD_TORTURE_SEED={SEED}):\n"
            + "\n".join(t.violations[:60])
            + (f"\n... and {len(t.violations) - 60} more" if len(t.violations) > 60 else ""),
            pytrace=False,
        )
    assert t.commits >= ROUNDS // 2, (
        f"only {t.commits} saves committed in {ROUNDS} rounds: the kills came too early to test anything"
    )
