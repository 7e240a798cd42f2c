"""Hostile and odd files planted in a committed checkpoint (issue 5, defect 9).

Checkpoints 1 and 2 of a small model (Hugging Face shards plus index) and its AdamW optimizer are written
with the ckptd.format helpers exactly as the daemon lays them out; each test plants one thing in the newest:
a FIFO as the manifest or as a shard, a manifest symlinked to /dev/zero, a shard symlinked to /etc/passwd
(with a manifest that vouches for it), a checkpoint directory that is a symlink out of the tree, a shard
whose safetensors header length is 8 EiB (checksum updated to match), a manifest that claims 909 TiB.

Every reader then runs as a subprocess under a 2 GiB address-space limit and a 20 s timeout: ``ckptd
ls|inspect|verify|export``, ``verify_checkpoint``/``find_latest_checkpoint``/``list_checkpoints``, and
``CheckpointClient.load("latest")`` against a real daemon. Each must answer in time, within the limit and
without a traceback, naming the planted file and what is wrong with it; ``load("latest")`` must fall back to
the newest good checkpoint, bit-exact. No mocks.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptd import format as fmt
from tests.ckptd.harness import running_daemon

pytestmark = pytest.mark.timeout(180)

ANSWER_TIMEOUT_S = 20.0
ADDRESS_SPACE_LIMIT = 2 * 1024**3  # torch takes ~0.7 GiB of it; a runaway read of /dev/zero takes the rest
MAX_RSS_KIB = 1024**2
TIB = 1024**4
EIB_8 = 2**63
SHARD_LIMIT = 1024  # bytes: the model is split over several shards


# ------------------------------------------------------------------------ the state and its checkpoints


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 16)).pow(2).mean().backward()
    opt.step()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """One safetensors file as the daemon writes it: the ckptd header, then the tensors back to back."""
    items = [(name, fmt.safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    layout = fmt.build_safetensors_layout([items[i] for i in fmt.alignment_order(items)], metadata)
    body = b"".join(tensors[e.name].contiguous().view(-1).view(torch.uint8).numpy().tobytes() for e in layout.entries)
    return layout.header + body


def write_checkpoint(out: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Path:
    """Commit ``checkpoint-<step>`` the way the daemon does: files, then the manifest, then the rename."""
    files: dict[str, tuple[str, str, bytes]] = {}  # name -> (component, kind, bytes)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    names = list(state)
    shards = fmt.plan_model_shards([state[n].nbytes for n in names], SHARD_LIMIT)
    weight_map = {}
    for i, members in enumerate(shards):
        shard = fmt.model_shard_filename(i, len(shards))
        files[shard] = ("model", "safetensors", safetensors_bytes({names[j]: state[names[j]] for j in members}))
        weight_map.update({names[j]: shard for j in members})
    index = fmt.build_model_index(weight_map, sum(t.nbytes for t in state.values()), [])
    files[fmt.MODEL_INDEX_NAME] = ("model", "index", index)
    tree, leaves = fmt.flatten_state(opt.state_dict(), "optimizer")
    optim = safetensors_bytes({leaf.name: leaf.tensor for leaf in leaves}, {fmt.TREE_METADATA_KEY: json.dumps(tree)})
    files[fmt.component_filename("optimizer", "global")] = ("optimizer", "safetensors", optim)

    root = fmt.checkpoints_root(out)
    temp = root / fmt.temp_dirname(step, "t0")
    temp.mkdir(parents=True)
    records = {}
    for name, (component, kind, data) in files.items():
        (temp / name).write_bytes(data)
        records[name] = fmt.FileRecord(name, len(data), fmt.checksum_bytes(data), component, kind)
    components = {}
    for key in ("model", "optimizer"):
        paths = sorted(n for n, r in records.items() if r.component == key)
        components[key] = fmt.ComponentRecord(
            key=key,
            sharing_pattern="global",
            ranks=[0],
            size_bytes=sum(records[p].size for p in paths),
            checksum=fmt.combine_checksums(records[p].checksum for p in paths),
            files=paths,
        )
    final = root / fmt.checkpoint_dirname(step)
    manifest = fmt.Manifest(
        format=fmt.FORMAT_VERSION,
        checkpoint_path=str(final),
        step=step,
        txn="t0",
        world_size=1,
        timestamp=fmt.now_timestamp(),
        components=components,
        files=records,
        topology={"world_size": 1, "nnodes": 1, "node_of_rank": [0], "groups": {}},
        pytorch_version=torch.__version__,
    )
    (temp / fmt.MANIFEST_NAME).write_bytes(manifest.to_json())
    temp.rename(final)
    return final


# The library readers, run in a child so that a hang or a runaway read cannot take pytest down with it.
LIBRARY_READERS = r"""
import json, resource, sys
from pathlib import Path
from client import find_latest_checkpoint, list_checkpoints, verify_checkpoint

out, target = Path(sys.argv[1]), Path(sys.argv[2])
result = verify_checkpoint(target)
print(json.dumps({
    "verify_ok": bool(result),
    "verify_problems": result.problems,
    "latest": str(find_latest_checkpoint(out)),
    "listed": [str(p) for p in list_checkpoints(out)],
    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
}))
"""

LOAD_LATEST = r"""
import json, resource, sys, warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, sys.argv[4])
from test_hostile_files import make_model
from client import CheckpointClient, SharingPattern, StateComponent

out, endpoint, loaded_to = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
model = make_model(seed=7)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
components = [
    StateComponent("model", model, SharingPattern.GLOBAL),
    StateComponent("optimizer", opt, SharingPattern.GLOBAL),
]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with CheckpointClient(out, components, endpoint=endpoint) as c:
        loaded = c.load("latest")
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(loaded_to))
print(json.dumps({
    "loaded": str(loaded),
    "warnings": [str(w.message) for w in caught],
    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
}))
"""


# ---------------------------------------------------------------------------------- bounded children


@dataclass
class Answer:
    returncode: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_bounded(*args: str | os.PathLike) -> Answer:
    """Run ``args`` under the memory limit; fail the test if it does not answer within ANSWER_TIMEOUT_S."""
    argv = [str(a) for a in args]
    shown = " ".join(a if len(a) < 80 else a[:20] + "..." for a in argv[1:])
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit_address_space,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=ANSWER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{shown} did not answer within {ANSWER_TIMEOUT_S:g} s (hung):\n{stderr[-2000:]}")
    # A raw MemoryError or OSError escaping is a crash, not an answer.
    assert "Traceback" not in stderr, f"{shown} crashed:\n{stderr[-3000:]}"
    return Answer(proc.returncode, stdout, stderr)


def ckptd(*args: str | os.PathLike) -> Answer:
    return run_bounded(sys.executable, "-m", "ckptd", *args)


def line_naming(text: str, culprit: str, why: str) -> str | None:
    """The first output line that names both the culprit file and what is wrong with it."""
    return next((ln for ln in text.splitlines() if culprit in ln and why in ln), None)


# ------------------------------------------------------------------------------------------- planting


def ckpt_of(out: Path, step: int) -> Path:
    return fmt.checkpoints_root(out) / fmt.checkpoint_dirname(step)


def first_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("model-*.safetensors"))[0]


def rewrite_manifest(ckpt: Path, edit: Callable[[dict], None]) -> None:
    raw = json.loads((ckpt / fmt.MANIFEST_NAME).read_bytes())
    edit(raw)
    (ckpt / fmt.MANIFEST_NAME).write_text(json.dumps(raw, indent=2))


def vouch_for(ckpt: Path, name: str, data: bytes) -> None:
    """Forge the manifest so that ``name``'s size and checksum are those of ``data`` (component size too)."""

    def forge(raw: dict) -> None:
        record = raw["files"][name]
        raw["components"][record["component"]]["size_bytes"] += len(data) - record["size"]
        record.update(size=len(data), checksum=fmt.checksum_bytes(data))

    rewrite_manifest(ckpt, forge)


@dataclass
class Plant:
    """A hostile thing planted in ``out``: which checkpoint it spoils, the file to name, and how to say it."""

    target: Path  # the checkpoint the verbs are pointed at
    culprit: str  # the name every answer must contain
    why: str  # ... on the same line as this
    ls_sees_it: bool = True  # ls checks file types and sizes only, never the bytes
    good: int = 1  # the step load("latest") must fall back to


def fifo_manifest(out: Path, tmp_path: Path) -> Plant:
    ckpt = ckpt_of(out, 2)
    (ckpt / fmt.MANIFEST_NAME).unlink()
    os.mkfifo(ckpt / fmt.MANIFEST_NAME)
    return Plant(ckpt, fmt.MANIFEST_NAME, "FIFO")


def fifo_shard(out: Path, tmp_path: Path) -> Plant:
    shard = first_shard(ckpt_of(out, 2))
    shard.unlink()
    os.mkfifo(shard)
    return Plant(shard.parent, shard.name, "FIFO")


def manifest_to_dev_zero(out: Path, tmp_path: Path) -> Plant:
    ckpt = ckpt_of(out, 2)
    (ckpt / fmt.MANIFEST_NAME).unlink()
    (ckpt / fmt.MANIFEST_NAME).symlink_to("/dev/zero")
    return Plant(ckpt, fmt.MANIFEST_NAME, "symbolic link")


def shard_to_etc_passwd(out: Path, tmp_path: Path) -> Plant:
    ckpt = ckpt_of(out, 2)
    shard = first_shard(ckpt)
    shard.unlink()
    shard.symlink_to("/etc/passwd")
    vouch_for(ckpt, shard.name, Path("/etc/passwd").read_bytes())
    return Plant(ckpt, shard.name, "symbolic link")


def checkpoint_dir_linked_out_of_the_tree(out: Path, tmp_path: Path) -> Plant:
    # A complete, valid checkpoint 3 outside the tree, linked in as the newest one.
    elsewhere = tmp_path / "elsewhere" / fmt.checkpoint_dirname(3)
    shutil.copytree(ckpt_of(out, 2), elsewhere)
    rewrite_manifest(elsewhere, lambda raw: raw.update(step=3))
    link = ckpt_of(out, 3)
    link.symlink_to(elsewhere, target_is_directory=True)
    return Plant(link, link.name, "symbolic link", good=2)


def header_length_8_eib(out: Path, tmp_path: Path) -> Plant:
    ckpt = ckpt_of(out, 2)
    shard = first_shard(ckpt)
    data = EIB_8.to_bytes(8, "little") + shard.read_bytes()[8:]
    shard.write_bytes(data)
    vouch_for(ckpt, shard.name, data)  # size and checksum agree: only the structure is wrong
    return Plant(ckpt, shard.name, "header length", ls_sees_it=False)


def sizes_of_909_tib(out: Path, tmp_path: Path) -> Plant:
    ckpt = ckpt_of(out, 2)
    shard = first_shard(ckpt)

    def lie(raw: dict) -> None:
        # A consistent lie: the component's size agrees with the file record, only the disk disagrees.
        raw["components"]["model"]["size_bytes"] += 909 * TIB - raw["files"][shard.name]["size"]
        raw["files"][shard.name]["size"] = 909 * TIB

    rewrite_manifest(ckpt, lie)
    return Plant(ckpt, shard.name, "size mismatch")


PLANTS = [
    pytest.param(fifo_manifest, id="fifo-manifest"),
    pytest.param(fifo_shard, id="fifo-shard"),
    pytest.param(manifest_to_dev_zero, id="manifest-to-dev-zero"),
    pytest.param(shard_to_etc_passwd, id="shard-to-etc-passwd"),
    pytest.param(checkpoint_dir_linked_out_of_the_tree, id="checkpoint-dir-symlink"),
    pytest.param(header_length_8_eib, id="header-length-8-eib"),
    pytest.param(sizes_of_909_tib, id="sizes-909-tib"),
]


# ------------------------------------------------------------------------------------------- fixtures


@dataclass
class Saved:
    out: Path  # checkpoints 1 and 2
    models: dict[int, dict[str, torch.Tensor]]  # the model as saved at each step

    def __repr__(self) -> str:  # keep tensors out of pytest's failure reports
        return f"Saved({self.out})"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    out = tmp_path_factory.mktemp("hostile") / "out"
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    models = {}
    for step in (1, 2):
        train_step(model, opt)
        write_checkpoint(out, step, model, opt)
        models[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert len(list(ckpt_of(out, 2).glob("model-*.safetensors"))) > 1
    return Saved(out, models)


@pytest.fixture
def out(saved: Saved, tmp_path: Path) -> Path:
    """A private copy of the saved output dir to plant things in."""
    dst = tmp_path / "out"
    shutil.copytree(saved.out, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def daemon() -> Iterator[str]:
    """A ``python -m ckptd serve`` for the load tests (CheckpointClient connects to one when it is built)."""
    with running_daemon("hostile") as endpoint:
        yield endpoint


# ------------------------------------------------------------------------------------------- the tests


def test_the_hand_built_checkpoints_are_good_to_every_reader(saved: Saved, out: Path, tmp_path: Path) -> None:
    """The baseline the hostile cases spoil: nothing is flagged, everything verifies and exports."""
    r = ckptd("ls", out, "--json")
    assert r.returncode == 0, r.text
    listing = json.loads(r.stdout)
    assert [c["step"] for c in listing["checkpoints"]] == [1, 2] and listing["broken"] == []
    assert all(not c.get("problems") for c in listing["checkpoints"])
    r = ckptd("inspect", ckpt_of(out, 2))
    assert r.returncode == 0 and r.stderr == "", r.text
    r = ckptd("verify", ckpt_of(out, 2))
    assert r.returncode == 0, r.text
    r = ckptd("export", ckpt_of(out, 2), tmp_path / "exported")
    assert r.returncode == 0, r.text
    r = run_bounded(sys.executable, "-c", LIBRARY_READERS, out, ckpt_of(out, 2))
    answer = json.loads(r.stdout)
    assert answer["verify_ok"] and answer["latest"] == str(ckpt_of(out, 2))


@pytest.mark.parametrize("plant", PLANTS)
def test_every_cli_verb_answers_at_once_naming_the_planted_file(
    plant: Callable[[Path, Path], Plant], out: Path, tmp_path: Path
) -> None:
    p = plant(out, tmp_path)

    r = ckptd("ls", out)
    assert r.returncode == 0, r.text
    r_json = ckptd("ls", out, "--json")
    assert r_json.returncode == 0, r_json.text
    if p.ls_sees_it:
        assert line_naming(r.stdout, p.culprit, p.why), f"ls does not flag {p.culprit} ({p.why}):\n{r.text}"
        listing = json.loads(r_json.stdout)
        flagged = [b["error"] for b in listing["broken"]] + [x for c in listing["checkpoints"] for x in c["problems"]]
        assert any(p.culprit in x and p.why in x for x in flagged), flagged

    r = ckptd("inspect", p.target)
    assert line_naming(r.text, p.culprit, p.why), f"inspect does not flag {p.culprit} ({p.why}):\n{r.text}"

    r = ckptd("verify", p.target)
    assert r.returncode in (1, 2), r.text
    assert line_naming(r.text, p.culprit, p.why), f"verify does not name {p.culprit} ({p.why}):\n{r.text}"

    dest = tmp_path / "exported"
    r = ckptd("export", p.target, dest)
    assert r.returncode in (1, 2), r.text
    assert line_naming(r.stderr, p.culprit, p.why), f"export does not name {p.culprit} ({p.why}):\n{r.text}"
    assert not dest.exists(), "a refused export left files behind"


@pytest.mark.parametrize("plant", PLANTS)
def test_verify_checkpoint_and_find_latest_answer_at_once_in_bounded_memory(
    plant: Callable[[Path, Path], Plant], out: Path, tmp_path: Path
) -> None:
    p = plant(out, tmp_path)
    r = run_bounded(sys.executable, "-c", LIBRARY_READERS, out, p.target)
    assert r.returncode == 0, r.text
    answer = json.loads(r.stdout)
    assert not answer["verify_ok"]
    assert any(p.culprit in x and p.why in x for x in answer["verify_problems"]), answer["verify_problems"]
    # A checkpoint whose files are damaged is still committed (load skips it); one without a readable
    # manifest or with a symlinked directory is not a checkpoint at all.
    assert answer["latest"] in (str(ckpt_of(out, p.good)), str(p.target))
    assert str(ckpt_of(out, p.good)) in answer["listed"]
    assert answer["maxrss_kib"] < MAX_RSS_KIB, f"took {answer['maxrss_kib']} KiB"


@pytest.mark.parametrize("plant", PLANTS)
def test_load_latest_falls_back_past_the_planted_file_with_a_warning_naming_it(
    plant: Callable[[Path, Path], Plant], saved: Saved, out: Path, tmp_path: Path, daemon: str
) -> None:
    p = plant(out, tmp_path)
    loaded_to = tmp_path / "loaded.safetensors"
    r = run_bounded(sys.executable, "-c", LOAD_LATEST, out, daemon, loaded_to, Path(__file__).parent)
    assert r.returncode == 0, r.text
    answer = json.loads(r.stdout.splitlines()[-1])
    assert answer["loaded"] == str(ckpt_of(out, p.good)), answer
    assert any(p.culprit in w and p.why in w for w in answer["warnings"]), answer["warnings"]
    assert answer["maxrss_kib"] < MAX_RSS_KIB, f"took {answer['maxrss_kib']} KiB"
    loaded = load_file(loaded_to)
    expected = saved.models[p.good]
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
