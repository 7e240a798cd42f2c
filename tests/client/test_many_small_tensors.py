"""A model of thousands of small tensors takes the staging fast path (cached copy plan, batched copies split
across two threads, cached header); each save must still hold exactly that save's tensors, whatever changed
since the one before: values, a shape, a dtype, a tie appearing or going away, the set of names."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from client import CheckpointClient, SharingPattern, StateComponent, staging

N = staging.BATCH_SPLIT + 501  # enough small tensors for the two-thread batched copy


class FlatState:
    """A flat ``{name: tensor}`` model state that the test mutates between saves."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in sd.items()}


def small_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"layers.{i}.weight": torch.randn(3 + i % 7, generator=g) for i in range(N)}
    out["big.weight"] = torch.randn(1 << 19, generator=g)  # one tensor past BIG_COPY, copied on its own
    out["empty"] = torch.zeros(0)
    return out


def stored_model(ckpt) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(ckpt.glob("model*.safetensors")):
        out.update(load_file(str(p)))
    return out


def assert_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], step: int) -> None:
    assert set(got) == set(want), f"step {step}: names {sorted(set(got) ^ set(want))[:5]} differ"
    for k, v in want.items():
        g = got[k]
        assert g.dtype == v.dtype and g.shape == v.shape, f"step {step} {k}: {g.dtype}{tuple(g.shape)} vs {v.dtype}"
        assert torch.equal(g, v), f"step {step} {k}: values differ"


def test_each_save_of_many_small_tensors_holds_exactly_its_state_as_the_structure_changes(endpoint, output_dir):
    st = FlatState(small_state(0))
    with CheckpointClient(output_dir, [StateComponent("model", st, SharingPattern.GLOBAL)], endpoint=endpoint) as c:
        expected: dict[int, dict[str, torch.Tensor]] = {}

        def save(step: int) -> None:
            expected[step] = {k: v.clone() for k, v in st.state.items()}
            ckpt = c.save_async(step).wait(60)
            got = stored_model(ckpt)
            # A tied alias is stored once: the reader sees the one stored name, and the index names the tie.
            want = {k: v for k, v in expected[step].items() if k != "tied.alias"}
            assert_exact(got, want, step)

        save(1)
        save(2)  # unchanged structure: the cached plan, views and header are reused
        for t in list(st.state.values())[::97]:
            t.add_(1.0)  # in place: the same objects, new values
        save(3)
        st.state["layers.5.weight"] = st.state["layers.5.weight"].reshape(2, 4)  # same bytes, new shape
        save(4)
        st.state["layers.6.weight"] = st.state["layers.6.weight"].to(torch.bfloat16)  # new dtype and size
        save(5)
        st.state["tied.alias"] = st.state["layers.7.weight"]  # a tie appears
        save(6)
        st.state["tied.alias"] = st.state["layers.7.weight"].clone().mul_(3)  # and goes away
        del st.state["layers.8.weight"]
        last = {k: v.clone() for k, v in st.state.items()}
        # The former alias is a tensor of its own again, with its own values; the deleted name is gone.
        assert_exact(stored_model(c.save_async(7).wait(60)), last, 7)

        # The newest checkpoint restores every tensor bit for bit through the client.
        st.state = {}
        c.load("latest")
    assert_exact(st.state, last, 7)
