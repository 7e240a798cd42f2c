"""Names on disk: the checkpoint, temp, trash and lease names, the files a checkpoint may hold, valid keys.

Every name a reader meets is checked here before it is used as a path: a file name from a manifest or a
model index must pass :func:`is_valid_filename` (no ``/``, no ``..``, one of the known shapes), so nothing
outside the checkpoint directory can ever be named by one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ckptd.format.errors import FormatError

FORMAT_VERSION = "ckptd/1"
CHECKPOINTS_DIRNAME = "checkpoints"
MANIFEST_NAME = "checkpoint_manifest.json"
MODEL_KEY = "model"
MODEL_INDEX_NAME = "model.safetensors.index.json"
TREE_METADATA_KEY = "ckptd.tree"
# A SHARDED model shard's header metadata: the mesh shape and placements each DTensor was saved with.
PLACEMENTS_METADATA_KEY = "ckptd.placements"
# The lease naming the one job that writes an output dir (ckptd.ownership reads and writes it), the lock
# its read-decide-write runs under, and the temp files it is written to before the rename over it:
# ``LEASE_TEMP_NAME`` plus a random suffix (``lease_temp_name``), created O_EXCL, so that nothing found at a
# fixed name (a FIFO, a symlink) can ever be opened by a writer; ``is_lease_temp_name`` recognises them
# (and the bare fixed name older versions used) for sweeps.
LEASE_NAME = ".ckptd-lease.json"
LEASE_LOCK_NAME = ".ckptd-lease.lock"
LEASE_TEMP_NAME = ".ckptd-lease.json.tmp"
# The best-checkpoint mark (``marks``), replaced by renaming a ``BEST_TEMP_NAME-<token>`` file over it.
BEST_NAME = ".ckptd-best.json"
BEST_TEMP_NAME = ".ckptd-best.json.tmp"
# client.save_model: the manifest metadata key that marks a directory as a saved model (so a later
# save_model may replace it, and nothing else), the model component's metadata key holding its Hugging Face
# config, and the file that config is written to beside the shards (what from_pretrained reads).
EXPORT_METADATA_KEY = "ckptd.export"
HF_CONFIG_METADATA_KEY = "hf_config"
HF_CONFIG_NAME = "config.json"

KEY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_KEY_RE = re.compile(KEY_PATTERN + r"\Z")
_CHECKPOINT_RE = re.compile(r"checkpoint-(0|[1-9][0-9]*)\Z")
_TEMP_RE = re.compile(r"\.tmp-checkpoint-(0|[1-9][0-9]*)-([A-Za-z0-9]+)\Z")
_TRASH_RE = re.compile(r"\.trash-checkpoint-(0|[1-9][0-9]*)-([A-Za-z0-9]+)\Z")
_TXN_RE = re.compile(r"[A-Za-z0-9]{1,64}\Z")
_LEASE_TEMP_RE = re.compile(re.escape(LEASE_TEMP_NAME) + r"(-[A-Za-z0-9]{1,64})?\Z")
_BEST_TEMP_RE = re.compile(re.escape(BEST_TEMP_NAME) + r"-[A-Za-z0-9]{1,64}\Z")
_OWNER_SUFFIX = ".owner"
_VETO_SUFFIX = ".veto"
_FILE_RES = [
    re.compile(r"model-[0-9]{5,}-of-[0-9]{5,}\.safetensors\Z"),
    re.compile(re.escape(MODEL_INDEX_NAME) + r"\Z"),
    re.compile(KEY_PATTERN + r"_state\.safetensors\Z"),
    re.compile(KEY_PATTERN + r"_state_rank_[0-9]+\.safetensors\Z"),
    re.compile(KEY_PATTERN + r"_state_group_" + KEY_PATTERN + r"_[0-9]+\.safetensors\Z"),
    re.compile(KEY_PATTERN + r"_state_node_[0-9]+\.safetensors\Z"),
]


def is_valid_key(key: object) -> bool:
    """True for a component key or process group name usable in file names.

    Args:
        key: the candidate (anything; only a str can pass).

    Example:
        >>> is_valid_key("optimizer"), is_valid_key("../etc")
        (True, False)
    """
    return isinstance(key, str) and bool(_KEY_RE.match(key)) and ".." not in key


def is_valid_txn(txn: object) -> bool:
    """True for a transaction id: 1 to 64 ASCII letters and digits.

    Args:
        txn: the candidate.

    Example:
        >>> is_valid_txn("9f3c0a1b"), is_valid_txn("a/b")
        (True, False)
    """
    return isinstance(txn, str) and bool(_TXN_RE.match(txn))


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    """The directory holding an output dir's checkpoints.

    Args:
        output_dir: the training output dir given to CheckpointClient.

    Example:
        >>> checkpoints_root("/runs/exp1")
        PosixPath('/runs/exp1/checkpoints')
    """
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def checkpoint_dirname(step: int) -> str:
    """The name of the committed checkpoint of ``step``.

    Args:
        step: the training step.

    Example:
        >>> checkpoint_dirname(500)
        'checkpoint-500'
    """
    return f"checkpoint-{int(step)}"


def parse_checkpoint_dirname(name: str) -> int | None:
    """Step of a committed checkpoint directory name, or None for anything else (temp, trash, junk).

    Args:
        name: a directory entry of ``checkpoints/``.

    Example:
        >>> parse_checkpoint_dirname("checkpoint-500"), parse_checkpoint_dirname("checkpoint-0500")
        (500, None)
    """
    m = _CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def temp_dirname(step: int, txn: str) -> str:
    """The hidden directory a transaction writes into before its commit renames it.

    Args:
        step: the step being saved.
        txn: the transaction id.

    Example:
        >>> temp_dirname(5, "ab12")
        '.tmp-checkpoint-5-ab12'
    """
    return f".tmp-checkpoint-{int(step)}-{txn}"


def parse_temp_dirname(name: str) -> tuple[int, str] | None:
    """``(step, txn)`` of a temp directory name, or None.

    Args:
        name: a directory entry of ``checkpoints/``.

    Example:
        >>> parse_temp_dirname(".tmp-checkpoint-5-ab12")
        (5, 'ab12')
    """
    m = _TEMP_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def temp_owner_name(step: int, txn: str) -> str:
    """The record beside ``.tmp-checkpoint-<step>-<txn>`` naming the process that owns it (for sweeps).

    Args:
        step: the step being saved.
        txn: the transaction id.

    Example:
        >>> temp_owner_name(5, "ab12")
        '.tmp-checkpoint-5-ab12.owner'
    """
    return temp_dirname(step, txn) + _OWNER_SUFFIX


def parse_temp_owner_name(name: str) -> tuple[int, str] | None:
    """``(step, txn)`` of a temp dir's owner record name, or None.

    Args:
        name: a directory entry of ``checkpoints/``.

    Example:
        >>> parse_temp_owner_name(".tmp-checkpoint-5-ab12.owner")
        (5, 'ab12')
    """
    if not name.endswith(_OWNER_SUFFIX):
        return None
    return parse_temp_dirname(name[: -len(_OWNER_SUFFIX)])


def temp_veto_name(step: int, txn: str) -> str:
    """The record under which the ranks of one save veto it one at a time, and which keeps the outcome.

    Args:
        step: the save's step.
        txn: its transaction id.

    Example:
        >>> temp_veto_name(5, "ab12")
        '.tmp-checkpoint-5-ab12.veto'
    """
    return temp_dirname(step, txn) + _VETO_SUFFIX


def parse_temp_veto_name(name: str) -> tuple[int, str] | None:
    """``(step, txn)`` of a veto record's name, or None.

    Args:
        name: a directory entry of ``checkpoints/``.

    Example:
        >>> parse_temp_veto_name(".tmp-checkpoint-5-ab12.veto")
        (5, 'ab12')
    """
    if not name.endswith(_VETO_SUFFIX):
        return None
    return parse_temp_dirname(name[: -len(_VETO_SUFFIX)])


def trash_dirname(step: int, token: str) -> str:
    """The name a checkpoint is renamed to before it is removed (never visible half-deleted).

    Args:
        step: the step of the checkpoint being removed.
        token: a random alphanumeric token.

    Example:
        >>> trash_dirname(5, "ff00")
        '.trash-checkpoint-5-ff00'
    """
    return f".trash-checkpoint-{int(step)}-{token}"


def is_trash_dirname(name: str) -> bool:
    """True for a trash directory name.

    Args:
        name: a directory entry of ``checkpoints/``.

    Example:
        >>> is_trash_dirname(".trash-checkpoint-5-ff00")
        True
    """
    return bool(_TRASH_RE.match(name))


def lease_temp_name(token: str) -> str:
    """The name of one lease write's temp file (created O_EXCL, renamed over the lease, or removed).

    Args:
        token: a random alphanumeric token, unique to the write.

    Example:
        >>> lease_temp_name("3fa9c2")
        '.ckptd-lease.json.tmp-3fa9c2'
    """
    if not re.fullmatch(r"[A-Za-z0-9]{1,64}", token):
        raise ValueError(f"lease temp token {token!r} must be 1-64 letters or digits")
    return f"{LEASE_TEMP_NAME}-{token}"


def is_lease_temp_name(name: str) -> bool:
    """True for a lease write's temp file (``lease_temp_name``) or the fixed temp name of older versions.

    Args:
        name: a directory entry of ``checkpoints/``.

    Example:
        >>> is_lease_temp_name(".ckptd-lease.json.tmp-3fa9c2"), is_lease_temp_name(".ckptd-lease.json")
        (True, False)
    """
    return bool(_LEASE_TEMP_RE.match(name))


def component_filename(
    key: str,
    pattern: str,
    *,
    rank: int | None = None,
    group: str | None = None,
    instance: int | None = None,
    node: int | None = None,
) -> str:
    """The file a (non-model-index) component part is written to.

    Args:
        key: the component key.
        pattern: a SharingPattern value ("global", "replicated", "per_rank", "per_group", "per_node",
            "sharded"). A SHARDED component's file holds full tensors, like a GLOBAL one: every rank writes
            its distinct pieces at their offsets in it (a region each), so it has the same name.
        rank: the rank, for per_rank.
        group: the process group name, for per_group.
        instance: the group instance index, for per_group.
        node: the node index, for per_node.

    Example:
        >>> component_filename("optimizer", "per_rank", rank=3)
        'optimizer_state_rank_3.safetensors'
    """
    if not is_valid_key(key):
        raise FormatError(f"component key {key!r} is not a valid key; expected {KEY_PATTERN}")
    if pattern in ("global", "replicated", "sharded"):
        return f"{key}_state.safetensors"
    if pattern == "per_rank":
        return f"{key}_state_rank_{int(rank)}.safetensors"  # type: ignore[arg-type]
    if pattern == "per_group":
        if not is_valid_key(group):
            raise FormatError(f"process group name {group!r} is not valid; expected {KEY_PATTERN}")
        return f"{key}_state_group_{group}_{int(instance)}.safetensors"  # type: ignore[arg-type]
    if pattern == "per_node":
        return f"{key}_state_node_{int(node)}.safetensors"  # type: ignore[arg-type]
    raise FormatError(f"unknown sharing pattern {pattern!r}")


def model_shard_filename(index: int, count: int) -> str:
    """The Hugging Face name of model shard ``index`` (0-based) of ``count``.

    Args:
        index: 0-based shard index.
        count: number of shards.

    Example:
        >>> model_shard_filename(0, 2)
        'model-00001-of-00002.safetensors'
    """
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def is_valid_filename(name: object) -> bool:
    """True for exactly the file names a checkpoint directory may hold (the manifest excluded).

    Every name read from a manifest or a model index passes through here before it is joined to the
    checkpoint directory, so no name can point outside it.

    Args:
        name: the candidate.

    Example:
        >>> is_valid_filename("optimizer_state.safetensors"), is_valid_filename("../x_state.safetensors")
        (True, False)
    """
    return (
        isinstance(name, str)
        and "/" not in name
        and "\x00" not in name
        and ".." not in name
        and any(r.match(name) for r in _FILE_RES)
    )


def best_temp_name(token: str) -> str:
    """The temp name a new best-checkpoint mark is written under before it is renamed into place.

    Example:
        >>> best_temp_name("ab12")
        '.ckptd-best.json.tmp-ab12'
    """
    return f"{BEST_TEMP_NAME}-{token}"


def is_best_temp_name(name: str) -> bool:
    """Whether ``name`` is a best-mark temp file (a leftover of a killed writer when no write is running)."""
    return bool(_BEST_TEMP_RE.match(name))
