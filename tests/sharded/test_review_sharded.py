"""Review of the SHARDED change (issue 7): reproductions of the defects a fresh-context review found, now fixed.

Real parts only: real daemons (tests/ckptd/harness.py or a client's own daemon on a private endpoint), real
torchrun + gloo launches (tests/sharded/review_worker.py), real files.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd import format as fmt
from ckptd import protocol as proto
from ckptd.protocol import MsgType
from tests.ckptd.harness import Harness, commit_info, no_temp_or_trash, wait_until
from tests.ckptd.test_regions import SHARED, region_spec, sharded, shared_file, stage_two_ranks

pytestmark = pytest.mark.timeout(240)

WORKER = Path(__file__).with_name("review_worker.py")
LAUNCH_TIMEOUT_S = 180


def _new_endpoint() -> str:
    proto.ensure_private_dir(proto.runtime_dir())
    return f"ipc://{proto.runtime_dir()}/rv-{secrets.token_hex(4)}.sock"


def _stop_daemon(endpoint: str) -> None:
    from conftest import stop_daemon

    stop_daemon(endpoint)


def _launch(scenario: str, nproc: int, out: Path, results: Path, endpoint: str) -> dict[int, dict[str, Any]]:
    """Run review_worker.py SCENARIO under torchrun (nproc ranks, gloo); each rank's report."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        scenario,
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
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{scenario} hung for more than {LAUNCH_TIMEOUT_S} s; output:\n{output}")
    assert proc.returncode == 0, f"{scenario} exited with {proc.returncode}; output:\n{output}"
    reports = {}
    for r in range(nproc):
        path = results / f"{scenario}_rank{r}.json"
        assert path.exists(), f"rank {r} wrote no report; output:\n{output}"
        reports[r] = json.loads(path.read_text())
    return reports


# ------------------------------------------------------------------------------------------ 1. daemon


def test_shares_that_overlap_and_leave_a_hole_are_refused(harness: Harness, output_dir: Path) -> None:
    harness.start()
    slabs = {r: harness.shm(256 * 1024) for r in (0, 1)}
    f = shared_file()
    # Rank 1 writes its columns of `a`, then, instead of the second half of `b`, the first half again
    # (the bytes rank 0 writes too): 40 bytes overlap, 40 bytes are never written, the sum is exact.
    first_half_of_b = f.pieces[0][2]
    assert first_half_of_b[1:3] == (40, 1)
    specs = {
        0: [region_spec(slabs[0], f.data, f.pieces[0])],
        1: [region_spec(slabs[1], f.data, [f.pieces[1][0], first_half_of_b])],
    }
    _, results = stage_two_ranks(harness, slabs, output_dir, 11, specs, commit_info(sharded([0, 1])))
    final = output_dir / "checkpoints" / "checkpoint-11"
    if final.exists():
        got = (final / SHARED).read_bytes()
        assert got[-40:] == b"\0" * 40 and f.data[-40:] != got[-40:]  # the hole: what is committed
    for t, body in results.values():
        assert t == MsgType.ABORTED, body
    assert not final.exists()
    wait_until(lambda: no_temp_or_trash(output_dir), 5, "removal of the aborted temp dir")


# ------------------------------------------------------------------------------------------ 2. client vote


def test_ranks_that_disagree_on_a_dtensors_placements_are_refused(tmp_path: Path) -> None:
    ep = _new_endpoint()
    try:
        got = _launch("placements", 2, tmp_path / "out", tmp_path / "results", ep)
    finally:
        _stop_daemon(ep)
    assert "saved_equals_full" not in got[0] or got[0]["saved_equals_full"], got[0]  # never a hole committed
    for r in got.values():
        assert "error" in r and "t" in r["error"], r
    assert not list((tmp_path / "out" / "checkpoints").glob("checkpoint-*"))


# ------------------------------------------------------------------------------------------ 3. world 1


class _Holder:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.loaded: Any = None

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loaded = sd


@pytest.mark.parametrize(
    "pattern",
    [
        "global",
        "sharded",
    ],
)
def test_a_damaged_file_is_refused_even_if_the_manifest_leaves_it_out_of_the_components_files(
    endpoint: str, tmp_path: Path, pattern: str
) -> None:
    from client import CheckpointClient, CheckpointError, SharingPattern, StateComponent

    out = tmp_path / "out"
    holder = _Holder({"w": torch.arange(64, dtype=torch.float32), "step": 3})
    comps = [StateComponent("opt", holder, SharingPattern(pattern))]
    with CheckpointClient(out, comps) as client:
        ckpt = client.save_async(1).wait(60)
    manifest = json.loads((ckpt / fmt.MANIFEST_NAME).read_text())
    manifest["components"]["opt"]["files"] = []  # parse_manifest accepts it: every listed file has a record
    (ckpt / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    victim = ckpt / "opt_state.safetensors"
    data = bytearray(victim.read_bytes())
    data[-4:] = b"\xff\xff\xff\xff"  # the last float becomes a NaN
    victim.write_bytes(bytes(data))
    with CheckpointClient(out, comps) as client:
        with pytest.raises(CheckpointError, match="checksum"):
            client.load("latest", verify=True)
    assert holder.loaded is None, holder.loaded["w"][-1]


class _TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize(
    "pattern",
    [
        "global",
        "sharded",
    ],
)
def test_tied_weights_of_a_sharded_model_are_stored_once_and_recorded(
    endpoint: str, tmp_path: Path, pattern: str
) -> None:
    from client import CheckpointClient, SharingPattern, StateComponent

    model = _TiedLM()
    with CheckpointClient(tmp_path / "out", [StateComponent("model", model, SharingPattern(pattern))]) as client:
        ckpt = client.save_async(1).wait(60)
    index = json.loads((ckpt / fmt.MODEL_INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 16 * 8 * 4, index
    assert index["metadata"].get("tied_weights") == [["emb.weight", "head.weight"]], index
