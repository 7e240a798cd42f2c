"""Unit tests for ckptd.protocol, the rank <-> daemon wire protocol.

Messages are built with the real msgpack and parsed by the real validators; hostile inputs must end in a
ProtocolError that names the field, never in another exception.
"""

from __future__ import annotations

import copy
import random
import re

import msgpack
import pytest

from ckptd import format as fmt
from ckptd import protocol as proto
from ckptd.protocol import MsgType, ProtocolError

SEGMENT_SIZE = 4096


def valid_body() -> dict:
    """A stage request body exactly as it arrives from unpack(): three files filling the segment, a commit."""
    return {
        "txn": "abc123",
        "output_dir": "/data/run1",
        "step": 10,
        "rank": 1,
        "world_size": 4,
        "expected_ranks": [0, 1, 2, 3],
        "timeout_s": 600.0,
        "pid": 1234,
        "segment": "ckptd-1234-0",
        "segment_fd": 7,
        "segment_ino": 424242,
        "segment_size": SEGMENT_SIZE,
        "files": [
            {
                "path": "optim_state_rank_1.safetensors",
                "offset": 0,
                "length": 1000,
                "component": "optim",
                "kind": "safetensors",
                "rank": 1,
                "group_instance": None,
                "node": None,
            },
            {"path": fmt.MODEL_INDEX_NAME, "offset": 1000, "length": 200, "component": "model", "kind": "index"},
            {"path": "model-00001-of-00001.safetensors", "offset": 1200, "length": 2896, "component": "model"},
        ],
        "commit": {
            "components": [
                {
                    "key": "optim",
                    "sharing_pattern": "per_rank",
                    "ranks": [0, 1, 2, 3],
                    "replicated_across": None,
                    "group_name": None,
                    "group_instances": None,
                    "required": True,
                    "metadata": {"lr": 0.001, "tags": ["a", None, True]},
                },
                {
                    "key": "data",
                    "sharing_pattern": "per_group",
                    "ranks": [0, 2],
                    "group_name": "dp",
                    "group_instances": [[0, 1], [2, 3]],
                    "required": False,
                },
                {"key": "model", "sharing_pattern": "replicated", "ranks": [0], "replicated_across": [0, 1, 2, 3]},
            ],
            "topology": {"nnodes": 1, "local_world_size": 4},
            "metadata": {"eval_loss": 1.5, "epoch": 3},
            "pytorch_version": "2.13.0",
            "save_total_limit": 3,
        },
    }


def over_the_wire(body: dict, req_id: int = 7) -> tuple[MsgType, int, dict]:
    return proto.unpack(proto.pack(MsgType.STAGE, req_id, **body))


# ------------------------------------------------------------------------------------------ pack/unpack


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.value)
def test_pack_unpack_round_trips_every_message_type(msg_type):
    body = {"txn": "t1", "n": -3, "x": 1.5, "blob": b"\x00\xff", "nested": {"a": [1, None, True]}, "s": "ü"}
    got_type, got_id, got_body = proto.unpack(proto.pack(msg_type, 42, **body))
    assert got_type is msg_type
    assert got_id == 42
    assert got_body == body
    assert type(got_body["blob"]) is bytes


def test_unpack_of_a_notification_without_id_gives_id_0():
    frame = msgpack.packb({"v": proto.PROTOCOL_VERSION, "type": "released", "txn": "a", "rank": 0})
    assert proto.unpack(frame) == (MsgType.RELEASED, 0, {"txn": "a", "rank": 0})


def test_largest_request_id_round_trips():
    assert proto.unpack(proto.pack(MsgType.HELLO, (1 << 63) - 1))[1] == (1 << 63) - 1


def test_message_type_and_txn_state_wire_names_are_stable():
    assert {t.value for t in MsgType} == {
        "hello", "welcome", "stage", "accepted", "query", "abort", "txn_state", "status", "status_report",
        "bye", "bye_ok", "released", "committed", "aborted", "error", "set_best", "best_set",
        "peer_listen", "peer_address", "peer_check", "peer_ok",
        "p_hello", "p_welcome", "p_join", "p_opened", "p_prepared", "p_beat", "p_state", "p_abort",
        "p_committed", "p_aborted",
    }  # fmt: skip
    assert {s.value for s in proto.TxnState} == {
        "open", "writing", "prepared", "committing", "committed", "aborting", "aborted", "unknown",
    }  # fmt: skip


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x92\x01", id="truncated-array"),
        pytest.param(b"\x85\xa1v\x01", id="truncated-map"),
        pytest.param(b"hello world, not msgpack", id="text"),
        pytest.param(msgpack.packb({"v": 1, "type": "hello", "id": 1}) + b"\x00", id="trailing-bytes"),
        pytest.param(b"\x91" * 100_000 + b"\xc0", id="nested-100k-deep"),
        pytest.param(msgpack.packb({"v": 1, "type": "hello", 5: "int-key"}), id="int-map-key"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="map-claiming-4g-entries"),
        pytest.param(b"\xdb\xff\xff\xff\xff" + b"a", id="str-claiming-4gib"),
    ],
)
def test_unpack_rejects_garbage_bytes_with_a_protocol_error(frame):
    with pytest.raises(ProtocolError):
        proto.unpack(frame)


def test_unpack_rejects_an_oversized_frame_before_decoding():
    with pytest.raises(ProtocolError, match="exceeds"):
        proto.unpack(b"\xc0" * (proto.MAX_MESSAGE_BYTES + 1))


@pytest.mark.parametrize("value", [[1, 2], 5, "hello", None, b"bytes", 1.5])
def test_unpack_rejects_a_message_that_is_not_a_map(value):
    with pytest.raises(ProtocolError, match="expected a msgpack map"):
        proto.unpack(msgpack.packb(value))


@pytest.mark.parametrize("version", [0, 2, "1", None, [1]])
def test_unpack_rejects_a_wrong_protocol_version_and_says_to_restart(version):
    with pytest.raises(ProtocolError, match="protocol version .* expected 1.*restart the daemon"):
        proto.unpack(msgpack.packb({"v": version, "type": "hello", "id": 1}))


def test_unpack_rejects_a_missing_protocol_version():
    with pytest.raises(ProtocolError, match="protocol version None"):
        proto.unpack(msgpack.packb({"type": "hello", "id": 1}))


@pytest.mark.parametrize("msg_type", ["frobnicate", "HELLO", "", None, 3, ["hello"], {"t": "hello"}])
def test_unpack_rejects_an_unknown_message_type(msg_type):
    with pytest.raises(ProtocolError, match="unknown message type"):
        proto.unpack(msgpack.packb({"v": 1, "type": msg_type, "id": 1}))


@pytest.mark.parametrize("req_id", [-1, True, False, "1", 1.0, 1 << 63, [1], None])
def test_unpack_rejects_a_bad_request_id(req_id):
    with pytest.raises(ProtocolError, match="field 'id' must be a non-negative integer"):
        proto.unpack(msgpack.packb({"v": 1, "type": "hello", "id": req_id}))


def test_unpack_never_raises_anything_but_protocol_error_on_random_bytes():
    rng = random.Random(1234)
    valid = proto.pack(MsgType.STAGE, 1, **valid_body())
    for i in range(3000):
        if i % 2:
            frame = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        else:  # flip a few bytes of a valid frame: mostly still msgpack, often nonsense
            buf = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] = rng.getrandbits(8)
            frame = bytes(buf)
        try:
            msg_type, _, body = proto.unpack(frame)
            if msg_type is MsgType.STAGE:
                proto.parse_stage(body)
        except ProtocolError:
            pass


# ---------------------------------------------------------------------------------------------- stage


def test_parse_stage_accepts_a_valid_request_and_keeps_every_field():
    msg_type, req_id, body = over_the_wire(valid_body())
    assert (msg_type, req_id) == (MsgType.STAGE, 7)
    req = proto.parse_stage(body)
    assert req.txn == "abc123" and req.output_dir == "/data/run1" and req.step == 10
    assert (req.rank, req.world_size, req.expected_ranks) == (1, 4, [0, 1, 2, 3])
    assert req.timeout_s == 600.0 and req.pid == 1234
    assert req.segment == "ckptd-1234-0" and req.segment_size == SEGMENT_SIZE
    assert [f.path for f in req.files] == [
        "optim_state_rank_1.safetensors",
        fmt.MODEL_INDEX_NAME,
        "model-00001-of-00001.safetensors",
    ]
    assert req.files[0] == proto.FileSpec("optim_state_rank_1.safetensors", 0, 1000, "optim", "safetensors", rank=1)
    assert req.files[1].kind == "index" and req.files[2].kind == "safetensors"
    assert req.commit is not None
    assert [c.key for c in req.commit.components] == ["optim", "data", "model"]
    assert req.commit.components[1].group_instances == [[0, 1], [2, 3]]
    assert req.commit.components[1].required is False
    assert req.commit.components[2].replicated_across == [0, 1, 2, 3]
    assert req.commit.metadata == {"eval_loss": 1.5, "epoch": 3}
    assert req.commit.save_total_limit == 3


def test_pack_stage_then_unpack_then_parse_stage_gives_back_the_same_request():
    req = proto.parse_stage(valid_body())
    msg_type, req_id, body = proto.unpack(proto.pack_stage(req, 99))
    assert (msg_type, req_id) == (MsgType.STAGE, 99)
    assert proto.parse_stage(body) == req


def test_parse_stage_accepts_a_request_without_commit_info_and_an_integer_timeout():
    body = valid_body()
    del body["commit"]
    body["timeout_s"] = 30
    req = proto.parse_stage(body)
    assert req.commit is None
    assert req.timeout_s == 30.0 and type(req.timeout_s) is float


def test_parse_stage_accepts_a_file_ending_exactly_at_the_segment_end_and_empty_files():
    body = valid_body()
    body["files"] = [
        {"path": "a_state.safetensors", "offset": SEGMENT_SIZE - 8, "length": 8, "component": "a"},
        {"path": "b_state.safetensors", "offset": SEGMENT_SIZE, "length": 0, "component": "b"},
    ]
    assert [f.length for f in proto.parse_stage(body).files] == [8, 0]


def _set(path: str, value):
    """A mutation that sets body[path] (dotted, list indices as ints); the sentinel DELETE removes it."""

    def mutate(body):
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        target = body
        for k in keys[:-1]:
            target = target[k]
        if value is DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value

    return mutate


DELETE = object()
F0 = "files.0"

INVALID_STAGE = [
    # file paths: only checkpoint file names, never a directory component
    ("path-dotdot", _set(f"{F0}.path", "../optim_state_rank_1.safetensors"), "is not a checkpoint file name"),
    ("path-dotdot-deep", _set(f"{F0}.path", "../../etc/x_state.safetensors"), "is not a checkpoint file name"),
    ("path-slash", _set(f"{F0}.path", "sub/optim_state_rank_1.safetensors"), "is not a checkpoint file name"),
    ("path-absolute", _set(f"{F0}.path", "/tmp/optim_state.safetensors"), "is not a checkpoint file name"),
    ("path-manifest", _set(f"{F0}.path", fmt.MANIFEST_NAME), "is not a checkpoint file name"),
    ("path-not-str", _set(f"{F0}.path", b"optim_state.safetensors"), "is not a checkpoint file name"),
    ("path-nul", _set(f"{F0}.path", "optim_state.safetensors\x00"), "is not a checkpoint file name"),
    # byte ranges inside the segment
    ("range-beyond-segment", _set(f"{F0}.offset", SEGMENT_SIZE - 999), "beyond the 4096-byte segment"),
    ("length-beyond-segment", _set(f"{F0}.length", SEGMENT_SIZE + 1), "beyond the 4096-byte segment"),
    ("offset-negative", _set(f"{F0}.offset", -1), "field 'offset' must be an integer"),
    ("length-negative", _set(f"{F0}.length", -5), "field 'length' must be an integer"),
    ("offset-bool", _set(f"{F0}.offset", True), "field 'offset' must be an integer"),
    ("offset-float", _set(f"{F0}.offset", 0.0), "field 'offset' must be an integer"),
    ("offset-missing", _set(f"{F0}.offset", DELETE), "field 'offset' must be an integer"),
    ("offset-huge", _set(f"{F0}.offset", 1 << 63), "field 'offset' must be an integer"),
    ("file-rank-bool", _set(f"{F0}.rank", True), "field 'rank' must be an integer"),
    ("file-node-negative", _set(f"{F0}.node", -1), "field 'node' must be an integer"),
    ("file-component-invalid", _set(f"{F0}.component", "../x"), "component key '../x' is not a valid key"),
    ("file-component-missing", _set(f"{F0}.component", DELETE), "component key None"),
    ("file-extra-field", _set(f"{F0}.mode", 0o777), "files[]: unexpected field(s) ['mode']"),
    ("file-not-a-map", _set(F0, ["optim_state.safetensors", 0, 1]), "each entry of 'files' must be a map"),
    ("files-not-a-list", _set("files", {"a": 1}), "field 'files' must be a list"),
    ("files-duplicate-path", _set("files.2.path", "optim_state_rank_1.safetensors"), "names the same path twice"),
    # index kind must match the name
    ("kind-index-on-shard", _set("files.2.kind", "index"), "does not match its name"),
    ("kind-safetensors-on-index", _set("files.1.kind", "safetensors"), "does not match its name"),
    ("kind-unknown", _set(f"{F0}.kind", "pickle"), "kind must be 'safetensors' or 'index'"),
    # ranks
    ("rank-not-expected", _set("expected_ranks", [0, 2, 3]), "include this rank 1"),
    ("rank-equals-world-size", _set("rank", 4), "field 'rank' must be an integer in [0, 3]"),
    ("rank-beyond-world-size", _set("rank", 10), "field 'rank' must be an integer in [0, 3]"),
    ("rank-bool", _set("rank", True), "field 'rank' must be an integer"),
    ("rank-negative", _set("rank", -1), "field 'rank' must be an integer"),
    ("rank-str", _set("rank", "1"), "field 'rank' must be an integer"),
    ("expected-beyond-world-size", _set("expected_ranks", [0, 1, 2, 3, 4]), "below world_size 4"),
    ("expected-duplicates", _set("expected_ranks", [0, 1, 1]), "must be distinct"),
    ("expected-bool", _set("expected_ranks", [0, True]), "field 'expected_ranks' must hold ranks"),
    ("expected-not-list", _set("expected_ranks", 1), "field 'expected_ranks' must be a list"),
    ("world-size-zero", _set("world_size", 0), "field 'world_size' must be an integer in [1,"),
    ("world-size-bool", _set("world_size", True), "field 'world_size' must be an integer"),
    # scalars
    ("output-dir-relative", _set("output_dir", "data/run1"), "must be an absolute path"),
    ("output-dir-dot", _set("output_dir", "./run"), "must be an absolute path"),
    ("output-dir-empty", _set("output_dir", ""), "field 'output_dir' must be a non-empty string"),
    ("output-dir-nul", _set("output_dir", "/data\x00/run"), "field 'output_dir' must be a non-empty string"),
    ("output-dir-too-long", _set("output_dir", "/" + "a" * 5000), "field 'output_dir' must be a non-empty string"),
    ("output-dir-bytes", _set("output_dir", b"/data"), "field 'output_dir' must be a non-empty string"),
    ("step-negative", _set("step", -1), "field 'step' must be an integer"),
    ("step-bool", _set("step", False), "field 'step' must be an integer"),
    ("step-str", _set("step", "10"), "field 'step' must be an integer"),
    ("pid-zero", _set("pid", 0), "field 'pid' must be an integer in [1,"),
    ("pid-bool", _set("pid", True), "field 'pid' must be an integer"),
    ("timeout-zero", _set("timeout_s", 0), "field 'timeout_s' must be a number"),
    ("timeout-negative", _set("timeout_s", -1.0), "field 'timeout_s' must be a number"),
    ("timeout-nan", _set("timeout_s", float("nan")), "field 'timeout_s' must be a number"),
    ("timeout-inf", _set("timeout_s", float("inf")), "field 'timeout_s' must be a number"),
    ("timeout-too-long", _set("timeout_s", proto.MAX_TIMEOUT_S + 1), "field 'timeout_s' must be a number"),
    ("timeout-bool", _set("timeout_s", True), "field 'timeout_s' must be a number"),
    ("segment-size-negative", _set("segment_size", -1), "field 'segment_size' must be an integer"),
    ("commit-no-components", _set("commit.components", []), "must name at least one component"),
    ("segment-fd-negative", _set("segment_fd", -1), "field 'segment_fd' must be an integer"),
    ("segment-fd-missing", _set("segment_fd", None), "field 'segment_fd' must be an integer"),
    ("segment-ino-zero", _set("segment_ino", 0), "field 'segment_ino' must be an integer"),
    ("segment-ino-str", _set("segment_ino", "12"), "field 'segment_ino' must be an integer"),
    ("job-slash", _set("job", "a/b"), "field 'job' must be 1-128"),
    ("job-empty", _set("job", ""), "field 'job' must be 1-128"),
    ("job-int", _set("job", 7), "field 'job' must be 1-128"),
    ("deadline-nan", _set("deadline", float("nan")), "field 'deadline' must be a Unix time"),
    ("deadline-str", _set("deadline", "soon"), "field 'deadline' must be a Unix time"),
    ("deadline-bool", _set("deadline", True), "field 'deadline' must be a Unix time"),
    # the shared-memory segment name
    ("segment-no-prefix", _set("segment", "psm_1234"), "must be a memfd name starting 'ckptd-'"),
    ("segment-slash", _set("segment", "ckptd-a/b"), "must be a memfd name starting 'ckptd-'"),
    ("segment-dotdot", _set("segment", "ckptd-../../etc/passwd"), "must be a memfd name starting 'ckptd-'"),
    ("segment-absolute", _set("segment", "/dev/shm/ckptd-1"), "must be a memfd name starting 'ckptd-'"),
    ("segment-empty", _set("segment", ""), "field 'segment' must be a non-empty string"),
    ("segment-too-long", _set("segment", "ckptd-" + "x" * 300), "field 'segment' must be a non-empty string"),
    # the transaction id
    ("txn-empty", _set("txn", ""), "field 'txn' must be 1-64 letters or digits"),
    ("txn-dash", _set("txn", "abc-123"), "field 'txn' must be 1-64 letters or digits"),
    ("txn-dotdot", _set("txn", "../x"), "field 'txn' must be 1-64 letters or digits"),
    ("txn-too-long", _set("txn", "a" * 65), "field 'txn' must be 1-64 letters or digits"),
    ("txn-int", _set("txn", 123), "field 'txn' must be 1-64 letters or digits"),
    ("txn-missing", _set("txn", DELETE), "field 'txn' must be 1-64 letters or digits"),
    # unknown fields anywhere
    ("extra-field", _set("extra", 1), "stage: unexpected field(s) ['extra']"),
    ("commit-extra-field", _set("commit.callback", "x"), "commit: unexpected field(s) ['callback']"),
    ("component-extra-field", _set("commit.components.0.pickle", b"x"), "commit.components[]: unexpected field"),
    # commit info
    ("commit-not-a-map", _set("commit", [1]), "field 'commit' must be a map"),
    ("commit-components-not-list", _set("commit.components", {}), "field 'commit.components' must be a list"),
    ("commit-component-not-map", _set("commit.components.0", "optim"), "must be a map"),
    ("commit-key-dotdot", _set("commit.components.0.key", "../x"), "component key '../x' is not a valid key"),
    ("commit-key-slash", _set("commit.components.0.key", "a/b"), "component key 'a/b' is not a valid key"),
    ("commit-key-hidden", _set("commit.components.0.key", ".x"), "component key '.x' is not a valid key"),
    ("commit-key-missing", _set("commit.components.0.key", DELETE), "component key None is not a valid key"),
    ("commit-pattern-unknown", _set("commit.components.0.sharing_pattern", "per_host"), "unknown sharing_pattern"),
    ("commit-group-name-invalid", _set("commit.components.1.group_name", "../dp"), "invalid group_name '../dp'"),
    ("commit-group-instances-not-list", _set("commit.components.1.group_instances", 2), "group_instances must be"),
    ("commit-group-instances-bad-rank", _set("commit.components.1.group_instances", [[0, -1]]), "must hold ranks"),
    ("commit-ranks-not-list", _set("commit.components.0.ranks", "0"), "field 'ranks' must be a list"),
    ("commit-across-bad", _set("commit.components.2.replicated_across", [0.5]), "field 'replicated_across'"),
    ("commit-required-int", _set("commit.components.0.required", 1), "required must be a bool"),
    ("commit-component-metadata-list", _set("commit.components.0.metadata", [1]), "metadata must be a map"),
    ("commit-nan-metadata", _set("commit.metadata.eval_loss", float("nan")), "non-finite float"),
    ("commit-inf-metadata-nested", _set("commit.metadata.hist", [1.0, [float("-inf")]]), "non-finite float"),
    ("commit-inf-topology", _set("commit.topology.x", float("inf")), "field 'commit.topology' holds a non-finite"),
    ("commit-nan-component-metadata", _set("commit.components.0.metadata.lr", float("nan")), "non-finite float"),
    ("commit-bytes-metadata", _set("commit.metadata.blob", b"\x00"), "holds bytes, which is not JSON"),
    ("commit-int-key-metadata", _set("commit.metadata", {1: "a"}), "has a non-string key 1"),
    ("commit-metadata-missing", _set("commit.metadata", DELETE), "field 'commit.metadata' must be a map"),
    ("commit-topology-not-map", _set("commit.topology", []), "field 'commit.topology' must be a map"),
    ("commit-torch-version-int", _set("commit.pytorch_version", 2), "field 'commit.pytorch_version' must be a str"),
    ("commit-limit-zero", _set("commit.save_total_limit", 0), "field 'save_total_limit' must be an integer in [1,"),
    ("commit-limit-bool", _set("commit.save_total_limit", True), "field 'save_total_limit' must be an integer"),
]


@pytest.mark.parametrize("mutate, message", [pytest.param(m, msg, id=i) for i, m, msg in INVALID_STAGE])
def test_parse_stage_rejects_an_invalid_request_naming_what_is_wrong(mutate, message):
    body = valid_body()
    proto.parse_stage(copy.deepcopy(body))  # the unmutated request is valid, so the mutation is the cause
    mutate(body)
    with pytest.raises(ProtocolError) as info:
        proto.parse_stage(body)
    assert message in str(info.value)


def test_parse_stage_rejects_metadata_nested_too_deeply():
    body = valid_body()
    deep: list = []
    for _ in range(40):
        deep = [deep]
    body["commit"]["metadata"] = {"deep": deep}
    with pytest.raises(ProtocolError, match="nested too deeply"):
        proto.parse_stage(body)


def test_parse_stage_rejections_survive_the_wire():
    # The same hostile values, packed by msgpack and decoded by unpack, are still refused.
    for case in ("path-dotdot", "range-beyond-segment", "segment-no-prefix", "commit-nan-metadata", "extra-field"):
        mutate, message = next((m, msg) for i, m, msg in INVALID_STAGE if i == case)
        body = valid_body()
        mutate(body)
        _, _, decoded = over_the_wire(body)
        with pytest.raises(ProtocolError, match=re.escape(message)):
            proto.parse_stage(decoded)


HOSTILE_VALUES = [None, True, -1, 0, 1 << 62, 1.5, float("nan"), "", "../x", "a/b", "x" * 5000, b"\x00", [], {}, [[]]]


def test_parse_stage_never_raises_anything_but_protocol_error_on_hostile_field_values():
    rng = random.Random(99)

    def paths(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield f"{prefix}{k}"
                yield from paths(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield f"{prefix}{i}"
                yield from paths(v, f"{prefix}{i}.")

    all_paths = list(paths(valid_body()))
    accepted = 0
    for _ in range(3000):
        body = valid_body()
        for path in rng.sample(all_paths, rng.randint(1, 3)):
            try:
                _set(path, rng.choice(HOSTILE_VALUES + [DELETE]))(body)
            except (KeyError, IndexError, TypeError):
                pass  # an earlier mutation replaced the parent
        try:
            req = proto.parse_stage(body)
        except ProtocolError:
            continue
        accepted += 1
        # Whatever got through is still confined to checkpoint file names inside the segment.
        for f in req.files:
            assert fmt.is_valid_filename(f.path) and "/" not in f.path
            assert 0 <= f.offset and f.offset + f.length <= req.segment_size
        assert req.output_dir.startswith("/") and req.segment.startswith("ckptd-") and "/" not in req.segment
        assert fmt.is_valid_txn(req.txn) and 0 <= req.rank < req.world_size
    assert accepted > 0  # some mutations (e.g. a None optional field) are harmless


# ------------------------------------------------------------------------------------- small requests


def test_parse_txn_accepts_valid_ids_and_rejects_others():
    assert proto.parse_txn({"txn": "Ab12"}) == "Ab12"
    for bad in ({"txn": "a/b"}, {"txn": ""}, {}, {"txn": 5}, {"txn": "x" * 65}):
        with pytest.raises(ProtocolError, match="field 'txn'"):
            proto.parse_txn(bad)


def test_parse_reason_defaults_truncates_and_rejects_non_strings():
    assert proto.parse_reason({}) == "aborted by a rank"
    assert proto.parse_reason({"reason": "oom"}) == "oom"
    assert len(proto.parse_reason({"reason": "x" * 10_000})) == 4096
    with pytest.raises(ProtocolError, match="field 'reason' must be a string"):
        proto.parse_reason({"reason": 5})


def test_parse_pid_accepts_positive_ints_only():
    assert proto.parse_pid({"pid": 4321}) == 4321
    for bad in (0, -1, True, "12", 1.0, None, 1 << 40):
        with pytest.raises(ProtocolError, match="field 'pid'"):
            proto.parse_pid({"pid": bad})


def test_parse_stage_keeps_the_slab_job_and_deadline_fields():
    body = valid_body() | {"job": "torchelastic_run-1.a:b@c", "deadline": 1_900_000_000.5}
    req = proto.parse_stage(body)
    assert (req.segment_fd, req.segment_ino) == (7, 424242)
    assert req.job == "torchelastic_run-1.a:b@c" and req.deadline == 1_900_000_000.5
    legacy = proto.parse_stage(valid_body())
    assert legacy.job is None and legacy.deadline is None


@pytest.mark.parametrize(
    "body",
    [
        {"output_dir": "relative/out", "step": 1},
        {"output_dir": "/out", "step": -1},
        {"output_dir": "/out", "step": True},
        {"output_dir": "/out", "step": "3"},
        {"output_dir": "/out"},
        {"output_dir": "/out", "step": 1, "extra": 1},
        {"output_dir": "", "step": 1},
    ],
)
def test_a_hostile_set_best_request_is_refused_by_name(body):
    with pytest.raises(proto.ProtocolError):
        proto.parse_set_best(body)


def test_set_best_request_parses_its_two_fields():
    assert proto.parse_set_best({"output_dir": "/runs/a", "step": 40}) == ("/runs/a", 40)


@pytest.mark.parametrize(
    "extra",
    [{"keep_every_n_steps": 0}, {"keep_every_n_steps": "5"}, {"best_metric": ""}, {"best_metric": 3},
     {"greater_is_better": "yes"}, {"best_metric": "x" * 300}],
)  # fmt: skip
def test_hostile_retention_and_best_fields_of_a_commit_are_refused(extra):
    body = {
        "components": [{"key": "w", "sharing_pattern": "global", "ranks": [0]}],
        "topology": {},
        "metadata": {},
        "pytorch_version": None,
        "save_total_limit": 2,
        **extra,
    }
    with pytest.raises(proto.ProtocolError):
        proto.parse_commit_info(body)


def test_retention_and_best_fields_of_a_commit_parse():
    body = {
        "components": [{"key": "w", "sharing_pattern": "global", "ranks": [0]}],
        "topology": {},
        "metadata": {},
        "pytorch_version": None,
        "save_total_limit": 2,
        "keep_every_n_steps": 3,
        "best_metric": "eval_loss",
        "greater_is_better": True,
    }
    info = proto.parse_commit_info(body)
    assert (info.keep_every_n_steps, info.best_metric, info.greater_is_better) == (3, "eval_loss", True)
