"""Real multi-process tests: 2 ranks under torchrun with the gloo backend, on this one machine.

Each launch runs tests/client/dist_worker.py (see its docstring for the modes); every rank writes a JSON
file with what it saw, and these tests assert on those files and on the checkpoint directories.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import stop_daemon
from dist_worker import CONTINUE_STEPS, SAVE_STEP, DictState, digest, make_model
from safetensors import safe_open
from safetensors.torch import load_file

from ckptd import format as fmt
from ckptd import protocol as proto
from client import CheckpointClient, CheckpointError, RNGState, SharingPattern, StateComponent, verify_checkpoint

WORKER = Path(__file__).with_name("dist_worker.py")
LAUNCH_TIMEOUT_S = 120
NPROC = 2


def torchrun(mode: str, out: Path, results: Path, endpoint: str, nproc: int = NPROC) -> dict[int, dict[str, Any]]:
    """Run the worker under torchrun (gloo); returns each rank's result. Fails with the output on error."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # what the torchrun console script runs
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        mode,
        str(out),
        str(results),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", proto.ENDPOINT_ENV: endpoint}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers (the daemon has its own session)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {mode} hung for more than {LAUNCH_TIMEOUT_S} s; output:\n{output}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun {mode} exited with {proc.returncode}; output:\n{output}")
    found = {}
    for r in range(nproc):
        path = results / f"{mode}_rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result; output:\n{output}"
        found[r] = json.loads(path.read_text())
    return found


def new_endpoint() -> str:
    proto.ensure_private_dir(proto.runtime_dir())
    return f"ipc://{proto.runtime_dir()}/t-{secrets.token_hex(4)}.sock"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One 2-rank training run that saved step 3 (shared by the tests that read it; none writes to it)."""
    base = tmp_path_factory.mktemp("torchrun_train")
    ep = new_endpoint()
    try:
        res = torchrun("train", base / "out", base / "results", ep)
    finally:
        stop_daemon(ep)
    return base / "out", res


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory):
    """One 2-rank run of the failing-save scenarios (replication validation, a bad state_dict on rank 1)."""
    base = tmp_path_factory.mktemp("torchrun_failures")
    ep = new_endpoint()
    try:
        res = torchrun("failures", base / "out", base / "results", ep)
    finally:
        stop_daemon(ep)
    return base / "out", res


def checkpoint_files(path: Path) -> set[str]:
    return set(os.listdir(path))


# --------------------------------------------------------------------------------------------------- 1


def test_two_rank_save_writes_shared_state_once_and_per_rank_state_once_per_rank(trained) -> None:
    out, res = trained
    ckpt = fmt.checkpoints_root(out) / f"checkpoint-{SAVE_STEP}"
    assert res[0]["path"] == res[1]["path"] == str(ckpt)
    assert res[0]["world_size"] == res[1]["world_size"] == 2
    # Only the committed directory: no temp or trash directory left behind.
    assert os.listdir(fmt.checkpoints_root(out)) == [ckpt.name]

    index = json.loads((ckpt / fmt.MODEL_INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2, "max_shard_size in the worker is meant to split the model"
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    expected = {
        fmt.MANIFEST_NAME,
        fmt.MODEL_INDEX_NAME,
        *shards,
        "optimizer_state.safetensors",
        "trainer_state.safetensors",
        "rng_state_rank_0.safetensors",
        "rng_state_rank_1.safetensors",
        "data_state_rank_0.safetensors",
        "data_state_rank_1.safetensors",
    }
    assert checkpoint_files(ckpt) == expected  # nothing twice (no rank-1 copy of model/optimizer/trainer)
    assert verify_checkpoint(ckpt)

    m = fmt.read_manifest(ckpt)
    assert m.world_size == 2 and m.step == SAVE_STEP
    assert set(m.metadata) == {"loss"}  # the user metadata passed to save_async (rank 0's)
    comps = m.components
    assert set(comps) == {"trainer", "model", "optimizer", "rng", "data"}
    assert (comps["trainer"].sharing_pattern, comps["trainer"].ranks, comps["trainer"].replicated_across) == (
        "global",
        [0],
        None,
    )
    for key in ("model", "optimizer"):
        assert comps[key].sharing_pattern == "replicated"
        assert comps[key].ranks == [0]
        assert comps[key].replicated_across == [0, 1]
    for key in ("rng", "data"):
        assert comps[key].sharing_pattern == "per_rank"
        assert comps[key].ranks == [0, 1]
        assert sorted(comps[key].files) == [f"{key}_state_rank_0.safetensors", f"{key}_state_rank_1.safetensors"]
    assert sorted(comps["model"].files) == sorted([fmt.MODEL_INDEX_NAME, *shards])

    # Who wrote each file: shared state only rank 0, per-rank state its own rank.
    for name, rec in m.files.items():
        if rec.component in ("rng", "data"):
            r = int(name.rsplit("_", 1)[1].split(".")[0])
            assert (rec.rank, rec.written_by) == (r, r), name
        else:
            assert rec.written_by == 0, name

    # Contents: each rank's data tensor is in its own file; the model is rank 0's (== rank 1's) weights.
    for r in (0, 1):
        shift = load_file(ckpt / f"data_state_rank_{r}.safetensors")["data.shift"]
        assert shift.tolist() == res[r]["data_shift"]
    assert res[0]["data_shift"] != res[1]["data_shift"]
    weights: dict[str, torch.Tensor] = {}
    for s in shards:
        weights.update(load_file(ckpt / s))
    assert res[0]["model_digest"] == res[1]["model_digest"]
    assert {k: v.tolist() for k, v in weights.items()} == res[0]["model"]


# --------------------------------------------------------------------------------------------------- 2


def test_resume_under_torchrun_restores_each_rank_and_continues_like_uninterrupted_run(
    trained, endpoint: str, tmp_path: Path
) -> None:
    out, saved = trained
    res = torchrun("resume", out, tmp_path / "results", endpoint)
    # The fresh objects really differed (from the checkpoint and between ranks) before the load.
    assert res[0]["digest_before_load"] != res[1]["digest_before_load"]
    for r in (0, 1):
        got, ref = res[r], saved[r]
        assert got["digest_before_load"] != ref["model_digest"]
        assert got["path"] == ref["path"]
        # Replicated model: identical on both ranks, and equal to what was saved.
        assert got["model_digests_all_ranks"] == [ref["model_digest"]] * 2
        assert got["trainer_step"] == SAVE_STEP  # GLOBAL state reaches every rank
        assert got["optimizer_steps"] == [SAVE_STEP]
        # PER_RANK: this rank's own data position and RNG streams.
        assert got["data_cursor"] == ref["data_cursor"] == SAVE_STEP
        assert got["data_shift"] == ref["data_shift"]
        assert got["data_shift"] != saved[1 - r]["data_shift"]
        assert got["draws"] == ref["draws"], f"rank {r}: RNG streams do not continue where the save left them"
        assert len(got["losses"]) == CONTINUE_STEPS
        assert got["losses"] == ref["losses"], f"rank {r}: resumed training diverges from the uninterrupted run"
    assert saved[0]["draws"] != saved[1]["draws"]  # the ranks' streams differ, so each got its own back


# --------------------------------------------------------------------------------------------------- 3


def test_global_and_replicated_state_from_two_ranks_loads_at_world_size_one(
    trained, endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    out, saved = trained
    ckpt = fmt.checkpoints_root(out) / f"checkpoint-{SAVE_STEP}"

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, DictState]:
        torch.manual_seed(4242)
        model = make_model()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2), DictState({"step": 0, "losses": []})

    def shared(model, opt, trainer) -> list[StateComponent]:
        return [
            StateComponent("trainer", trainer, SharingPattern.GLOBAL),
            StateComponent("model", model, SharingPattern.REPLICATED),
            StateComponent("optimizer", opt, SharingPattern.REPLICATED),
        ]

    # The embedded daemon the first client starts is a child of this process; stop and reap it here,
    # or it lingers as a zombie that the endpoint fixture's teardown waits 10 s for.
    daemons = []

    def opened(comps: list[StateComponent]) -> CheckpointClient:
        client = CheckpointClient(out, comps)
        if client._link.process is not None:
            daemons.append(client._link.process)
        return client

    try:
        # Only GLOBAL/REPLICATED declared: loads at world size 1.
        model, opt, trainer = fresh()
        with opened(shared(model, opt, trainer)) as client:
            assert client.topology.world_size == 1
            assert client.load("latest") == ckpt
        assert digest(model.state_dict()) == saved[0]["model_digest"]
        assert trainer.state["step"] == SAVE_STEP
        assert {int(s["step"]) for s in opt.state_dict()["state"].values()} == {SAVE_STEP}

        # PER_RANK declared optional: a warning naming it and the mismatch, the rest loads, RNG untouched.
        model, opt, trainer = fresh()
        rng_before = torch.get_rng_state()
        comps = shared(model, opt, trainer) + [
            StateComponent("rng", RNGState(), SharingPattern.PER_RANK, required=False)
        ]
        caplog.clear()
        with caplog.at_level(logging.WARNING), opened(comps) as client:
            with pytest.warns(RuntimeWarning, match="'rng' is PER_RANK and was saved by 2 ranks"):
                assert client.load("latest") == ckpt
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("'rng'" in w and "saved by 2 ranks" in w for w in warned), warned
        assert torch.equal(torch.get_rng_state(), rng_before)
        assert digest(model.state_dict()) == saved[0]["model_digest"]

        # PER_RANK required: a clear error, and nothing applied (the model keeps its fresh weights).
        model, opt, trainer = fresh()
        untouched = digest(model.state_dict())
        comps = shared(model, opt, trainer) + [StateComponent("rng", RNGState(), SharingPattern.PER_RANK)]
        with opened(comps) as client:
            with pytest.raises(CheckpointError, match=r"'rng'.*saved by 2 ranks.*1 (are )?running"):
                client.load("latest")
        assert digest(model.state_dict()) == untouched
        assert trainer.state["step"] == 0
    finally:
        for proc in daemons:
            proc.terminate()
            proc.wait(10)


# --------------------------------------------------------------------------------------------------- 4


def _same_on_both_ranks(res: dict[int, dict[str, Any]], case: str) -> list[dict[str, Any]]:
    a, b = res[0]["validate"]["cases"][case], res[1]["validate"]["cases"][case]
    assert [x["ok"] for x in a] == [x["ok"] for x in b], f"{case}: ranks disagree on the verdict: {a} vs {b}"
    for x, y in zip(a, b, strict=True):
        assert x.get("error") == y.get("error"), case
    return a


def test_replication_validation_verdict_is_agreed_by_both_ranks_and_commits_nothing(failures) -> None:
    out, res = failures

    (ok,) = _same_on_both_ranks(res, "tensor_identical")
    assert ok["ok"] and ok["committed"] == ["checkpoint-1"]

    def assert_rejected(attempt: dict[str, Any], key: str, level: str) -> None:
        assert not attempt["ok"]
        assert attempt["type"] == "CheckpointError"
        err = attempt["error"]
        assert f"component {key!r}" in err and "rank(s) [1]" in err and f"level {level}" in err, err
        assert attempt["listing"] == [], "a rejected save left something in checkpoints/"

    # tensor level: one perturbed fp32 model weight on rank 1; after restoring it the next save works.
    failed, retried = _same_on_both_ranks(res, "tensor_model_weight")
    assert_rejected(failed, "model", "tensor")
    assert retried["ok"] and retried["committed"] == ["checkpoint-2"]

    # tensor level: one element of a bf16 tensor two levels down in an optimizer-like tree, on rank 1.
    (failed,) = _same_on_both_ranks(res, "tensor_nested_bf16")
    assert_rejected(failed, "optimizer", "tensor")
    assert "'model'" not in failed["error"]

    # quick level: different values pass (and commit), a different shape fails.
    (ok,) = _same_on_both_ranks(res, "quick_values")
    assert ok["ok"] and ok["committed"] == ["checkpoint-1"]
    (failed,) = _same_on_both_ranks(res, "quick_shape")
    assert_rejected(failed, "model", "quick")

    for case in ("tensor_nested_bf16", "quick_shape"):
        root = fmt.checkpoints_root(out / "validate" / case)
        assert not root.exists() or not os.listdir(root)


# --------------------------------------------------------------------------------------------------- 5


def test_state_dict_failure_on_rank_1_fails_the_save_on_both_ranks_and_the_next_save_works(failures) -> None:
    base, res = failures
    out = base / "badleaf"
    a, b = res[0]["badleaf"]["attempts"], res[1]["badleaf"]["attempts"]
    for name in ("leaf", "retry", "raise", "next"):
        assert a[name]["ok"] == b[name]["ok"], f"{name}: ranks disagree: {a[name]} vs {b[name]}"
        assert a[name].get("error") == b[name].get("error"), name

    # An unsupported leaf (a set) only in rank 1's per-rank state: named by rank and dotted path.
    leaf = a["leaf"]
    assert not leaf["ok"] and leaf["type"] == "CheckpointError"
    assert "rank 1" in leaf["error"] and "data.sampler.seen" in leaf["error"] and "set" in leaf["error"]
    assert "rank 0" not in leaf["error"]
    assert leaf["listing"] == []

    # The same step again, with clean state, commits.
    assert a["retry"]["ok"] and a["retry"]["committed"] == ["checkpoint-1"]

    # state_dict() itself raising on rank 1: both ranks get a CheckpointError, nothing new appears.
    raised = a["raise"]
    assert not raised["ok"] and raised["type"] == "CheckpointError"
    assert "rank 1" in raised["error"] and "sampler state unavailable" in raised["error"], raised["error"]
    assert raised["listing"] == ["checkpoint-1"]

    assert a["next"]["ok"] and a["next"]["committed"] == ["checkpoint-1", "checkpoint-3"]
    ckpt = fmt.checkpoints_root(out) / "checkpoint-3"
    assert verify_checkpoint(ckpt)
    assert {"data_state_rank_0.safetensors", "data_state_rank_1.safetensors"} <= checkpoint_files(ckpt)
    with safe_open(ckpt / "data_state_rank_1.safetensors", "pt") as f:
        tree = json.loads(f.metadata()[fmt.TREE_METADATA_KEY])
    assert tree["sampler"] == {"epoch": 1, "seen": [1, 2, 3]}
