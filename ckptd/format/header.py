"""The safetensors side of the format: dtypes, tensor tables, header layouts, and the header codec.

A ckptd file is a plain safetensors file: an 8-byte little-endian header length N, N bytes of JSON padded
with spaces to a multiple of 8, then the tensors back to back with no gap. :func:`parse_safetensors_header`
enforces every rule the safetensors reader does, so a file that passes here opens with
``safetensors.safe_open``; it never allocates more than :data:`MAX_HEADER_BYTES` for a header, parses its JSON
in bounded memory, and raises nothing but FormatError whatever the bytes.

No torch at import time (the daemon runs without it); :func:`torch_dtype` imports it lazily.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckptd.format.errors import FormatError
from ckptd.format.safejson import brief, load_json

# A header larger than this is hostile or corrupt; the safetensors reader refuses headers over 100,000,000 bytes
# (MAX_HEADER_SIZE in its Rust crate), so a larger one could never be opened by it anyway.
MAX_HEADER_BYTES = 100_000_000
U64_MAX = 2**64 - 1
HEADER_LENGTH_BYTES = 8

# torch dtype name -> (safetensors dtype, item size in bytes)
_TORCH_TO_ST: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint64": ("U64", 8),
    "uint32": ("U32", 4),
    "uint16": ("U16", 2),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
_ST_TO_TORCH = {st: name for name, (st, _) in _TORCH_TO_ST.items()}
DTYPE_SIZES = {st: size for st, size in _TORCH_TO_ST.values()}


STORABLE_TORCH_DTYPES = tuple(_TORCH_TO_ST)  # names of the torch dtypes safetensors can hold


def safetensors_dtype(torch_dtype: Any) -> str | None:
    """safetensors dtype string of a torch (or NumPy) dtype, or None when safetensors cannot store it.

    Args:
        torch_dtype: e.g. ``torch.bfloat16`` or ``numpy.dtype("float32")``.

    Example:
        >>> safetensors_dtype(torch.bfloat16), safetensors_dtype(torch.complex64)
        ('BF16', None)
    """
    name = str(torch_dtype).removeprefix("torch.")
    entry = _TORCH_TO_ST.get(name)
    return entry[0] if entry else None


def torch_dtype_name(st_dtype: str) -> str:
    """The name of the torch dtype a safetensors dtype maps to (it may not exist in an older torch).

    Args:
        st_dtype: a key of DTYPE_SIZES.

    Example:
        >>> torch_dtype_name("F8_E4M3")
        'float8_e4m3fn'
    """
    return _ST_TO_TORCH[st_dtype]


def torch_dtype(st_dtype: str) -> Any:
    """The torch dtype of a safetensors dtype string (imports torch).

    Args:
        st_dtype: a key of DTYPE_SIZES.

    Example:
        >>> torch_dtype("BF16")
        torch.bfloat16
    """
    import torch

    return getattr(torch, _ST_TO_TORCH[st_dtype])


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; begin/end are relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsLayout:
    header: bytes  # the 8-byte length prefix plus the padded JSON header
    entries: tuple[TensorEntry, ...]  # in data order, back to back

    @property
    def data_size(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size


def alignment_order(items: Sequence[tuple[str, str, Sequence[int]]]) -> list[int]:
    """Indices of ``(name, dtype, shape)`` items in file data order.

    safetensors forbids gaps between tensors, so each tensor is aligned to its item size only if wider
    dtypes come first. The header is padded to 8 bytes, so this keeps every tensor naturally aligned.

    Args:
        items: ``(name, safetensors dtype, shape)`` per tensor.

    Example:
        >>> alignment_order([("a", "U8", (3,)), ("b", "F32", (2,))])
        [1, 0]
    """
    return sorted(range(len(items)), key=lambda i: -DTYPE_SIZES[items[i][1]])


@dataclass(frozen=True)
class TensorTable:
    """The part of a safetensors header that depends only on tensor names, dtypes and shapes.

    Kept apart from the metadata so that a client saving the same structure every step can reuse it and
    only re-encode the metadata (which holds changing values such as the learning rate).
    """

    entries: tuple[TensorEntry, ...]
    json_fragment: str  # '"name":{"dtype":..,"shape":..,"data_offsets":..},...' without braces


def tensor_table(items: Sequence[tuple[str, str, Sequence[int]]]) -> TensorTable:
    """Data offsets for ``(name, dtype, shape)`` items, back to back in the order given.

    Args:
        items: ``(name, safetensors dtype, shape)`` per tensor, in file order.

    Example:
        >>> [(e.name, e.begin, e.end) for e in tensor_table([("w", "F32", (2, 3))]).entries]
        [('w', 0, 24)]
    """
    table: dict[str, Any] = {}
    entries = []
    offset = 0
    for name, dtype, shape in items:
        if name in table or name == "__metadata__":
            # A second entry would silently replace the first and leave its bytes uncovered.
            raise FormatError(f"safetensors tensor name {name!r} is used twice or is reserved")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        entries.append(TensorEntry(name, dtype, tuple(int(s) for s in shape), offset, offset + nbytes))
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return TensorTable(tuple(entries), json.dumps(table, separators=(",", ":"))[1:-1])


def encode_header(table: TensorTable, metadata: dict[str, str] | None = None, min_len: int = 0) -> SafetensorsLayout:
    """The full header for a table: 8-byte length, then JSON padded with spaces to a multiple of 8.

    Args:
        table: names, dtypes, shapes and offsets (from :func:`tensor_table`).
        metadata: string-to-string ``__metadata__`` entries (``"format": "pt"`` is always added).
        min_len: pad the header to at least this many bytes in all, so that a client can keep its data at
            a stable offset in its staging slab from one save to the next.

    Example:
        >>> len(encode_header(tensor_table([("w", "F32", (2,))]), min_len=256).header)
        256
    """
    meta = json.dumps({"__metadata__": {"format": "pt", **(metadata or {})}}, separators=(",", ":"))
    text = meta[:-1] + ("," + table.json_fragment if table.json_fragment else "") + "}"
    raw = text.encode("utf-8")
    raw += b" " * max(-len(raw) % 8, min_len - 8 - len(raw))
    raw += b" " * (-len(raw) % 8)
    return SafetensorsLayout(struct.pack("<Q", len(raw)) + raw, table.entries)


def build_safetensors_layout(
    items: Sequence[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None
) -> SafetensorsLayout:
    """Header and data offsets for ``(name, dtype, shape)`` items, written in the order given.

    Args:
        items: ``(name, safetensors dtype, shape)`` per tensor, in file order.
        metadata: string-to-string ``__metadata__`` entries.

    Example:
        >>> layout = build_safetensors_layout([("w", "F32", (2, 3))], {"k": "v"})
        >>> layout.file_size == len(layout.header) + 24
        True
    """
    return encode_header(tensor_table(items), metadata)


def _is_uint(v: object) -> bool:
    # JSON true/false parse as bool, an int subclass; the safetensors reader rejects them.
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def header_span(head: bytes | memoryview, file_size: int) -> int:
    """Bytes the header of a safetensors file takes (8 + its declared length), checked before any allocation.

    Reads only the 8-byte length prefix, so a reader can learn how much more to read, and refuses a length
    over MAX_HEADER_BYTES or past the end of the file (a hostile length of 8 EiB fails here, not in malloc).

    Args:
        head: at least the first 8 bytes of the file.
        file_size: the size of the whole file.

    Example:
        >>> header_span((16).to_bytes(8, "little") + b"x" * 16, 24)
        24
    """
    if file_size < HEADER_LENGTH_BYTES or len(head) < HEADER_LENGTH_BYTES:
        raise FormatError(f"safetensors file of {file_size} bytes is too short for its 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(head[:HEADER_LENGTH_BYTES]))
    if n > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + n > file_size:
        raise FormatError(
            f"safetensors header length {n} does not fit a file of {file_size} bytes "
            f"(at most {min(MAX_HEADER_BYTES, max(0, file_size - HEADER_LENGTH_BYTES))} possible)"
        )
    return HEADER_LENGTH_BYTES + n


def parse_safetensors_header(head: bytes | memoryview, file_size: int) -> tuple[dict[str, str], SafetensorsLayout]:
    """Validate and parse the header at the start of a safetensors file of ``file_size`` bytes.

    ``head`` must hold at least the first 8 + header-length bytes. Checks every rule the safetensors
    reader (the Rust crate) enforces, so a file that passes here opens with safetensors.safe_open:

    - a JSON object of at most :data:`MAX_HEADER_BYTES` holding at most ``MAX_JSON_VALUES`` values (parsed in
      bounded memory: see ``safejson``);
    - ``__metadata__``, if present and not null, maps strings to strings;
    - every other entry has a known ``dtype`` string, a ``shape`` of unsigned 64-bit integers whose running
      product (times the item size) never overflows 64 bits, even when a later dimension is 0 (as the Rust
      reader computes it), and ``data_offsets`` of two unsigned 64-bit integers spanning exactly that size;
    - the tensors lie back to back from offset 0 and cover the data exactly.

    Args:
        head: the first bytes of the file, at least 8 + its header length (see :func:`header_span`).
        file_size: the size of the whole file.

    Returns:
        ``(metadata, layout)``: the ``__metadata__`` strings and the header bytes with every tensor entry.

    Raises:
        FormatError: saying what is wrong (never another exception, whatever the bytes).

    Example:
        >>> layout = build_safetensors_layout([("w", "F32", (2,))])
        >>> meta, parsed = parse_safetensors_header(layout.header, layout.file_size)
        >>> meta["format"], [e.name for e in parsed.entries]
        ('pt', ['w'])
    """
    n = header_span(head, file_size) - HEADER_LENGTH_BYTES
    if len(head) < 8 + n:
        raise FormatError(f"safetensors header needs {8 + n} bytes, only {len(head)} given")
    try:
        text = bytes(head[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"safetensors header is not valid JSON (invalid UTF-8: {e})") from None
    header = _load_header(text)  # callers prefix the file's path to every message
    if not isinstance(header, dict):
        raise FormatError("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"safetensors __metadata__ must map strings to strings, got {brief(meta)}")
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise FormatError(f"safetensors entry {brief(name)} lacks dtype/shape/data_offsets: {brief(info)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise FormatError(f"safetensors entry {brief(name)} has unsupported dtype {brief(dtype)}")
        if not (isinstance(shape, list) and all(_is_u64(s) for s in shape)):
            raise FormatError(
                f"safetensors entry {brief(name)} has invalid shape {brief(shape)} "
                "(expected a list of unsigned 64-bit integers)"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise FormatError(
                f"safetensors entry {brief(name)} lacks a [begin, end] pair of data_offsets, got {brief(offsets)}"
            )
        if not all(_is_u64(o) for o in offsets):
            raise FormatError(f"safetensors entry {brief(name)} has invalid data_offsets {brief(offsets)}")
        begin, end = offsets
        if begin > end:
            raise FormatError(f"safetensors entry {brief(name)} has invalid data_offsets {brief(offsets)}")
        nbytes = _checked_nbytes(shape, DTYPE_SIZES[dtype])
        if nbytes is None:
            raise FormatError(
                f"safetensors entry {brief(name)}: shape {brief(shape)} {dtype} overflows 64 bits (the product "
                "of the dimensions, taken left to right, must stay below 2^64 as the safetensors reader "
                "computes it)"
            )
        if end - begin != nbytes:
            raise FormatError(
                f"safetensors entry {brief(name)}: {end - begin} bytes do not match shape {brief(shape)} {dtype}"
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    expected = 0
    for e in entries:
        if e.begin != expected:
            raise FormatError(
                f"safetensors entry {brief(e.name)} starts at {e.begin}, expected {expected} (gap or overlap)"
            )
        expected = e.end
    if 8 + n + expected != file_size:
        raise FormatError(
            f"safetensors data covers {expected} bytes but the file holds {file_size - 8 - n} after its header"
        )
    return meta, SafetensorsLayout(bytes(head[: 8 + n]), tuple(entries))


def _load_header(text: str) -> Any:
    try:
        return load_json(text, "safetensors header", "safetensors header")
    except FormatError as e:
        # load_json says "<where>: <what> ..."; here where and what are the same words.
        raise FormatError(str(e).removeprefix("safetensors header: ")) from None


def _is_u64(v: object) -> bool:
    # JSON true/false parse as bool, an int subclass; the safetensors reader rejects them, and sizes are u64.
    return type(v) is int and 0 <= v <= U64_MAX


def _checked_nbytes(shape: list[int], item_size: int) -> int | None:
    """Bytes of a tensor as the safetensors reader computes them (``try_fold(1, checked_mul)`` over the
    dimensions, then times the item size), or None where any step overflows 64 bits."""
    n = 1
    for dim in shape:
        n *= dim
        if n > U64_MAX:
            return None
    n *= item_size
    return None if n > U64_MAX else n
