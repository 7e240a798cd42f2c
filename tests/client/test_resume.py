"""End-to-end save/resume through a real embedded daemon: bit-exact resume, the on-disk format as other
tools see it, retention, re-saving a step, and saves in flight back to back."""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file
from trainer_script import Captured, entries  # tests/client is on sys.path for these modules

from client import (
    CheckpointClient,
    RNGState,
    SharingPattern,
    StateComponent,
    find_latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)


def assert_same(a, b, path="state"):
    """Deep equality where tensors must match bit for bit (dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b).__name__} is not a tensor"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{path}: values differ"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} vs {b!r}"


def clone_state(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone_state(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clone_state(v) for v in x]
    if isinstance(x, tuple):
        return tuple(clone_state(v) for v in x)
    return x


class Trainer:
    """A small model + AdamW + LR scheduler whose steps consume torch, Python and NumPy randomness."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Dropout(0.25), torch.nn.Linear(32, 4)
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-2, weight_decay=0.05)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.7)

    def components(self) -> list[StateComponent]:
        return [
            StateComponent("model", self.model, SharingPattern.GLOBAL),
            StateComponent("optimizer", self.opt, SharingPattern.GLOBAL),
            StateComponent("scheduler", self.sched, SharingPattern.GLOBAL),
            StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        ]

    def step(self) -> float:
        bs = random.randint(3, 9)  # Python random
        noise = torch.from_numpy(np.random.standard_normal((bs, 8)).astype(np.float32))  # NumPy
        x = torch.randn(bs, 8) + noise  # torch (and Dropout below)
        y = torch.randn(bs, 4)
        loss = (self.model(x) - y).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.item()


def test_resume_is_bit_exact_with_fresh_objects_and_rng(endpoint, output_dir):
    n = 6
    a = Trainer(seed=0)
    with CheckpointClient(output_dir, a.components(), endpoint=endpoint) as client:
        for _ in range(3):
            a.step()
        saved_model = clone_state(a.model.state_dict())
        saved_opt = clone_state(a.opt.state_dict())
        handle = client.save_async(3)
        # Keep training while the daemon writes: the checkpoint is the snapshot, not the live tensors.
        losses_a = [a.step() for _ in range(n)]
        rng_after_a = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        ckpt = handle.wait(60)
    assert ckpt == output_dir / "checkpoints" / "checkpoint-3"

    unresumed = Trainer(seed=1234)
    assert [unresumed.step() for _ in range(n)] != losses_a  # without the checkpoint the runs do differ

    fresh = Trainer(seed=1234)

    with CheckpointClient(output_dir, fresh.components(), endpoint=endpoint) as client:
        assert client.load("latest") == ckpt
    assert_same(saved_model, fresh.model.state_dict(), "model")
    assert_same(saved_opt, fresh.opt.state_dict(), "optimizer")
    losses_b = [fresh.step() for _ in range(n)]

    assert losses_b == losses_a
    assert_same(a.model.state_dict(), fresh.model.state_dict(), "model")
    assert_same(a.opt.state_dict(), fresh.opt.state_dict(), "optimizer")
    assert_same(a.sched.state_dict(), fresh.sched.state_dict(), "scheduler")
    assert fresh.sched.get_last_lr() == a.sched.get_last_lr()
    # Every generator continued exactly where the uninterrupted run's did.
    assert torch.equal(torch.get_rng_state(), rng_after_a[0])
    assert random.getstate() == rng_after_a[1]
    np_state = np.random.get_state()
    assert np_state[0] == rng_after_a[2][0] and np.array_equal(np_state[1], rng_after_a[2][1])
    assert np_state[2:] == rng_after_a[2][2:]


class TinyLM(torch.nn.Module):
    """Embedding tied to the output projection, as in most language models."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.body = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.lm_head = torch.nn.Linear(16, 64, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(torch.tanh(self.body(self.embed(ids)))))


SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors\Z")


def _lm_setup(seed: int):
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(torch.randint(0, 64, (4, 5))).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    comps = [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("optimizer", opt, SharingPattern.GLOBAL),
        StateComponent("trainer", Captured({"epoch": 2, "tokens": [1, 2, 3], "name": "tiny"}), SharingPattern.GLOBAL),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
    ]
    return model, opt, comps


def test_checkpoint_is_plain_safetensors_with_hf_model_index_and_tied_weights_stored_once(endpoint, output_dir):
    model, opt, comps = _lm_setup(0)
    with CheckpointClient(output_dir, comps, endpoint=endpoint, max_shard_size=1100) as client:
        ckpt = client.save_async(1).wait(60)

    # Only JSON and safetensors files; every safetensors file opens with the reference reader; no pickle.
    names = sorted(p.name for p in ckpt.iterdir())
    for p in output_dir.rglob("*"):
        if p.is_dir():
            continue
        assert p.suffix in (".json", ".safetensors"), f"unexpected file {p}"
        assert p.suffix not in (".pt", ".bin", ".pkl", ".pickle")
        data = p.read_bytes()
        if p.suffix == ".json":
            assert not data.startswith(b"\x80"), f"{p} starts like a pickle"
            json.loads(data)
        else:
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
            # Its first 8 bytes are the header length (whose low byte may happen to be 0x80, the pickle
            # protocol opcode), then the JSON header: never pickle opcodes.
            header_len = int.from_bytes(data[:8], "little")
            assert data[8:9] == b"{" and 8 + header_len <= len(data), f"{p} is not a safetensors file"
    assert "checkpoint_manifest.json" in names
    assert {"optimizer_state.safetensors", "trainer_state.safetensors", "rng_state_rank_0.safetensors"} <= set(names)

    # A reader that knows only the Hugging Face layout.
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3, shards
    for i, shard in enumerate(shards, start=1):
        m = SHARD_RE.match(shard)
        assert m and int(m.group(1)) == i and int(m.group(2)) == len(shards), shard
    assert sorted(n for n in names if n.startswith("model-")) == shards
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors = load_file(str(ckpt / shard))
        assert not set(tensors) & set(loaded)
        loaded.update(tensors)
    assert set(loaded) == set(weight_map)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())

    # Tied weights: stored once, recorded as a group [stored, alias].
    tied = index["metadata"]["tied_weights"]
    assert tied == [["embed.weight", "lm_head.weight"]]
    assert "embed.weight" in weight_map and "lm_head.weight" not in weight_map
    alias = {a: g[0] for g in tied for a in g[1:]}
    sd = model.state_dict()
    assert set(sd) == set(loaded) | set(alias)
    for name, t in sd.items():
        assert torch.equal(loaded[alias.get(name, name)], t), name

    # Loading restores the tie: in the state dict handed to load_state_dict, and in a fresh model.
    fresh, fresh_opt, _ = _lm_setup(99)
    capture = Captured({})
    with CheckpointClient(
        output_dir, [StateComponent("model", capture, SharingPattern.GLOBAL)], endpoint=endpoint
    ) as c:
        assert c.load("latest") == ckpt
    got = capture.loaded
    assert list(got) == list(sd)
    assert got["lm_head.weight"].data_ptr() == got["embed.weight"].data_ptr()
    comps = [
        StateComponent("model", fresh, SharingPattern.GLOBAL),
        StateComponent("optimizer", fresh_opt, SharingPattern.GLOBAL),
    ]
    with CheckpointClient(output_dir, comps, endpoint=endpoint) as c:
        assert c.load(ckpt) == ckpt
    assert fresh.lm_head.weight is fresh.embed.weight
    assert_same(sd, fresh.state_dict(), "model")
    assert_same(opt.state_dict(), fresh_opt.state_dict(), "optimizer")


def _counter_components(state: dict) -> list[StateComponent]:
    return [StateComponent("counter", Captured(state), SharingPattern.GLOBAL)]


def _load_counter(output_dir: Path, endpoint: str, which="latest"):
    cap = Captured({})
    with CheckpointClient(output_dir, [StateComponent("counter", cap, "global")], endpoint=endpoint) as c:
        path = c.load(which)
    return path, cap.loaded


def test_save_total_limit_two_keeps_the_two_newest(endpoint, output_dir):
    state = {"v": torch.zeros(4)}
    with CheckpointClient(output_dir, _counter_components(state), endpoint=endpoint, save_total_limit=2) as client:
        for step in range(1, 6):
            state["v"] = torch.full((4,), float(step))
            client.save_async(step).wait(60)
    root = output_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4", "checkpoint-5"]
    path, got = _load_counter(output_dir, endpoint)
    assert path == root / "checkpoint-5" and torch.equal(got["v"], torch.full((4,), 5.0))


def test_save_total_limit_one_keeps_the_checkpoint_just_saved(endpoint, output_dir):
    state = {"v": torch.zeros(4)}
    root = output_dir / "checkpoints"
    with CheckpointClient(output_dir, _counter_components(state), endpoint=endpoint, save_total_limit=1) as client:
        for step in (10, 20, 30):
            state["v"] = torch.full((4,), float(step))
            path = client.save_async(step).wait(60)
            assert entries(root) == [f"checkpoint-{step}"]
            assert verify_checkpoint(path)
    path, got = _load_counter(output_dir, endpoint)
    assert path == root / "checkpoint-30" and torch.equal(got["v"], torch.full((4,), 30.0))


def test_resaving_a_step_replaces_it_atomically(endpoint, output_dir):
    root = output_dir / "checkpoints"
    ckpt = root / "checkpoint-3"
    state = {"v": torch.full((4 * 2**20,), 1.0), "tag": "first"}  # 16 MiB: the second write takes a moment
    with CheckpointClient(output_dir, _counter_components(state), endpoint=endpoint) as client:
        client.save_async(3).wait(60)
        first_txn = json.loads((ckpt / "checkpoint_manifest.json").read_text())["txn"]
        state["v"] = torch.full((4 * 2**20,), 2.0)
        state["tag"] = "second"

        # While the second save runs, checkpoint-3 must always be present and complete (old or new).
        seen, problems, stop = set(), [], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    seen.add(json.loads((ckpt / "checkpoint_manifest.json").read_bytes())["txn"])
                except (OSError, ValueError) as e:
                    problems.append(repr(e))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            handle = client.save_async(3)
            path = handle.wait(60)
        finally:
            stop.set()
            watcher.join()
    assert path == ckpt
    assert not problems, problems[:3]
    assert seen <= {first_txn, handle.txn} and first_txn in seen
    assert json.loads((ckpt / "checkpoint_manifest.json").read_text())["txn"] == handle.txn
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-3"]  # no temp or trash left behind
    assert verify_checkpoint(ckpt)
    _, got = _load_counter(output_dir, endpoint)
    assert got["tag"] == "second" and torch.equal(got["v"], torch.full((4 * 2**20,), 2.0))


def test_latest_is_the_highest_step_not_the_newest_mtime(endpoint, output_dir):
    state = {"v": torch.zeros(2)}
    with CheckpointClient(output_dir, _counter_components(state), endpoint=endpoint) as client:
        for step in (2, 10, 9):  # saved out of order: 9 is the most recent write
            state["v"] = torch.full((2,), float(step))
            client.save_async(step).wait(60)
    root = output_dir / "checkpoints"
    future = time.time() + 3600
    os.utime(root / "checkpoint-2", (future, future))
    os.utime(root / "checkpoint-2" / "checkpoint_manifest.json", (future, future))
    assert find_latest_checkpoint(output_dir) == root / "checkpoint-10"
    assert list_checkpoints(output_dir) == [root / f"checkpoint-{s}" for s in (2, 9, 10)]
    path, got = _load_counter(output_dir, endpoint)
    assert path == root / "checkpoint-10" and torch.equal(got["v"], torch.full((2,), 10.0))


def test_back_to_back_saves_without_waiting_both_commit_in_order_with_metadata(endpoint, output_dir):
    root = output_dir / "checkpoints"
    big = 16 * 2**20  # 64 MiB of float32: the daemon still holds the slab when the second save starts
    model = torch.nn.Linear(8, 8)
    blob = {"x": torch.full((big,), 1.0), "step": 1}
    comps = [
        StateComponent("model", model, SharingPattern.GLOBAL),
        StateComponent("blob", Captured(blob), SharingPattern.GLOBAL),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
    ]
    with CheckpointClient(output_dir, comps, endpoint=endpoint) as client:
        h1 = client.save_async(1, metadata={"eval_loss": 0.5, "note": "first"})
        blob["x"] = torch.full((big,), 2.0)  # a new tensor: the first save's bytes must stay what they were
        blob["step"] = 2
        weight1 = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)  # in place: the slab, not the live tensor, must be written
        weight2 = model.weight.detach().clone()
        h2 = client.save_async(2, metadata={"eval_loss": 0.25, "note": "second"})
        deadline = time.monotonic() + 60
        while not h2.done():
            assert time.monotonic() < deadline, "handle.done() never became True"
            time.sleep(0.01)
        client.wait(timeout=60)
        assert h1.done() and h2.done()
        assert h1.path == root / "checkpoint-1" and h2.path == root / "checkpoint-2"
        assert h1.error is None and h2.error is None
        assert client.wait() == []  # nothing left in flight

    m1 = json.loads((h1.path / "checkpoint_manifest.json").read_text())
    m2 = json.loads((h2.path / "checkpoint_manifest.json").read_text())
    assert m1["timestamp"] <= m2["timestamp"]  # committed in order
    assert m1["metadata"] == {"eval_loss": 0.5, "note": "first"}
    assert m2["metadata"] == {"eval_loss": 0.25, "note": "second"}
    for m, h in ((m1, h1), (m2, h2)):
        assert m["format"] == "ckptd/1"
        assert m["step"] == h.step and m["txn"] == h.txn and m["world_size"] == 1
        assert m["pytorch_version"] == torch.__version__
        files = m["files"]
        assert set(files) == {p.name for p in h.path.iterdir()} - {"checkpoint_manifest.json"}
        for name, rec in files.items():
            data = (h.path / name).read_bytes()
            assert rec["size"] == len(data), name
            assert rec["checksum"] == "xxh3-128:" + xxhash.xxh3_128(data).hexdigest(), name
        comps_m = m["components"]
        assert set(comps_m) == {"model", "blob", "rng"}
        assert comps_m["model"]["sharing_pattern"] == "global" and comps_m["model"]["ranks"] == [0]
        assert comps_m["blob"]["sharing_pattern"] == "global" and comps_m["blob"]["ranks"] == [0]
        assert comps_m["rng"]["sharing_pattern"] == "per_rank" and comps_m["rng"]["ranks"] == [0]
        assert comps_m["blob"]["files"] == ["blob_state.safetensors"]
        assert comps_m["blob"]["size_bytes"] == files["blob_state.safetensors"]["size"]

    # Each checkpoint holds the state of its own step.
    for step, value, weight in ((1, 1.0, weight1), (2, 2.0, weight2)):
        cap, mod = Captured({}), torch.nn.Linear(8, 8)
        comps = [StateComponent("model", mod, "global"), StateComponent("blob", cap, "global")]
        with CheckpointClient(output_dir, comps, endpoint=endpoint) as c:
            assert c.load(root / f"checkpoint-{step}", strict=False) == root / f"checkpoint-{step}"
        assert cap.loaded["step"] == step
        assert torch.equal(cap.loaded["x"], torch.full((big,), value))
        assert torch.equal(mod.weight, weight)
