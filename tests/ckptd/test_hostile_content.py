"""Hostile *content* in a committed checkpoint whose checksums vouch for it (issue 5, defect 9, second review).

test_hostile_files.py plants hostile file *types* (FIFOs, symlinks, /dev/zero, an 8 EiB header length);
this module plants hostile bytes inside regular files whose manifest records match them, so that only
the structure is wrong, and proves that:

- a manifest or header that parses to trouble (a 5000-digit integer, nesting 100,000 deep, a dtype that
  is a list or an object) is a damaged checkpoint named by ``ls``, ``inspect``, ``verify`` and ``export``,
  never a traceback;
- ``verify`` refuses every header the safetensors reader itself refuses (a shape whose running product
  overflows 64 bits although a later dimension is 0, a dimension past 2^64, a ``__metadata__`` that is not
  a map), and an index that maps a tensor to a file of another component or to a shard that lacks it;
- ``load("latest")`` falls back past a newest checkpoint with any of these, or with a state tree that is
  malformed (a node without its fields, a torch.Size of strings, nesting 100,000 deep), a shape torch cannot
  build, or tied weights naming a tensor no shard stores, warning with the file's name, bit-exact;
- manifest fields of the wrong type (``timestamp: 5``, ``ranks: "abc"``...) are reported, not crashed on;
- JSON within its byte limit but of millions of empty objects is refused before it is parsed, so ``ls`` and
  ``verify`` run in bounded memory (under a 1 GiB address-space limit);
- ``export`` never writes into a committed checkpoint or any ``checkpoints/`` tree, and never exports
  another component's file as a model shard;
- ``verify`` never reads through a checkpoint directory swapped for a symlink while it runs (every file is
  opened relative to the directory it started with).

Real files and real processes: every CLI verb and ``load("latest")`` runs as a subprocess under an
address-space limit and a timeout (``test_hostile_files.run_bounded``: a hang, or a traceback on stderr,
fails the test). The checkpoints are built by the same helpers as test_hostile_files (the daemon's layout).
No mocks.
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptd import format as fmt
from tests.ckptd import test_hostile_files as hf
from tests.ckptd.harness import running_daemon

pytestmark = pytest.mark.timeout(240)

GIB = 1024**3


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> hf.Saved:
    out = tmp_path_factory.mktemp("review") / "out"
    model = hf.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    models = {}
    for step in (1, 2):
        hf.train_step(model, opt)
        hf.write_checkpoint(out, step, model, opt)
        models[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return hf.Saved(out, models)


@pytest.fixture
def out(saved: hf.Saved, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(saved.out, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def daemon() -> Iterator[str]:
    with running_daemon("review") as endpoint:
        yield endpoint


def ckpt(out: Path, step: int) -> Path:
    return hf.ckpt_of(out, step)


def replace_manifest_text(c: Path, old: str, new: str) -> None:
    path = c / fmt.MANIFEST_NAME
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def header_of(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def safetensors_from(header_json: bytes, body: bytes) -> bytes:
    header_json += b" " * (-len(header_json) % 8)
    return struct.pack("<Q", len(header_json)) + header_json + body


def plant_header(c: Path, name: str, edit: Callable[[dict, bytes], tuple[bytes, bytes]]) -> None:
    """Rewrite the safetensors header of ``c/name`` (``edit(header, body) -> (header_json, body)``) and forge
    the manifest so that its size and checksum vouch for the new bytes: only the structure is wrong."""
    header, body = header_of((c / name).read_bytes())
    data = safetensors_from(*edit(header, body))
    (c / name).write_bytes(data)
    hf.vouch_for(c, name, data)


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


# Hostile safetensors headers (all with a matching size and checksum in the manifest).
def dtype_is_a_list(h: dict, body: bytes) -> tuple[bytes, bytes]:
    h[first_tensor(h)]["dtype"] = []
    return json.dumps(h).encode(), body


def dtype_is_an_object(h: dict, body: bytes) -> tuple[bytes, bytes]:
    h[first_tensor(h)]["dtype"] = {"U8": 1}
    return json.dumps(h).encode(), body


def deeply_nested_header(h: dict, body: bytes) -> tuple[bytes, bytes]:
    text = json.dumps(h).encode()
    return text[:-1] + b',"zz":' + b"[" * 100_000 + b"]" * 100_000 + b"}", body


def integer_of_5000_digits(h: dict, body: bytes) -> tuple[bytes, bytes]:
    text = json.dumps(h).encode()
    return text[:-1] + b',"zz":{"dtype":"U8","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,0]}}', body


def shape_product_overflows(h: dict, body: bytes) -> tuple[bytes, bytes]:
    # 2^40 * 2^40 * 0 bytes: zero by Python's arithmetic, an overflow for safetensors and torch.
    end = len(body)
    h["zz"] = {"dtype": "U8", "shape": [2**40, 2**40, 0], "data_offsets": [end, end]}
    return json.dumps(h).encode(), body


def dimension_past_u64(h: dict, body: bytes) -> tuple[bytes, bytes]:
    end = len(body)
    h["zz"] = {"dtype": "U8", "shape": [0, 2**70], "data_offsets": [end, end]}
    return json.dumps(h).encode(), body


def metadata_not_a_map(h: dict, body: bytes) -> tuple[bytes, bytes]:
    h["__metadata__"] = []
    return json.dumps(h).encode(), body


def hostile_tree(tree_json: str) -> Callable[[dict, bytes], tuple[bytes, bytes]]:
    def edit(h: dict, body: bytes) -> tuple[bytes, bytes]:
        h["__metadata__"][fmt.TREE_METADATA_KEY] = tree_json
        return json.dumps(h).encode(), body

    return edit


OPTIMIZER = fmt.component_filename("optimizer", "global")


# ---------------------------------------------------------------------------- manifest: huge integers


def test_a_manifest_with_a_5000_digit_integer_is_a_broken_checkpoint_for_every_verb(out: Path, tmp_path: Path) -> None:
    c = ckpt(out, 2)
    replace_manifest_text(c, '"world_size": 1', '"world_size": ' + "9" * 5000)

    r = hf.ckptd("ls", out)  # run_bounded fails the test on a traceback
    assert r.returncode == 0
    assert hf.line_naming(r.stdout, fmt.MANIFEST_NAME, "BROKEN") or "BROKEN checkpoint-2" in r.stdout, r.text
    r = hf.ckptd("verify", c)
    assert r.returncode in (1, 2) and fmt.MANIFEST_NAME in r.text, r.text
    r = hf.ckptd("inspect", c)
    assert r.returncode in (1, 2) and fmt.MANIFEST_NAME in r.text, r.text
    r = hf.ckptd("export", c, tmp_path / "exported")
    assert r.returncode in (1, 2) and fmt.MANIFEST_NAME in r.text, r.text
    r = hf.run_bounded(sys.executable, "-c", hf.LIBRARY_READERS, out, ckpt(out, 1))
    assert json.loads(r.stdout)["latest"] == str(ckpt(out, 1))


# ----------------------------------------------------------------------------- hostile header JSON


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(dtype_is_a_list, id="dtype-list"),
        pytest.param(dtype_is_an_object, id="dtype-object"),
        pytest.param(deeply_nested_header, id="deep-nesting"),
        pytest.param(integer_of_5000_digits, id="int-5000-digits"),
    ],
)
def test_a_hostile_header_is_named_by_verify_inspect_and_export_not_a_traceback(
    edit: Callable[[dict, bytes], tuple[bytes, bytes]], out: Path, tmp_path: Path
) -> None:
    c = ckpt(out, 2)
    shard = hf.first_shard(c)
    plant_header(c, shard.name, edit)
    r = hf.ckptd("verify", c)
    assert r.returncode == 1 and shard.name in r.stdout, r.text
    r = hf.ckptd("inspect", c)
    assert shard.name in r.text, r.text
    r = hf.ckptd("export", c, tmp_path / "exported")
    assert r.returncode in (1, 2) and shard.name in r.stderr, r.text
    assert not (tmp_path / "exported").exists()


# ------------------------------------------------- verify refuses what the safetensors reader refuses


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(shape_product_overflows, id="shape-2^40x2^40x0"),
        pytest.param(dimension_past_u64, id="dim-2^70"),
        pytest.param(metadata_not_a_map, id="metadata-list"),
    ],
)
def test_verify_refuses_a_header_that_safetensors_itself_refuses(
    edit: Callable[[dict, bytes], tuple[bytes, bytes]], out: Path
) -> None:
    from safetensors import SafetensorError, safe_open

    c = ckpt(out, 2)
    plant_header(c, OPTIMIZER, edit)
    with pytest.raises(SafetensorError):  # the reference reader refuses the file
        with safe_open(str(c / OPTIMIZER), "pt"):
            pass
    r = hf.ckptd("verify", c)
    assert r.returncode == 1, f"ckptd verify passes a file safetensors refuses:\n{r.text}"
    assert hf.line_naming(r.stdout, OPTIMIZER, "safetensors"), r.text


# -------------------------------------------------- load("latest") falls back past a hostile newest


def manifest_5000_digits(c: Path) -> str:
    replace_manifest_text(c, '"world_size": 1', '"world_size": ' + "9" * 5000)
    return fmt.MANIFEST_NAME


def optimizer_header(edit: Callable[[dict, bytes], tuple[bytes, bytes]]) -> Callable[[Path], str]:
    def plant(c: Path) -> str:
        plant_header(c, OPTIMIZER, edit)
        return OPTIMIZER

    return plant


def index_ties_a_missing_tensor(c: Path) -> str:
    index = json.loads((c / fmt.MODEL_INDEX_NAME).read_bytes())
    index["metadata"]["tied_weights"] = [["no.such.tensor", "alias"]]
    data = json.dumps(index).encode()
    (c / fmt.MODEL_INDEX_NAME).write_bytes(data)
    hf.vouch_for(c, fmt.MODEL_INDEX_NAME, data)
    return fmt.MODEL_INDEX_NAME


def shape_torch_cannot_build(h: dict, body: bytes) -> tuple[bytes, bytes]:
    # Valid for safetensors (0 * 2^63 = 0 bytes), but torch sizes are signed 64-bit.
    end = len(body)
    h["zz"] = {"dtype": "U8", "shape": [0, 2**63], "data_offsets": [end, end]}
    return json.dumps(h).encode(), body


def index_maps_a_tensor_to_the_optimizer_state(c: Path) -> str:
    index = json.loads((c / fmt.MODEL_INDEX_NAME).read_bytes())
    index["weight_map"]["not.a.weight"] = OPTIMIZER
    data = json.dumps(index).encode()
    (c / fmt.MODEL_INDEX_NAME).write_bytes(data)
    hf.vouch_for(c, fmt.MODEL_INDEX_NAME, data)
    return fmt.MODEL_INDEX_NAME


LOAD_PLANTS = [
    pytest.param(manifest_5000_digits, id="manifest-int-5000-digits"),
    pytest.param(optimizer_header(dtype_is_a_list), id="header-dtype-list"),
    pytest.param(optimizer_header(deeply_nested_header), id="header-deep-nesting"),
    pytest.param(optimizer_header(shape_product_overflows), id="header-shape-overflow"),
    pytest.param(optimizer_header(dimension_past_u64), id="header-dim-2^70"),
    pytest.param(optimizer_header(hostile_tree('{"__ckptd__": "tensor"}')), id="tree-node-without-name"),
    pytest.param(optimizer_header(hostile_tree("[" * 100_000 + "]" * 100_000)), id="tree-deep-nesting"),
    pytest.param(
        optimizer_header(hostile_tree('{"__ckptd__": "torch_size", "items": ["x"]}')), id="tree-size-of-strings"
    ),
    pytest.param(index_ties_a_missing_tensor, id="index-ties-missing-tensor"),
    pytest.param(optimizer_header(shape_torch_cannot_build), id="header-shape-torch-cannot-build"),
    pytest.param(optimizer_header(hostile_tree('{"__ckptd__": "dict", "items": [[{}, 1]]}')), id="tree-dict-key"),
    pytest.param(optimizer_header(hostile_tree("{}," * 100)), id="tree-not-json"),
    pytest.param(optimizer_header(metadata_not_a_map), id="header-metadata-list"),
    pytest.param(index_maps_a_tensor_to_the_optimizer_state, id="index-maps-to-optimizer"),
]


@pytest.mark.parametrize("plant", LOAD_PLANTS)
def test_load_latest_falls_back_past_a_hostile_newest_checkpoint(
    plant: Callable[[Path], str], saved: hf.Saved, out: Path, tmp_path: Path, daemon: str
) -> None:
    culprit = plant(ckpt(out, 2))
    loaded_to = tmp_path / "loaded.safetensors"
    r = hf.run_bounded(sys.executable, "-c", hf.LOAD_LATEST, out, daemon, loaded_to, Path(hf.__file__).parent)
    assert r.returncode == 0, r.text
    answer = json.loads(r.stdout.splitlines()[-1])
    assert answer["loaded"] == str(ckpt(out, 1)), answer
    assert any(culprit in w for w in answer["warnings"]), answer["warnings"]
    loaded = load_file(loaded_to)
    for k, v in saved.models[1].items():
        assert torch.equal(loaded[k], v), k


# ---------------------------------------------------------- inspect: manifest fields of the wrong type


def set_component(**fields: object) -> Callable[[dict], None]:
    return lambda raw: raw["components"]["model"].update(**fields)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda raw: raw.update(timestamp=5), id="timestamp-int"),
        pytest.param(set_component(ranks="abc"), id="ranks-str"),
        pytest.param(set_component(ranks=5), id="ranks-int"),
        pytest.param(set_component(ranks=[1, "a"]), id="ranks-mixed"),
        pytest.param(set_component(replicated_across=5), id="replicated-int"),
        pytest.param(set_component(group_name="g", group_instances=5), id="group-instances-int"),
        pytest.param(lambda raw: next(iter(raw["files"].values())).update(component=None), id="file-component-null"),
        pytest.param(lambda raw: next(iter(raw["files"].values())).update(rank="0"), id="file-rank-str"),
        pytest.param(set_component(required="yes"), id="required-str"),
        pytest.param(set_component(metadata=[]), id="component-metadata-list"),
        pytest.param(lambda raw: raw.update(metadata=nested(200)), id="metadata-nested-200"),
        pytest.param(lambda raw: raw.update(step=True), id="step-bool"),
    ],
)
def test_inspect_reports_manifest_fields_of_the_wrong_type_instead_of_crashing(
    edit: Callable[[dict], None], out: Path
) -> None:
    c = ckpt(out, 2)
    hf.rewrite_manifest(c, edit)
    r = hf.ckptd("inspect", c)  # run_bounded fails on the traceback
    assert r.returncode == 2, r.text
    assert hf.line_naming(r.stderr, fmt.MANIFEST_NAME, "must be"), r.text
    r = hf.ckptd("ls", ckpt(out, 2).parent.parent)
    assert "BROKEN checkpoint-2" in r.stdout, r.text


def nested(depth: int) -> dict:
    v: dict = {}
    for _ in range(depth):
        v = {"k": v}
    return v


# ----------------------------------------------------- memory: a bounded read is a bounded parse too


def _limit_1_gib() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (GIB, GIB))


def repeated_json(prefix: bytes, item: bytes, suffix: bytes, size: int) -> bytes:
    """``prefix item,item,...,item suffix`` of ``size`` bytes at most: JSON of millions of tiny values."""
    n = (size - len(prefix) - len(suffix)) // (len(item) + 1)
    return prefix + (item + b",") * (n - 1) + item + suffix


@pytest.mark.parametrize("item", [b"{}", b"1.5"], ids=["empty-objects", "floats"])
@pytest.mark.parametrize("where", ["manifest", "header", "index"])
def test_a_manifest_header_or_index_within_its_byte_bound_is_parsed_in_bounded_memory(
    where: str, item: bytes, out: Path
) -> None:
    """64 MiB of ``{},`` would be ~1.7 GiB of dicts: each reader refuses it by its value count, unparsed."""
    c = ckpt(out, 2)
    if where == "manifest":
        culprit = fmt.MANIFEST_NAME
        (c / culprit).write_bytes(repeated_json(b'{"format":"ckptd/1","x":[', item, b"]}", fmt.MAX_MANIFEST_BYTES - 64))
        argv = ["ls", out]
    elif where == "header":
        shard = hf.first_shard(c)
        culprit = shard.name
        data = safetensors_from(repeated_json(b'{"zz":[', item, b"]}", fmt.MAX_HEADER_BYTES - 64), b"")
        shard.write_bytes(data)
        hf.vouch_for(c, culprit, data)
        argv = ["verify", "--size-only", c]
    else:
        culprit = fmt.MODEL_INDEX_NAME
        data = repeated_json(b'{"weight_map":{},"x":[', item, b"]}", fmt.MAX_INDEX_BYTES - 64)
        (c / culprit).write_bytes(data)
        hf.vouch_for(c, culprit, data)
        argv = ["verify", "--size-only", c]
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ckptd", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_1_gib,
    )
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr[-1500:]
    assert time.monotonic() - t0 < 20
    assert hf.line_naming(proc.stdout, culprit, "JSON values"), proc.stdout[-1500:]


# ------------------------------------------------------------- export: never into a checkpoints tree


def test_export_refuses_a_dest_that_is_a_committed_checkpoint(out: Path) -> None:
    older = ckpt(out, 1)
    r = hf.ckptd("export", ckpt(out, 2), older, "--force")
    assert fmt.verify_checkpoint(older).ok, "export overwrote a committed checkpoint's files"
    assert r.returncode == 2, r.text
    assert "inside" in r.stderr and "checkpoints directory" in r.stderr, r.text


def _another_output_dir(tmp_path: Path, saved: hf.Saved) -> Path:
    other = tmp_path / "other-run"
    shutil.copytree(saved.out, other, symlinks=True)
    return other


@pytest.mark.parametrize(
    "dest_of",
    [
        pytest.param(lambda out, tmp, saved: ckpt(out, 2), id="the-source-itself"),
        pytest.param(lambda out, tmp, saved: ckpt(out, 2) / "hf", id="inside-the-source"),
        pytest.param(lambda out, tmp, saved: fmt.checkpoints_root(out) / "hf-export", id="in-its-checkpoints-dir"),
        pytest.param(
            lambda out, tmp, saved: ckpt(_another_output_dir(tmp, saved), 1) / "x", id="in-another-run's-checkpoint"
        ),
    ],
)
def test_export_refuses_any_dest_inside_a_checkpoints_tree(
    dest_of: Callable[[Path, Path, hf.Saved], Path], out: Path, tmp_path: Path, saved: hf.Saved
) -> None:
    dest = dest_of(out, tmp_path, saved)
    before = sorted(p.name for p in fmt.checkpoints_root(out).iterdir())
    r = hf.ckptd("export", ckpt(out, 2), dest, "--force")
    assert r.returncode == 2 and "outside every OUTPUT_DIR/checkpoints/ tree" in r.stderr, r.text
    assert not dest.exists() or dest == ckpt(out, 2)
    assert sorted(p.name for p in fmt.checkpoints_root(out).iterdir()) == before
    assert fmt.verify_checkpoint(ckpt(out, 2)).ok


def test_export_refuses_a_dest_symlinked_into_a_checkpoint(out: Path, tmp_path: Path) -> None:
    link = tmp_path / "looks-harmless"
    link.symlink_to(ckpt(out, 1), target_is_directory=True)
    r = hf.ckptd("export", ckpt(out, 2), link, "--force")
    assert r.returncode == 2 and str(ckpt(out, 1).resolve()) in r.stderr, r.text
    assert fmt.verify_checkpoint(ckpt(out, 1)).ok


def test_export_into_a_users_own_folder_named_checkpoints_works(out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "checkpoints" / "hf-model"  # not a ckptd tree: nothing of ckptd's in it
    r = hf.ckptd("export", ckpt(out, 2), dest)
    assert r.returncode == 0, r.text
    assert (dest / fmt.MODEL_INDEX_NAME).is_file()


# -------------------------------------------- race: the checkpoint directory swapped for a symlink


def test_verify_never_reads_files_through_a_checkpoint_dir_swapped_for_a_symlink(out: Path, tmp_path: Path) -> None:
    c = ckpt(out, 2)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(c, elsewhere)
    for f in elsewhere.glob("*.safetensors"):  # same names and sizes outside the tree, other bytes
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    swapped: list[bool] = []

    def swap(_n: int) -> None:
        if not swapped:  # after the manifest is read and the first file verified
            c.rename(c.with_name(".moved-away"))
            c.symlink_to(elsewhere, target_is_directory=True)
            swapped.append(True)

    result = fmt.verify_checkpoint(c, progress=swap)
    assert swapped
    outside = [p for p in result.problems if "checksum mismatch" in p]
    assert not outside, f"verify read files outside the checkpoint through the swapped-in link: {outside}"
    # It read the directory it started with, now renamed: every file of it, intact.
    assert result.ok and result.files_checked == len(fmt.read_manifest(c.with_name(".moved-away")).files), result


# --------------------------------------------------- the model index names the model's own shards only


def test_export_refuses_an_index_that_maps_a_tensor_to_another_components_file(out: Path, tmp_path: Path) -> None:
    c = ckpt(out, 2)
    index = json.loads((c / fmt.MODEL_INDEX_NAME).read_bytes())
    index["weight_map"]["not.a.weight"] = OPTIMIZER
    data = json.dumps(index).encode()
    (c / fmt.MODEL_INDEX_NAME).write_bytes(data)
    hf.vouch_for(c, fmt.MODEL_INDEX_NAME, data)
    dest = tmp_path / "exported"
    r = hf.ckptd("export", c, dest)
    assert not (dest / OPTIMIZER).exists(), "the optimizer state was exported as a model shard"
    assert r.returncode == 1 and fmt.MODEL_INDEX_NAME in r.stderr, r.text
    assert not dest.exists()
    r = hf.ckptd("verify", c)
    assert r.returncode == 1 and hf.line_naming(r.stdout, fmt.MODEL_INDEX_NAME, "'optimizer' component"), r.text


def test_verify_and_export_refuse_an_index_mapping_a_tensor_to_a_shard_that_lacks_it(out: Path, tmp_path: Path) -> None:
    c = ckpt(out, 2)
    index = json.loads((c / fmt.MODEL_INDEX_NAME).read_bytes())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[-1]  # a model shard, but not the one holding it
    data = json.dumps(index).encode()
    (c / fmt.MODEL_INDEX_NAME).write_bytes(data)
    hf.vouch_for(c, fmt.MODEL_INDEX_NAME, data)
    r = hf.ckptd("verify", c)
    assert r.returncode == 1 and hf.line_naming(r.stdout, name, "does not hold"), r.text
    r = hf.ckptd("inspect", c)
    assert hf.line_naming(r.stdout, name, "does not hold"), r.text
    dest = tmp_path / "exported"
    r = hf.ckptd("export", c, dest)
    assert r.returncode == 1 and "does not hold" in r.stderr and not dest.exists(), r.text
