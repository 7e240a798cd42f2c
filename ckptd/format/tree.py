"""The nested structure of a state dict, stored as JSON in the safetensors header metadata: no pickle.

:func:`flatten_state` splits a state dict into a JSON-able tree and the tensors it holds; the tree goes into
``__metadata__["ckptd.tree"]`` of the component's file. :func:`unflatten_state` rebuilds it. An unsupported
leaf fails the save naming its dotted path, because pickling it would make loading run code. A tree read
back is parsed in bounded memory (:func:`load_tree`, at most :data:`MAX_TREE_VALUES` values, which
:func:`flatten_state` enforces at save time too) and checked node by node.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

from ckptd.format.errors import FormatError
from ckptd.format.header import STORABLE_TORCH_DTYPES, safetensors_dtype
from ckptd.format.safejson import brief, brief_text, load_json

# Values (see safejson) the tree of one file may hold. A save whose non-tensor state needs more fails naming
# the component, so every tree that was saved also loads; ~100 bytes each when loaded, so ~400 MB at most.
MAX_TREE_VALUES = 4_000_000

_TAG = "__ckptd__"


@dataclass
class TensorLeaf:
    """A tensor found while flattening a state tree; ``name`` is its key in the safetensors file."""

    name: str
    path: str
    tensor: Any  # torch.Tensor, or a torch view of a NumPy array


class UnsupportedLeafError(FormatError):
    """A state value that cannot be stored without pickle; the message names its dotted path."""


def _type_name(obj: object) -> str:
    t = type(obj)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def flatten_state(obj: Any, prefix: str, *, sharded: bool = False) -> tuple[Any, list[TensorLeaf]]:
    """Split a state dict into a JSON-able tree and the tensors it holds.

    Tensors (and NumPy arrays) are replaced by references into the safetensors file; every other leaf
    must be one of dict, list, tuple, str, int, float, bool, None, bytes, NumPy scalar, torch.dtype,
    torch.device or torch.Size. Anything else raises UnsupportedLeafError naming its dotted path,
    because pickling it would make loading run code.

    A ``DTensor`` (FSDP2, tensor parallel) is a leaf only with ``sharded`` (a SHARDED component): its node
    records the mesh and placements it was saved with, and the file holds it as one full tensor. Without
    ``sharded`` it raises UnsupportedLeafError naming its path and saying to declare the component SHARDED.

    Args:
        obj: the component's state (usually its ``state_dict()``).
        prefix: the dotted path of ``obj`` itself (the component key); tensor names start with it.
        sharded: DTensors are allowed (their leaf's ``tensor`` is the DTensor itself).

    Returns:
        ``(tree, leaves)``: the JSON-able tree and every tensor, in the order met.

    Example:
        >>> tree, leaves = flatten_state({"step": 3, "w": torch.zeros(2)}, "opt")
        >>> tree["w"], [leaf.name for leaf in leaves]
        ({'__ckptd__': 'tensor', 'name': 'opt.w'}, ['opt.w'])
    """
    import torch

    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        np = None  # type: ignore[assignment]

    leaves: list[TensorLeaf] = []
    used: set[str] = set()
    storable = {getattr(torch, name) for name in STORABLE_TORCH_DTYPES if hasattr(torch, name)}
    dtensor_type = _dtensor_type()

    def name_for(path: str) -> str:
        name, n = path, 1
        while name in used:
            n += 1
            name = f"{path}#{n}"
        used.add(name)
        return name

    def enc(x: Any, path: str) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int) and type(x) in (int,):
            return x
        if isinstance(x, float) and type(x) is float:
            return x if math.isfinite(x) else {_TAG: "float", "repr": repr(x)}
        if dtensor_type is not None and isinstance(x, dtensor_type):
            if not sharded:
                raise UnsupportedLeafError(
                    f"{path}: a DTensor (placements {describe_placements(x)}) in a component that is not SHARDED; "
                    "expected plain tensors here: declare this component SharingPattern.SHARDED (each rank then "
                    "writes its own shard, and the state reshards on load)"
                )
            if x.dtype not in storable:
                raise UnsupportedLeafError(f"{path}: DTensor dtype {x.dtype} has no safetensors equivalent")
            name = name_for(path)
            leaves.append(TensorLeaf(name, path, x))
            mesh = x.device_mesh
            return {
                _TAG: "dtensor",
                "name": name,
                "mesh": list(mesh.shape),
                "mesh_dims": list(mesh.mesh_dim_names) if mesh.mesh_dim_names else None,
                "placements": describe_placements(x),
            }
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided or x.is_quantized or x.is_meta:
                raise UnsupportedLeafError(
                    f"{path}: torch.Tensor with layout {x.layout} on {x.device} cannot be checkpointed; "
                    "expected a dense tensor; convert it (e.g. .to_dense()) in state_dict()"
                )
            if x.dtype not in storable:
                raise UnsupportedLeafError(
                    f"{path}: tensor dtype {x.dtype} has no safetensors equivalent; "
                    "convert it in state_dict() (e.g. view complex as real)"
                )
            name = name_for(path)
            leaves.append(TensorLeaf(name, path, x))
            return {_TAG: "tensor", "name": name}
        if np is not None and isinstance(x, np.ndarray):
            if x.dtype.kind not in "biuf" or safetensors_dtype(x.dtype) is None:
                raise UnsupportedLeafError(
                    f"{path}: numpy.ndarray of dtype {x.dtype} cannot be checkpointed without pickle; "
                    "expected a numeric or bool array"
                )
            name = name_for(path)
            leaves.append(TensorLeaf(name, path, torch.from_numpy(np.ascontiguousarray(x).reshape(x.shape))))
            return {_TAG: "ndarray", "name": name}
        if np is not None and isinstance(x, np.generic):
            # safetensors_dtype also rules out e.g. longdouble, whose .item() is not a Python number.
            if x.dtype.kind not in "biuf" or safetensors_dtype(x.dtype) is None:
                raise UnsupportedLeafError(f"{path}: {_type_name(x)} is not a supported NumPy scalar")
            return {_TAG: "npscalar", "dtype": x.dtype.str, "value": enc(x.item(), path)}
        if isinstance(x, torch.dtype):
            return {_TAG: "torch_dtype", "name": str(x).removeprefix("torch.")}
        if isinstance(x, torch.device):
            return {_TAG: "torch_device", "name": str(x)}
        if isinstance(x, torch.Size):
            return {_TAG: "torch_size", "items": list(x)}
        if isinstance(x, (bytes, bytearray)):
            return {_TAG: "bytes", "b64": base64.b64encode(bytes(x)).decode("ascii")}
        if isinstance(x, dict):
            if all(isinstance(k, str) and k != _TAG for k in x):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {_TAG: "dict", "items": [[enc(k, f"{path}.<key>"), enc(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {_TAG: "tuple", "items": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        raise UnsupportedLeafError(
            f"{path}: {_type_name(x)} is not a supported state value; expected tensors, NumPy arrays, "
            "dict/list/tuple, str, int, float, bool, None or bytes; convert it in state_dict()"
        )

    tree = enc(obj, prefix)
    n = tree_value_count(tree)
    if n > MAX_TREE_VALUES:
        raise UnsupportedLeafError(
            f"{prefix}: the state holds {n} values outside tensors (numbers, strings, lists...), more than the "
            f"{MAX_TREE_VALUES} one component can store in its header; expected large sequences as tensors: "
            "convert them in state_dict() (e.g. torch.tensor(indices))"
        )
    return tree, leaves


def _dtensor_type() -> Any:
    """``torch.distributed.tensor.DTensor``, or None where torch has no distributed support."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return None
    return DTensor


def describe_placements(dtensor: Any) -> list[str]:
    """A DTensor's placements as strings, one per mesh dimension (``["Shard(dim=0)", "Replicate()"]``)."""
    return [str(p) for p in dtensor.placements]


def tree_value_count(tree: Any) -> int:
    """The count ``safejson.json_value_count`` gives for ``json.dumps(tree)``: one per value, plus one per empty
    list or dict (iterative: never a RecursionError).

    Example:
        >>> tree_value_count({"a": [1, 2], "b": {}})
        6
    """
    n = 0
    stack = [tree]
    while stack:
        x = stack.pop()
        n += 1
        if isinstance(x, dict):
            stack.extend(x.values())
            n += not x
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
            n += not x
    return n


def load_tree(tree_json: str, where: str) -> Any:
    """Parse the tree JSON of a file's ``__metadata__`` in bounded memory (at most MAX_TREE_VALUES values).

    Args:
        tree_json: ``__metadata__["ckptd.tree"]``.
        where: the file, for messages.

    Raises:
        FormatError: naming ``where``.

    Example:
        >>> load_tree('{"step": 3}', "opt_state.safetensors")
        {'step': 3}
    """
    return load_json(tree_json, where, "state tree", MAX_TREE_VALUES)


_CONTENT_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError)


def unflatten_state(tree: Any, tensors: dict[str, Any], convert: Any = None) -> Any:
    """Inverse of flatten_state: rebuild the state dict from its tree and ``{name: tensor}``.

    ``convert(name, tensor, saved_as_dtensor)``, when given, turns each tensor read (the full tensor, for a
    DTensor saved by a SHARDED component) into the value to put in the state: the loader reshards there.

    The tree comes from a file and is checked node by node: whatever it holds, the only exception is a
    FormatError saying what is wrong (a node without its fields, a field of the wrong type, a tensor the
    file does not hold, nesting deeper than the interpreter allows...).

    Args:
        tree: the JSON tree from the file's ``__metadata__["ckptd.tree"]``.
        tensors: every tensor of the file by name.

    Example:
        >>> unflatten_state({"step": 3, "w": {"__ckptd__": "tensor", "name": "opt.w"}}, {"opt.w": t})["step"]
        3
    """
    try:
        return _decode(tree, tensors, convert)
    except _ConvertFailed as e:
        raise e.error from None
    except FormatError:
        raise
    except RecursionError:
        raise FormatError("state tree is nested too deeply to rebuild") from None
    except _CONTENT_ERRORS as e:
        raise FormatError(f"state tree is malformed ({type(e).__name__}: {brief_text(str(e))})") from None


def _field(node: dict[str, Any], name: str, kind: type) -> Any:
    value = node.get(name)
    if not isinstance(value, kind):
        raise FormatError(
            f"state tree node {brief(node.get(_TAG))} needs field {name!r} of type {kind.__name__}, got {brief(value)}"
        )
    return value


class _ConvertFailed(Exception):
    """Carries an exception of ``convert`` past the handlers that turn content errors into FormatError."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _decode(tree: Any, tensors: dict[str, Any], convert: Any = None) -> Any:
    def tensor(x: dict[str, Any], dtensor: bool) -> Any:
        name = _field(x, "name", str)
        t = _lookup(tensors, name)
        if convert is None:
            return t
        try:
            return convert(name, t, dtensor)
        except Exception as e:  # the caller's own error: not a sign of a damaged tree
            raise _ConvertFailed(e) from e

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        tag = x.get(_TAG)
        if tag is None:
            return {k: dec(v) for k, v in x.items()}
        if tag == "tensor":
            return tensor(x, False)
        if tag == "dtensor":
            return tensor(x, True)
        if tag == "ndarray":
            return _lookup(tensors, _field(x, "name", str)).numpy()
        if tag == "tuple":
            return tuple(dec(v) for v in _field(x, "items", list))
        if tag == "dict":
            out = {}
            for pair in _field(x, "items", list):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise FormatError(f"state tree dict node holds {brief(pair)}, expected [key, value] pairs")
                out[_hashable(dec(pair[0]))] = dec(pair[1])
            return out
        if tag == "float":
            return float(_field(x, "repr", str))
        if tag == "bytes":
            return base64.b64decode(_field(x, "b64", str), validate=True)
        if tag == "npscalar":
            import numpy as np

            dtype = np.dtype(_field(x, "dtype", str))
            if dtype.kind not in "biuf":
                raise FormatError(f"state tree names NumPy dtype {brief(dtype.str)}; only numbers are ever stored")
            return dtype.type(dec(x.get("value")))
        if tag == "torch_dtype":
            import torch

            # A hostile tree could name any attribute of torch; only a dtype is ever stored here.
            dtype = getattr(torch, str(x.get("name")), None)
            if not isinstance(dtype, torch.dtype):
                raise FormatError(f"tree names {brief(x.get('name'))} as a torch dtype; it is not one")
            return dtype
        if tag == "torch_device":
            import torch

            return torch.device(_field(x, "name", str))
        if tag == "torch_size":
            import torch

            items = _field(x, "items", list)
            if not all(type(i) is int and 0 <= i < 2**63 for i in items):
                raise FormatError(f"state tree torch_size node holds {brief(items)}, expected sizes (integers)")
            return torch.Size(items)
        raise FormatError(f"unknown tree node type {brief(tag)}; the file was written by a newer ckptd")

    return dec(tree)


def _hashable(k: Any) -> Any:
    if isinstance(k, dict):
        raise FormatError("state tree has a dict as a dict key; ckptd never writes one")
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k


def _lookup(tensors: dict[str, Any], name: str) -> Any:
    try:
        return tensors[name]
    except KeyError:
        raise FormatError(f"tree refers to tensor {brief(name)}, which the file does not contain") from None
