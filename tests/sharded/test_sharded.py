"""SHARDED state under real torchrun + gloo: FSDP2 and FSDP x TP meshes saved once per shard, resharded on load.

Each launch runs tests/sharded/sharded_worker.py. The reference is the full state gathered at save time (for
the test only); every load is compared to it bit for bit, and training resumed from ckptd is compared step by
step with training resumed from ``dcp.save`` / ``dcp.load`` of the same state.
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
from conftest import stop_daemon
from sharded_worker import MLP, SAVE_STEP

from ckptd import format as fmt
from ckptd import protocol as proto
from client import verify_checkpoint

WORKER = Path(__file__).with_name("sharded_worker.py")
LAUNCH_TIMEOUT_S = 180


def launch(
    mode: str, layout: str, nproc: int, out: Path, results: Path, endpoint: str, source: str = "ckptd", **env: str
) -> dict[int, dict[str, Any]]:
    """Run the worker (under torchrun unless ``layout`` is plain); each rank's report."""
    args = [str(WORKER), mode, layout, str(out), str(results), source]
    if layout == "plain":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", proto.ENDPOINT_ENV: endpoint, **env}
    proc = subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{mode} {layout} hung for more than {LAUNCH_TIMEOUT_S} s; output:\n{output}")
    if proc.returncode != 0:
        pytest.fail(f"{mode} {layout} exited with {proc.returncode}; output:\n{output}")
    reports = {}
    for r in range(nproc):
        path = results / f"{mode}-{layout}-{source}_rank{r}.json"
        assert path.exists(), f"rank {r} wrote no report; output:\n{output}"
        reports[r] = json.loads(path.read_text())
    return reports


def new_endpoint() -> str:
    proto.ensure_private_dir(proto.runtime_dir())
    return f"ipc://{proto.runtime_dir()}/sh-{secrets.token_hex(4)}.sock"


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-for-bit equality of two nested states (tensors compared as raw bytes, dtypes and shapes too)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def distinct_bytes(reference: dict[str, Any]) -> int:
    """Bytes of tensor data in the full state: what the distinct shards add up to."""
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(reference)
    return total


@pytest.fixture(scope="module")
def fsdp_saved(tmp_path_factory: pytest.TempPathFactory):
    """FSDP2 + AdamW at world 4, saved by ckptd (model, optimizer, and the get_state_dict recipe as a third
    component) and by dcp.save at step 3; before that, the same state declared PER_RANK and REPLICATED."""
    base = tmp_path_factory.mktemp("fsdp4")
    ep = new_endpoint()
    try:
        reports = launch(
            "save", "fsdp", 4, base / "out", base / "results", ep, SHARDED_TRY_MISDECLARED="1", SHARDED_APP_STATE="1"
        )
        yield base, reports, ep
    finally:
        stop_daemon(ep)


def test_fsdp2_world4_checkpoint_is_verified_and_holds_each_distinct_byte_once(fsdp_saved) -> None:
    base, reports, _ = fsdp_saved
    ckpt = Path(reports[0]["path"])
    assert ckpt.name == f"checkpoint-{SAVE_STEP}"
    assert verify_checkpoint(ckpt)
    reference = torch.load(base / "results" / "reference.pt", weights_only=True)
    manifest = fmt.read_manifest(ckpt)
    assert manifest.components["model"].sharing_pattern == "sharded"
    # The ranks staged exactly the distinct bytes: no replica written twice, no shard missing. (The state is
    # in the checkpoint twice on purpose: as "model" + "optimizer", and as the recipe's "train" component.)
    assert set(manifest.components) == {"model", "optimizer", "train"}
    assert sum(r["bytes_staged"] for r in reports.values()) == 2 * distinct_bytes(reference)
    # And the files hold nothing else: headers, the index and the tensors' data once per component.
    total = sum(rec.size for rec in manifest.files.values())
    assert total == 2 * distinct_bytes(reference) + _header_bytes(ckpt, manifest)
    # Each file holds full tensors: safetensors opens them like any other file.
    from safetensors.torch import load_file

    weights = {}
    for name in manifest.components["model"].files:
        if name.endswith(".safetensors"):
            weights.update(load_file(ckpt / name))
    assert_same(weights, reference["model"], "model")


def _header_bytes(ckpt: Path, manifest: fmt.Manifest) -> int:
    """Rank 0 stages each shared file's header; the index is a whole file of its own."""
    total = 0
    for name, rec in manifest.files.items():
        if rec.kind == "safetensors" and manifest.components[rec.component].sharing_pattern == "sharded":
            with open(ckpt / name, "rb") as f:
                total += 8 + int.from_bytes(f.read(8), "little")
        elif rec.kind == "index":
            total += rec.size
    return total


def test_fsdp2_world4_resumes_at_world2_bit_exactly_with_dcp_losses(fsdp_saved) -> None:
    base, _, ep = fsdp_saved
    results = base / "results"
    reference = torch.load(results / "reference.pt", weights_only=True)
    ours = launch("resume", "fsdp", 2, base / "out", results, ep, "ckptd")
    theirs = launch("resume", "fsdp", 2, base / "out", results, ep, "dcp")
    assert_same(torch.load(results / "loaded-fsdp-ckptd.pt", weights_only=True), reference)
    assert_same(torch.load(results / "loaded-fsdp-dcp.pt", weights_only=True), reference)
    assert ours[0]["losses"] == theirs[0]["losses"]
    assert all(r["losses"] == ours[0]["losses"] for r in ours.values())


def test_fsdp2_world4_loads_into_a_plain_module_at_world1(fsdp_saved) -> None:
    base, _, ep = fsdp_saved
    results = base / "results"
    launch("resume", "plain", 1, base / "out", results, ep)
    reference = torch.load(results / "reference.pt", weights_only=True)
    assert_same(torch.load(results / "loaded-plain-ckptd.pt", weights_only=True), reference)


def test_huggingface_hub_reads_the_sharded_model_from_the_checkpoint_directory(fsdp_saved) -> None:
    from huggingface_hub import load_torch_model

    base, reports, _ = fsdp_saved
    reference = torch.load(base / "results" / "reference.pt", weights_only=True)
    model = MLP(tp=False)
    load_torch_model(model, reports[0]["path"])
    assert_same({k: v.detach() for k, v in model.state_dict().items()}, reference["model"])


def test_save_model_of_an_fsdp2_model_is_a_directory_huggingface_hub_reads(fsdp_saved) -> None:
    from huggingface_hub import load_torch_model

    base, reports, _ = fsdp_saved
    assert {r["model_dir"] for r in reports.values()} == {str((base / "model").resolve())}
    reference = torch.load(base / "results" / "reference.pt", weights_only=True)
    model = MLP(tp=False)
    load_torch_model(model, base / "model", strict=True)
    assert_same({k: v.detach() for k, v in model.state_dict().items()}, reference["model"])
    assert verify_checkpoint(base / "model")


def test_ckptd_export_of_a_sharded_checkpoint_is_a_plain_hf_directory(fsdp_saved, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base, reports, _ = fsdp_saved
    dest = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, "-m", "ckptd", "export", reports[0]["path"], str(dest)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    index = json.loads((dest / fmt.MODEL_INDEX_NAME).read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights.update(load_file(dest / shard))
    reference = torch.load(base / "results" / "reference.pt", weights_only=True)
    assert_same(weights, reference["model"])


@pytest.fixture(scope="module")
def mesh_2x2_saved(tmp_path_factory: pytest.TempPathFactory):
    """A 2 x 2 FSDP x TP job (ColwiseParallel / RowwiseParallel, plain model.state_dict()) saved at step 3."""
    base = tmp_path_factory.mktemp("mesh2x2")
    ep = new_endpoint()
    try:
        saved = launch("save", "2x2", 4, base / "out", base / "results", ep, SHARDED_PLAIN_MODEL="1")
        yield base, saved, ep
    finally:
        stop_daemon(ep)


def test_fsdp_x_tp_2x2_mesh_writes_each_distinct_shard_once(mesh_2x2_saved) -> None:
    base, saved, _ = mesh_2x2_saved
    reference = torch.load(base / "results" / "reference.pt", weights_only=True)
    ckpt = Path(saved[0]["path"])
    assert verify_checkpoint(ckpt)
    manifest = fmt.read_manifest(ckpt)
    # b.bias is replicated over TP, c.* (not tensor parallel) over both data-parallel submeshes: written once.
    assert sum(r["bytes_staged"] for r in saved.values()) == distinct_bytes(reference)
    assert sum(rec.size for rec in manifest.files.values()) == distinct_bytes(reference) + _header_bytes(ckpt, manifest)


@pytest.mark.parametrize("target", ["1x2", "4x1"])
def test_fsdp_x_tp_2x2_mesh_reshards_to_other_mesh_shapes(mesh_2x2_saved, target: str) -> None:
    base, _, ep = mesh_2x2_saved
    reference = torch.load(base / "results" / "reference.pt", weights_only=True)
    nproc = 2 if target == "1x2" else 4
    launch("resume", target, nproc, base / "out", base / "results", ep, SHARDED_PLAIN_MODEL="1")
    assert_same(torch.load(base / "results" / f"loaded-{target}-ckptd.pt", weights_only=True), reference)


def test_a_dtensor_in_a_component_that_is_not_sharded_fails_the_save_naming_it(fsdp_saved) -> None:
    _, reports, _ = fsdp_saved
    for r in reports.values():
        tried = r["misdeclared"]
        errors = dict(tried["errors"])
        diverged = errors.pop("sharded-diverged")
        assert set(errors) == {"per_rank", "replicated"}
        for error in errors.values():
            assert "model.a.weight: a DTensor" in error and "SharingPattern.SHARDED" in error, error
        assert tried["checkpoints"] == []
        # The plain values of a SHARDED component are checked like a REPLICATED component's.
        assert "component 'optimizer' differs from rank 0 on rank(s) [1, 2, 3]" in diverged, diverged


def test_a_damaged_shared_file_is_caught_by_the_one_rank_that_checksums_it_and_every_rank_refuses(
    fsdp_saved, tmp_path: Path
) -> None:
    import shutil

    base, reports, ep = fsdp_saved
    out = tmp_path / "out"
    shutil.copytree(base / "out" / "checkpoints", out / "checkpoints")
    ckpt = out / "checkpoints" / Path(reports[0]["path"]).name
    victim = ckpt / "optimizer_state.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # the last rows: outside what most ranks' pieces read
    victim.write_bytes(bytes(data))
    got = launch("resume", "fsdp", 2, out, tmp_path / "results", ep, SHARDED_EXPECT_LOAD_ERROR="1")
    for r in got.values():
        assert "optimizer_state.safetensors" in r["error"] and "checksum" in r["error"], r["error"]


def test_the_get_state_dict_recipe_as_one_component_reshards_from_world4_to_world2(fsdp_saved, tmp_path) -> None:
    base, _, ep = fsdp_saved
    launch("resume", "fsdp", 2, base / "out", tmp_path, ep, SHARDED_APP_STATE="1")
    reference = torch.load(base / "results" / "reference.pt", weights_only=True)
    assert_same(torch.load(tmp_path / "loaded-fsdp-ckptd.pt", weights_only=True), reference)
