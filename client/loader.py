"""Loading: find the checkpoint to resume from, read and verify this rank's share, then apply it.

Reading happens in full before anything is applied, so a checkpoint that fails verification never
leaves the trainer half-restored; every rank then agrees (one all_gather) on whether the candidate is
usable, so no two ranks resume from different checkpoints.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptd import format as fmt
from client import sharding
from client.components import CheckpointError, SharingPattern
from client.planning import ComponentPlan, Topology

logger = logging.getLogger(__name__)


class VerificationFailed(CheckpointError):
    """The candidate checkpoint is damaged (missing/short/corrupt file, bad manifest): try an older one."""


@dataclass
class ReadResult:
    states: dict[str, Any]  # component key -> state to pass to load_state_dict
    skipped: list[str]  # optional components not restored, with the reason
    bytes_read: int


# What reading hostile content can raise besides FormatError/OSError (torch refusing a shape that
# safetensors accepts, e.g. [0, 2**63]); it is the checkpoint's fault, so it becomes VerificationFailed.
CONTENT_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
    RuntimeError,
)


def tensors_from_buffer(buf: Any, layout: fmt.SafetensorsLayout) -> dict[str, torch.Tensor]:
    base = len(layout.header)
    out = {}
    for e in layout.entries:
        dtype = fmt.torch_dtype(e.dtype)
        n = (e.end - e.begin) // max(1, fmt.DTYPE_SIZES[e.dtype])
        if n == 0:
            out[e.name] = torch.empty(e.shape, dtype=dtype)
        else:
            out[e.name] = torch.frombuffer(buf, dtype=dtype, count=n, offset=base + e.begin).view(e.shape)
    return out


def _damaged(path: Path, e: BaseException) -> VerificationFailed:
    """VerificationFailed naming the file for an error its content caused."""
    if isinstance(e, fmt.FormatError):
        text = str(e)
        return VerificationFailed(text if text.startswith(str(path)) else f"{path}: {text}")
    if isinstance(e, OSError):
        return VerificationFailed(f"{path}: cannot be read ({e.strerror or e})")
    return VerificationFailed(
        f"{path}: cannot be read as a checkpoint file ({type(e).__name__}: {fmt.brief(str(e))}); it is damaged"
    )


def read_safetensors(
    d: fmt.CheckpointDir, name: str, record: fmt.FileRecord, verify: bool
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of one safetensors file, mapped copy-on-write and verified; opened relative to
    the checkpoint directory ``d``. Anything wrong with the file is a VerificationFailed naming it."""
    path = d.path / name
    try:
        buf = fmt.map_verified(path, record, verify_checksum=verify, at=d)
    except (fmt.FormatError, OSError) as e:
        raise _damaged(path, e) from None
    try:
        view = memoryview(buf)
        try:
            meta, layout = fmt.parse_safetensors_header(view, len(buf))
        finally:
            view.release()
        return meta, tensors_from_buffer(buf, layout)
    except (fmt.FormatError, *CONTENT_ERRORS) as e:
        raise _damaged(path, e) from None


def read_file(
    d: fmt.CheckpointDir, name: str, record: fmt.FileRecord, verify: bool, max_bytes: int | None = None
) -> bytearray:
    path = d.path / name
    try:
        return fmt.read_verified(path, record, verify_checksum=verify, max_bytes=max_bytes, at=d)
    except (fmt.FormatError, OSError) as e:
        raise _damaged(path, e) from None


def _record(ckpt: Path, manifest: fmt.Manifest, name: str) -> fmt.FileRecord:
    rec = manifest.files.get(name)
    if rec is None:
        raise VerificationFailed(f"{ckpt / name}: not listed in {fmt.MANIFEST_NAME}; the checkpoint is incomplete")
    return rec


def topology_mismatch(
    p: ComponentPlan, comp: fmt.ComponentRecord, manifest: fmt.Manifest, topo: Topology
) -> str | None:
    """Why this rank cannot read its share of ``comp`` at the running topology, or None if it can."""
    pattern = p.pattern
    if pattern == SharingPattern.PER_RANK and manifest.world_size != topo.world_size:
        return (
            f"component {p.key!r} is PER_RANK and was saved by {manifest.world_size} ranks, "
            f"but {topo.world_size} are running"
        )
    if pattern == SharingPattern.PER_GROUP:
        saved = [list(m) for m in (comp.group_instances or [])]
        running = [list(m) for m in topo.groups.get(p.component.process_group_name or "", ((0,),))]
        if saved != running:
            return (
                f"component {p.key!r} is PER_GROUP over {comp.group_name!r}; saved instances {saved}, "
                f"running instances {running}"
            )
    if pattern == SharingPattern.PER_NODE:
        saved_nodes = manifest.topology.get("nnodes")
        if saved_nodes != topo.nnodes:
            return f"component {p.key!r} is PER_NODE and was saved on {saved_nodes} node(s), {topo.nnodes} running"
    if comp.sharing_pattern != pattern.value and not (
        comp.sharing_pattern in FULL_TENSOR_PATTERNS and pattern.value in FULL_TENSOR_PATTERNS
    ):
        return f"component {p.key!r} was saved as {comp.sharing_pattern}, is declared {pattern.value} now"
    return None


# Patterns whose files hold whole tensors under the same names (a SHARDED file is a GLOBAL one written in
# pieces): a checkpoint saved with one loads into a component declared with another.
FULL_TENSOR_PATTERNS = ("global", "replicated", "sharded")


def read_component(d: fmt.CheckpointDir, manifest: fmt.Manifest, p: ComponentPlan, verify: bool) -> tuple[Any, int]:
    ckpt = d.path
    comp = manifest.components[p.key]
    if p.is_model_index and p.filename in comp.files:
        state, _ = read_model(d, manifest, p, lambda _name: verify)
        return state, sum(manifest.files[f].size for f in comp.files if f in manifest.files)
    name = p.filename if not p.is_model_index else fmt.component_filename(p.key, p.pattern.value)
    rec = _record(ckpt, manifest, name)
    meta, tensors = read_safetensors(d, name, rec, verify)
    tree = _tree_of(ckpt / name, meta)
    try:
        state = fmt.unflatten_state(tree, tensors)
    except fmt.FormatError as e:
        raise VerificationFailed(f"{ckpt / name}: cannot rebuild the state tree ({e}); the file is damaged") from None
    return state, rec.size


def read_model(
    d: fmt.CheckpointDir, manifest: fmt.Manifest, p: ComponentPlan, checked: Any
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The model's Hugging Face shards as ``{name: full tensor}`` in index order (tied names included), and
    the names saved as DTensors; ``checked(file)`` says whether to verify that file's checksum here."""
    ckpt = d.path
    index_path = ckpt / p.filename
    index_rec = _record(ckpt, manifest, p.filename)
    index = read_file(d, p.filename, index_rec, checked(p.filename), max_bytes=fmt.MAX_INDEX_BYTES)
    try:
        weight_map, tied = fmt.parse_model_index(bytes(index), str(index_path))
    except fmt.FormatError as e:
        raise _damaged(index_path, e) from None
    # Only the model's own shards, never another component's file, whatever the index says.
    problems = fmt.index_problems(ckpt, manifest, weight_map, tied)
    if problems:
        raise VerificationFailed(problems[0])
    state: dict[str, torch.Tensor] = {}
    shard_tensors: dict[str, set[str]] = {}
    dtensors: set[str] = set()
    for shard in sorted(set(weight_map.values())):
        rec = _record(ckpt, manifest, shard)
        meta, tensors = read_safetensors(d, shard, rec, checked(shard))
        shard_tensors[shard] = set(tensors)
        state.update(tensors)
        dtensors |= _saved_dtensors(ckpt / shard, meta)
    problems = fmt.index_problems(ckpt, manifest, weight_map, tied, shard_tensors)
    if problems:
        raise VerificationFailed(problems[0])
    for group in tied:
        for alias in group[1:]:
            state[alias] = state[group[0]]
    for group in tied:
        if group[0] in dtensors:
            dtensors.update(group[1:])
    # Keep the order of the index (the order the model returned its state_dict in).
    return {name: state[name] for name in _index_order(weight_map, tied)}, dtensors


def _saved_dtensors(path: Path, meta: dict[str, str]) -> set[str]:
    """The tensors of a SHARDED model shard that were DTensors when saved (its placements metadata)."""
    raw = meta.get(fmt.PLACEMENTS_METADATA_KEY)
    if raw is None:
        return set()
    try:
        placements = fmt.load_json(raw, str(path), "placements metadata", fmt.MAX_TREE_VALUES)
    except fmt.FormatError as e:
        raise VerificationFailed(str(e)) from None
    if not isinstance(placements, dict):
        raise VerificationFailed(f"{path}: header metadata {fmt.PLACEMENTS_METADATA_KEY!r} is not a map")
    return set(placements)


def live_state(p: ComponentPlan) -> Any:
    """A SHARDED component's live ``state_dict()``: the layout its checkpoint is resharded into."""
    try:
        return p.component.stateful.state_dict()
    except Exception as e:
        raise CheckpointError(
            f"component {p.key!r}: state_dict() raised {type(e).__name__}: {e}; a SHARDED component's live "
            "state_dict() gives the layout to load into"
        ) from e


def read_sharded(
    d: fmt.CheckpointDir, manifest: fmt.Manifest, p: ComponentPlan, verify: bool, topo: Topology, target: Any
) -> tuple[Any, int]:
    """A SHARDED component's state in the live object's layout (the resharding load).

    The target layout is the live ``state_dict()`` (``target``, from :func:`live_state`): each saved tensor
    becomes a DTensor on the target's mesh and placements holding only this rank's piece, sliced out of the
    mapped file (so only the bytes that overlap it are read), or the full tensor where the target is a plain
    tensor. Every file's checksum
    is verified by one rank only (picked by a hash of the file's name; the verdicts are shared), so the job
    reads each byte once, not once per rank. Returns the state and the bytes of this rank's pieces."""
    ckpt = d.path

    def checked_here(name: str) -> bool:
        # By name alone (not by the manifest's file lists, which a damaged manifest could leave short): every
        # file read is checked by exactly one rank, the same on every rank.
        return verify and int(fmt.checksum_bytes(name.encode()).split(":")[1][:8], 16) % topo.world_size == topo.rank

    nbytes = 0

    def convert(name: str, full: torch.Tensor, saved_as_dtensor: bool, live: Any) -> Any:
        nonlocal nbytes
        value = sharding.reshard(full, live, name, saved_as_dtensor, topo.world_size)
        local = sharding.local_tensor(value)
        nbytes += local.numel() * local.element_size()
        return value

    if p.is_model_index:
        if not isinstance(target, dict):
            raise CheckpointError(f"component {p.key!r}: a SHARDED model's state_dict() must be a flat dict")
        state, dtensors = read_model(d, manifest, p, checked_here)
        return {name: convert(name, t, name in dtensors, target.get(name)) for name, t in state.items()}, nbytes
    try:
        live = {leaf.name: leaf.tensor for leaf in fmt.flatten_state(target, p.key, sharded=True)[1]}
    except fmt.FormatError as e:
        raise CheckpointError(f"component {p.key!r}: its live state_dict() cannot give a target layout: {e}") from None
    name = p.filename
    rec = _record(ckpt, manifest, name)
    meta, tensors = read_safetensors(d, name, rec, checked_here(name))
    tree = _tree_of(ckpt / name, meta)
    try:
        state = fmt.unflatten_state(tree, tensors, lambda n, t, was_dt: convert(n, t, was_dt, live.get(n)))
    except fmt.FormatError as e:
        raise VerificationFailed(f"{ckpt / name}: cannot rebuild the state tree ({e}); the file is damaged") from None
    return state, nbytes


def _tree_of(path: Path, meta: dict[str, str]) -> Any:
    tree_json = meta.get(fmt.TREE_METADATA_KEY)
    if tree_json is None:
        raise VerificationFailed(f"{path}: header metadata lacks {fmt.TREE_METADATA_KEY!r}")
    try:
        return fmt.load_tree(tree_json, f"{path} (header metadata {fmt.TREE_METADATA_KEY!r})")
    except fmt.FormatError as e:
        raise VerificationFailed(str(e)) from None


def _index_order(weight_map: dict[str, str], tied: list[list[str]]) -> list[str]:
    names = list(weight_map)
    for group in tied:
        for alias in group[1:]:
            if alias not in weight_map:
                names.append(alias)
    return names


def read_share(
    ckpt: Path,
    plans: list[ComponentPlan],
    topo: Topology,
    strict: bool,
    verify: bool,
    skip: frozenset[str] = frozenset(),
) -> ReadResult:
    """Read (and verify) everything this rank needs from ``ckpt``; applies nothing.

    Raises VerificationFailed when the checkpoint is damaged (the caller may fall back to an older one):
    anything wrong with its content, whatever the bytes, is one, naming the file at fault. CheckpointError
    when it cannot serve this job (missing required component, topology mismatch).
    """
    # The directory is opened once: every file is read relative to it, never through a path resolved again.
    try:
        d = fmt.CheckpointDir(ckpt)
    except FileNotFoundError:
        raise VerificationFailed(f"{ckpt}: no longer exists (deleted by retention or by hand?)") from None
    except (fmt.FormatError, OSError) as e:
        raise _damaged(ckpt, e) from None
    with d:
        return _read_share(d, plans, topo, strict, verify, skip)


def _missing_files(d: fmt.CheckpointDir, comp: fmt.ComponentRecord) -> list[str]:
    """The files of ``comp`` that are not in the checkpoint directory at all (deleted by hand)."""
    return [name for name in comp.files if not os.path.lexists(d.path / name)]


def _read_share(
    d: fmt.CheckpointDir,
    plans: list[ComponentPlan],
    topo: Topology,
    strict: bool,
    verify: bool,
    skip: frozenset[str] = frozenset(),
) -> ReadResult:
    ckpt = d.path
    try:
        manifest = fmt.read_manifest(d)
    except (fmt.FormatError, OSError) as e:
        raise _damaged(ckpt / fmt.MANIFEST_NAME, e) from None
    # Every SHARDED component's live state first, on every rank alike, before anything can fail on one rank
    # only (a damaged file): a state_dict() that runs collectives must not leave the others waiting.
    targets = {p.key: live_state(p) for p in plans if p.pattern == SharingPattern.SHARDED and p.key not in skip}
    states: dict[str, Any] = {}
    skipped: list[str] = []
    total = 0
    for p in plans:
        if p.key in skip:
            logger.info("%s: component %r left out (skip=)", ckpt, p.key)
            skipped.append(p.key)
            continue
        comp = manifest.components.get(p.key)
        missing = _missing_files(d, comp) if comp is not None and not p.component.required else []
        if missing:
            # The seed's way to leave a component out (delete its file): this checkpoint still serves, without
            # it. A file that is there but damaged is not this case: it fails verification below.
            _warn(
                f"{ckpt}: {', '.join(missing)} of optional component {p.key!r} is missing (deleted by hand?); "
                f"{p.key!r} is not restored, everything else is from this checkpoint "
                f"(load(skip=[{p.key!r}]) leaves it out on purpose, without this warning)"
            )
            skipped.append(p.key)
            continue
        if comp is None:
            problem = f"component {p.key!r} is not in this checkpoint (expected {p.filename})"
            advice = "resume from a checkpoint that has it, mark it required=False, or load with strict=False"
        else:
            problem = topology_mismatch(p, comp, manifest, topo)
            advice = "resume with the topology it was saved with, or mark the component required=False"
        if problem is not None:
            if p.component.required and strict:
                raise CheckpointError(f"{ckpt}: {problem}; {advice}")
            _warn(f"{ckpt}: {problem}; optional component {p.key!r} is not restored")
            skipped.append(p.key)
            continue
        if p.pattern == SharingPattern.SHARDED:
            state, nbytes = read_sharded(d, manifest, p, verify, topo, targets[p.key])
        else:
            state, nbytes = read_component(d, manifest, p, verify)
        states[p.key] = state
        total += nbytes
    return ReadResult(states, skipped, total)


def _warn(text: str) -> None:
    logger.warning("%s", text)
    warnings.warn(text, RuntimeWarning, stacklevel=4)


def candidates(output_dir: Path, checkpoint: str | os.PathLike) -> tuple[list[Path], bool]:
    """Checkpoints to try, newest first, and whether falling back to older ones is allowed.

    With "latest", every ``checkpoint-<int>`` entry that is not a checkpoint (no readable manifest, a
    manifest that is a FIFO or a symlink, a directory that is a symlink...) is skipped with a warning that
    names the file at fault. An explicit path must be a real checkpoint directory, not a symlink to one.
    """
    if isinstance(checkpoint, str) and checkpoint == "latest":
        survey = fmt.survey_checkpoints(output_dir)
        for b in survey.broken:
            _warn(f"{b.path} is not a usable checkpoint and is skipped: {b.reason}")
        return [c.path for c in reversed(survey.found)], True
    if isinstance(checkpoint, str) and checkpoint == "best":
        try:
            best = fmt.find_best_checkpoint(output_dir)
        except fmt.FormatError as e:
            raise CheckpointError(str(e)) from None
        if best is None:
            raise CheckpointError(
                f"{fmt.checkpoints_root(output_dir)}: no checkpoint is marked best (or the one marked is gone); "
                "pass best_metric= to CheckpointClient so that saves with that metadata key are ranked, call "
                "client.set_best_checkpoint(step), or load 'latest'"
            )
        return [best], False
    path = Path(checkpoint)
    if not path.is_absolute() and not os.path.lexists(path):
        path = fmt.checkpoints_root(output_dir) / path
    try:
        fmt.check_directory(path)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: no such checkpoint directory; pass 'latest', None, or a checkpoint path"
        ) from None
    except fmt.FormatError as e:
        raise CheckpointError(str(e)) from None
    return [path], False
