"""The wire protocol between training ranks and their node's daemon: the one place messages are built
and parsed.

Every message is one msgpack map in one ZeroMQ frame (after the ROUTER identity), carrying ``v`` (the
protocol version), ``type`` and the fields of that type. Bulk bytes never travel: a rank names its
shared-memory segment and the byte ranges of each file inside it.

Rank -> daemon requests, each answered by exactly one reply carrying the request's ``id``:

    hello    {pid, version}                                   -> welcome {pid, version}
    stage    {txn, output_dir, step, rank, world_size,        -> accepted {txn} | error
              expected_ranks, timeout_s, pid, segment,
              segment_fd, segment_ino, segment_size,
              files[], commit?, job?, deadline?, export_to?,
              stall_s?}
    query    {txn}                                            -> txn_state {txn, state, path, reason}
    abort    {txn, reason}                                    -> txn_state
    status   {}                                               -> status_report {...}
    bye      {pid}                                            -> bye_ok
    peer_listen {job, server_public, server_secret,           -> peer_address {address}
              client_public}
    peer_check  {leader, server_public, client_public,        -> peer_ok {pid} | error
              client_secret}

Daemon -> rank notifications (``id`` 0), sent to every rank that staged a part of the transaction:

    released  {txn, rank}          the daemon has copied this rank's bytes out; the slab may be reused
    committed {txn, step, path}    checkpoint-<step> is durable and visible
    aborted   {txn, reason}        the transaction is gone; earlier checkpoints are untouched

Any malformed request gets ``error {message}``; the daemon never crashes or hangs on one.

Each entry of ``files`` (``FileSpec``) is either a whole file (kind ``safetensors`` or ``index``: one
contiguous range of the segment) or, kind ``region``, this part's share of a *shared* file that several
parts write at their byte offsets (SHARDED state): ``file_size`` and ``runs`` say where each of its slab
bytes goes (see ``FileSpec`` and ``parse_runs``; docs/protocol.md).

Multi-node (DESIGN §5). Rank 0 makes a CURVE key set for the job when ``CheckpointClient`` is built and
asks its daemon, the leader, to ``peer_listen``: the daemon binds one ROUTER for the job on its peer host
and answers with its address. The keys and the address reach every rank through the job's own collective;
each follower node's local rank 0 sends ``peer_check`` so that its daemon connects now and a wrong address or
firewall fails the constructor, not the first save. Every part of a multi-node save carries ``peer``
(``PeerInfo``): this node's index, the node count, the leader's address and the job's keys.

Daemon <-> daemon messages, over the leader's per-job CURVE socket (follower DEALER -> leader ROUTER)::

    p_hello    {node, pid}                       -> p_welcome {pid}
    p_join     {txn, node, step}                 the follower has parts of txn; the leader answers
                                                 p_opened {txn} once the shared temp dir exists
    p_prepared {txn, node, ino, files[]}         every file of this node written and fsynced (FileRecords),
                                                 in the temp dir of inode ``ino``
    p_beat     {txn, node}                       -> p_state {txn, state, path, reason}
    p_abort    {txn, node, reason}               this node failed its part: abort everywhere

    leader -> follower (``id`` 0): p_opened {txn}, p_committed {txn, step}, p_aborted {txn, reason}

The staging segment is a sealed memfd of the rank's process (``memfd_create`` + ``F_SEAL_SHRINK``): the
daemon opens it as ``/proc/<pid>/fd/<segment_fd>`` while the rank waits for ``accepted``, checks that it is
the inode ``segment_ino``, owned by this user and sealed against shrinking (so no read of it can ever
SIGBUS), and keeps its own mapping. ``segment`` is the memfd's name, for logs only. A memfd has no name in
/dev/shm, so a crash of either process can never leak it.

``export_to`` (``client.save_model``, the same on every part) is an absolute directory outside
``output_dir/checkpoints``: the transaction is staged, written and checked like a checkpoint, in its temp
dir under ``output_dir/checkpoints``, and its commit renames that dir to ``export_to`` instead of
``checkpoint-<step>`` (no best mark, no retention).

``job`` names the job that owns ``output_dir`` (see ``ckptd.ownership``); ``deadline`` is the Unix time
after which the save may no longer commit: a hand-off that reaches the daemon later is refused.
"""

from __future__ import annotations

import enum
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack

from ckptd import format as fmt

PROTOCOL_VERSION = 1
# Bounds that keep a hostile message from making the daemon allocate or loop without limit.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_FILES_PER_PART = 10_000  # files, not tensors: a part holds a few per component (shards)
MAX_RUNS_PER_PART = 1_000_000  # region runs of all the shared files of one part (one per local shard, roughly)
MAX_FILE_SIZE = fmt.MAX_FILE_SIZE
MAX_NODE_RANKS = 4096  # ranks one daemon serves in one transaction
MAX_RANKS = 1 << 20
MAX_TIMEOUT_S = 7 * 24 * 3600.0
SEGMENT_PREFIX = "ckptd-"
SHARING_PATTERNS = ("global", "per_rank", "replicated", "per_group", "per_node", "sharded")


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says which field and what was expected."""


class MsgType(str, enum.Enum):
    HELLO = "hello"
    WELCOME = "welcome"
    STAGE = "stage"
    ACCEPTED = "accepted"
    QUERY = "query"
    ABORT = "abort"
    TXN_STATE = "txn_state"
    STATUS = "status"
    STATUS_REPORT = "status_report"
    BYE = "bye"
    BYE_OK = "bye_ok"
    SET_BEST = "set_best"  # mark a committed checkpoint best (answered by BEST_SET or ERROR)
    BEST_SET = "best_set"
    RELEASED = "released"
    PEER_LISTEN = "peer_listen"
    PEER_ADDRESS = "peer_address"
    PEER_CHECK = "peer_check"
    PEER_OK = "peer_ok"
    # daemon <-> daemon
    P_HELLO = "p_hello"
    P_WELCOME = "p_welcome"
    P_JOIN = "p_join"
    P_OPENED = "p_opened"
    P_PREPARED = "p_prepared"
    P_BEAT = "p_beat"
    P_STATE = "p_state"
    P_ABORT = "p_abort"
    P_COMMITTED = "p_committed"
    P_ABORTED = "p_aborted"
    COMMITTED = "committed"
    ABORTED = "aborted"
    ERROR = "error"


class TxnState(str, enum.Enum):
    """A transaction's state; the transitions between them live in ``ckptd.transactions``."""

    OPEN = "open"  # waiting for parts
    WRITING = "writing"  # all parts in, files being written and fsynced
    PREPARED = "prepared"  # every part durable and the commit checked; waiting for its turn to commit
    COMMITTING = "committing"  # manifest and rename under way; no abort accepted any more
    COMMITTED = "committed"  # renamed into place: the point of no return is behind it
    ABORTING = "aborting"  # failed; the temp dir is being removed
    ABORTED = "aborted"  # failed, and nothing of it is left on disk
    UNKNOWN = "unknown"  # this daemon never saw the txn (e.g. it restarted)


@dataclass
class FileSpec:
    """One file of a rank's part: ``length`` bytes at ``offset`` in the segment become ``path``.

    Kind ``"region"`` is this part's share of a *shared* file that several parts (ranks, possibly on
    several nodes) write together (SHARDED state): the file is ``file_size`` bytes in the end, and this part
    places its bytes by ``runs``, each ``[file_offset, slab_offset, run_len, count, file_stride]``: for
    ``i in range(count)``, the ``run_len`` bytes at segment offset ``slab_offset + i*run_len`` go to file
    offset ``file_offset + i*file_stride``. ``slab_offset`` is absolute in the segment, and every run's slab
    bytes lie in ``[offset, offset + length)``. ``rank``, ``group_instance`` and ``node`` are None for one.
    """

    path: str
    offset: int
    length: int
    component: str
    kind: str = "safetensors"  # "safetensors", "index" or "region"
    rank: int | None = None
    group_instance: int | None = None
    node: int | None = None
    file_size: int | None = None  # "region" only: the shared file's final size in bytes
    runs: list[list[int]] | None = None  # "region" only: [file_offset, slab_offset, run_len, count, file_stride]


@dataclass
class ComponentSpec:
    """What the manifest records about a component, sent by the rank that carries the commit info."""

    key: str
    sharing_pattern: str
    ranks: list[int]
    replicated_across: list[int] | None = None
    group_name: str | None = None
    group_instances: list[list[int]] | None = None
    required: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class CommitInfo:
    components: list[ComponentSpec]
    topology: dict[str, Any]
    metadata: dict[str, Any]
    pytorch_version: str | None
    save_total_limit: int | None
    keep_every_n_steps: int | None = None  # retention never removes a step that is a multiple of it
    best_metric: str | None = None  # the metadata key the best checkpoint is chosen by
    greater_is_better: bool = False


@dataclass(frozen=True)
class PeerInfo:
    """Where a multi-node save's node stands: sent with every part, the same from every rank of a node.

    ``node`` 0 holds global rank 0 and leads; the others follow ``leader`` (a tcp:// address). The keys are
    the job's CURVE keys (Z85), made by rank 0 for this job only: followers present the client pair and trust
    ``server_public``."""

    node: int
    nnodes: int
    leader: str
    server_public: str
    client_public: str
    client_secret: str = field(repr=False)

    @property
    def leads(self) -> bool:
        return self.node == 0


@dataclass
class StageRequest:
    txn: str
    output_dir: str
    step: int
    rank: int
    world_size: int
    expected_ranks: list[int]
    timeout_s: float
    pid: int
    segment: str
    segment_fd: int
    segment_ino: int
    segment_size: int
    files: list[FileSpec]
    commit: CommitInfo | None = None
    job: str | None = None
    deadline: float | None = None
    peer: PeerInfo | None = None
    export_to: str | None = None  # client.save_model: the directory the commit renames the temp dir to
    stall_s: float | None = None  # this rank's save_async stall (staging and collective), for the metrics


def pack(msg_type: MsgType, req_id: int = 0, **body: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": msg_type.value, "id": req_id, **body}, use_bin_type=True)


def pack_stage(req: StageRequest, req_id: int) -> bytes:
    body = asdict(req)
    return pack(MsgType.STAGE, req_id, **body)


def unpack(frame: bytes) -> tuple[MsgType, int, dict[str, Any]]:
    """Decode one frame into (type, request id, body); raises ProtocolError on anything malformed."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        # unpackb bounds every str/bin/array/map length by len(frame), already capped above.
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types on garbage
        raise ProtocolError(f"not a msgpack message ({type(e).__name__}: {e})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"expected a msgpack map, got {type(msg).__name__}")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {msg.get('v')!r}, expected {PROTOCOL_VERSION}; client and daemon versions differ, "
            "restart the daemon from the same installation"
        )
    try:
        msg_type = MsgType(msg.get("type"))
    except ValueError:
        raise ProtocolError(f"unknown message type {msg.get('type')!r}") from None
    req_id = msg.get("id", 0)
    if not isinstance(req_id, int) or isinstance(req_id, bool) or not 0 <= req_id < 1 << 63:
        raise ProtocolError(f"field 'id' must be a non-negative integer, got {req_id!r}")
    body = {k: v for k, v in msg.items() if k not in ("v", "type", "id")}
    return msg_type, req_id, body


# ------------------------------------------------------------------------------------------ validation


def _int(body: dict[str, Any], name: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = body.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"field {name!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _opt_int(body: dict[str, Any], name: str, lo: int = 0, hi: int = 1 << 62) -> int | None:
    return None if body.get(name) is None else _int(body, name, lo, hi)


def _str(body: dict[str, Any], name: str, max_len: int = 4096) -> str:
    v = body.get(name)
    if not isinstance(v, str) or not v or len(v) > max_len or "\x00" in v:
        raise ProtocolError(f"field {name!r} must be a non-empty string of at most {max_len} characters")
    return v


def _int_list(body: dict[str, Any], name: str, max_len: int = MAX_RANKS) -> list[int]:
    v = body.get(name)
    if not isinstance(v, list) or len(v) > max_len:
        raise ProtocolError(f"field {name!r} must be a list of at most {max_len} integers")
    for x in v:
        if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < MAX_RANKS:
            raise ProtocolError(f"field {name!r} must hold ranks in [0, {MAX_RANKS}), got {x!r}")
    return v


def _json_like(v: Any, name: str, depth: int = 0) -> None:
    if depth > 32:
        raise ProtocolError(f"field {name!r} is nested too deeply")
    if v is None or isinstance(v, (bool, int, str)):
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ProtocolError(f"field {name!r} holds a non-finite float, which JSON cannot store")
        return
    if isinstance(v, list):
        for x in v:
            _json_like(x, name, depth + 1)
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ProtocolError(f"field {name!r} has a non-string key {k!r}")
            _json_like(x, name, depth + 1)
        return
    raise ProtocolError(f"field {name!r} holds {type(v).__name__}, which is not JSON")


def json_problem(v: Any, name: str) -> str | None:
    """Why ``v`` cannot travel as a JSON-like field (a non-finite float, nesting deeper than 32, a non-string
    key, a non-JSON type), or None: what a sender checks before it puts a value in a message.

    Example:
        >>> json_problem({"x": float("inf")}, "hf_config")
        "field 'hf_config' holds a non-finite float, which JSON cannot store"
    """
    try:
        _json_like(v, name)
    except ProtocolError as e:
        return str(e)
    return None


def _known(body: dict[str, Any], cls: type, where: str) -> None:
    _known_names(body, {f.name for f in fields(cls)}, where)


def _known_names(body: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = set(body) - allowed
    if extra:
        raise ProtocolError(f"{where}: unexpected field(s) {sorted(map(str, extra))}")


def parse_file_spec(v: Any, segment_size: int, max_runs: int = MAX_RUNS_PER_PART) -> FileSpec:
    """Validate one entry of a stage request's ``files`` against a segment of ``segment_size`` bytes.

    A ``"region"`` entry must also carry ``file_size`` and at most ``max_runs`` ``runs`` that stay inside its
    slab range and inside the file, and that do not overlap each other in the file (see ``parse_runs``);
    any other kind must carry neither."""
    if not isinstance(v, dict):
        raise ProtocolError("each entry of 'files' must be a map")
    _known(v, FileSpec, "files[]")
    path = v.get("path")
    if not fmt.is_valid_filename(path):
        raise ProtocolError(
            f"file path {path!r} is not a checkpoint file name (no directories, no '..'; see docs/format.md)"
        )
    offset = _int(v, "offset")
    length = _int(v, "length")
    if offset + length > segment_size:
        raise ProtocolError(
            f"file {path!r} spans bytes [{offset}, {offset + length}) beyond the {segment_size}-byte segment"
        )
    component = v.get("component")
    if not fmt.is_valid_key(component):
        raise ProtocolError(f"file {path!r}: component key {component!r} is not a valid key")
    kind = v.get("kind", "safetensors")
    if kind not in ("safetensors", "index", "region"):
        raise ProtocolError(
            f"file {path!r}: kind must be 'safetensors' or 'index' (a whole file) or 'region' (a share of a shared "
            f"file), got {kind!r}"
        )
    if (kind == "index") != (path == fmt.MODEL_INDEX_NAME):
        raise ProtocolError(f"file {path!r}: kind {kind!r} does not match its name")
    spec = FileSpec(
        path=path,
        offset=offset,
        length=length,
        component=component,
        kind=kind,
        rank=_opt_int(v, "rank", 0, MAX_RANKS),
        group_instance=_opt_int(v, "group_instance", 0, MAX_RANKS),
        node=_opt_int(v, "node", 0, MAX_RANKS),
    )
    if kind != "region":
        if v.get("file_size") is not None or v.get("runs") is not None:
            raise ProtocolError(
                f"file {path!r}: 'file_size' and 'runs' belong to kind 'region' only (a file several ranks write "
                f"in regions); a {kind!r} file is one contiguous range of the segment"
            )
        return spec
    if (spec.rank, spec.group_instance, spec.node) != (None, None, None):
        raise ProtocolError(
            f"file {path!r}: a region of a shared file has no rank, group_instance or node (it is shared by "
            "every rank that writes it); send them as null"
        )
    spec.file_size = _int(v, "file_size", fmt.HEADER_LENGTH_BYTES, MAX_FILE_SIZE)
    spec.runs = parse_runs(v.get("runs"), path, offset, length, spec.file_size, max_runs)
    return spec


def parse_runs(v: Any, path: str, offset: int, length: int, file_size: int, max_runs: int) -> list[list[int]]:
    """Validate the ``runs`` of a region spec whose slab range is ``[offset, offset + length)``.

    Each run is ``[file_offset, slab_offset, run_len, count, file_stride]`` of integers, ``run_len >= 1``,
    ``count >= 1``, ``file_stride >= run_len`` when ``count > 1``; its slab bytes
    ``[slab_offset, slab_offset + count*run_len)`` lie in the slab range and its file envelope
    ``[file_offset, file_offset + (count-1)*file_stride + run_len)`` in ``[0, file_size)``. The envelopes of
    one spec's runs must be disjoint: one part writes each byte of the file at most once. An empty list is
    a part with no byte of the file to write (its pieces are empty, or other ranks write them): it writes and
    records nothing.

    Raises:
        ProtocolError: naming the file, the run and the bound it breaks.

    Example:
        >>> parse_runs([[0, 0, 4, 2, 8]], "x_state.safetensors", 0, 8, 12, 10)
        [[0, 0, 4, 2, 8]]
    """
    if not isinstance(v, list):
        raise ProtocolError(f"file {path!r}: a region spec needs 'runs', a list of runs")
    if len(v) > max_runs:
        raise ProtocolError(
            f"file {path!r}: {len(v)} runs exceed what is left of the {MAX_RUNS_PER_PART}-run limit of one part "
            f"({max_runs}); the client must merge adjacent runs"
        )
    end_of_slab = offset + length
    runs: list[list[int]] = []
    envelopes: list[tuple[int, int, int]] = []
    for i, run in enumerate(v):
        if (
            not isinstance(run, list)
            or len(run) != 5
            or not all(type(x) is int and 0 <= x <= MAX_FILE_SIZE for x in run)
        ):
            raise ProtocolError(
                f"file {path!r}: run {i} must be [file_offset, slab_offset, run_len, count, file_stride], five "
                f"non-negative integers, got {str(run)[:100]}"
            )
        file_offset, slab_offset, run_len, count, stride = run
        if run_len < 1 or count < 1:
            raise ProtocolError(f"file {path!r}: run {i} {run} needs run_len >= 1 and count >= 1")
        if count > 1 and stride < run_len:
            raise ProtocolError(
                f"file {path!r}: run {i} {run} has file_stride {stride} below its run_len {run_len}: its own "
                "pieces would overlap in the file"
            )
        slab_end = slab_offset + count * run_len
        if slab_offset < offset or slab_end > end_of_slab:
            raise ProtocolError(
                f"file {path!r}: run {i} {run} reads segment bytes [{slab_offset}, {slab_end}), outside the "
                f"spec's range [{offset}, {end_of_slab})"
            )
        file_end = file_offset + (count - 1) * stride + run_len
        if file_end > file_size:
            raise ProtocolError(
                f"file {path!r}: run {i} {run} writes file bytes up to {file_end}, beyond its file_size {file_size}"
            )
        runs.append(run)
        envelopes.append((file_offset, file_end, i))
    envelopes.sort()
    for (_, prev_end, j), (start, _, i) in zip(envelopes, envelopes[1:], strict=False):
        if start < prev_end:
            raise ProtocolError(
                f"file {path!r}: runs {j} and {i} overlap in the file (run {i} starts at {start}, run {j} "
                f"reaches {prev_end}); each part writes each byte of a shared file at most once"
            )
    return runs


def parse_commit_info(v: Any) -> CommitInfo:
    if not isinstance(v, dict):
        raise ProtocolError("field 'commit' must be a map")
    _known(v, CommitInfo, "commit")
    comps_raw = v.get("components")
    if not isinstance(comps_raw, list) or len(comps_raw) > 100_000:
        raise ProtocolError("field 'commit.components' must be a list")
    if not comps_raw:
        # A checkpoint of nothing would still be "latest" and let retention delete every real one.
        raise ProtocolError("field 'commit.components' is empty: a commit must name at least one component")
    comps = []
    for c in comps_raw:
        if not isinstance(c, dict):
            raise ProtocolError("each entry of 'commit.components' must be a map")
        _known(c, ComponentSpec, "commit.components[]")
        if not fmt.is_valid_key(c.get("key")):
            raise ProtocolError(f"component key {c.get('key')!r} is not a valid key")
        if c.get("sharing_pattern") not in SHARING_PATTERNS:
            raise ProtocolError(f"component {c['key']!r}: unknown sharing_pattern {c.get('sharing_pattern')!r}")
        if c.get("group_name") is not None and not fmt.is_valid_key(c.get("group_name")):
            raise ProtocolError(f"component {c['key']!r}: invalid group_name {c.get('group_name')!r}")
        ranks = _int_list(c, "ranks")
        across = None if c.get("replicated_across") is None else _int_list(c, "replicated_across")
        instances = c.get("group_instances")
        if instances is not None:
            if not isinstance(instances, list):
                raise ProtocolError(f"component {c['key']!r}: group_instances must be a list of rank lists")
            instances = [_int_list({"i": i}, "i") for i in instances]
        metadata = c.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ProtocolError(f"component {c['key']!r}: metadata must be a map")
        _json_like(metadata, "commit.components[].metadata")
        required = c.get("required", True)
        if not isinstance(required, bool):
            raise ProtocolError(f"component {c['key']!r}: required must be a bool")
        comps.append(
            ComponentSpec(
                key=c["key"],
                sharing_pattern=c["sharing_pattern"],
                ranks=ranks,
                replicated_across=across,
                group_name=c.get("group_name"),
                group_instances=instances,
                required=required,
                metadata=metadata,
            )
        )
    for name in ("topology", "metadata"):
        if not isinstance(v.get(name), dict):
            raise ProtocolError(f"field 'commit.{name}' must be a map")
        _json_like(v[name], f"commit.{name}")
    torch_version = v.get("pytorch_version")
    if torch_version is not None and not isinstance(torch_version, str):
        raise ProtocolError("field 'commit.pytorch_version' must be a string")
    limit = _opt_int(v, "save_total_limit", 1, 1 << 31)
    every = _opt_int(v, "keep_every_n_steps", 1, 1 << 62)
    metric = None if v.get("best_metric") is None else _str(v, "best_metric", 256)
    greater = v.get("greater_is_better", False)
    if not isinstance(greater, bool):
        raise ProtocolError("field 'commit.greater_is_better' must be a boolean")
    return CommitInfo(comps, v["topology"], v["metadata"], torch_version, limit, every, metric, greater)


def parse_set_best(body: dict[str, Any]) -> tuple[str, int]:
    """A SET_BEST request: ``(output_dir, step)``."""
    _known_names(body, {"output_dir", "step"}, "set_best")
    output_dir = _str(body, "output_dir")
    if not output_dir.startswith("/"):
        raise ProtocolError(f"field 'output_dir' must be an absolute path, got {output_dir!r}")
    step = _int(body, "step", 0, 1 << 62)
    return output_dir, step


def parse_stage(body: dict[str, Any]) -> StageRequest:
    """Validate every field of a stage request (types, bounds, path components, ranges in the segment)."""
    _known(body, StageRequest, "stage")
    txn = body.get("txn")
    if not fmt.is_valid_txn(txn):
        raise ProtocolError(f"field 'txn' must be 1-64 letters or digits, got {txn!r}")
    output_dir = _str(body, "output_dir")
    if not output_dir.startswith("/"):
        raise ProtocolError(f"field 'output_dir' must be an absolute path, got {output_dir!r}")
    step = _int(body, "step", 0, (1 << 62))
    world_size = _int(body, "world_size", 1, MAX_RANKS)
    rank = _int(body, "rank", 0, world_size - 1)
    expected = _int_list(body, "expected_ranks", MAX_NODE_RANKS)
    if rank not in expected or len(set(expected)) != len(expected) or any(r >= world_size for r in expected):
        raise ProtocolError(
            f"field 'expected_ranks' {expected[:16]} must be distinct ranks below world_size {world_size} "
            f"and include this rank {rank}"
        )
    timeout = body.get("timeout_s")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ProtocolError(f"field 'timeout_s' must be a number in (0, {MAX_TIMEOUT_S}], got {timeout!r}")
    pid = _int(body, "pid", 1, 1 << 31)
    segment = _str(body, "segment", 200)
    if not segment.startswith(SEGMENT_PREFIX) or "/" in segment or ".." in segment:
        raise ProtocolError(f"field 'segment' must be a memfd name starting {SEGMENT_PREFIX!r}, got {segment!r}")
    segment_fd = _int(body, "segment_fd", 0, 1 << 31)
    segment_ino = _int(body, "segment_ino", 1, 1 << 63)
    segment_size = _int(body, "segment_size")
    files_raw = body.get("files")
    if not isinstance(files_raw, list) or len(files_raw) > MAX_FILES_PER_PART:
        raise ProtocolError("field 'files' must be a list")
    files = []
    runs_left = MAX_RUNS_PER_PART
    for f in files_raw:
        spec = parse_file_spec(f, segment_size, runs_left)
        runs_left -= len(spec.runs or ())
        files.append(spec)
    if len({f.path for f in files}) != len(files):
        raise ProtocolError("field 'files' names the same path twice")
    commit = None if body.get("commit") is None else parse_commit_info(body["commit"])
    job = body.get("job")
    if job is not None and not is_valid_job(job):
        raise ProtocolError(f"field 'job' must be 1-128 letters, digits or '._:@-', got {job!r}")
    deadline = body.get("deadline")
    if deadline is not None and (
        not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or not math.isfinite(deadline)
    ):
        raise ProtocolError(f"field 'deadline' must be a Unix time, got {deadline!r}")
    peer = None if body.get("peer") is None else parse_peer_info(body["peer"], world_size)
    export_to = None if body.get("export_to") is None else parse_export_to(body, output_dir)
    stall = body.get("stall_s")
    if stall is not None and (
        not isinstance(stall, (int, float)) or isinstance(stall, bool) or not 0 <= stall <= MAX_TIMEOUT_S
    ):
        raise ProtocolError(f"field 'stall_s' must be a number of seconds in [0, {MAX_TIMEOUT_S}], got {stall!r}")
    return StageRequest(
        txn=txn,
        output_dir=output_dir,
        step=step,
        rank=rank,
        world_size=world_size,
        expected_ranks=expected,
        timeout_s=float(timeout),
        pid=pid,
        segment=segment,
        segment_fd=segment_fd,
        segment_ino=segment_ino,
        segment_size=segment_size,
        files=files,
        commit=commit,
        job=job,
        deadline=None if deadline is None else float(deadline),
        peer=peer,
        export_to=export_to,
        stall_s=None if stall is None else float(stall),
    )


def parse_export_to(body: dict[str, Any], output_dir: str) -> str:
    """A stage request's ``export_to``: an absolute, normalised directory path outside the checkpoints
    directory of ``output_dir`` (where it would be taken for a checkpoint, or replace one)."""
    dest = _str(body, "export_to")
    if not dest.startswith("/") or os.path.normpath(dest) != dest or dest == "/":
        raise ProtocolError(
            f"field 'export_to' must be an absolute, normalised directory path (no '..', no trailing '/'), got {dest!r}"
        )
    root = str(fmt.checkpoints_root(output_dir))
    if dest == root or dest.startswith(root + "/") or dest == output_dir or output_dir.startswith(dest + "/"):
        raise ProtocolError(
            f"field 'export_to' {dest!r} is {output_dir}, above it, or inside its checkpoints directory; a model "
            "saved there would be taken for a checkpoint or replace one: choose a directory beside them, e.g. "
            f"{output_dir}/model"
        )
    return dest


# --------------------------------------------------------------------------------------------- multi-node

MAX_NODES = 65536
_Z85_KEY = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}\Z")
_PEER_ADDRESS = re.compile(r"tcp://[A-Za-z0-9._:\[\]-]{1,255}:[0-9]{1,5}\Z")
_CHECKSUM = re.compile(r"[a-z0-9-]{1,32}:[0-9a-f]{1,128}\Z")


def is_z85_key(v: object) -> bool:
    return isinstance(v, str) and bool(_Z85_KEY.match(v))


def _key(body: dict[str, Any], name: str) -> str:
    v = body.get(name)
    if not is_z85_key(v):
        raise ProtocolError(f"field {name!r} must be a CURVE key (40 Z85 characters)")
    return v


def parse_peer_address(v: Any, name: str = "leader") -> str:
    if not isinstance(v, str) or not _PEER_ADDRESS.match(v) or not 0 < int(v.rsplit(":", 1)[1]) < 65536:
        raise ProtocolError(f"field {name!r} must be a peer address tcp://HOST:PORT, got {str(v)[:100]!r}")
    return v


def parse_peer_info(v: Any, world_size: int) -> PeerInfo:
    if not isinstance(v, dict):
        raise ProtocolError("field 'peer' must be a map")
    _known(v, PeerInfo, "peer")
    nnodes = _int(v, "nnodes", 2, min(MAX_NODES, world_size))
    return PeerInfo(
        node=_int(v, "node", 0, nnodes - 1),
        nnodes=nnodes,
        leader=parse_peer_address(v.get("leader")),
        server_public=_key(v, "server_public"),
        client_public=_key(v, "client_public"),
        client_secret=_key(v, "client_secret"),
    )


@dataclass(frozen=True)
class ListenRequest:
    job: str
    server_public: str
    server_secret: str = field(repr=False)
    client_public: str = ""


def parse_listen(body: dict[str, Any]) -> ListenRequest:
    _known(body, ListenRequest, "peer_listen")
    job = body.get("job")
    if not is_valid_job(job):
        raise ProtocolError(f"field 'job' must be 1-128 letters, digits or '._:@-', got {job!r}")
    return ListenRequest(job, _key(body, "server_public"), _key(body, "server_secret"), _key(body, "client_public"))


@dataclass(frozen=True)
class CheckRequest:
    leader: str
    server_public: str
    client_public: str
    client_secret: str = field(repr=False)


def parse_check(body: dict[str, Any]) -> CheckRequest:
    _known(body, CheckRequest, "peer_check")
    return CheckRequest(
        parse_peer_address(body.get("leader")),
        _key(body, "server_public"),
        _key(body, "client_public"),
        _key(body, "client_secret"),
    )


def parse_node(body: dict[str, Any]) -> int:
    return _int(body, "node", 1, MAX_NODES - 1)


def parse_file_record(v: Any) -> fmt.FileRecord:
    """One file a follower wrote, as it reports it in ``p_prepared``.

    A ``"region"`` record is the follower's share of a shared file: ``size`` is the bytes its rank
    contributed, ``file_size`` the whole file's final size, and ``checksum`` is empty (the leader hashes the
    whole file at commit)."""
    if not isinstance(v, dict):
        raise ProtocolError("each entry of 'files' must be a map")
    _known(v, fmt.FileRecord, "files[]")
    path = v.get("path")
    if not fmt.is_valid_filename(path):
        raise ProtocolError(f"file path {path!r} is not a checkpoint file name")
    component = v.get("component")
    if not fmt.is_valid_key(component):
        raise ProtocolError(f"file {path!r}: component key {component!r} is not a valid key")
    kind = v.get("kind", "safetensors")
    if kind not in ("safetensors", "index", "region") or (kind == "index") != (path == fmt.MODEL_INDEX_NAME):
        raise ProtocolError(f"file {path!r}: kind {kind!r} is not valid for that name")
    checksum = v.get("checksum")
    if kind == "region":
        if not isinstance(checksum, str) or fmt.parse_coverage(checksum) is None:
            raise ProtocolError(
                f"file {path!r}: a region record's checksum field holds its coverage fingerprint "
                f"('cover:' and 16 hex digits; the leader hashes the whole shared file), got {str(checksum)[:80]!r}"
            )
        file_size = _int(v, "file_size", fmt.HEADER_LENGTH_BYTES, MAX_FILE_SIZE)
    else:
        if not isinstance(checksum, str) or not _CHECKSUM.match(checksum):
            raise ProtocolError(f"file {path!r}: checksum must be 'algo:hex', got {str(checksum)[:80]!r}")
        if v.get("file_size") is not None:
            raise ProtocolError(f"file {path!r}: 'file_size' belongs to region records only")
        file_size = None
    rec = fmt.FileRecord(
        path=path,
        size=_int(v, "size"),
        checksum=checksum,
        component=component,
        kind=kind,
        rank=_opt_int(v, "rank", 0, MAX_RANKS),
        group_instance=_opt_int(v, "group_instance", 0, MAX_RANKS),
        node=_opt_int(v, "node", 0, MAX_RANKS),
        written_by=_int(v, "written_by", 0, MAX_RANKS),
        file_size=file_size,
    )
    if kind == "region":
        if (rec.rank, rec.group_instance, rec.node) != (None, None, None):
            raise ProtocolError(f"file {path!r}: a region record has no rank, group_instance or node")
        if not 1 <= rec.size <= file_size:
            raise ProtocolError(
                f"file {path!r}: a region record of {rec.size} bytes does not fit its file_size {file_size}"
            )
    return rec


@dataclass(frozen=True)
class Prepared:
    """A follower's vote: every file of its node is durable in the temp dir of inode ``ino``."""

    txn: str
    node: int
    ino: int
    files: tuple[fmt.FileRecord, ...]


def parse_prepared(body: dict[str, Any]) -> Prepared:
    _known(body, Prepared, "p_prepared")
    files_raw = body.get("files")
    if not isinstance(files_raw, list) or len(files_raw) > MAX_FILES_PER_PART * 64:
        raise ProtocolError("field 'files' must be a list")
    files = tuple(parse_file_record(f) for f in files_raw)
    # Several ranks of one node may each write regions of one shared file: one record per (path, rank).
    if len({(f.path, f.written_by if f.kind == "region" else None) for f in files}) != len(files):
        raise ProtocolError("field 'files' names the same path twice")
    return Prepared(parse_txn(body), parse_node(body), _int(body, "ino", 1, 1 << 63), files)


_JOB_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}\Z")


def is_valid_job(job: object) -> bool:
    return isinstance(job, str) and bool(_JOB_RE.match(job))


def parse_txn(body: dict[str, Any]) -> str:
    txn = body.get("txn")
    if not fmt.is_valid_txn(txn):
        raise ProtocolError(f"field 'txn' must be 1-64 letters or digits, got {txn!r}")
    return txn


def parse_reason(body: dict[str, Any]) -> str:
    reason = body.get("reason", "aborted by a rank")
    if not isinstance(reason, str):
        raise ProtocolError("field 'reason' must be a string")
    return reason[:4096]


def parse_pid(body: dict[str, Any]) -> int:
    return _int(body, "pid", 1, 1 << 31)


# ------------------------------------------------------------------------------------------- endpoints

ENDPOINT_ENV = "CKPTD_ENDPOINT"
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107


def runtime_dir() -> str:
    """Directory for the node daemon's socket: short (IPC path limit) and private to this user."""
    return f"/tmp/ckptd-{os.getuid()}"


def default_endpoint() -> str:
    return f"ipc://{runtime_dir()}/ckptd.sock"


def resolve_endpoint(endpoint: str | None) -> str:
    """The endpoint to use: the argument, else $CKPTD_ENDPOINT, else the node default."""
    ep = endpoint or os.environ.get(ENDPOINT_ENV) or default_endpoint()
    path = ipc_path(ep)
    if path is not None:
        if not path.startswith("/"):
            raise ProtocolError(f"IPC endpoint {ep!r} must use an absolute path (ipc:///dir/name.sock)")
        if len(path.encode()) > MAX_IPC_PATH:
            raise ProtocolError(
                f"IPC endpoint path {path!r} is {len(path.encode())} bytes; Unix sockets allow at most "
                f"{MAX_IPC_PATH}; use a short directory such as {runtime_dir()}"
            )
    elif not ep.startswith("tcp://"):
        raise ProtocolError(f"endpoint {ep!r} must start with ipc:// or tcp://")
    return ep


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


def ensure_private_dir(path: str) -> None:
    """Make sure ``path`` is a directory only this user can enter, for an IPC socket or the node's log.

    A missing directory is created ``0700``. An existing one is used as it is when it is ours and private;
    its mode is never changed (``ipc:///tmp/x.sock`` as root must not turn ``/tmp`` into ``0700``, a
    group-shared project directory must keep its group), except for this user's own runtime directory
    (``runtime_dir()``), which ckptd alone creates and which is made private again if it is not.

    Args:
        path: the directory (the dirname of an ``ipc://`` socket path).

    Raises:
        PermissionError: ``path`` is not a directory (a symlink counts as not one), is owned by another
            user, or is open to group/other; the message says to use a private directory.

    Example:
        >>> ensure_private_dir(runtime_dir())  # created 0700 on first use
        >>> ensure_private_dir("/tmp")  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        PermissionError: /tmp is accessible by group/other (mode drwxrwxrwt); ...
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        created = False
    st = os.lstat(path)
    uid = os.getuid()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        raise PermissionError(
            f"{path} must be a directory owned by uid {uid} (found {stat.filemode(st.st_mode)} owned by uid "
            f"{st.st_uid}); remove it, or put the socket in a private directory of your own, such as {runtime_dir()}"
        )
    if not st.st_mode & 0o077:
        return
    if created or os.path.abspath(path) == runtime_dir():
        # Ours alone: made just now (a umask or default ACL may have widened it), or ckptd's own runtime dir.
        os.chmod(path, 0o700)
        return
    # A sticky directory is /tmp or alike: shared by design, never to be made private.
    chmod_hint = "" if st.st_mode & stat.S_ISVTX else f", or run 'chmod 700 {path}' if it is yours alone"
    raise PermissionError(
        f"{path} is accessible by group/other (mode {stat.filemode(st.st_mode)}), so other users could reach "
        f"a socket in it; ckptd changes the mode of no directory it did not create. Expected a private "
        f"(0700) directory: put the socket in one, such as {runtime_dir()} or a new subdirectory "
        f"(ipc://{os.path.join(path, 'ckptd', 'ckptd.sock')}){chmod_hint}"
    )
