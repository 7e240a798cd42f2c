"""``ckptd import SRC OUTPUT_DIR``: an existing checkpoint as a pickle-free ckptd checkpoint.

Three kinds of source, told apart by what the directory holds (``detect``):

- a Hugging Face Trainer ``checkpoint-N/``: the model (``model.safetensors``, sharded safetensors with an
  index, or ``pytorch_model.bin``), ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` and
  ``trainer_state.json``; ``config.json`` rides along as the model's config (``save_model`` and ``ckptd
  export`` write it out again). ``training_args.bin`` (a pickled ``TrainingArguments`` object, no training
  state) is left out;
- a Forgather checkpoint: its ``checkpoint_manifest.json`` names the components and their sharing patterns,
  each saved as ``<key>_state.pt`` (the model as safetensors or ``.bin``);
- a DCP checkpoint (``.metadata`` plus ``*.distcp``): each top-level key of the saved state dict becomes a
  component, ``model`` a Hugging Face model.

Pickled files are read only with ``--trust-weights-only-pickle``, and then only by torch's weights-only
unpickler (``torch.load(weights_only=True)``), which builds tensors, numbers, strings and containers and
refuses any other global; NumPy's RNG arrays (HF's ``rng_state.pth``) are admitted by name. DCP's
``.metadata`` is a plain pickle of protocol 4 or later, which ``torch.load`` cannot read at all: it is read
by an unpickler whose ``find_class`` admits only DCP's own metadata records, ``torch.Size``, dtypes,
layouts and paths (``DCP_METADATA_GLOBALS``). DCP's non-tensor values go through ``weights_only=True`` too
(DCP itself would unpickle them unrestricted).

The checkpoint is then saved by a real ``CheckpointClient`` at world size 1, through the node's daemon, so it
is committed exactly like any other and resumes through ``load("latest")`` with components of the same keys.
Per-rank state saved at a world size above 1 (Forgather's ``_rank_<r>`` files, HF's ``rng_state_<r>.pth``)
cannot be staged by one process; such a component is refused with a message naming ``--skip``.
"""

from __future__ import annotations

import argparse
import enum
import io
import json
import logging
import os
import pickle
import re
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptd import format as fmt
from client.components import CheckpointError, SharingPattern, StateComponent, checked_config

logger = logging.getLogger(__name__)

TRUST_FLAG = "--trust-weights-only-pickle"
IMPORT_METADATA_KEY = "ckptd.import"
_RANK_FILE = re.compile(r"(.+)_state_rank_([0-9]+)\.pt\Z")
_HF_RNG_RANK = re.compile(r"rng_state_([0-9]+)\.pth\Z")
# Forgather's patterns, by the names its manifest uses.
_PATTERNS = {p.value: p for p in SharingPattern}


class SourceKind(str, enum.Enum):
    HF_TRAINER = "hf-trainer"
    FORGATHER = "forgather"
    DCP = "dcp"


@dataclass(frozen=True)
class ImportedComponent:
    """One component of the source, read into memory."""

    key: str
    state: Any
    pattern: SharingPattern
    sources: tuple[str, ...]  # the source files it came from
    required: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportPlan:
    """What ``read_source`` found: the components, the step, and what was left out and why."""

    kind: SourceKind
    step: int
    components: list[ImportedComponent]
    left_out: list[str]
    values: dict[str, Any] = field(default_factory=dict)  # plain top-level values (DCP), kept as metadata


class _Frozen:
    """A stateful whose state is the imported one (the import saves it; nothing loads into it)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        raise CheckpointError("an imported component is saved, never loaded into")


# ------------------------------------------------------------------------------------------- reading


def detect(src: Path) -> SourceKind:
    """Which kind of checkpoint ``src`` is; raises CheckpointError naming what was expected.

    Example:
        >>> detect(Path("run/checkpoint-500"))  # doctest: +SKIP
        <SourceKind.HF_TRAINER: 'hf-trainer'>
    """
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory; expected an HF Trainer, Forgather or DCP checkpoint directory")
    names = set(os.listdir(src))
    if ".metadata" in names:
        return SourceKind.DCP
    if fmt.MANIFEST_NAME in names:
        raw = _read_json(src / fmt.MANIFEST_NAME, None)
        if isinstance(raw, dict) and raw.get("format") == fmt.FORMAT_VERSION:
            raise CheckpointError(f"{src} is already a ckptd checkpoint; copy it, or load it with client.load()")
        return SourceKind.FORGATHER
    if names & {"trainer_state.json", "optimizer.pt", "model.safetensors", "pytorch_model.bin"} or any(
        n.endswith(".safetensors.index.json") or n.endswith(".bin.index.json") for n in names
    ):
        return SourceKind.HF_TRAINER
    raise CheckpointError(
        f"{src}: not a checkpoint this tool knows (found {', '.join(sorted(names)[:8]) or 'nothing'}); expected an "
        "HF Trainer checkpoint-N/ (trainer_state.json, model.safetensors, optimizer.pt), a Forgather checkpoint "
        "(checkpoint_manifest.json, *_state.pt) or a DCP checkpoint (.metadata, *.distcp)"
    )


class PickleReader:
    """Reads the pickled files of a source, only if the user said to trust the weights-only unpickler."""

    def __init__(self, trusted: bool) -> None:
        self.trusted = trusted

    def check(self, src: Path, paths: Iterable[str]) -> None:
        """Refuse up front, naming every pickled file the import needs, unless trusted."""
        needed = sorted(set(paths))
        if needed and not self.trusted:
            raise CheckpointError(
                f"{src}: {', '.join(needed)} {'is a pickle' if len(needed) == 1 else 'are pickles'}, which this tool "
                f"reads only when told to: pass {TRUST_FLAG} to read them with torch.load(weights_only=True) (it "
                "builds tensors, numbers, strings and containers, and refuses any other object), or leave their "
                "components out with --skip KEY"
            )

    def load(self, path: Path, extra_globals: Iterable[Any] = ()) -> Any:
        assert self.trusted
        try:
            with torch.serialization.safe_globals(list(extra_globals)):
                return torch.load(_regular(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused by torch's weights-only unpickler ({str(e).splitlines()[0]}); it holds objects "
                "other than tensors and plain values, which this tool never builds: leave it out with --skip KEY"
            ) from None
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read as a torch.save file ({e})") from None


def _numpy_rng_globals() -> list[Any]:
    """What ``np.random.get_state()`` pickles into (HF's ``rng_state.pth``): arrays of plain dtypes only."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    out: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType") if hasattr(dtypes, n)]
    return out


MAX_JSON_BYTES = 64 << 20  # trainer_state.json with a long log_history is megabytes; never gigabytes


def _regular(path: Path) -> Path:
    """``path`` itself, if it is a regular file (a symlink could point anywhere, a FIFO would block)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a symlink, FIFO or directory); nothing is read through it")
    return path


def _read_json(path: Path, kind: type | None = dict) -> Any:
    """A JSON file of the source (at most ``MAX_JSON_BYTES``), which must hold a ``kind`` if given."""
    try:
        with open(_regular(path), "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: more than {MAX_JSON_BYTES} bytes of JSON; not a checkpoint file")
        value = json.loads(data)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if kind is not None and not isinstance(value, kind):
        raise CheckpointError(f"{path}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(_regular(path)), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _hf_model_files(src: Path) -> tuple[list[str], bool]:
    """The model's files in an HF-style directory (shards and index, or one file), and whether pickled."""
    for index, pickled in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        if (src / index).is_file():
            weight_map = _read_json(src / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{src / index}: no 'weight_map' object of tensor names to shard file names")
            shards = sorted(set(weight_map.values()))
            bad = [s for s in shards if "/" in s or s.startswith(".") or "\0" in s]
            if bad:
                raise CheckpointError(f"{src / index}: shard names {bad[:3]} are not file names in {src}")
            return shards, pickled
    for name, pickled in (("model.safetensors", False), ("pytorch_model.bin", True)):
        if (src / name).is_file():
            return [name], pickled
    return [], False


def _read_hf_model(src: Path, files: list[str], pickled: bool, reader: PickleReader) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in files:
        part = reader.load(src / name) if pickled else _read_safetensors(src / name)
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{src / name}: expected a {{name: tensor}} state dict")
        state.update(part)
    return state


def _hf_rng_to_rngstate(raw: Any, where: Path) -> dict[str, Any]:
    """HF's ``{"python", "numpy", "cpu", "cuda"}`` as ``RNGState``'s state dict."""
    if not isinstance(raw, dict) or "cpu" not in raw or "python" not in raw:
        raise CheckpointError(f"{where}: expected HF's RNG state (keys python, numpy, cpu), got {type(raw).__name__}")
    out: dict[str, Any] = {"torch": raw["cpu"], "python": raw["python"]}
    if "numpy" in raw:
        out["numpy"] = raw["numpy"]
    cuda = raw.get("cuda")
    if cuda is not None:
        out["cuda"] = list(cuda) if isinstance(cuda, (list, tuple)) else [cuda]
    return out


def read_hf_trainer(src: Path, reader: PickleReader, skip: set[str]) -> ImportPlan:
    names = set(os.listdir(src))
    left_out = []
    model_files, model_pickled = _hf_model_files(src)
    plan: list[tuple[str, list[str], bool]] = []  # key, files, pickled
    if model_files:
        plan.append((fmt.MODEL_KEY, model_files, model_pickled))
    for key, name in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"), ("scaler", "scaler.pt")):
        if name in names:
            plan.append((key, [name], True))
    rank_rng = sorted(n for n in names if _HF_RNG_RANK.match(n))
    if "rng_state.pth" in names:
        plan.append(("rng", ["rng_state.pth"], True))
    elif len(rank_rng) == 1 and rank_rng[0] == "rng_state_0.pth":
        plan.append(("rng", rank_rng, True))
    elif rank_rng and "rng" not in skip:
        raise CheckpointError(
            f"{src} holds the RNG state of {len(rank_rng)} ranks ({', '.join(rank_rng[:4])}); an import runs as one "
            "process and cannot stage per-rank state of another world size: pass --skip rng"
        )
    if "trainer_state.json" in names:
        plan.append(("trainer_state", ["trainer_state.json"], False))
    if "training_args.bin" in names:
        left_out.append("training_args.bin (a pickled TrainingArguments object, not training state)")
    for key in sorted(skip & {k for k, _, _ in plan}):
        left_out.append(f"{key} (--skip)")
    plan = [p for p in plan if p[0] not in skip]
    reader.check(src, [f for _, files, pickled in plan if pickled for f in files])
    comps = []
    for key, files, pickled in plan:
        metadata: dict[str, Any] = {}
        if key == fmt.MODEL_KEY:
            state: Any = _read_hf_model(src, files, pickled, reader)
            if "config.json" in names:
                try:
                    config = _read_json(src / "config.json")
                    problem = checked_config(config)
                except CheckpointError as e:
                    problem = str(e)
                if problem is None:
                    metadata[fmt.HF_CONFIG_METADATA_KEY] = config
                else:
                    left_out.append(f"config.json ({problem})")
        elif key == "rng":
            state = _hf_rng_to_rngstate(reader.load(src / files[0], _numpy_rng_globals()), src / files[0])
        elif key == "trainer_state":
            state = _read_json(src / files[0])  # HF's TrainerState, as an object
        else:
            state = reader.load(src / files[0])
        pattern = SharingPattern.PER_RANK if key == "rng" else SharingPattern.GLOBAL
        comps.append(ImportedComponent(key, state, pattern, tuple(files), metadata=metadata))
    if not comps:
        raise CheckpointError(f"{src}: nothing left to import (every component was skipped or absent)")
    recorded = _read_json(src / "trainer_state.json").get("global_step") if "trainer_state.json" in names else None
    step = _step_of(src, recorded)
    return ImportPlan(SourceKind.HF_TRAINER, step, comps, left_out)


def read_forgather(src: Path, reader: PickleReader, skip: set[str]) -> ImportPlan:
    manifest = _read_json(src / fmt.MANIFEST_NAME)
    declared = manifest.get("components") if isinstance(manifest, dict) else None
    if not isinstance(declared, dict) or not declared:
        raise CheckpointError(f"{src / fmt.MANIFEST_NAME}: no 'components' map (expected Forgather's manifest)")
    names = set(os.listdir(src))
    left_out = [f"{k} (--skip)" for k in sorted(skip & set(declared))]
    wanted: list[tuple[str, SharingPattern, list[str], bool, bool]] = []  # key, pattern, files, pickled, required
    for key, rec in sorted(declared.items()):
        if key in skip:
            continue
        if not fmt.is_valid_key(key) or not isinstance(rec, dict):
            raise CheckpointError(f"{src / fmt.MANIFEST_NAME}: component {key!r} is not a valid key and record")
        pattern = _PATTERNS.get(str(rec.get("sharing_pattern", "global")).lower())
        if pattern is None:
            raise CheckpointError(f"component {key!r}: unknown sharing_pattern {rec.get('sharing_pattern')!r}")
        if pattern in (SharingPattern.PER_GROUP, SharingPattern.PER_NODE):
            raise CheckpointError(
                f"component {key!r} was saved {pattern.value.upper()}; an import runs as one process, without the "
                f"job's process groups or nodes, and cannot stage it: pass --skip {key}"
            )
        required = bool(rec.get("required", True))
        if key == fmt.MODEL_KEY and (model := _hf_model_files(src))[0]:
            wanted.append((key, SharingPattern.GLOBAL, model[0], model[1], required))
            continue
        ranked = sorted(n for n in names if (m := _RANK_FILE.match(n)) and m.group(1) == key)
        if f"{key}_state.pt" in names:
            wanted.append((key, pattern, [f"{key}_state.pt"], True, required))
        elif ranked == [f"{key}_state_rank_0.pt"]:
            wanted.append((key, SharingPattern.PER_RANK, ranked, True, required))
        elif ranked:
            raise CheckpointError(
                f"component {key!r} was saved per rank by {len(ranked)} ranks ({', '.join(ranked[:4])}); an import "
                f"runs as one process and cannot stage per-rank state of another world size: pass --skip {key}"
            )
        elif required:
            raise CheckpointError(f"{src}: the manifest names component {key!r}, and no file of it is there")
        else:
            left_out.append(f"{key} (optional, and its file is not there)")
    reader.check(src, [f for _, _, files, pickled, _ in wanted if pickled for f in files])
    comps = []
    for key, pattern, files, pickled, required in wanted:
        if key == fmt.MODEL_KEY:
            state: Any = _read_hf_model(src, files, pickled, reader)
        else:
            state = reader.load(src / files[0], _numpy_rng_globals())
        comps.append(ImportedComponent(key, state, pattern, tuple(files), required=required))
    if not comps:
        raise CheckpointError(f"{src}: nothing left to import (every component was skipped or absent)")
    return ImportPlan(SourceKind.FORGATHER, _step_of(src, manifest.get("step")), comps, left_out)


def _dcp_metadata_globals() -> dict[tuple[str, str], Any]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {("torch", "Size"): torch.Size, ("pathlib", "PosixPath"): pathlib.PosixPath}
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    ):
        if hasattr(metadata, name):
            allowed[(metadata.__name__, name)] = getattr(metadata, name)
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    return allowed


class _DCPMetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata``, building DCP's metadata records and nothing else (``DCP_METADATA_GLOBALS``)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.allowed = _dcp_metadata_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not one of DCP's metadata records")


def _restore_optimizer_keys(tree: Any) -> Any:
    """DCP flattens ``optimizer.state_dict()``'s integer state keys to strings; put them back where the
    param groups name those integers (an FQN-keyed optimizer state, from ``get_state_dict``, stays)."""
    if isinstance(tree, dict):
        tree = {k: _restore_optimizer_keys(v) for k, v in tree.items()}
        state, groups = tree.get("state"), tree.get("param_groups")
        if isinstance(state, dict) and isinstance(groups, list):
            ids = {p for g in groups if isinstance(g, dict) for p in g.get("params", []) if isinstance(p, int)}
            if all(isinstance(k, str) and k.isdigit() and int(k) in ids for k in state):
                tree["state"] = {int(k): v for k, v in state.items()}
        return tree
    if isinstance(tree, list):
        return [_restore_optimizer_keys(v) for v in tree]
    return tree


MAX_DCP_ENTRIES = 10_000_000


def _read_dcp_metadata(src: Path) -> Any:
    """DCP's ``.metadata`` through the restricted unpickler, checked before any of it is used: the records'
    types, ``planner_data`` paths (non-empty tuples of keys and bounded list indices) and storage paths (file
    names inside SRC, no '/' or '..')."""
    from torch.distributed.checkpoint.metadata import Metadata

    where = src / ".metadata"
    try:
        with open(_regular(where), "rb") as f:
            md = _DCPMetadataUnpickler(f.read()).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: refused ({e}); only DCP's metadata records are built") from None
    except (OSError, EOFError, AttributeError, TypeError, ValueError, IndexError, RecursionError) as e:
        raise CheckpointError(f"{where}: not a readable DCP metadata file ({type(e).__name__}: {e})") from None
    entries = getattr(md, "state_dict_metadata", None)
    if not isinstance(md, Metadata) or not isinstance(entries, dict) or len(entries) > MAX_DCP_ENTRIES:
        raise CheckpointError(f"{where}: not DCP metadata (no state_dict_metadata map of bounded size)")
    mappings = getattr(md, "planner_data", None)
    for fqn, path in mappings.items() if isinstance(mappings, dict) else ():
        ok = isinstance(path, tuple) and path and isinstance(path[0], str)
        ok = ok and all(isinstance(p, str) or (type(p) is int and 0 <= p <= len(entries)) for p in path)
        if not ok:
            raise CheckpointError(f"{where}: the planner path of {fqn!r} is {path!r}, not a tuple of keys and indices")
    storage = getattr(md, "storage_data", None)
    for info in storage.values() if isinstance(storage, dict) else ():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or "/" in rel or rel.startswith(".") or "\0" in rel:
            raise CheckpointError(f"{where}: names a storage file {rel!r} that is not a file name inside {src}")
        _regular(src / rel)
    return md


def read_dcp(src: Path, reader: PickleReader, skip: set[str]) -> ImportPlan:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    # The .metadata and every non-tensor value are pickles: the flag is needed for any DCP checkpoint.
    reader.check(src, [".metadata", *sorted(n for n in os.listdir(src) if n.endswith(".distcp"))])
    md = _read_dcp_metadata(src)
    mappings = md.planner_data if isinstance(getattr(md, "planner_data", None), dict) else {}
    flat: dict[str, Any] = {}
    for fqn, item in md.state_dict_metadata.items():
        top = mappings.get(fqn, (fqn,))[0]
        if top in skip:
            continue
        if isinstance(item, TensorStorageMetadata):
            flat[fqn] = torch.empty(item.size, dtype=item.properties.dtype)
        elif isinstance(item, BytesStorageMetadata):
            flat[fqn] = None
        else:
            raise CheckpointError(f"{src}: {fqn} has storage metadata of type {type(item).__name__}, not supported")

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                # Kept aside: dcp.load writes its own copies of the entries back into the dict it was given.
                loaded_bytes[fqn] = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(
                    f"{src}: the value of {fqn} was refused by torch's weights-only unpickler "
                    f"({str(e).splitlines()[0]}): leave its component out with --skip"
                ) from None

    loaded_bytes: dict[str, Any] = {}
    dcp.load(flat, checkpoint_id=str(src), planner=WeightsOnlyPlanner(flatten_state_dict=False))
    missing = [fqn for fqn, v in flat.items() if v is None and fqn not in loaded_bytes]
    if missing:
        raise CheckpointError(f"{src}: the values of {missing[:3]} were not read back; the checkpoint is incomplete")
    flat.update(loaded_bytes)
    nested: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = mappings.get(fqn, (fqn,))
        _set_path(nested, list(path), value)
    nested = _restore_optimizer_keys(nested)
    comps = []
    values: dict[str, Any] = {}
    for key, state in nested.items():
        if isinstance(state, (int, float, str, bool)) or state is None:
            values[key] = state  # a plain top-level value (a step count): the manifest's metadata keeps it
            continue
        if not fmt.is_valid_key(key):
            raise CheckpointError(f"{src}: top-level key {key!r} is not a valid component key (pass --skip {key})")
        comps.append(ImportedComponent(key, state, SharingPattern.GLOBAL, (".metadata",)))
    if not comps:
        raise CheckpointError(f"{src}: nothing left to import (every component was skipped or absent)")
    step = _step_of(src, nested.get("step") if isinstance(nested.get("step"), int) else None)
    return ImportPlan(SourceKind.DCP, step, comps, [f"{k} (--skip)" for k in sorted(skip)], values)


def _set_path(tree: dict[str, Any], path: list[Any], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            while len(node) <= part:
                node.append(None)
            if node[part] is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        else:
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def _step_of(src: Path, recorded: Any) -> int:
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 0:
        return recorded
    m = re.search(r"([0-9]+)\Z", src.name)
    if m:
        return int(m.group(1))
    raise CheckpointError(f"{src}: no step recorded and none in its name; pass --step N")


def read_source(src: Path, trust_pickle: bool = False, skip: Iterable[str] = ()) -> ImportPlan:
    """Read an HF Trainer, Forgather or DCP checkpoint into memory, pickle only by the weights-only rules.

    Args:
        src: the source checkpoint directory.
        trust_pickle: read its pickled files with ``torch.load(weights_only=True)`` (else they are refused).
        skip: component keys to leave out.

    Example:
        >>> read_source(Path("run/checkpoint-500"), trust_pickle=True).step  # doctest: +SKIP
        500
    """
    reader = PickleReader(trust_pickle)
    kind = detect(src)
    readers = {SourceKind.HF_TRAINER: read_hf_trainer, SourceKind.FORGATHER: read_forgather, SourceKind.DCP: read_dcp}
    return readers[kind](src, reader, set(skip))


def import_checkpoint(
    src: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    skip: Iterable[str] = (),
    step: int | None = None,
    endpoint: str | None = None,
) -> Path:
    """Import ``src`` as ``output_dir/checkpoints/checkpoint-<step>``, saved by the daemon like any save.

    Args:
        src: an HF Trainer, Forgather or DCP checkpoint directory.
        output_dir: the ckptd output dir to save into (a checkpoint of that step must not exist there).
        trust_pickle: read pickled files with ``torch.load(weights_only=True)``; without it they are refused.
        skip: component keys to leave out.
        step: the step to save as (default: the source's recorded step, else the number ending its name).
        endpoint: the daemon's address (default: ``$CKPTD_ENDPOINT`` or the node default; one is started).

    Returns:
        The committed checkpoint's path.

    Example:
        >>> import_checkpoint("hf-run/checkpoint-500", "run", trust_pickle=True)  # doctest: +SKIP
        PosixPath('run/checkpoints/checkpoint-500')
    """
    from client.client import CheckpointClient

    src = Path(src)
    plan = read_source(src, trust_pickle, skip)
    step = plan.step if step is None else step
    final = fmt.checkpoints_root(Path(output_dir)) / fmt.checkpoint_dirname(step)
    if final.exists():
        raise CheckpointError(f"{final} already exists; import into another output dir, or pass --step N")
    try:
        comps = [
            StateComponent(c.key, _Frozen(c.state), c.pattern, required=c.required, metadata=dict(c.metadata))
            for c in plan.components
        ]
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None
    meta = {
        IMPORT_METADATA_KEY: {
            "source": str(src.resolve()),
            "format": plan.kind.value,
            "left_out": plan.left_out,
            "values": plan.values,
        }
    }
    with CheckpointClient(output_dir, comps, endpoint=endpoint, overlap_staging=False) as client:
        path = client.save_async(step, metadata=meta).wait()
    for note in plan.left_out:
        logger.warning("left out of the import: %s", note)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m client.importing SRC OUTPUT_DIR [...]`` (what ``ckptd import`` runs)."""
    parser = argparse.ArgumentParser(prog="ckptd import", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="the HF Trainer, Forgather or DCP checkpoint directory")
    parser.add_argument("output_dir", help="the ckptd output dir; the checkpoint lands in checkpoints/checkpoint-N")
    parser.add_argument(TRUST_FLAG, dest="trust", action="store_true")
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("--step", type=int)
    parser.add_argument("--endpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        path = import_checkpoint(
            args.src, args.output_dir, trust_pickle=args.trust, skip=args.skip, step=args.step, endpoint=args.endpoint
        )
    except CheckpointError as e:
        sys.stderr.write(f"ckptd import: {e}\n")
        return 2
    sys.stdout.write(f"imported {args.src} as {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
