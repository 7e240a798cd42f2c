"""Unit tests for ckptd.format, the on-disk format ckptd/1.

Every test writes real files under tmp_path and reads them back with the real safetensors library.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptd import format as fmt

# ------------------------------------------------------------------------------------------- helpers


def raw_bytes(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor, in row-major order (works for 0-dim, empty, bool and fp8)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata=None, *, aligned=True):
    """Write tensors the way the daemon does: header, then each tensor's bytes back to back in entry order."""
    items = [(name, fmt.safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    order = fmt.alignment_order(items) if aligned else list(range(len(items)))
    layout = fmt.build_safetensors_layout([items[i] for i in order], metadata)
    with open(path, "wb") as f:
        f.write(layout.header)
        for entry in layout.entries:
            f.write(raw_bytes(tensors[entry.name]))
    return layout


def save_state(path: Path, state, prefix: str):
    """Flatten a state tree into one safetensors file (tree as JSON under TREE_METADATA_KEY)."""
    tree, leaves = fmt.flatten_state(state, prefix)
    tensors = {leaf.name: leaf.tensor for leaf in leaves}
    write_safetensors(path, tensors, {fmt.TREE_METADATA_KEY: json.dumps(tree)})
    return tree, leaves


def load_state(path: Path):
    with safe_open(str(path), framework="pt") as f:
        tree = json.loads(f.metadata()[fmt.TREE_METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return fmt.unflatten_state(tree, tensors)


def roundtrip(tmp_path: Path, state, prefix: str = "comp"):
    path = tmp_path / "comp_state.safetensors"
    save_state(path, state, prefix)
    return load_state(path)


def random_tensor(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaN payloads and all), 0/1 for bool."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).bool().reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = torch.randint(0, 256, (n * itemsize,), generator=g, dtype=torch.uint8)
    return data.view(dtype).reshape(shape)


ALL_ST_DTYPES = sorted(fmt.DTYPE_SIZES)
TORCH_DTYPES = [
    pytest.param(st, id=st)
    for st in ALL_ST_DTYPES
    if hasattr(torch, fmt.torch_dtype_name(st))  # fp8 and uint16+ exist in recent torch only
]


def header_bytes(header: dict, *, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# --------------------------------------------------------------------------- safetensors layout bytes


def test_dtype_table_covers_bf16_fp8_bool_and_unsigned_types():
    for st in ("BF16", "F8_E4M3", "F8_E5M2", "BOOL", "U8", "U16", "U32", "U64", "F16", "F32", "F64"):
        assert st in fmt.DTYPE_SIZES
    assert fmt.safetensors_dtype(torch.bfloat16) == "BF16"
    assert fmt.safetensors_dtype(torch.complex64) is None
    assert fmt.torch_dtype("BF16") is torch.bfloat16


@pytest.mark.parametrize("st_dtype", TORCH_DTYPES)
def test_layout_of_every_dtype_opens_with_safe_open_and_load_file_bit_exact(tmp_path, st_dtype):
    dtype = fmt.torch_dtype(st_dtype)
    assert fmt.safetensors_dtype(dtype) == st_dtype
    tensors = {
        "matrix": random_tensor(dtype, (3, 5), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "empty": random_tensor(dtype, (0, 4), seed=3),
        "odd": random_tensor(dtype, (7,), seed=4),
    }
    path = tmp_path / "t.safetensors"
    layout = write_safetensors(path, tensors, {"k": "v"})
    assert path.stat().st_size == layout.file_size

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == dtype and got.shape == t.shape
            assert raw_bytes(got) == raw_bytes(t), name
    loaded = load_file(str(path))
    for name, t in tensors.items():
        assert loaded[name].dtype == dtype and loaded[name].shape == t.shape
        assert raw_bytes(loaded[name]) == raw_bytes(t), name


def test_layout_with_mixed_dtypes_opens_with_safe_open_bit_exact(tmp_path):
    tensors = {
        f"{st.lower()}_{i}": random_tensor(fmt.torch_dtype(st), shape, seed=i)
        for i, (st, shape) in enumerate(
            [(st, shape) for st in ALL_ST_DTYPES for shape in [(3,), (), (2, 0), (1, 3, 1)]]
        )
    }
    path = tmp_path / "mixed.safetensors"
    write_safetensors(path, tensors)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert raw_bytes(loaded[name]) == raw_bytes(t), name


def test_metadata_round_trips_through_safe_open_with_format_pt(tmp_path):
    meta = {"ckptd.tree": json.dumps({"a": [1, 2, {"b": None}]}), "unicode": "héllo ✓", "empty": ""}
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"x": torch.arange(3)}, meta)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", **meta}


def test_layout_with_no_tensors_opens_with_safe_open(tmp_path):
    path = tmp_path / "none.safetensors"
    layout = write_safetensors(path, {}, {"only": "metadata"})
    assert layout.data_size == 0 and layout.file_size == len(layout.header)
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == []
        assert f.metadata()["only"] == "metadata"


def test_header_length_is_a_multiple_of_8():
    for n in range(12):  # names of varying length shift the JSON length through every residue mod 8
        layout = fmt.build_safetensors_layout([("x" * n, "U8", [n])], {"m": "y" * (n * 3)})
        (hlen,) = struct.unpack("<Q", layout.header[:8])
        assert hlen % 8 == 0
        assert len(layout.header) == 8 + hlen
        assert layout.header[8:].rstrip(b" ").endswith(b"}")


def test_entries_are_back_to_back_in_the_order_given():
    items = [("a", "U8", [3]), ("b", "F32", [2, 2]), ("c", "BF16", []), ("d", "I64", [0])]
    layout = fmt.build_safetensors_layout(items)
    assert [e.name for e in layout.entries] == ["a", "b", "c", "d"]
    assert [(e.begin, e.end) for e in layout.entries] == [(0, 3), (3, 19), (19, 21), (21, 21)]
    assert layout.data_size == 21
    assert layout.entries[1].shape == (2, 2)


def test_alignment_order_puts_wider_dtypes_first_and_keeps_order_within_a_width():
    items = [("u8", "U8", [3]), ("f64", "F64", [1]), ("bf16", "BF16", [5]), ("f32", "F32", [1]), ("i64", "I64", [2])]
    assert fmt.alignment_order(items) == [1, 4, 3, 2, 0]


def test_alignment_order_aligns_every_tensor_to_its_itemsize_in_the_file(tmp_path):
    rng = random.Random(7)
    tensors = {}
    for i in range(40):  # odd element counts in every dtype, deliberately listed narrow-first
        st = ALL_ST_DTYPES[i % len(ALL_ST_DTYPES)]
        shape = rng.choice([(), (0,), (rng.randint(1, 9),), (rng.randint(1, 3), rng.randint(1, 5))])
        tensors[f"t{i}"] = random_tensor(fmt.torch_dtype(st), shape, seed=i)
    path = tmp_path / "aligned.safetensors"
    layout = write_safetensors(path, tensors, {"pad": "x" * 13})
    assert len(layout.header) % 8 == 0
    for e in layout.entries:
        assert (len(layout.header) + e.begin) % fmt.DTYPE_SIZES[e.dtype] == 0, e
    loaded = load_file(str(path))
    for name, t in tensors.items():
        assert raw_bytes(loaded[name]) == raw_bytes(t)


def test_without_alignment_order_a_narrow_first_layout_would_misalign():
    # Guards the test above: the input order really is adversarial.
    items = [("u8", "U8", [3]), ("f64", "F64", [1])]
    unaligned = fmt.build_safetensors_layout(items)
    assert (len(unaligned.header) + unaligned.entries[1].begin) % 8 != 0
    aligned = fmt.build_safetensors_layout([items[i] for i in fmt.alignment_order(items)])
    assert all((len(aligned.header) + e.begin) % fmt.DTYPE_SIZES[e.dtype] == 0 for e in aligned.entries)


def test_build_layout_rejects_duplicate_tensor_names():
    with pytest.raises(fmt.FormatError, match="'a'"):
        fmt.build_safetensors_layout([("a", "U8", [1]), ("a", "U8", [1])])


def test_build_layout_rejects_a_tensor_named_like_the_metadata_key():
    with pytest.raises(fmt.FormatError, match="__metadata__"):
        fmt.build_safetensors_layout([("__metadata__", "U8", [1])])


# ------------------------------------------------------------------------------- parse_safetensors_header


def test_parse_header_accepts_what_build_produces(tmp_path):
    tensors = {
        "w": random_tensor(torch.float32, (4, 3)),
        "b": random_tensor(torch.bfloat16, (3,)),
        "s": torch.tensor(1),
    }
    path = tmp_path / "p.safetensors"
    layout = write_safetensors(path, tensors, {"k": "v"})
    data = path.read_bytes()
    meta, parsed = fmt.parse_safetensors_header(data, len(data))
    assert meta == {"format": "pt", "k": "v"}
    assert parsed.header == layout.header
    assert parsed.entries == layout.entries
    assert parsed.file_size == len(data)
    # Only the header bytes are needed, not the data.
    meta2, parsed2 = fmt.parse_safetensors_header(memoryview(data)[: len(layout.header)], len(data))
    assert (meta2, parsed2) == (meta, parsed)


def test_parse_header_accepts_a_file_written_by_safetensors_save_file(tmp_path):
    path = tmp_path / "hf.safetensors"
    tensors = {"a": torch.randn(3, 2), "b": torch.arange(5, dtype=torch.int16), "c": torch.tensor(True)}
    save_file(tensors, str(path), metadata={"format": "pt", "x": "1"})
    data = path.read_bytes()
    meta, layout = fmt.parse_safetensors_header(data, len(data))
    assert meta == {"format": "pt", "x": "1"}
    assert {e.name: (e.dtype, e.shape) for e in layout.entries} == {
        "a": ("F32", (3, 2)),
        "b": ("I16", (5,)),
        "c": ("BOOL", ()),
    }
    for e in layout.entries:
        got = data[len(layout.header) + e.begin : len(layout.header) + e.end]
        assert got == raw_bytes(tensors[e.name])


def test_parse_header_rejects_a_file_truncated_inside_its_data(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": torch.arange(10, dtype=torch.int64)})
    data = path.read_bytes()[:-1]
    with pytest.raises(fmt.FormatError, match="covers 80 bytes but the file holds 79"):
        fmt.parse_safetensors_header(data, len(data))


def test_parse_header_rejects_a_file_shorter_than_the_length_prefix():
    with pytest.raises(fmt.FormatError, match="too short"):
        fmt.parse_safetensors_header(b"\x10\x00\x00", 3)


def test_parse_header_rejects_a_file_truncated_inside_its_header(tmp_path):
    layout = fmt.build_safetensors_layout([("a", "U8", [4])])
    data = layout.header[:-5]
    with pytest.raises(fmt.FormatError, match="does not fit"):
        fmt.parse_safetensors_header(data, len(data))


def test_parse_header_rejects_a_header_length_larger_than_the_limit():
    head = struct.pack("<Q", fmt.MAX_HEADER_BYTES + 8) + b"{}"
    with pytest.raises(fmt.FormatError, match="header length"):
        fmt.parse_safetensors_header(head, 1 << 40)


def test_parse_header_rejects_a_header_length_of_2_to_the_64_minus_1():
    head = b"\xff" * 8 + b"{}      "
    with pytest.raises(fmt.FormatError, match="header length"):
        fmt.parse_safetensors_header(head, len(head))


def test_parse_header_rejects_a_head_buffer_shorter_than_the_declared_header():
    layout = fmt.build_safetensors_layout([("a", "U8", [4])])
    with pytest.raises(fmt.FormatError, match="only"):
        fmt.parse_safetensors_header(layout.header[:12], len(layout.header) + 4)


def _hostile(header: dict, data_len: int) -> bytes:
    return header_bytes(header) + b"\x00" * data_len


HOSTILE_HEADERS = {
    "gap": (
        {
            "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]},
        },
        12,
        "gap or overlap",
    ),
    "overlap": (
        {
            "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
        },
        6,
        "gap or overlap",
    ),
    "leading_gap": ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, 8, "gap or overlap"),
    "size_shape_mismatch": (
        {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}},
        20,
        "do not match shape",
    ),
    "unknown_dtype": ({"a": {"dtype": "Q64", "shape": [1], "data_offsets": [0, 8]}}, 8, "unsupported dtype 'Q64'"),
    "non_string_metadata": (
        {"__metadata__": {"format": "pt", "n": 3}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
        1,
        "must map strings to strings",
    ),
    "metadata_not_a_map": (
        {"__metadata__": ["x"], "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
        1,
        "__metadata__",
    ),
    "missing_offsets": ({"a": {"dtype": "U8", "shape": [1]}}, 1, "lacks dtype/shape/data_offsets"),
    "entry_not_a_map": ({"a": "U8"}, 1, "lacks dtype/shape/data_offsets"),
    "three_offsets": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, 1, "lacks"),
    "negative_dim": ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, 0, "invalid shape"),
    "bool_dim": ({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1, "invalid shape"),
    "float_dim": ({"a": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}, 1, "invalid shape"),
    "bool_offset": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, 1, "invalid data_offsets"),
    "reversed_offsets": ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [1, 0]}}, 1, "invalid data_offsets"),
    # The running product overflows u64 before the 0 (as safetensors computes it), although Python says 0.
    "shape_product_overflows": (
        {"a": {"dtype": "U8", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}},
        0,
        "overflows 64 bits",
    ),
    "dim_past_u64": ({"a": {"dtype": "U8", "shape": [0, 2**70], "data_offsets": [0, 0]}}, 0, "invalid shape"),
    "bytes_overflow_u64": ({"a": {"dtype": "F64", "shape": [2**62], "data_offsets": [0, 0]}}, 0, "overflows 64 bits"),
    "metadata_empty_list": (
        {"__metadata__": [], "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
        1,
        "__metadata__",
    ),
    "dtype_list": ({"a": {"dtype": [], "shape": [1], "data_offsets": [0, 1]}}, 1, "unsupported dtype"),
    "dtype_object": ({"a": {"dtype": {"U8": 1}, "shape": [1], "data_offsets": [0, 1]}}, 1, "unsupported dtype"),
    "trailing_bytes": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, 2, "covers 1 bytes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_parse_header_rejects_what_safetensors_itself_rejects(tmp_path, case):
    header, data_len, message = HOSTILE_HEADERS[case]
    data = _hostile(header, data_len)
    with pytest.raises(fmt.FormatError, match=message):
        fmt.parse_safetensors_header(data, len(data))
    # The real reader refuses the same file, so the check above is not stricter than necessary.
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises SafetensorError or ValueError
        load_file(str(path))


def test_parse_header_rejects_complex64_which_safetensors_reads_but_ckptd_never_writes():
    # safetensors 0.8 reads complex64 ("C64"); ckptd/1 never writes it and refuses it rather than guess.
    data = _hostile({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, 8)
    with pytest.raises(fmt.FormatError, match="unsupported dtype 'C64'"):
        fmt.parse_safetensors_header(data, len(data))


def test_parse_header_rejects_non_json():
    head = struct.pack("<Q", 8) + b"not json"
    with pytest.raises(fmt.FormatError, match="not valid JSON"):
        fmt.parse_safetensors_header(head, len(head))


def test_parse_header_rejects_invalid_utf8():
    head = struct.pack("<Q", 8) + b'{"\xff":1}  '
    with pytest.raises(fmt.FormatError, match="not valid JSON"):
        fmt.parse_safetensors_header(head, len(head))


def test_parse_header_rejects_a_json_array():
    head = struct.pack("<Q", 8) + b"[1,2,3] "
    with pytest.raises(fmt.FormatError, match="not a JSON object"):
        fmt.parse_safetensors_header(head, len(head))


# -------------------------------------------------------------------------------- flatten / unflatten


def assert_same(a, b, path="root"):
    """Deep equality that also checks exact types, tensor bytes/dtype/shape and float bit patterns."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert raw_bytes(a) == raw_bytes(b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b)), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            assert type(k) is type(next(kk for kk in b if kk == k)), f"{path}: key {k!r}"
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    else:
        assert a == b, path


def test_nested_containers_and_plain_leaves_round_trip_with_types_preserved(tmp_path):
    state = {
        "dict": {"a": {"b": {"c": 1}}},
        "list": [1, [2, [3, []]], {}],
        "tuple": (1, (2, 3), ()),
        "str": "héllo\n\x00✓",
        "big_int": 2**80,
        "neg": -(2**70),
        "bool_true": True,
        "bool_false": False,
        "one": 1,
        "zero": 0,
        "bools_and_ints": [True, 1, False, 0, 1.0],
        "none": None,
        "bytes": b"\x00\xff\x80binary",
        "empty_bytes": b"",
        "float": 0.1,
        "tiny": 5e-324,
    }
    got = roundtrip(tmp_path, state)
    assert_same(state, got)
    assert got["bools_and_ints"][0] is True and type(got["bools_and_ints"][1]) is int


def test_nan_inf_and_negative_zero_floats_round_trip_bit_exact(tmp_path):
    state = {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"), "nzero": -0.0, "l": [float("nan"), -0.0]}
    got = roundtrip(tmp_path, state)
    assert math.isnan(got["nan"]) and math.isnan(got["l"][0])
    assert got["inf"] == math.inf and got["ninf"] == -math.inf
    assert math.copysign(1.0, got["nzero"]) == -1.0 and math.copysign(1.0, got["l"][1]) == -1.0


def test_tree_is_plain_json_without_nan_tokens():
    tree, _ = fmt.flatten_state({"x": float("nan"), "y": [float("inf")]}, "c")
    json.dumps(tree, allow_nan=False)  # raises if a NaN/Infinity slipped into the tree


def test_int_tuple_bytes_and_mixed_dict_keys_round_trip(tmp_path):
    state = {
        "int_keys": {0: "a", 3: "b", -1: "c"},
        "tuple_keys": {(1, 2): "x", ("a", (3,)): "y"},
        "mixed": {1: "int", "1": "str", None: "none", b"k": "bytes", 2.5: "float"},
        "bool_keys": {True: "t", False: "f", 2: "two"},
    }
    got = roundtrip(tmp_path, state)
    assert_same(state, got)
    assert type(next(iter(got["bool_keys"]))) is bool
    assert list(got["mixed"].keys()) == list(state["mixed"].keys())


def test_dict_containing_the_reserved_tag_key_round_trips(tmp_path):
    state = {
        "__ckptd__": "tensor",
        "name": "not-a-tensor-ref",
        "inner": {"__ckptd__": {"__ckptd__": 1}, "x": [1]},
    }
    got = roundtrip(tmp_path, state)
    assert got == state


def test_dict_that_looks_like_an_encoded_node_round_trips_literally(tmp_path):
    state = {"fake": {"__ckptd__": "bytes", "b64": "AAAA"}, "t": {"__ckptd__": "tensor", "name": "comp.x"}}
    got = roundtrip(tmp_path, state)
    assert got == state


def test_numpy_arrays_and_scalars_round_trip_with_dtypes_preserved(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "u16": np.array([0, 65535], dtype=np.uint16),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "i8": np.array([-128, 127], dtype=np.int8),
        "bool": np.array([True, False, True]),
        "zero_dim": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 2), dtype=np.int32),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "strided": np.arange(10, dtype=np.int32)[::3],
        "s_f32": np.float32(1.25),
        "s_f16": np.float16(-2.5),
        "s_f64_nan": np.float64("nan"),
        "s_i64": np.int64(-(2**62)),
        "s_u64": np.uint64(2**64 - 1),
        "s_u8": np.uint8(200),
        "s_bool": np.bool_(True),
    }
    got = roundtrip(tmp_path, state)
    assert_same(state["zero_dim"], got["zero_dim"])
    assert got["zero_dim"].shape == ()
    assert got["fortran"].tolist() == state["fortran"].tolist()
    assert got["strided"].tolist() == [0, 3, 6, 9]
    for k, v in state.items():
        if k in ("fortran", "strided"):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            continue
        assert_same(v, got[k], k)


def test_torch_dtype_device_and_size_round_trip(tmp_path):
    state = {
        "dtype": torch.bfloat16,
        "dtypes": [torch.float8_e4m3fn, torch.int64, torch.complex64],
        "cpu": torch.device("cpu"),
        "cuda": torch.device("cuda", 1),
        "size": torch.Size([2, 0, 3]),
        "empty_size": torch.Size([]),
    }
    got = roundtrip(tmp_path, state)
    assert got == state
    assert type(got["size"]) is torch.Size and type(got["cuda"]) is torch.device


def test_tensors_of_every_dtype_round_trip_at_any_depth(tmp_path):
    state = {
        "deep": [{"x": (random_tensor(fmt.torch_dtype(st), (2, 3), seed=i),)} for i, st in enumerate(ALL_ST_DTYPES)],
        "scalar": torch.tensor(3.0, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 5, dtype=torch.float16),
        "noncontig": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    }
    got = roundtrip(tmp_path, state)
    assert_same(
        {k: v for k, v in state.items() if k != "noncontig"}, {k: v for k, v in got.items() if k != "noncontig"}
    )
    assert torch.equal(got["noncontig"], state["noncontig"])


def test_tensor_names_are_unique_even_when_dotted_paths_collide(tmp_path):
    a, b = torch.tensor([1.0]), torch.tensor([2.0])
    state = {"a.b": a, "a": {"b": b}}
    tree, leaves = fmt.flatten_state(state, "comp")
    assert [leaf.path for leaf in leaves] == ["comp.a.b", "comp.a.b"]
    assert len({leaf.name for leaf in leaves}) == 2
    got = roundtrip(tmp_path, state)
    assert torch.equal(got["a.b"], a) and torch.equal(got["a"]["b"], b)


def test_tensor_leaves_are_named_by_their_dotted_path():
    _, leaves = fmt.flatten_state({"layers": [{"w": torch.ones(1)}], "state": {3: {"exp_avg": torch.ones(1)}}}, "opt")
    assert [leaf.name for leaf in leaves] == ["opt.layers.0.w", "opt.state.3.exp_avg"]


def test_adamw_state_dict_after_a_step_round_trips_exactly_and_resumes_identically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    sd = opt.state_dict()
    got = roundtrip(tmp_path, {"optimizer": sd}, prefix="optimizer")["optimizer"]

    assert got["param_groups"] == sd["param_groups"]
    assert type(got["param_groups"][0]["betas"]) is tuple
    assert list(got["state"].keys()) == list(sd["state"].keys()) == [0, 1, 2, 3]
    for pid, st in sd["state"].items():
        assert set(got["state"][pid]) == set(st)
        for name, value in st.items():
            assert torch.equal(got["state"][pid][name], value), (pid, name)
            assert got["state"][pid][name].dtype == value.dtype

    # The restored state drives an identical next step.
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(model2.parameters())
    opt2.load_state_dict(got)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p1, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_rng_states_of_torch_python_and_numpy_round_trip(tmp_path):
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    got = roundtrip(tmp_path, state, prefix="rng")
    random.setstate(got["python"])
    np.random.set_state(got["numpy"])
    torch.set_rng_state(got["torch"])
    a = (random.random(), np.random.rand(), torch.rand(1))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert_same(state["python"], got["python"])


@pytest.mark.parametrize(
    "leaf, type_name",
    [
        (object(), "object"),
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (np.array([np.int64(1)], dtype=object), "object"),
        (np.array(["a"]), "<U1"),
        (np.complex64(1j), "numpy.complex64"),
        (np.longdouble(1.5), "numpy.longdouble"),
        (torch.zeros(2, dtype=torch.complex64), "complex64"),
        (torch.zeros(2, 2).to_sparse(), "sparse"),
        (torch.empty(2, device="meta"), "meta"),
        (1 + 2j, "complex"),
        (lambda: 0, "function"),
        (Path("/x"), "Path"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_unsupported_leaf_raises_naming_its_dotted_path_and_type(leaf, type_name):
    state = {"state": {3: {"foo": leaf}}, "param_groups": []}
    with pytest.raises(fmt.UnsupportedLeafError) as info:
        fmt.flatten_state(state, "optimizer")
    assert str(info.value).startswith("optimizer.state.3.foo: ")
    assert type_name in str(info.value)
    assert isinstance(info.value, fmt.FormatError)


def test_unsupported_leaf_inside_a_list_and_tuple_names_the_indices():
    with pytest.raises(fmt.UnsupportedLeafError, match=r"^m\.a\.1\.0: set "):
        fmt.flatten_state({"a": [0, ({3},)]}, "m")


def test_unflatten_rejects_a_tree_node_type_from_a_newer_version():
    with pytest.raises(fmt.FormatError, match="unknown tree node type 'quaternion'"):
        fmt.unflatten_state({"x": {"__ckptd__": "quaternion"}}, {})


def test_unflatten_rejects_a_reference_to_a_tensor_the_file_lacks():
    with pytest.raises(fmt.FormatError, match="'c.w'"):
        fmt.unflatten_state({"w": {"__ckptd__": "tensor", "name": "c.w"}}, {})


# ------------------------------------------------------------------------------------------------ names


def test_checkpoint_dirname_round_trips():
    for step in (0, 1, 10, 123456789012):
        assert fmt.parse_checkpoint_dirname(fmt.checkpoint_dirname(step)) == step
    assert fmt.checkpoint_dirname(42) == "checkpoint-42"


@pytest.mark.parametrize(
    "name",
    [
        "checkpoint-01",
        "checkpoint-5.old",
        "checkpoint--1",
        "checkpoint-",
        "checkpoint-1 ",
        "checkpoint-1\n",
        "checkpoint-+1",
        "checkpoint-1e3",
        "checkpoint-٣",  # a non-ASCII digit
        "Checkpoint-1",
        "checkpoint_1",
        ".checkpoint-1",
        ".tmp-checkpoint-5-abc123",
        ".trash-checkpoint-5-abc123",
    ],
)
def test_parse_checkpoint_dirname_rejects_anything_but_checkpoint_int(name):
    assert fmt.parse_checkpoint_dirname(name) is None


def test_temp_and_trash_names_round_trip_and_are_not_checkpoints():
    tmp = fmt.temp_dirname(7, "abc123")
    assert tmp == ".tmp-checkpoint-7-abc123"
    assert fmt.parse_temp_dirname(tmp) == (7, "abc123")
    assert fmt.parse_temp_dirname("checkpoint-7") is None
    assert fmt.parse_temp_dirname(".tmp-checkpoint-7-a/b") is None
    trash = fmt.trash_dirname(7, "tok9")
    assert fmt.is_trash_dirname(trash) and not fmt.is_trash_dirname(tmp)
    assert fmt.parse_checkpoint_dirname(tmp) is None and fmt.parse_checkpoint_dirname(trash) is None


@pytest.mark.parametrize(
    "pattern, kwargs, expected",
    [
        ("global", {}, "optim_state.safetensors"),
        ("replicated", {}, "optim_state.safetensors"),
        ("per_rank", {"rank": 3}, "optim_state_rank_3.safetensors"),
        ("per_group", {"group": "dp", "instance": 2}, "optim_state_group_dp_2.safetensors"),
        ("per_node", {"node": 1}, "optim_state_node_1.safetensors"),
    ],
)
def test_component_filename_for_each_sharing_pattern_is_a_valid_filename(pattern, kwargs, expected):
    name = fmt.component_filename("optim", pattern, **kwargs)
    assert name == expected
    assert fmt.is_valid_filename(name)


def test_component_filename_rejects_bad_key_group_and_pattern():
    with pytest.raises(fmt.FormatError, match="component key"):
        fmt.component_filename("../x", "global")
    with pytest.raises(fmt.FormatError, match="process group name"):
        fmt.component_filename("optim", "per_group", group="a/b", instance=0)
    with pytest.raises(fmt.FormatError, match="unknown sharing pattern"):
        fmt.component_filename("optim", "per_host")


def test_model_shard_filename_is_hf_style_and_valid():
    assert fmt.model_shard_filename(0, 3) == "model-00001-of-00003.safetensors"
    assert fmt.is_valid_filename(fmt.model_shard_filename(99999, 100000))


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "../x_state.safetensors",
        "a/b.safetensors",
        "a/b_state.safetensors",
        "/abs_state.safetensors",
        "/etc/passwd",
        fmt.MANIFEST_NAME,
        "",
        ".hidden_state.safetensors",
        "x..y_state.safetensors",
        "x_state.safetensors\n",
        "x_state.safetensors\x00",
        "x_state.pt",
        "x_state_rank_a.safetensors",
        "model-1-of-2.safetensors",
        None,
        3,
    ],
)
def test_is_valid_filename_rejects_paths_and_foreign_names(name):
    assert not fmt.is_valid_filename(name)


def test_is_valid_filename_accepts_the_model_index():
    assert fmt.is_valid_filename(fmt.MODEL_INDEX_NAME)


@pytest.mark.parametrize("key", ["../x", "", ".hidden", "a/b", "a..b", "-x", "_x", "a b", "a\n", "ü", None, 1])
def test_is_valid_key_rejects_unsafe_keys(key):
    assert not fmt.is_valid_key(key)


@pytest.mark.parametrize("key", ["model", "optim", "a.b-c_d", "0", "Layer3"])
def test_is_valid_key_accepts_ordinary_keys(key):
    assert fmt.is_valid_key(key)


def test_is_valid_txn_accepts_1_to_64_alphanumerics_only():
    assert fmt.is_valid_txn("a" * 64) and fmt.is_valid_txn("Z9")
    for bad in ("", "a" * 65, "a-b", "a/b", "ab\n", None, 5):
        assert not fmt.is_valid_txn(bad)


# --------------------------------------------------------------------------------------------- manifest


def make_manifest(step: int = 5, files: dict[str, bytes] | None = None) -> fmt.Manifest:
    files = files if files is not None else {"optim_state.safetensors": b"abc"}
    records = {
        name: fmt.FileRecord(path=name, size=len(data), checksum=fmt.checksum_bytes(data), component="optim")
        for name, data in files.items()
    }
    comp = fmt.ComponentRecord(
        key="optim",
        sharing_pattern="per_group",
        ranks=[0, 2],
        group_name="dp",
        group_instances=[[0, 1], [2, 3]],
        size_bytes=sum(len(d) for d in files.values()),
        checksum=fmt.combine_checksums(r.checksum for r in records.values()),
        metadata={"note": "x", "nested": [1, 2.5, None]},
        files=list(records),
    )
    return fmt.Manifest(
        format=fmt.FORMAT_VERSION,
        checkpoint_path=f"/out/checkpoints/checkpoint-{step}",
        step=step,
        txn="abc123",
        world_size=4,
        timestamp=fmt.now_timestamp(),
        components={"optim": comp},
        files=records,
        topology={"nodes": 1, "local_world_size": 4},
        metadata={"eval_loss": 0.25},
        pytorch_version=torch.__version__,
        ckptd_version="0.1.0",
    )


def test_manifest_to_json_and_parse_round_trip_equal():
    m = make_manifest()
    data = m.to_json()
    assert json.loads(data)["format"] == "ckptd/1"
    parsed = fmt.parse_manifest(data)
    assert parsed == m
    assert parsed.to_json() == data


def test_manifest_json_is_a_superset_of_the_seed_manifest_fields():
    raw = json.loads(make_manifest().to_json())
    for key in ("checkpoint_path", "world_size", "timestamp", "components", "pytorch_version", "format", "step"):
        assert key in raw
    comp = raw["components"]["optim"]
    for key in ("key", "sharing_pattern", "ranks", "replicated_across", "group_name", "size_bytes", "checksum"):
        assert key in comp
    rec = raw["files"]["optim_state.safetensors"]
    assert rec["size"] == 3 and rec["checksum"].startswith("xxh3-128:")


def _mutated(mutate) -> bytes:
    raw = json.loads(make_manifest().to_json())
    mutate(raw)
    return json.dumps(raw).encode()


OPT = "optim_state.safetensors"


def _add_file_record(path: str):
    def mutate(raw):
        raw["files"][path] = dict(raw["files"][OPT], path=path)

    return mutate


MANIFEST_DAMAGE = [
    ("wrong-format-version", lambda r: r.update(format="ckptd/2"), "format 'ckptd/2', expected 'ckptd/1'"),
    ("no-format", lambda r: r.pop("format"), "format None"),
    ("no-step", lambda r: r.pop("step"), "missing or unexpected field"),
    ("no-files", lambda r: r.pop("files"), "'files'"),
    ("no-components", lambda r: r.pop("components"), "'components'"),
    ("unknown-field", lambda r: r.update(surprise=1), "'surprise'"),
    ("step-not-int", lambda r: r.update(step="5"), "step and world_size must be integers"),
    ("world-size-not-int", lambda r: r.update(world_size=None), "step and world_size must be integers"),
    ("files-not-a-map", lambda r: r.update(files=[]), "missing or unexpected field"),
    ("record-without-checksum", lambda r: r["files"][OPT].pop("checksum"), "'checksum'"),
    ("component-without-record", lambda r: r["components"]["optim"].update(files=["optim_state_rank_1.safetensors"]),
     "component 'optim' lists 'optim_state_rank_1.safetensors', which has no file record"),
    ("component-files-null", lambda r: r["components"]["optim"].update(files=None), "'files' must be a list"),
    ("component-files-nested", lambda r: r["components"]["optim"].update(files=[["x"]]), "'files' must be a list"),
    ("record-path-dotdot", _add_file_record("../evil_state.safetensors"),
     "invalid file record '../evil_state.safetensors'"),
    ("record-path-absolute", _add_file_record("/abs_state.safetensors"),
     "invalid file record '/abs_state.safetensors'"),
    ("record-path-manifest", _add_file_record(fmt.MANIFEST_NAME), f"invalid file record '{fmt.MANIFEST_NAME}'"),
    ("record-path-differs-from-key", lambda r: r["files"][OPT].update(path="other_state.safetensors"),
     "invalid file record 'optim_state.safetensors'"),
    ("record-size-negative", lambda r: r["files"][OPT].update(size=-1), "invalid file record"),
    ("record-size-str", lambda r: r["files"][OPT].update(size="3"), "invalid file record"),
]  # fmt: skip


@pytest.mark.parametrize("mutate, message", [pytest.param(m, msg, id=i) for i, m, msg in MANIFEST_DAMAGE])
def test_parse_manifest_rejects_damage_saying_what_is_wrong(mutate, message):
    with pytest.raises(fmt.FormatError) as info:
        fmt.parse_manifest(_mutated(mutate), "ckpt/checkpoint_manifest.json")
    assert message in str(info.value)
    assert str(info.value).startswith("ckpt/checkpoint_manifest.json: ")


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"[]", b"null", b'"str"'])
def test_parse_manifest_rejects_non_json_and_non_objects(data):
    with pytest.raises(fmt.FormatError):
        fmt.parse_manifest(data)


# -------------------------------------------------------------------------------------- listing, latest


def write_checkpoint(root: Path, step: int, *, dirname: str | None = None, manifest_step: int | None = None) -> Path:
    """A real committed-looking checkpoint: one safetensors file plus a manifest describing it."""
    d = root / "checkpoints" / (dirname or fmt.checkpoint_dirname(step))
    d.mkdir(parents=True)
    path = d / "optim_state.safetensors"
    save_state(path, {"step": step, "w": torch.full((4,), float(step))}, "optim")
    m = make_manifest(manifest_step if manifest_step is not None else step, {path.name: path.read_bytes()})
    (d / fmt.MANIFEST_NAME).write_bytes(m.to_json())
    return d


def test_latest_is_the_highest_step_never_the_newest_mtime(tmp_path):
    for step in (5, 10, 2):
        write_checkpoint(tmp_path, step)
    old = tmp_path / "checkpoints" / "checkpoint-2"
    future = time.time() + 3600
    os.utime(old, (future, future))
    os.utime(old / fmt.MANIFEST_NAME, (future, future))
    assert fmt.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "checkpoint-10"
    assert fmt.list_checkpoints(tmp_path) == [tmp_path / "checkpoints" / f"checkpoint-{s}" for s in (2, 5, 10)]


def test_step_order_is_numeric_not_lexicographic(tmp_path):
    for step in (9, 10, 100, 11):
        write_checkpoint(tmp_path, step)
    assert [p.name for p in fmt.list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in (9, 10, 11, 100)]
    assert fmt.find_latest_checkpoint(tmp_path).name == "checkpoint-100"


def test_scan_ignores_temp_trash_and_broken_directories(tmp_path):
    good = write_checkpoint(tmp_path, 3)
    write_checkpoint(tmp_path, 99, dirname=fmt.temp_dirname(99, "abc"))
    write_checkpoint(tmp_path, 98, dirname=fmt.trash_dirname(98, "xyz"))
    write_checkpoint(tmp_path, 97, dirname="checkpoint-097")
    write_checkpoint(tmp_path, 96, dirname="checkpoint-96.old")
    malformed = write_checkpoint(tmp_path, 50)
    (malformed / fmt.MANIFEST_NAME).write_bytes(b'{"format": "ckptd/1", "step": 50')  # torn write
    missing = write_checkpoint(tmp_path, 60)
    (missing / fmt.MANIFEST_NAME).unlink()
    wrong_step = write_checkpoint(tmp_path, 70, manifest_step=7)
    not_a_dir = tmp_path / "checkpoints" / "checkpoint-80"
    not_a_dir.write_bytes(b"x")
    old_format = write_checkpoint(tmp_path, 90)
    raw = json.loads((old_format / fmt.MANIFEST_NAME).read_bytes())
    raw["format"] = "ckptd/0"
    (old_format / fmt.MANIFEST_NAME).write_text(json.dumps(raw))

    found, broken = fmt.scan_checkpoints(tmp_path)
    assert [c.path for c in found] == [good]
    assert found[0].step == 3 and found[0].manifest.step == 3
    assert set(broken) == {malformed, missing, wrong_step, not_a_dir, old_format}
    assert fmt.find_latest_checkpoint(tmp_path) == good
    assert fmt.list_checkpoints(tmp_path) == [good]


def test_no_checkpoints_means_latest_is_none(tmp_path):
    assert fmt.find_latest_checkpoint(tmp_path) is None
    assert fmt.list_checkpoints(tmp_path / "does-not-exist") == []
    (tmp_path / "checkpoints" / fmt.temp_dirname(1, "a")).mkdir(parents=True)
    assert fmt.find_latest_checkpoint(tmp_path) is None
    assert fmt.scan_checkpoints(tmp_path) == ([], [])


def test_read_manifest_of_a_directory_without_one_says_it_is_not_committed(tmp_path):
    with pytest.raises(fmt.FormatError, match="missing; this is not a committed ckptd checkpoint"):
        fmt.read_manifest(tmp_path)


# --------------------------------------------------------------------------------------------- verify


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_checkpoint(tmp_path, 4)


def test_verify_of_a_good_checkpoint_is_truthy(checkpoint):
    result = fmt.verify_checkpoint(checkpoint)
    size = (checkpoint / "optim_state.safetensors").stat().st_size
    assert result and result.ok and result.problems == []
    assert result.files_checked == 1 and result.bytes_checked == size
    assert "OK" in str(result)
    assert fmt.verify_checkpoint(checkpoint, checksums=False)


def test_verify_reports_progress_for_every_byte(checkpoint):
    seen = []
    fmt.verify_checkpoint(checkpoint, progress=seen.append)
    assert sum(seen) == (checkpoint / "optim_state.safetensors").stat().st_size


def test_verify_names_a_truncated_file(checkpoint):
    f = checkpoint / "optim_state.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    for checksums in (True, False):
        result = fmt.verify_checkpoint(checkpoint, checksums=checksums)
        assert not result
        assert len(result.problems) == 1
        assert str(f) in result.problems[0] and "size mismatch" in result.problems[0]


def test_verify_names_a_file_with_one_flipped_byte(checkpoint):
    f = checkpoint / "optim_state.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    result = fmt.verify_checkpoint(checkpoint)
    assert not result
    assert str(f) in result.problems[0] and "checksum mismatch" in result.problems[0]
    assert str(f) in str(result)
    # Without checksums only the size is checked, and the size is right.
    assert fmt.verify_checkpoint(checkpoint, checksums=False)


def test_verify_names_a_missing_file(checkpoint):
    f = checkpoint / "optim_state.safetensors"
    f.unlink()
    for checksums in (True, False):
        result = fmt.verify_checkpoint(checkpoint, checksums=checksums)
        assert not result
        size = fmt.read_manifest(checkpoint).files[f.name].size
        assert result.problems == [f"{f}: missing (manifest lists {size} bytes)"]


def test_verify_names_a_malformed_manifest(checkpoint):
    (checkpoint / fmt.MANIFEST_NAME).write_bytes(b"{ not json")
    result = fmt.verify_checkpoint(checkpoint)
    assert not result
    assert fmt.MANIFEST_NAME in result.problems[0] and "not valid JSON" in result.problems[0]


def test_verify_names_a_missing_manifest(checkpoint):
    (checkpoint / fmt.MANIFEST_NAME).unlink()
    result = fmt.verify_checkpoint(checkpoint)
    assert not result and "missing" in result.problems[0]


def test_verify_names_a_directory_where_a_file_should_be_instead_of_raising(checkpoint):
    f = checkpoint / "optim_state.safetensors"
    f.unlink()
    f.mkdir()
    result = fmt.verify_checkpoint(checkpoint)
    assert not result and str(f) in result.problems[0]


def test_verify_names_every_bad_file_and_counts_the_good_ones(tmp_path):
    d = tmp_path / "checkpoints" / "checkpoint-1"
    d.mkdir(parents=True)
    contents = {}
    for r in range(4):
        path = d / f"optim_state_rank_{r}.safetensors"
        write_safetensors(path, {"w": torch.full((25 + r,), float(r))})
        contents[path.name] = path.read_bytes()
    (d / fmt.MANIFEST_NAME).write_bytes(make_manifest(1, contents).to_json())
    assert fmt.verify_checkpoint(d).files_checked == 4
    (d / "optim_state_rank_1.safetensors").unlink()
    rank3 = bytearray(contents["optim_state_rank_3.safetensors"])
    rank3[-1] ^= 0xFF
    (d / "optim_state_rank_3.safetensors").write_bytes(bytes(rank3))
    result = fmt.verify_checkpoint(d)
    assert len(result.problems) == 2 and result.files_checked == 2
    assert "optim_state_rank_1.safetensors: missing" in result.problems[0]
    assert "optim_state_rank_3.safetensors: checksum mismatch" in result.problems[1]


def test_read_verified_returns_the_exact_bytes_and_reports_progress(checkpoint):
    m = fmt.read_manifest(checkpoint)
    rec = m.files["optim_state.safetensors"]
    seen = []
    data = fmt.read_verified(checkpoint / rec.path, rec, progress=seen.append)
    assert bytes(data) == (checkpoint / rec.path).read_bytes()
    assert sum(seen) == rec.size


def test_read_verified_names_truncated_flipped_and_missing_files(checkpoint):
    rec = fmt.read_manifest(checkpoint).files["optim_state.safetensors"]
    f = checkpoint / rec.path
    original = f.read_bytes()

    f.write_bytes(original[:-1])
    with pytest.raises(fmt.FormatError, match="size mismatch") as info:
        fmt.read_verified(f, rec)
    assert str(f) in str(info.value)

    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 0x80
    f.write_bytes(bytes(flipped))
    with pytest.raises(fmt.FormatError, match="checksum mismatch") as info:
        fmt.read_verified(f, rec)
    assert str(f) in str(info.value)
    assert bytes(fmt.read_verified(f, rec, verify_checksum=False)) == bytes(flipped)

    f.unlink()
    with pytest.raises(fmt.FormatError, match="missing") as info:
        fmt.read_verified(f, rec)
    assert str(f) in str(info.value)


def test_read_verified_of_an_empty_file(tmp_path):
    f = tmp_path / "x_state.safetensors"
    f.write_bytes(b"")
    rec = fmt.FileRecord(path=f.name, size=0, checksum=fmt.checksum_bytes(b""), component="x")
    assert fmt.read_verified(f, rec) == bytearray()


def test_checksums_are_xxh3_128_and_combine_is_order_sensitive():
    c = fmt.checksum_bytes(b"hello")
    algo, _, digest = c.partition(":")
    assert algo == "xxh3-128" and len(digest) == 32 and int(digest, 16) >= 0
    assert fmt.checksum_bytes(memoryview(b"hello")) == c
    assert fmt.checksum_bytes(b"hellp") != c
    a, b = fmt.checksum_bytes(b"a"), fmt.checksum_bytes(b"b")
    assert fmt.combine_checksums([a, b]) != fmt.combine_checksums([b, a])
    assert fmt.combine_checksums([a, b]).startswith("xxh3-128:")


# ---------------------------------------------------------------------- streaming hash while copying


def test_hashing_writer_hashes_each_chunk_then_hands_it_to_the_sink():
    seen: list[bytes] = []
    w = fmt.HashingWriter(lambda chunk: seen.append(bytes(chunk)))
    for part in (b"abc", bytearray(b"de"), memoryview(b"f")):
        w.write(part)
    assert seen == [b"abc", b"de", b"f"]
    assert w.nbytes == 6 and w.checksum == fmt.checksum_bytes(b"abcdef")
    assert fmt.HashingWriter().checksum == fmt.checksum_bytes(b"")


def test_hash_chunks_passes_every_chunk_in_order_and_matches_the_whole_buffer_checksum():
    data = bytes(range(256)) * 41
    out = bytearray()
    progress: list[int] = []
    got = fmt.hash_chunks(memoryview(data), 1000, sink=out.extend, progress=progress.append)
    assert got == fmt.checksum_bytes(data) and bytes(out) == data
    assert progress == [1000] * 10 + [len(data) - 10000]


def test_hash_fd_streams_a_file_to_a_sink_or_into_a_buffer(tmp_path):
    f = tmp_path / "x_state.safetensors"
    data = os.urandom(10_001)
    f.write_bytes(data)
    out = bytearray()
    with open(f, "rb") as fh:
        assert fmt.hash_fd(fh.fileno(), len(data), sink=out.extend, chunk_size=4096) == fmt.checksum_bytes(data)
    assert bytes(out) == data
    into = bytearray(len(data))
    with open(f, "rb") as fh:
        assert fmt.hash_fd(fh.fileno(), len(data), into=into, chunk_size=4096) == fmt.checksum_bytes(data)
    assert bytes(into) == data


def test_hash_fd_names_a_file_that_ends_before_its_size(tmp_path):
    f = tmp_path / "x_state.safetensors"
    f.write_bytes(b"abc")
    with open(f, "rb") as fh, pytest.raises(fmt.FormatError, match="file ended after 3 of 10 bytes") as info:
        fmt.hash_fd(fh.fileno(), 10, where=f)
    assert str(f) in str(info.value)


def test_stream_verified_copies_exactly_the_verified_bytes(checkpoint):
    rec = fmt.read_manifest(checkpoint).files["optim_state.safetensors"]
    out = bytearray()
    fmt.stream_verified(checkpoint / rec.path, rec, sink=out.extend)
    assert bytes(out) == (checkpoint / rec.path).read_bytes()


# ------------------------------------------------------------------- hostile files: regular files only


def test_open_regular_refuses_a_fifo_without_blocking_and_a_symlink_without_following_it(tmp_path):
    fifo = tmp_path / "a_state.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(fmt.FormatError, match="is a FIFO, not a regular file") as info:
        fmt.open_regular(fifo)
    assert str(fifo) in str(info.value)
    link = tmp_path / "b_state.safetensors"
    link.symlink_to("/etc/passwd")
    with pytest.raises(fmt.FormatError, match=r"is a symbolic link \(to /etc/passwd\)"):
        fmt.open_regular(link)
    with pytest.raises(fmt.FormatError, match="is a character device"):
        fmt.open_regular("/dev/zero")
    with pytest.raises(FileNotFoundError):
        fmt.open_regular(tmp_path / "missing_state.safetensors")


def test_read_bounded_refuses_a_file_over_its_limit_before_reading_it(tmp_path):
    f = tmp_path / fmt.MANIFEST_NAME
    with open(f, "wb") as fh:
        fh.truncate(1 << 40)  # sparse: 1 TiB that costs nothing on disk
    with pytest.raises(fmt.FormatError, match="larger than any manifest can be") as info:
        fmt.read_bounded(f, fmt.MAX_MANIFEST_BYTES, "manifest")
    assert str(f) in str(info.value)
    f.write_bytes(b"12345")
    assert fmt.read_bounded(f, 5, "manifest") == b"12345"
    with pytest.raises(fmt.FormatError):
        fmt.read_bounded(f, 4, "manifest")


def test_read_manifest_refuses_a_symlinked_checkpoint_directory_and_a_huge_manifest(tmp_path):
    good = write_checkpoint(tmp_path, 4)
    link = tmp_path / "checkpoints" / "checkpoint-5"
    link.symlink_to(good)
    with pytest.raises(fmt.FormatError, match="is a symbolic link .* not a checkpoint directory"):
        fmt.read_manifest(link)
    with open(good / fmt.MANIFEST_NAME, "r+b") as fh:
        fh.truncate(fmt.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(fmt.FormatError, match="larger than any manifest"):
        fmt.read_manifest(good)


def test_scan_gives_the_reason_each_look_alike_is_not_a_checkpoint(tmp_path):
    good = write_checkpoint(tmp_path, 3)
    fifo = write_checkpoint(tmp_path, 4)
    (fifo / fmt.MANIFEST_NAME).unlink()
    os.mkfifo(fifo / fmt.MANIFEST_NAME)
    (tmp_path / "checkpoints" / "checkpoint-9").symlink_to(good)
    survey = fmt.survey_checkpoints(tmp_path)
    assert [c.path for c in survey.found] == [good]
    reasons = {b.path.name: b.reason for b in survey.broken}
    assert set(reasons) == {"checkpoint-4", "checkpoint-9"}
    assert f"{fifo / fmt.MANIFEST_NAME}: is a FIFO" in reasons["checkpoint-4"]
    assert "checkpoint-9: is a symbolic link" in reasons["checkpoint-9"]
    assert fmt.scan_checkpoints(tmp_path) == (survey.found, [b.path for b in survey.broken])


def test_verify_checks_the_header_structure_not_only_size_and_checksum(checkpoint):
    f = checkpoint / "optim_state.safetensors"
    forged = (2**63).to_bytes(8, "little") + f.read_bytes()[8:]
    f.write_bytes(forged)
    raw = json.loads((checkpoint / fmt.MANIFEST_NAME).read_bytes())
    raw["files"][f.name]["checksum"] = fmt.checksum_bytes(forged)
    (checkpoint / fmt.MANIFEST_NAME).write_text(json.dumps(raw))
    for checksums in (True, False):
        result = fmt.verify_checkpoint(checkpoint, checksums=checksums)
        assert len(result.problems) == 1, result.problems
        assert result.problems[0].startswith(f"{f}: safetensors header length 9223372036854775808 does not fit")


def test_verify_and_disk_problems_flag_a_manifest_lying_about_sizes(checkpoint):
    raw = json.loads((checkpoint / fmt.MANIFEST_NAME).read_bytes())
    raw["files"]["optim_state.safetensors"]["size"] = 909 * 1024**4
    (checkpoint / fmt.MANIFEST_NAME).write_text(json.dumps(raw))
    manifest = fmt.read_manifest(checkpoint)
    problems = fmt.disk_problems(checkpoint, manifest)
    f = checkpoint / "optim_state.safetensors"
    assert any(p.startswith(f"{f}: size mismatch (manifest {909 * 1024**4} bytes") for p in problems), problems
    assert any("component 'optim': size mismatch" in p for p in problems), problems
    assert not fmt.verify_checkpoint(checkpoint)


def test_read_verified_never_allocates_a_size_the_manifest_lies_about(checkpoint):
    rec = fmt.read_manifest(checkpoint).files["optim_state.safetensors"]
    liar = fmt.FileRecord(rec.path, 909 * 1024**4, rec.checksum, rec.component)
    with pytest.raises(fmt.FormatError, match="size mismatch"):
        fmt.read_verified(checkpoint / rec.path, liar)
    with pytest.raises(fmt.FormatError, match="larger than such a file can be"):
        fmt.read_verified(checkpoint / rec.path, rec, max_bytes=rec.size - 1)


@pytest.mark.parametrize("size", [True, -1, 2**63, 909.0])
def test_parse_manifest_rejects_sizes_that_are_not_file_sizes(size):
    with pytest.raises(fmt.FormatError, match="invalid file record"):
        fmt.parse_manifest(_mutated(lambda r: r["files"][OPT].update(size=size)))


def test_parse_manifest_of_deeply_nested_json_is_a_format_error_not_a_recursion_error():
    with pytest.raises(fmt.FormatError, match="not valid JSON"):
        fmt.parse_manifest(b"[" * 200_000 + b"]" * 200_000)


def test_unflatten_refuses_a_torch_dtype_node_naming_something_else():
    with pytest.raises(fmt.FormatError, match="not one"):
        fmt.unflatten_state({"__ckptd__": "torch_dtype", "name": "save"}, {})


# ------------------------------------------------------------------------------------------ model index


def test_plan_model_shards_splits_greedily_in_order():
    assert fmt.plan_model_shards([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert fmt.plan_model_shards([3, 3, 3], 10) == [[0, 1, 2]]
    assert fmt.plan_model_shards([5, 6, 5], 10) == [[0], [1], [2]]
    assert fmt.plan_model_shards([1, 2, 7, 1], 10) == [[0, 1, 2], [3]]


def test_plan_model_shards_gives_an_oversized_tensor_a_shard_of_its_own():
    assert fmt.plan_model_shards([2, 50, 2, 2], 10) == [[0], [1], [2, 3]]
    assert fmt.plan_model_shards([50], 10) == [[0]]


def test_plan_model_shards_keeps_every_index_once_and_respects_the_limit():
    rng = random.Random(3)
    sizes = [rng.choice([0, 1, 7, 64, 100, 300]) for _ in range(200)]
    shards = fmt.plan_model_shards(sizes, 256)
    assert [i for s in shards for i in s] == list(range(len(sizes)))
    for s in shards:
        assert sum(sizes[i] for i in s) <= 256 or len(s) == 1
        assert s  # no empty shard when there are tensors


def test_model_index_round_trips_with_total_size_and_tied_weights(tmp_path):
    weight_map = {
        "embed.weight": fmt.model_shard_filename(0, 2),
        "layer.weight": fmt.model_shard_filename(1, 2),
    }
    tied = [["embed.weight", "lm_head.weight"]]
    data = fmt.build_model_index(weight_map, 1234, tied)
    raw = json.loads(data)
    assert raw["metadata"]["total_size"] == 1234 and isinstance(raw["metadata"]["total_size"], int)
    assert raw["metadata"]["tied_weights"] == tied
    assert raw["weight_map"] == weight_map
    assert fmt.parse_model_index(data) == (weight_map, tied)

    untied = fmt.build_model_index(weight_map, 0, [])
    assert "tied_weights" not in json.loads(untied)["metadata"]
    assert fmt.parse_model_index(untied) == (weight_map, [])


def test_model_index_total_size_matches_the_shards_tensor_bytes(tmp_path):
    tensors = {
        "embed.weight": torch.randn(10, 4),
        "layer.weight": torch.randn(4, 4).to(torch.bfloat16),
        "layer.bias": torch.randn(4),
    }
    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    shards = fmt.plan_model_shards(sizes, 100)
    assert len(shards) == 2
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = fmt.model_shard_filename(i, len(shards))
        write_safetensors(tmp_path / fname, {names[j]: tensors[names[j]] for j in shard})
        weight_map.update({names[j]: fname for j in shard})
    (tmp_path / fmt.MODEL_INDEX_NAME).write_bytes(fmt.build_model_index(weight_map, sum(sizes), []))

    wm, _ = fmt.parse_model_index((tmp_path / fmt.MODEL_INDEX_NAME).read_bytes())
    total = 0
    for name, fname in wm.items():
        with safe_open(str(tmp_path / fname), framework="pt") as f:
            t = f.get_tensor(name)
        assert torch.equal(t, tensors[name])
        total += t.numel() * t.element_size()
    assert json.loads((tmp_path / fmt.MODEL_INDEX_NAME).read_bytes())["metadata"]["total_size"] == total


@pytest.mark.parametrize(
    "data, message",
    [
        (b"{", "not a valid index"),
        (b"[]", "not a valid index"),
        (b'{"metadata": {}}', "not a valid index"),
        (b'{"metadata": null, "weight_map": {}}', "not a valid index"),
        (b'{"weight_map": {"w": "../x.safetensors"}}', "weight_map"),
        (b'{"weight_map": {"w": "/abs/model-00001-of-00001.safetensors"}}', "weight_map"),
        (b'{"weight_map": ["model-00001-of-00001.safetensors"]}', "weight_map"),
        (b'{"metadata": {"tied_weights": 5}, "weight_map": {}}', "tied_weights"),
        (b'{"metadata": {"tied_weights": ["ab"]}, "weight_map": {}}', "tied_weights"),
        (b'{"metadata": {"tied_weights": [[1, 2]]}, "weight_map": {}}', "tied_weights"),
    ],
)
def test_parse_model_index_rejects_malformed_indexes(data, message):
    with pytest.raises(fmt.FormatError, match=message):
        fmt.parse_model_index(data)


# ------------------------------------------------------------------ hostile content: bounded, typed, named


def _header_bytes(text: bytes) -> bytes:
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def test_a_zero_sized_tensor_with_a_dimension_of_2_to_the_64_minus_1_passes_as_in_safetensors(tmp_path):
    data = _header_bytes(json.dumps({"a": {"dtype": "U8", "shape": [0, 2**64 - 1], "data_offsets": [0, 0]}}).encode())
    _, layout = fmt.parse_safetensors_header(data, len(data))
    assert layout.entries[0].shape == (0, 2**64 - 1)
    (tmp_path / "a.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:  # the reference reader agrees
        assert list(f.keys()) == ["a"]


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param(b'{"a": [' + b"1" * 5000 + b"]}", "4300 digits", id="int-5000-digits"),
        pytest.param(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply", id="deep"),
        pytest.param(b'{"a": [' + b"{}," * 3_000_000 + b"{}]}", "JSON values", id="millions-of-objects"),
    ],
)
def test_every_json_reader_turns_hostile_json_into_a_format_error_naming_the_file(text, message):
    with pytest.raises(fmt.FormatError, match=message) as info:
        fmt.parse_manifest(text, "ckpt/checkpoint_manifest.json")
    assert str(info.value).startswith("ckpt/checkpoint_manifest.json: ")
    with pytest.raises(fmt.FormatError, match=message) as info:
        fmt.parse_model_index(text, "ckpt/model.safetensors.index.json")
    assert str(info.value).startswith("ckpt/model.safetensors.index.json: ")
    data = _header_bytes(text)
    with pytest.raises(fmt.FormatError, match=message):
        fmt.parse_safetensors_header(data, len(data))
    with pytest.raises(fmt.FormatError, match=message):
        fmt.load_tree(text.decode(), "ckpt/x_state.safetensors")


def test_json_values_inside_strings_do_not_count_against_the_limit():
    # A tree stored as a string in a header holds commas and brackets: they are not values of the header.
    text = json.dumps({"__metadata__": {"ckptd.tree": "[" + ",".join(["{}"] * 50) + "]"}}).encode()
    assert fmt.json_value_count(text) > 50
    assert fmt.json_value_count(text, limit=10) == 3  # the object, __metadata__, and the one string
    assert fmt.load_json(text, "x", "header", max_values=10)["__metadata__"]["ckptd.tree"].startswith("[{}")
    with pytest.raises(fmt.FormatError, match="holds 4 JSON values, more than the 3"):
        fmt.load_json(b'{"a": [1, 2]}', "x", "header", max_values=3)


@pytest.mark.parametrize(
    "tree",
    [
        {"__ckptd__": "tensor"},
        {"__ckptd__": "tensor", "name": 5},
        {"__ckptd__": "ndarray", "name": "missing"},
        {"__ckptd__": "tuple", "items": 5},
        {"__ckptd__": "dict", "items": [[{}, 1]]},
        {"__ckptd__": "dict", "items": [[1]]},
        {"__ckptd__": "float", "repr": "abc"},
        {"__ckptd__": "float"},
        {"__ckptd__": "bytes", "b64": "!!"},
        {"__ckptd__": "npscalar", "dtype": "O", "value": 1},
        {"__ckptd__": "npscalar", "dtype": "no-such-dtype", "value": 1},
        {"__ckptd__": "torch_device", "name": "nowhere"},
        {"__ckptd__": "torch_size", "items": ["x"]},
        {"__ckptd__": "torch_size", "items": [2**63]},
        {"__ckptd__": "torch_dtype", "name": []},
        {"__ckptd__": ["unhashable"]},
        {"__ckptd__": "from-the-future"},
    ],
    ids=repr,
)
def test_unflatten_raises_only_format_errors_whatever_the_tree(tree):
    with pytest.raises(fmt.FormatError):
        fmt.unflatten_state({"x": [tree]}, {})


def test_a_state_tree_too_large_to_load_fails_the_save_naming_the_component():
    state = {"indices": list(range(fmt.MAX_TREE_VALUES))}  # one list too many values (plus the dict)
    with pytest.raises(fmt.UnsupportedLeafError, match="sampler: the state holds .* values outside tensors"):
        fmt.flatten_state(state, "sampler")
    tree, _ = fmt.flatten_state({"indices": list(range(1000))}, "sampler")
    assert fmt.tree_value_count(tree) == fmt.json_value_count(json.dumps(tree), limit=0) == 1002


MANIFEST_WRONG_TYPES = [
    ("timestamp", lambda r: r.update(timestamp=5)),
    ("txn", lambda r: r.update(txn=None)),
    ("topology", lambda r: r.update(topology=[])),
    ("metadata", lambda r: r.update(metadata=json.loads('{"a":' * 100 + "1" + "}" * 100))),
    ("pytorch_version", lambda r: r.update(pytorch_version=2)),
    ("ranks", lambda r: r["components"]["optim"].update(ranks="abc")),
    ("ranks", lambda r: r["components"]["optim"].update(ranks=[0, True])),
    ("replicated_across", lambda r: r["components"]["optim"].update(replicated_across=5)),
    ("group_instances", lambda r: r["components"]["optim"].update(group_instances=[5])),
    ("required", lambda r: r["components"]["optim"].update(required="yes")),
    ("checksum", lambda r: r["components"]["optim"].update(checksum=1)),
    ("metadata", lambda r: r["components"]["optim"].update(metadata=None)),
    ("key", lambda r: r["components"]["optim"].update(key="other")),
    ("component", lambda r: r["files"][OPT].update(component=None)),
    ("rank", lambda r: r["files"][OPT].update(rank="0")),
    ("written_by", lambda r: r["files"][OPT].update(written_by=-1)),
]


@pytest.mark.parametrize("field, mutate", MANIFEST_WRONG_TYPES, ids=[f for f, _ in MANIFEST_WRONG_TYPES])
def test_parse_manifest_checks_the_type_of_every_field(field, mutate):
    with pytest.raises(fmt.FormatError, match=f"{field}") as info:
        fmt.parse_manifest(_mutated(mutate), "ckpt/checkpoint_manifest.json")
    assert str(info.value).startswith("ckpt/checkpoint_manifest.json: ")


def test_files_are_read_relative_to_the_checkpoint_directory_opened_once(tmp_path):
    checkpoint = write_checkpoint(tmp_path, 4)
    link = tmp_path / "checkpoints" / "checkpoint-5"
    link.symlink_to(checkpoint)
    with pytest.raises(fmt.FormatError, match="is a symbolic link .* not a checkpoint directory"):
        fmt.CheckpointDir(link)
    with fmt.CheckpointDir(checkpoint) as d:
        manifest = fmt.read_manifest(d)
        rec = manifest.files[OPT]
        moved = checkpoint.with_name("elsewhere")
        checkpoint.rename(moved)  # the path now names nothing; the open directory is still the checkpoint
        assert bytes(fmt.read_verified(checkpoint / OPT, rec, at=d)) == (moved / OPT).read_bytes()
        with pytest.raises(ValueError, match="not a file directly inside"):
            fmt.read_verified(moved / OPT, rec, at=d)
    with pytest.raises(FileNotFoundError):
        fmt.CheckpointDir(checkpoint)


def test_index_problems_name_a_shard_of_another_component_and_a_tensor_a_shard_lacks():
    files = {"model-00001-of-00001.safetensors": b"abc", fmt.MODEL_INDEX_NAME: b"{}", OPT: b"xyz"}
    m = make_manifest(files=files)
    for name, rec in m.files.items():
        rec.component = "optim" if name == OPT else "model"
    model_files = ["model-00001-of-00001.safetensors", fmt.MODEL_INDEX_NAME]
    m.components["model"] = fmt.ComponentRecord("model", "global", [0], files=model_files)
    m.components["optim"].files = [OPT]
    ckpt = Path("ckpt")
    good = {"w": "model-00001-of-00001.safetensors"}
    assert fmt.index_problems(ckpt, m, good, [["w", "w_tied"]], {"model-00001-of-00001.safetensors": {"w"}}) == []
    (problem,) = fmt.index_problems(ckpt, m, {**good, "x": OPT}, [])
    assert problem.startswith(f"ckpt/{fmt.MODEL_INDEX_NAME}: maps 1 tensor(s) (e.g. 'x') to '{OPT}'")
    assert "'optim' component" in problem
    (problem,) = fmt.index_problems(ckpt, m, good, [], {"model-00001-of-00001.safetensors": {"v"}})
    assert "whose header does not hold them" in problem
    (problem,) = fmt.index_problems(ckpt, m, good, [["missing", "alias"]])
    assert "'missing', which no shard stores" in problem
    (problem,) = fmt.index_problems(ckpt, m, {**good, "v": "model-00001-of-00001.safetensors"}, [["w", "v"]])
    assert "stored in its own right" in problem
