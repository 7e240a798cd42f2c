"""The ``ckptd`` command line, run for real: ``python -m ckptd ...`` subprocesses against checkpoints written
by the real client through a real ``python -m ckptd serve`` daemon. No mocks.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zmq
from safetensors.torch import load_file

from ckptd import format as fmt
from ckptd import ownership
from ckptd import protocol as proto
from client import CheckpointClient, SharingPattern, StateComponent
from tests.ckptd.harness import running_daemon

pytestmark = pytest.mark.timeout(120)

SUBCOMMANDS = ("serve", "ls", "inspect", "verify", "gc", "status", "export")


def ckptd(*args: str | os.PathLike, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def unused_endpoint() -> str:
    proto.ensure_private_dir(proto.runtime_dir())
    return f"ipc://{proto.runtime_dir()}/cli-none-{secrets.token_hex(4)}.sock"


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


@dataclass
class Saved:
    endpoint: str
    out: Path  # steps 1 and 2; model GLOBAL (HF shards), optimizer GLOBAL, extra PER_RANK
    model_state: dict[str, torch.Tensor]  # the model as saved at step 2
    generic_out: Path  # step 5 with the model saved PER_RANK (a generic file, not HF layout)

    def ckpt(self, step: int) -> Path:
        return fmt.checkpoints_root(self.out) / fmt.checkpoint_dirname(step)


@pytest.fixture(scope="module")
def daemon() -> Iterator[str]:
    """A ``python -m ckptd serve`` process for this module, stopped at the end."""
    with running_daemon("cli") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def saved(daemon: str, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("cli") / "out"
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    extra = {"seen": torch.arange(5), "note": "hello"}

    class Extra:
        def state_dict(self) -> dict:
            return extra

        def load_state_dict(self, sd: dict) -> None:
            extra.update(sd)

    comps = [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("optimizer", opt, SharingPattern.GLOBAL),
        StateComponent("extra", Extra(), SharingPattern.PER_RANK),
    ]
    # A small shard limit, so the model is split over several HF shards.
    with CheckpointClient(out, comps, endpoint=daemon, max_shard_size=1024) as c:
        for step in (1, 2):
            model(torch.randn(4, 16)).pow(2).mean().backward()
            opt.step()
            c.save_async(step, metadata={"loss": 0.5 / step}).wait(30)
    model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    generic_out = tmp_path_factory.mktemp("cli") / "generic"
    with CheckpointClient(
        generic_out, [StateComponent("model", make_model(), SharingPattern.PER_RANK)], endpoint=daemon
    ) as c:
        c.save_async(5).wait(30)
    return Saved(daemon, out, model_state, generic_out)


def copy_out(saved: Saved, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(saved.out, dst)
    return dst


def dead_process() -> ownership.ProcessIdentity:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    me = ownership.ProcessIdentity.of_pid(proc.pid)
    proc.wait()
    assert me is not None
    return me


def make_dir(path: Path, age_s: float = 0.0) -> Path:
    path.mkdir()
    (path / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


# ------------------------------------------------------------------------------------------- the tests


def test_help_lists_every_subcommand() -> None:
    r = ckptd("--help")
    assert r.returncode == 0, r.stderr
    for name in SUBCOMMANDS:
        assert name in r.stdout, f"{name} missing from --help:\n{r.stdout}"
    assert "Exit codes" in r.stdout
    assert ckptd().returncode == 2  # no subcommand: usage error


def test_ls_lists_steps_and_flags_temp_trash_and_broken(saved: Saved, tmp_path: Path) -> None:
    out = copy_out(saved, tmp_path)
    root = fmt.checkpoints_root(out)
    make_dir(root / fmt.temp_dirname(3, "abc123"))
    make_dir(root / fmt.trash_dirname(1, "ff00"))
    broken = root / fmt.checkpoint_dirname(9)
    broken.mkdir()
    (broken / fmt.MANIFEST_NAME).write_text("{not json")

    r = ckptd("ls", out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["STEP", "SIZE", "AGE", "COMPONENTS"]
    assert [ln.split()[0] for ln in lines[1:3]] == ["1", "2"]  # newest last
    assert "model,optimizer,extra" in lines[1]
    temp = next(ln for ln in lines if ".tmp-checkpoint-3-abc123" in ln)
    assert "in flight / stale" in temp
    assert any(".trash-checkpoint-1-ff00" in ln for ln in lines)
    bad = next(ln for ln in lines if "checkpoint-9" in ln)
    assert "BROKEN" in bad and "not valid JSON" in bad

    r = ckptd("ls", out, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [c["step"] for c in data["checkpoints"]] == [1, 2]
    assert data["checkpoints"][0]["components"] == ["model", "optimizer", "extra"]
    assert [t["name"] for t in data["temp"]] == [".tmp-checkpoint-3-abc123"]
    assert data["temp"][0]["txn"] == "abc123" and data["temp"][0]["step"] == 3
    assert [t["name"] for t in data["trash"]] == [".trash-checkpoint-1-ff00"]
    assert [Path(b["path"]).name for b in data["broken"]] == ["checkpoint-9"]

    # The checkpoints dir itself is accepted too.
    r = ckptd("ls", root, "--json")
    assert r.returncode == 0 and [c["step"] for c in json.loads(r.stdout)["checkpoints"]] == [1, 2]


def test_ls_bad_paths_exit_2(saved: Saved, tmp_path: Path) -> None:
    r = ckptd("ls", tmp_path / "nope")
    assert r.returncode == 2 and "no such directory" in r.stderr
    r = ckptd("ls", tmp_path)
    assert r.returncode == 2 and "checkpoints/" in r.stderr
    r = ckptd("ls", saved.ckpt(1))
    assert r.returncode == 2 and "is a checkpoint" in r.stderr


def test_inspect_shows_header_components_and_files(saved: Saved) -> None:
    ckpt = saved.ckpt(2)
    r = ckptd("inspect", ckpt)
    assert r.returncode == 0, r.stderr
    manifest = fmt.read_manifest(ckpt)
    for text in ("ckptd/1", manifest.txn, "world size", '"loss": 0.25', "Hugging Face layout", "per_rank"):
        assert text in r.stdout, f"{text!r} missing:\n{r.stdout}"
    for key in ("model", "optimizer", "extra"):
        assert any(ln.split()[:1] == [key] for ln in r.stdout.splitlines()), key
    for rec in manifest.files.values():
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(rec.path + " "))
        assert str(rec.size) in line and rec.checksum in line
    assert sum(p.startswith("model-0") for p in manifest.files) > 1  # several shards

    r = ckptd("inspect", ckpt, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((ckpt / fmt.MANIFEST_NAME).read_text())

    r = ckptd("inspect", saved.out)
    assert r.returncode == 2 and "is an output dir" in r.stderr


def test_verify_good_flipped_byte_truncated_and_not_a_checkpoint(saved: Saved, tmp_path: Path) -> None:
    r = ckptd("verify", saved.ckpt(2))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout

    out = copy_out(saved, tmp_path)
    ckpt = fmt.checkpoints_root(out) / fmt.checkpoint_dirname(2)
    victim = ckpt / "optimizer_state.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    r = ckptd("verify", ckpt)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "optimizer_state.safetensors" in r.stdout and "checksum mismatch" in r.stdout
    assert "damaged" in r.stderr
    assert ckptd("verify", ckpt, "--size-only").returncode == 0  # same size: only the checksum sees it

    r = ckptd("verify", ckpt, "--json")
    result = json.loads(r.stdout)
    assert r.returncode == 1 and not result["ok"] and len(result["problems"]) == 1

    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4)
    r = ckptd("verify", ckpt, "--size-only")
    assert r.returncode == 1 and shard.name in r.stdout and "size mismatch" in r.stdout
    r = ckptd("verify", ckpt)
    assert r.returncode == 1 and shard.name in r.stdout and victim.name in r.stdout

    r = ckptd("verify", tmp_path)  # a directory, not a checkpoint
    assert r.returncode == 2 and "not a committed ckptd checkpoint" in r.stderr
    r = ckptd("verify", tmp_path / "missing")
    assert r.returncode == 2 and "no such directory" in r.stderr
    temp = make_dir(fmt.checkpoints_root(out) / fmt.temp_dirname(4, "dead"))
    r = ckptd("verify", temp)
    assert r.returncode == 2 and "temporary directory" in r.stderr


def test_verify_progress_on_request(saved: Saved) -> None:
    r = ckptd("verify", saved.ckpt(1), "--progress")
    assert r.returncode == 0, r.stderr
    assert "verifying checkpoint-1:" in r.stderr and "100%" in r.stderr


def test_gc_without_daemon_removes_what_dead_owners_left_and_keeps_the_rest(saved: Saved, tmp_path: Path) -> None:
    out = copy_out(saved, tmp_path)
    root = fmt.checkpoints_root(out)
    old = make_dir(root / fmt.temp_dirname(3, "old1"), age_s=7200)  # an older ckptd's: no owner record
    young = make_dir(root / fmt.temp_dirname(4, "young1"))
    dead = make_dir(root / fmt.temp_dirname(5, "dead1"))
    ownership.write_temp_owner(root, 5, "dead1", dead_process(), None, time.time() + 300)
    alive = make_dir(root / fmt.temp_dirname(6, "alive1"))
    ownership.write_temp_owner(root, 6, "alive1", ownership.ProcessIdentity.current(), None, time.time() + 300)
    trash = make_dir(root / fmt.trash_dirname(1, "beef"))
    ep = unused_endpoint()

    r = ckptd("gc", out, "--timeout", "0.3", "--endpoint", ep, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"would remove {dead.name}" in r.stdout and "is no longer running" in r.stdout
    assert old.exists() and dead.exists() and trash.exists()

    r = ckptd("gc", out, "--timeout", "0.3", "--endpoint", ep)
    assert r.returncode == 0, r.stderr
    assert "no daemon answered" in r.stderr
    assert not old.exists() and not trash.exists() and not dead.exists() and young.exists() and alive.exists()
    assert f"removed {old.name}" in r.stdout and f"removed {trash.name}" in r.stdout
    assert f"kept {young.name}" in r.stdout and "--min-age" in r.stdout
    assert f"kept {alive.name}: owned by" in r.stdout

    r = ckptd("gc", out, "--timeout", "0.3", "--endpoint", ep, "--force")
    assert r.returncode == 0, r.stderr
    assert not young.exists() and alive.exists()
    assert sorted(os.listdir(root)) == sorted(["checkpoint-1", "checkpoint-2", alive.name, alive.name + ".owner"])
    assert ckptd("verify", root / "checkpoint-1").returncode == 0
    assert ckptd("verify", root / "checkpoint-2").returncode == 0


def test_status_and_gc_with_a_live_transaction(saved: Saved, tmp_path: Path) -> None:
    """A transaction left open (rank 1 of 2 never stages): status lists it, gc keeps its temp dir and
    removes the others, young as they are, because the daemon says they are not live."""
    out = copy_out(saved, tmp_path)
    root = fmt.checkpoints_root(out)
    txn = "clilive" + secrets.token_hex(4)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(saved.endpoint)

    def request(msg_type: proto.MsgType, req_id: int, **body: object) -> tuple[proto.MsgType, dict]:
        sock.send(proto.pack(msg_type, req_id, **body))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sock.poll(1000):
                t, rid, b = proto.unpack(sock.recv())
                if rid == req_id:
                    return t, b
        raise AssertionError(f"no reply to {msg_type.value}")

    try:
        t, body = request(
            proto.MsgType.STAGE, 1, txn=txn, output_dir=str(out.resolve()), step=7, rank=0, world_size=2,
            expected_ranks=[0, 1], timeout_s=60.0, pid=os.getpid(), segment="ckptd-cli-test", segment_fd=0,
            segment_ino=1, segment_size=0, files=[], commit=None,
        )  # fmt: skip
        assert t == proto.MsgType.ACCEPTED, body
        live = root / fmt.temp_dirname(7, txn)
        deadline = time.monotonic() + 10
        while not live.exists():  # the daemon sweeps the output dir, then creates the temp dir
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stale = make_dir(root / fmt.temp_dirname(8, "stale1"))
        ownership.write_temp_owner(root, 8, "stale1", dead_process(), None, time.time() + 300)
        trash = make_dir(root / fmt.trash_dirname(2, "cafe"))

        r = ckptd("status", "--endpoint", saved.endpoint)
        assert r.returncode == 0, r.stderr
        assert "in flight    1 save(s)" in r.stdout
        assert f"step 7  txn {txn}  open  ranks 1/2" in r.stdout
        assert "commits 3" in r.stdout
        assert "last commit  " + str(fmt.checkpoints_root(saved.generic_out)) in r.stdout
        assert "serves       " in r.stdout and f"  {out.resolve()}" in r.stdout, r.stdout
        # --watch redraws until Ctrl-C, which ends it with exit 0.
        watch = subprocess.Popen(
            [sys.executable, "-m", "ckptd", "status", "--endpoint", saved.endpoint, "--watch", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # pytest-xdist workers ignore SIGINT, and an ignored signal stays ignored across exec: give the
            # child the default, as a terminal's Ctrl-C would find it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(2.0)
        watch.send_signal(signal.SIGINT)
        shown, err = watch.communicate(timeout=20)
        assert watch.returncode == 0, err
        assert shown.count("in flight    1 save(s)") >= 2, shown
        r = ckptd("status", "--endpoint", saved.endpoint, "--json")
        report = json.loads(r.stdout)
        assert [t["txn"] for t in report["in_flight"]] == [txn] and report["commits"] == 3

        r = ckptd("gc", out, "--endpoint", saved.endpoint)
        assert r.returncode == 0, r.stderr
        assert live.exists() and f"kept {live.name}: in flight" in r.stdout
        assert not stale.exists() and not trash.exists()
        assert sorted(os.listdir(root)) == sorted(["checkpoint-1", "checkpoint-2", live.name, live.name + ".owner"])
    finally:
        request(proto.MsgType.ABORT, 2, txn=txn, reason="test done")
        sock.close(linger=0)
        ctx.term()


def test_status_on_the_default_endpoint_says_it_is_shared_and_names_the_jobs(monkeypatch) -> None:
    from ckptd import cli

    monkeypatch.delenv(proto.ENDPOINT_ENV, raising=False)
    report = {"pid": 1, "output_dirs": ["/runs/a", "/runs/b"], "jobs": {"/runs/a": "job-a"}, "in_flight": []}
    lines = cli.render_status(report, proto.default_endpoint(), default_endpoint=True)
    text = "\n".join(lines)
    assert "the default endpoint: every job of this user on this node shares it" in text
    assert "  /runs/a  (job job-a)" in text and "  /runs/b" in text
    assert "default endpoint" not in "\n".join(cli.render_status(report, "ipc:///x", default_endpoint=False))


def test_status_without_daemon_exits_2(endpoint: str) -> None:
    r = ckptd("status")  # $CKPTD_ENDPOINT names an endpoint nothing serves
    assert r.returncode == 2
    assert "no daemon answered at " + endpoint in r.stderr and "ckptd serve" in r.stderr
    r = ckptd("status", "--endpoint", "ipc://relative.sock")
    assert r.returncode == 2 and "absolute path" in r.stderr


def test_export_loads_into_a_fresh_module(saved: Saved, tmp_path: Path) -> None:
    dest = tmp_path / "hf" / "model"
    r = ckptd("export", saved.ckpt(2), dest)
    assert r.returncode == 0, r.stderr
    index = json.loads((dest / fmt.MODEL_INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert sorted(p.name for p in dest.iterdir()) == sorted([fmt.MODEL_INDEX_NAME, *shards])
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(dest / shard))
    assert set(state) == set(index["weight_map"])
    fresh = make_model()
    fresh.load_state_dict(state, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved.model_state[k]), k

    r = ckptd("export", saved.ckpt(1), dest)  # non-empty DEST
    assert r.returncode == 2 and "--force" in r.stderr
    r = ckptd("export", saved.ckpt(1), dest, "--force")
    assert r.returncode == 0, r.stderr


def test_export_refuses_generic_model_and_damaged_shards(saved: Saved, tmp_path: Path) -> None:
    generic = fmt.checkpoints_root(saved.generic_out) / fmt.checkpoint_dirname(5)
    r = ckptd("export", generic, tmp_path / "g")
    assert r.returncode == 2
    assert "single generic" in r.stderr and "model_state_rank_0.safetensors" in r.stderr
    assert not (tmp_path / "g").exists()

    out = copy_out(saved, tmp_path)
    ckpt = fmt.checkpoints_root(out) / fmt.checkpoint_dirname(2)
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = ckptd("export", ckpt, tmp_path / "bad")
    assert r.returncode == 1 and shard.name in r.stderr and "checksum mismatch" in r.stderr
    assert not (tmp_path / "bad").exists()  # nothing half-exported left behind

    r = ckptd("export", tmp_path, tmp_path / "x")
    assert r.returncode == 2
