"""Overlapped staging (client/overlap.py): what only optimizer.step() changes is copied after save_async
returns, and no later value can reach the checkpoint. Real daemon, real slabs, real files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client import CheckpointClient, SharingPattern, StateComponent


class Net(torch.nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.bn = torch.nn.BatchNorm1d(width)  # running stats: buffers that forward mutates
        self.b = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(self.a(x))))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, model.a.in_features, generator=g)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())},
    }


def assert_equal_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["opt"].keys() == b["opt"].keys()
    for i in a["opt"]:
        for k in a["opt"][i]:
            assert torch.equal(a["opt"][i][k], b["opt"][i][k]), (i, k)


def components(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
    return [
        StateComponent("model", model, SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
    ]


def restored(out: Path, ckpt: Path) -> dict:
    torch.manual_seed(123)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt, 999)  # other values, and the moments exist
    with CheckpointClient(out, components(model, opt), read_only=True) as client:
        assert client.load(ckpt) == ckpt
    return snapshot(model, opt)


def test_every_tensor_mutated_right_after_the_pre_step_hook_never_reaches_the_checkpoint(
    endpoint: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt, 0)
    out = tmp_path / "out"
    with CheckpointClient(out, components(model, opt)) as client:
        for step in (1, 2, 3):
            train_step(model, opt, step)
            before = snapshot(model, opt)
            h = client.save_async(step)
            # The parameters and moments (the large tensors only step() changes) were left to the copy thread.
            assert h.overlapped_bytes >= 2 * 256 * 256 * 4 * 3
            # Forward mutates BatchNorm's running stats right away: they were copied before save_async returned.
            model.train()
            model(torch.randn(32, 256))
            # step() waits in its pre-step hook, then changes every parameter and moment...
            train_step(model, opt, 100 + step)
            # ...and right after it, every tensor is overwritten in place as well.
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1000.0)
                for s in opt.state.values():
                    for v in s.values():
                        v.add_(1.0)  # (keeps exp_avg_sq positive for the next step)
                for b in model.buffers():
                    if b.is_floating_point():
                        b.add_(77.0)
            ckpt = h.wait(60)
            assert_equal_state(restored(out, ckpt), before)


def test_the_pre_step_hook_waits_for_a_copy_still_running_and_reports_the_wait(endpoint: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(64 << 20))  # 256 MiB, and as much again of SGD momentum
    opt = torch.optim.SGD([big], lr=0.1, momentum=0.9)
    big.grad = torch.ones_like(big)
    opt.step()

    class Holder:
        def state_dict(self) -> dict:
            return {"big": big.detach()}

        def load_state_dict(self, sd: dict) -> None:
            with torch.no_grad():
                big.copy_(sd["big"])

    expect = big.detach().clone()
    comps = [
        StateComponent("model", Holder(), SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
    ]
    with CheckpointClient(tmp_path / "out", comps) as client:
        h = client.save_async(1)
        assert h.overlapped_bytes == 2 * big.numel() * 4
        opt.step()  # at once: the copy of 512 MiB cannot be done yet
        assert h.hook_wait_s > 0
        ckpt = h.wait(60)
    from safetensors.torch import load_file

    saved = {}
    for f in ckpt.glob("model-*.safetensors"):
        saved.update(load_file(f))
    assert torch.equal(saved["big"], expect)


@pytest.mark.parametrize("how", ["no optimizer declared", "overlap_staging=False"])
def test_without_an_optimizer_or_when_turned_off_everything_is_copied_before_save_async_returns(
    endpoint: str, tmp_path: Path, how: str
) -> None:
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    train_step(model, opt, 0)
    if how == "no optimizer declared":
        comps, kwargs = [StateComponent("model", model, SharingPattern.REPLICATED)], {}
    else:
        comps, kwargs = components(model, opt), {"overlap_staging": False}
    with CheckpointClient(tmp_path / "out", comps, **kwargs) as client:
        h = client.save_async(1)
        assert h.overlapped_bytes == 0 and h.hook_wait_s == 0
        h.wait(60)


@pytest.mark.parametrize("wait", [True, False])
def test_a_client_closed_while_its_save_is_still_being_copied_hands_it_off_and_it_commits(
    endpoint: str, tmp_path: Path, wait: bool
) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt, 0)
    before = snapshot(model, opt)
    out = tmp_path / "out"
    client = CheckpointClient(out, components(model, opt))
    h = client.save_async(5)
    assert h.overlapped_bytes > 0
    client.close(wait=wait)
    from client import find_latest_checkpoint

    if not wait:
        import time

        deadline = time.monotonic() + 30
        while find_latest_checkpoint(out) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    ckpt = find_latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "checkpoint-5"
    assert_equal_state(restored(out, ckpt), before)
