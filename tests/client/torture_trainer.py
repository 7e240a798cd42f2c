"""The trainer that tests/test_torture.py kills with SIGKILL at random instants.

Every tensor of its state holds the step it belongs to (the model's parameters, a blob, an int64 counter),
so any committed checkpoint can be checked to hold exactly its own step's values. It resumes from
``load("latest")``, checks that what it loaded holds the resumed step everywhere, then saves every step
through an embedded daemon (endpoint from $CKPTD_ENDPOINT) until it is killed. Progress goes to stdout,
one line per event, flushed at once:

    RESUMED <step> ok | RESUMED <step> BAD <what>     after load("latest") (step 0: nothing to resume)
    SAVED <step>                                      save_async returned (the hand-off is done)
    COMMITTED <step> <path> | ABORTED <step> <reason> a handle settled
    SAVEFAIL <step> <reason>                          save_async raised
    DONE                                              with --steps N: N saves settled, client closed

Python plus torch take seconds to start on the 2-core CI machine, more than a whole torture round, so the
test runs this file once as a *zygote* (``--zygote``): it imports torch and the client once, then forks one
trainer per round on request (a JSON line on stdin naming the arguments and the output file; it answers
with the child's pid). Each trainer is a real process with its own pid, sockets, slab and daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback

import torch

from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent


class Blob:
    def __init__(self, n: int) -> None:
        self.tensor = torch.zeros(n, dtype=torch.float32)
        self.counter = torch.zeros((), dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"tensor": self.tensor, "counter": self.counter, "note": "torture"}

    def load_state_dict(self, state: dict) -> None:
        self.tensor = state["tensor"]
        self.counter = state["counter"]


def fill(model: torch.nn.Module, blob: Blob, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
        blob.tensor.fill_(float(step))
        blob.counter.fill_(step)


def mismatch(model: torch.nn.Module, blob: Blob, step: int) -> str | None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {"blob.tensor": blob.tensor, "blob.counter": blob.counter}
    for name, t in tensors.items():
        if not bool((t == step).all()):
            return f"{name} holds {sorted(set(t.flatten().tolist()))[:5]}, expected {step}"
    return None


def say(line: str) -> None:
    sys.stdout.write(line.replace("\n", " ") + "\n")
    sys.stdout.flush()


def train(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--blob-kib", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=2, help="save_total_limit")
    ap.add_argument("--timeout", type=float, default=10.0, help="timeout_s of every save")
    ap.add_argument("--pause", type=float, default=0.02, help="seconds of 'training' between saves")
    ap.add_argument("--steps", type=int, default=0, help="save this many steps, then close and exit (0: until killed)")
    ap.add_argument("--max-s", type=float, default=60.0, help="give up (exit 3) if not killed by then")
    args = ap.parse_args(argv)

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    blob = Blob(args.blob_kib * 1024 // 4)
    comps = [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("blob", blob, SharingPattern.GLOBAL),
    ]
    client = CheckpointClient(args.out, comps, save_total_limit=args.limit, timeout_s=args.timeout)
    path = client.load("latest")
    resumed = 0
    if path is not None:
        resumed = int(path.name.rsplit("-", 1)[1])
        bad = mismatch(model, blob, resumed)
        say(f"RESUMED {resumed} " + (f"BAD {bad}" if bad else "ok"))
    else:
        say("RESUMED 0 ok")
    pending = []
    step = resumed
    deadline = time.monotonic() + args.max_s
    while time.monotonic() < deadline:
        if args.steps and step == resumed + args.steps:
            for h in pending:
                try:
                    say(f"COMMITTED {h.step} {h.wait(args.max_s)}")
                except CheckpointError as e:
                    say(f"ABORTED {h.step} {e}")
            client.close()
            say("DONE")
            return 0
        step += 1
        fill(model, blob, step)
        try:
            pending.append(client.save_async(step, metadata={"step": step}))
            say(f"SAVED {step}")
        except CheckpointError as e:
            say(f"SAVEFAIL {step} {e}")
        for h in [h for h in pending if h.done()]:
            pending.remove(h)
            try:
                say(f"COMMITTED {h.step} {h.wait(0)}")
            except CheckpointError as e:
                say(f"ABORTED {h.step} {e}")
        time.sleep(args.pause)
    say("NOT KILLED")
    return 3


def zygote() -> int:
    """Fork one trainer per request line: {"args": [...], "out": path}; answers the child's pid."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children: no zombies
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the trainer waits for its own children
                out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, 1)
                os.dup2(out, 2)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                code = train(req["args"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        sys.exit(zygote())
    sys.exit(train(sys.argv[1:]))
