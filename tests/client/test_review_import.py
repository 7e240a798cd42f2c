"""Defects a fresh-context review of ``ckptd import`` and of the Hugging Face config in every manifest found,
each reproduced first as a failing test: malformed or hostile sources (JSON of the wrong shape, hostile DCP
metadata, a PER_GROUP Forgather component) ended in a traceback instead of a clean refusal, and a config
holding Infinity (as transformers 4.x writes Mamba2's) failed every save of that model and its import."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from client import CheckpointClient, SharingPattern, StateComponent, list_checkpoints

transformers = pytest.importorskip("transformers")
FLAG = "--trust-weights-only-pickle"


def ckptd(*args):
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=200)


def hf_dir(tmp_path, name="checkpoint-5"):
    src = tmp_path / name
    src.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(src / "model.safetensors"))
    return src


def clean_refusal(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_trainer_state_json_not_an_object(endpoint, tmp_path):
    src = hf_dir(tmp_path)
    (src / "trainer_state.json").write_text("[1, 2, 3]")
    clean_refusal(ckptd("import", str(src), str(tmp_path / "out")))


def test_index_json_not_an_object(endpoint, tmp_path):
    src = tmp_path / "checkpoint-5"
    src.mkdir()
    (src / "model.safetensors.index.json").write_text("[]")
    clean_refusal(ckptd("import", str(src), str(tmp_path / "out")))


def test_index_weight_map_with_list_values(endpoint, tmp_path):
    src = tmp_path / "checkpoint-5"
    src.mkdir()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": ["../x"]}}))
    clean_refusal(ckptd("import", str(src), str(tmp_path / "out")))


def test_trainer_state_with_nan_as_hf_writes_it(endpoint, tmp_path):
    """HF's Trainer writes trainer_state.json with json.dumps (allow_nan): a NaN grad_norm is 'NaN'."""
    src = hf_dir(tmp_path)
    (src / "trainer_state.json").write_text(
        '{"global_step": 5, "log_history": [{"step": 5, "grad_norm": NaN, "loss": 1.0}]}'
    )
    r = ckptd("import", str(src), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-5"]


def test_config_json_with_infinity_as_transformers_4_writes_it(endpoint, tmp_path):
    """transformers 4.x writes Mamba2Config's time_step_limit (0.0, inf) as Infinity in config.json."""
    src = hf_dir(tmp_path)
    (src / "config.json").write_text('{"model_type": "mamba2", "time_step_limit": [0.0, Infinity]}')
    r = ckptd("import", str(src), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]


def _dcp_dir(tmp_path):
    import torch.distributed.checkpoint as dcp

    src = tmp_path / "dcp-3"
    dcp.save({"model": {"w": torch.ones(2)}, "step": 3}, checkpoint_id=str(src))
    return src


def _rewrite_md(src, fn):
    md = pickle.loads((src / ".metadata").read_bytes())
    fn(md)
    (src / ".metadata").write_bytes(pickle.dumps(md, protocol=4))


def test_dcp_metadata_planner_data_empty_path(endpoint, tmp_path):
    src = _dcp_dir(tmp_path)
    _rewrite_md(src, lambda md: setattr(md, "planner_data", {k: () for k in md.state_dict_metadata}))
    clean_refusal(ckptd("import", str(src), str(tmp_path / "out"), FLAG))


def test_dcp_metadata_planner_data_type_confusion(endpoint, tmp_path):
    src = _dcp_dir(tmp_path)

    def f(md):
        md.planner_data = {k: ("model", "w") if k == "model.w" else ("model", 0) for k in md.state_dict_metadata}

    _rewrite_md(src, f)
    clean_refusal(ckptd("import", str(src), str(tmp_path / "out"), FLAG))


def test_dcp_metadata_state_dict_metadata_not_a_dict(endpoint, tmp_path):
    src = _dcp_dir(tmp_path)
    _rewrite_md(src, lambda md: setattr(md, "state_dict_metadata", [1, 2]))
    clean_refusal(ckptd("import", str(src), str(tmp_path / "out"), FLAG))


def test_forgather_per_group_component(endpoint, tmp_path):
    src = tmp_path / "fg-2"
    src.mkdir()
    torch.save({"a": torch.ones(1)}, src / "x_state.pt")
    (src / "checkpoint_manifest.json").write_text(json.dumps({"components": {"x": {"sharing_pattern": "per_group"}}}))
    clean_refusal(ckptd("import", str(src), str(tmp_path / "out"), FLAG))


def _model_with(config):
    m = torch.nn.Linear(4, 4)
    m.config = config
    return m


def test_save_async_of_a_model_whose_hf_config_holds_inf(endpoint, output_dir):
    """Mamba2Config's default time_step_limit=(0.0, inf): hf_config now rides in every save's manifest
    metadata, and the daemon refuses non-finite floats, so no checkpoint of such a model commits."""
    m = _model_with(
        transformers.Mamba2Config(hidden_size=8, num_hidden_layers=1, vocab_size=16, num_heads=2, head_dim=8)
    )
    with CheckpointClient(output_dir, [StateComponent("model", m, SharingPattern.GLOBAL)]) as c:
        assert c.save_async(1).wait(60).name == "checkpoint-1"


def test_save_async_of_a_model_with_a_deep_hf_config(endpoint, output_dir):
    cfg = transformers.PretrainedConfig()
    deep = {}
    cur = deep
    for _ in range(40):
        cur["a"] = {}
        cur = cur["a"]
    cfg.extra = deep
    m = _model_with(cfg)
    with CheckpointClient(output_dir, [StateComponent("model", m, SharingPattern.GLOBAL)]) as c:
        assert c.save_async(1).wait(60).name == "checkpoint-1"


class Transformers4Config:
    """What transformers 4.x's PretrainedConfig.to_json_string returns for Mamba2Config(time_step_limit=(0.0, inf)):
    json.dumps(..., allow_nan default) -> 'Infinity'."""

    def to_json_string(self, use_diff=True):
        import json

        return json.dumps({"model_type": "mamba2", "time_step_limit": [0.0, float("inf")]}, indent=2)


def test_save_async_of_a_model_whose_config_json_holds_infinity(endpoint, output_dir):
    m = _model_with(Transformers4Config())
    with CheckpointClient(output_dir, [StateComponent("model", m, SharingPattern.GLOBAL)]) as c:
        assert c.save_async(1).wait(60).name == "checkpoint-1"


def test_a_dcp_storage_path_outside_src_is_refused(endpoint, tmp_path):
    src = _dcp_dir(tmp_path)

    def escape(md):
        for info in md.storage_data.values():
            info.relative_path = "../elsewhere.distcp"

    _rewrite_md(src, escape)
    r = ckptd("import", str(src), str(tmp_path / "out"), FLAG)
    clean_refusal(r)
    assert "not a file name inside" in r.stderr


def test_a_symlinked_shard_is_not_followed(endpoint, tmp_path):
    src = tmp_path / "checkpoint-5"
    src.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "outside.safetensors"))
    (src / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    r = ckptd("import", str(src), str(tmp_path / "out"))
    clean_refusal(r)
    assert "not a regular file" in r.stderr
