"""The model component in Hugging Face's layout: how it is split into shards, and its index file.

``model.safetensors.index.json`` is small JSON; readers load it with a bound of :data:`MAX_INDEX_BYTES`, parse
it in bounded memory, and every shard name it lists must be a valid checkpoint file name (so it can never
point outside the checkpoint directory). Which files those shards may be (the model component's own) is
checked against the manifest by ``reading.index_problems``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ckptd.format.errors import FormatError
from ckptd.format.names import FORMAT_VERSION, MODEL_INDEX_NAME, is_valid_filename
from ckptd.format.safejson import brief, load_json

DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3
# An index lists one line per tensor: even a model of a million tensors stays far below this.
MAX_INDEX_BYTES = 64 * 1024 * 1024


def plan_model_shards(sizes: Sequence[int], max_shard_size: int) -> list[list[int]]:
    """Greedy split of tensor indices (in the order given) into shards of at most ``max_shard_size`` bytes.

    A tensor larger than the limit gets a shard of its own, as in Hugging Face's own sharding.

    Args:
        sizes: bytes of each tensor, in the order they are written.
        max_shard_size: the limit per shard.

    Example:
        >>> plan_model_shards([4, 4, 4, 4], 8)
        [[0, 1], [2, 3]]
    """
    shards: list[list[int]] = [[]]
    current = 0
    for i, size in enumerate(sizes):
        if shards[-1] and current + size > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(i)
        current += size
    return shards


def build_model_index(weight_map: dict[str, str], total_size: int, tied: Sequence[Sequence[str]]) -> bytes:
    """``model.safetensors.index.json`` in Hugging Face's layout.

    ``total_size`` is, as in Hugging Face, the bytes of tensor data (headers excluded). Tied weights are
    stored once; ``metadata.tied_weights`` lists each group as ``[stored_name, alias, ...]``.

    Args:
        weight_map: tensor name -> shard file name.
        total_size: bytes of tensor data in all shards.
        tied: groups of tied names, the stored one first.

    Example:
        >>> build_model_index({"w": "model-00001-of-00001.safetensors"}, 24, [])[:1]
        b'{'
    """
    meta: dict[str, Any] = {"total_size": int(total_size), "format": FORMAT_VERSION}
    if tied:
        meta["tied_weights"] = [list(g) for g in tied]
    return (json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n").encode("utf-8")


def parse_model_index(data: bytes, where: str = MODEL_INDEX_NAME) -> tuple[dict[str, str], list[list[str]]]:
    """Validate and parse ``model.safetensors.index.json`` (in bounded memory: see ``safejson``).

    Args:
        data: the file's bytes (read with a bound of MAX_INDEX_BYTES).
        where: its path, for messages.

    Returns:
        ``(weight_map, tied)``; every shard name in ``weight_map`` is a valid checkpoint file name, every
        tied group a non-empty list of tensor names.

    Raises:
        FormatError: naming ``where`` and what is wrong (never another exception).

    Example:
        >>> parse_model_index(b'{"weight_map": {"w": "model-00001-of-00001.safetensors"}}')
        ({'w': 'model-00001-of-00001.safetensors'}, [])
    """
    index = load_json(data, where, "index")
    try:
        weight_map = index["weight_map"]
        tied = index.get("metadata", {}).get("tied_weights", [])
    except (KeyError, AttributeError, TypeError) as e:
        raise FormatError(
            f"{where}: not a valid index (missing or mistyped field: {brief(e)}); expected "
            '{"metadata": {...}, "weight_map": {tensor: shard}}: the checkpoint is damaged'
        ) from None
    if not isinstance(weight_map, dict) or not all(is_valid_filename(f) for f in weight_map.values()):
        raise FormatError(f"{where}: weight_map must map tensor names to shard files of this checkpoint")
    if not (
        isinstance(tied, list) and all(isinstance(g, list) and g and all(isinstance(n, str) for n in g) for g in tied)
    ):
        raise FormatError(f"{where}: metadata.tied_weights must be a list of non-empty lists of tensor names")
    return weight_map, [list(g) for g in tied]
