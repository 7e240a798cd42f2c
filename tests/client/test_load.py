"""Load semantics through a real daemon and real files: fresh starts, fallback past damaged checkpoints,
strict/optional components, and what save_async accepts (bad leaves, bad keys, NumPy values)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_script import Captured, entries  # tests/client is on sys.path for these modules

from client import (
    CheckpointClient,
    CheckpointError,
    SharingPattern,
    StateComponent,
    find_latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)


def _make(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt


def _train(model, opt) -> None:
    loss = model(torch.randn(5, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _comps(model, opt) -> list[StateComponent]:
    return [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("optimizer", opt, SharingPattern.GLOBAL),
    ]


def _snapshot(model, opt):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()},
    )


def _assert_state(model, opt, snap) -> None:
    model_sd, opt_state = snap
    assert set(model.state_dict()) == set(model_sd)
    for k, v in model_sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    got = opt.state_dict()["state"]
    assert set(got) == set(opt_state)
    for i, s in opt_state.items():
        assert set(got[i]) == set(s)
        for k, v in s.items():
            assert torch.equal(got[i][k], v), (i, k)


def _two_checkpoints(output_dir: Path, endpoint: str) -> dict[int, tuple]:
    """Checkpoints 1 and 2 of a small model + AdamW; returns each one's exact state."""
    model, opt = _make(0)
    snaps = {}
    with CheckpointClient(output_dir, _comps(model, opt), endpoint=endpoint) as client:
        for step in (1, 2):
            _train(model, opt)
            client.save_async(step).wait(60)
            snaps[step] = _snapshot(model, opt)
    return snaps


def _root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def test_load_none_or_false_is_a_fresh_start_that_changes_nothing(endpoint, output_dir):
    _two_checkpoints(output_dir, endpoint)
    model, opt = _make(7)
    before = _snapshot(model, opt)
    with CheckpointClient(output_dir, _comps(model, opt), endpoint=endpoint) as client:
        assert client.load(None) is None
        assert client.load(False) is None
    _assert_state(model, opt, before)
    assert opt.state_dict()["state"] == {}


def test_load_latest_with_no_committed_checkpoint_returns_none(endpoint, output_dir):
    model, opt = _make(7)
    before = _snapshot(model, opt)
    with CheckpointClient(output_dir, _comps(model, opt), endpoint=endpoint) as client:
        assert client.load("latest") is None  # no checkpoints/ directory at all
        root = _root(output_dir)
        (root / ".tmp-checkpoint-5-abcdef").mkdir(parents=True)  # in flight: invisible
        (root / ".trash-checkpoint-4-abcdef").mkdir()  # being deleted: invisible
        (root / "checkpoint-x").mkdir()  # not a step
        (root / "checkpoint-6").mkdir()  # no manifest: not committed
        assert client.load("latest") is None
    assert find_latest_checkpoint(output_dir) is None
    _assert_state(model, opt, before)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    size = path.stat().st_size
    os.truncate(path, size - 16)


def test_latest_falls_back_past_damaged_checkpoints_warning_about_each_file(endpoint, output_dir):
    """A flipped byte, a truncated file and a deleted file each make a checkpoint fail verification."""
    model, opt = _make(0)
    snaps = {}
    with CheckpointClient(output_dir, _comps(model, opt), endpoint=endpoint) as client:
        for step in (1, 2, 3, 4):
            _train(model, opt)
            client.save_async(step).wait(60)
            snaps[step] = _snapshot(model, opt)
    root = _root(output_dir)
    damage = {
        4: ("optimizer_state.safetensors", _flip_last_byte),
        3: ("model-00001-of-00001.safetensors", _truncate),
        2: ("optimizer_state.safetensors", Path.unlink),
    }
    for step, (name, spoil) in damage.items():
        spoil(root / f"checkpoint-{step}" / name)
        result = verify_checkpoint(root / f"checkpoint-{step}")
        assert not result and any(name in p for p in result.problems), result.problems
    assert find_latest_checkpoint(output_dir) == root / "checkpoint-4"  # still committed, just damaged

    model, opt = _make(7)
    with CheckpointClient(output_dir, _comps(model, opt), endpoint=endpoint) as client:
        with pytest.warns(RuntimeWarning) as record:
            assert client.load("latest") == root / "checkpoint-1"
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 3, messages
    for (step, (name, _)), text in zip(sorted(damage.items(), reverse=True), messages, strict=True):
        assert f"checkpoint-{step}" in text and name in text, text
    _assert_state(model, opt, snaps[1])

    # Without fallback the damaged newest checkpoint is an error naming the file.
    with CheckpointClient(output_dir, _comps(model, opt), endpoint=endpoint) as client:
        with pytest.raises(CheckpointError, match=r"optimizer_state\.safetensors"):
            client.load("latest", fallback=False)
    _assert_state(model, opt, snaps[1])


def test_malformed_manifest_makes_that_checkpoint_invisible(endpoint, output_dir):
    snaps = _two_checkpoints(output_dir, endpoint)
    root = _root(output_dir)
    manifest = root / "checkpoint-2" / "checkpoint_manifest.json"
    good = manifest.read_bytes()
    bad_step = json.loads(good)
    bad_step["step"] = 99
    for bad in (b'{"format": "ckptd/1", "files": ', b"", json.dumps(bad_step).encode(), b"[1, 2, 3]"):
        manifest.write_bytes(bad)
        assert find_latest_checkpoint(output_dir) == root / "checkpoint-1", bad
        assert list_checkpoints(output_dir) == [root / "checkpoint-1"], bad
    manifest.unlink()
    assert find_latest_checkpoint(output_dir) == root / "checkpoint-1"

    model, opt = _make(7)
    with CheckpointClient(output_dir, _comps(model, opt), endpoint=endpoint) as client:
        assert client.load("latest") == root / "checkpoint-1"
    _assert_state(model, opt, snaps[1])


def test_explicit_path_to_a_corrupt_checkpoint_raises_naming_the_file_and_applies_nothing(endpoint, output_dir):
    _two_checkpoints(output_dir, endpoint)
    root = _root(output_dir)
    _flip_last_byte(root / "checkpoint-2" / "optimizer_state.safetensors")
    model, opt = _make(7)
    before = _snapshot(model, opt)
    with CheckpointClient(output_dir, _comps(model, opt), endpoint=endpoint) as client:
        for which in (root / "checkpoint-2", str(root / "checkpoint-2"), "checkpoint-2"):
            with pytest.raises(CheckpointError, match=r"optimizer_state\.safetensors"):
                client.load(which)
        with pytest.raises(CheckpointError, match="checkpoint-3"):
            client.load(root / "checkpoint-3")
    _assert_state(model, opt, before)  # the intact model file was read but not applied


def test_missing_component_required_raises_optional_warns_and_strict_false_loads_the_rest(endpoint, output_dir):
    snaps = _two_checkpoints(output_dir, endpoint)
    ckpt = _root(output_dir) / "checkpoint-2"

    model, opt = _make(7)
    before = _snapshot(model, opt)
    extra = Captured({"x": torch.zeros(2)})
    comps = _comps(model, opt) + [StateComponent("extra", extra, SharingPattern.GLOBAL)]
    with CheckpointClient(output_dir, comps, endpoint=endpoint) as client:
        with pytest.raises(CheckpointError, match=r"extra_state\.safetensors"):
            client.load("latest")
        _assert_state(model, opt, before)  # nothing applied

        with pytest.warns(RuntimeWarning, match=r"extra_state\.safetensors"):
            assert client.load("latest", strict=False) == ckpt
    _assert_state(model, opt, snaps[2])
    assert extra.loaded is None

    model, opt = _make(8)
    optional = Captured({"x": torch.zeros(2)})
    comps = _comps(model, opt) + [StateComponent("extra", optional, SharingPattern.GLOBAL, required=False)]
    with CheckpointClient(output_dir, comps, endpoint=endpoint) as client:
        with pytest.warns(RuntimeWarning, match=r"extra_state\.safetensors"):
            assert client.load("latest") == ckpt
    _assert_state(model, opt, snaps[2])
    assert optional.loaded is None


def test_global_and_replicated_state_saved_at_world_size_one_loads(endpoint, output_dir):
    model, _ = _make(0)
    table = {"w": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), "meta": {"vocab": 3}}
    comps = [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("table", Captured(table), SharingPattern.REPLICATED, validate_replication=True),
    ]
    with CheckpointClient(output_dir, comps, endpoint=endpoint) as client:
        ckpt = client.save_async(1).wait(60)
    manifest = json.loads((ckpt / "checkpoint_manifest.json").read_text())
    assert manifest["components"]["table"]["sharing_pattern"] == "replicated"
    assert manifest["components"]["table"]["replicated_across"] == [0]
    assert (ckpt / "table_state.safetensors").is_file()

    fresh, _ = _make(5)
    got = Captured({})
    comps = [StateComponent("model", fresh, "global"), StateComponent("table", got, "replicated")]
    with CheckpointClient(output_dir, comps, endpoint=endpoint) as client:
        assert client.load("latest") == ckpt
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert got.loaded["w"].dtype == torch.bfloat16 and torch.equal(got.loaded["w"], table["w"])
    assert got.loaded["meta"] == {"vocab": 3}


def test_unsupported_leaf_fails_save_naming_its_path_and_writes_nothing(endpoint, output_dir):
    model, _ = _make(0)
    state = {"state": {"foo": [1, 2], "bar": "ok"}, "epoch": 1}
    comps = [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("trainer", Captured(state), SharingPattern.GLOBAL),
    ]
    root = _root(output_dir)
    with CheckpointClient(output_dir, comps, endpoint=endpoint) as client:
        client.save_async(1).wait(60)
        for step, (bad, path) in enumerate(
            [({1, 2}, "trainer.state.foo"), (object(), "trainer.state.foo"), ([1, object()], "trainer.state.foo.1")],
            start=2,
        ):
            state["state"]["foo"] = bad
            with pytest.raises(CheckpointError, match=path.replace(".", r"\.") + r"\b") as err:
                client.save_async(step)
            assert "nothing was written" in str(err.value)
            assert entries(root) == ["checkpoint-1"], type(bad)
            assert client.wait(timeout=10) == []

        # The client still works: fix the state and save again.
        state["state"]["foo"] = (3, 4)
        ckpt = client.save_async(9).wait(60)
    assert verify_checkpoint(ckpt)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1", "checkpoint-9"]
    got = Captured({})
    with CheckpointClient(output_dir, [StateComponent("trainer", got, "global")], endpoint=endpoint) as client:
        assert client.load("latest", strict=False) == ckpt
    assert got.loaded == {"state": {"foo": (3, 4), "bar": "ok"}, "epoch": 1}


@pytest.mark.parametrize("key", ["../x", "a/b", "", ".hidden", "x/../y", "a b", "-lead"])
def test_invalid_component_key_is_rejected_at_construction(key):
    with pytest.raises(ValueError, match="key"):
        StateComponent(key, Captured({}), SharingPattern.GLOBAL)


def test_numpy_arrays_and_scalars_round_trip_with_their_types(endpoint, output_dir):
    state = {
        "f64": np.linspace(0.0, 1.0, 7),
        "f32_2d": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i32": np.array([-3, 0, 5], dtype=np.int32),
        "u8": np.array([0, 255], dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.int64),
        "non_contiguous": np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2],
        "s_f32": np.float32(1.5),
        "s_f64": np.float64(-2.25),
        "s_i64": np.int64(-7),
        "s_u16": np.uint16(65535),
        "s_bool": np.bool_(True),
        "nested": [np.int8(-1), (np.float16(0.5), "text")],
    }
    with CheckpointClient(output_dir, [StateComponent("np", Captured(state), "global")], endpoint=endpoint) as client:
        ckpt = client.save_async(1).wait(60)
    got = Captured({})
    with CheckpointClient(output_dir, [StateComponent("np", got, "global")], endpoint=endpoint) as client:
        assert client.load(ckpt) == ckpt
    out = got.loaded
    assert set(out) == set(state)
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            assert type(out[k]) is np.ndarray, k
            assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
            assert np.array_equal(out[k], v), k
        elif k != "nested":
            assert type(out[k]) is type(v) and out[k] == v, (k, type(out[k]), out[k])
    assert type(out["nested"][0]) is np.int8 and out["nested"][0] == -1
    assert type(out["nested"][1]) is tuple
    assert type(out["nested"][1][0]) is np.float16 and out["nested"][1][0] == 0.5
    assert out["nested"][1][1] == "text"
