"""The on-disk format ``ckptd/1``: the one place that knows what a checkpoint looks like on disk.

Everything that names a file, lays out safetensors bytes, encodes the nested structure of a state dict,
computes a checksum, reads and writes the manifest, or opens a checkpoint file lives in this package, and
is shared by the daemon (which writes), the client (which stages and loads) and the CLI (which lists,
inspects, verifies and exports). Use it as one module: ``from ckptd import format as fmt; fmt.X``; every
public name is re-exported here. The submodules, each with one job:

- ``names``: directory and file names, keys, the lease and temp-owner names;
- ``header``: dtypes, tensor tables, safetensors header layouts, the header codec;
- ``tree``: the state-dict tree as JSON in the header metadata (no pickle);
- ``model_index``: the model's Hugging Face shards and ``model.safetensors.index.json``;
- ``coverage``: fingerprints that tell whether the regions of a shared (SHARDED) file tile it exactly;
- ``checksums``: xxh3-128, and the one streaming hash-while-copying helper (``HashingWriter``,
  ``hash_chunks``, ``hash_fd``);
- ``manifest``: ``checkpoint_manifest.json`` records, parsing and reading;
- ``marks``: the best-checkpoint mark (read, replaced atomically, resolved to a committed checkpoint);
- ``safeio``: opening checkpoint files (regular files only, no symlinks, never blocking, bounded reads),
  relative to a checkpoint directory opened once (``CheckpointDir``);
- ``safejson``: parsing JSON from a checkpoint in bounded memory (``load_json``), quoting hostile values;
- ``reading``: which checkpoints exist, verification, and verified reads, maps and streams.

Readers trust nothing on disk: a FIFO, a device, a symlink (file or checkpoint directory, even one swapped in
while a reader runs), a manifest of more than 64 MiB, a header length past the file's end, JSON holding more
values than its kind of file can (``{},`` times millions), a number of 5000 digits, nesting 100,000 deep, a
field of the wrong type, a shape safetensors would refuse, or a name with ``/`` or ``..`` is refused with a
FormatError naming the file, never followed, blocked on, read or parsed without bound.

This package never imports torch at import time: the daemon runs without it. Functions that have to touch
tensors import torch lazily.

Layout::

    <output_dir>/checkpoints/
      checkpoint-<step>/                         committed; appears only by atomic rename
        checkpoint_manifest.json                 written last
        model.safetensors.index.json             Hugging Face layout for the "model" component
        model-00001-of-0000N.safetensors
        <key>_state.safetensors                  GLOBAL / REPLICATED
        <key>_state_rank_<r>.safetensors         PER_RANK
        <key>_state_group_<name>_<i>.safetensors PER_GROUP (instance i)
        <key>_state_node_<n>.safetensors         PER_NODE
      .tmp-checkpoint-<step>-<txn>/              in flight; invisible to readers
      .tmp-checkpoint-<step>-<txn>.owner         who owns that temp dir (host, pid, start time, deadline)
      .trash-checkpoint-<step>-<token>/          being deleted; invisible to readers
      .ckptd-lease.json                          the job that writes this output dir
      .ckptd-best.json                           which checkpoint is the best (``marks``)
"""

from ckptd.format.checksums import (
    CHECKSUM_ALGO,
    READ_CHUNK,
    HashingWriter,
    checksum_bytes,
    combine_checksums,
    format_checksum,
    hash_chunks,
    hash_fd,
    new_hasher,
    short_checksum,
)
from ckptd.format.coverage import (
    COVER_PRIME,
    coverage_fingerprint,
    coverage_key,
    format_coverage,
    full_coverage,
    parse_coverage,
)
from ckptd.format.errors import FormatError
from ckptd.format.header import (
    DTYPE_SIZES,
    HEADER_LENGTH_BYTES,
    MAX_HEADER_BYTES,
    STORABLE_TORCH_DTYPES,
    U64_MAX,
    SafetensorsLayout,
    TensorEntry,
    TensorTable,
    alignment_order,
    build_safetensors_layout,
    encode_header,
    header_span,
    parse_safetensors_header,
    safetensors_dtype,
    tensor_table,
    torch_dtype,
    torch_dtype_name,
)
from ckptd.format.manifest import (
    MAX_FILE_SIZE,
    MAX_MANIFEST_BYTES,
    MAX_METADATA_DEPTH,
    ComponentRecord,
    FileRecord,
    Manifest,
    drop_component,
    manifest_problems,
    now_timestamp,
    parse_manifest,
    read_manifest,
    read_manifest_bytes,
)
from ckptd.format.marks import (
    BestMark,
    find_best_checkpoint,
    is_better,
    metric_value,
    read_best_mark,
    write_best_mark,
)
from ckptd.format.model_index import (
    DEFAULT_MAX_SHARD_SIZE,
    MAX_INDEX_BYTES,
    build_model_index,
    parse_model_index,
    plan_model_shards,
)
from ckptd.format.names import (
    BEST_NAME,
    CHECKPOINTS_DIRNAME,
    EXPORT_METADATA_KEY,
    FORMAT_VERSION,
    HF_CONFIG_METADATA_KEY,
    HF_CONFIG_NAME,
    KEY_PATTERN,
    LEASE_LOCK_NAME,
    LEASE_NAME,
    LEASE_TEMP_NAME,
    MANIFEST_NAME,
    MODEL_INDEX_NAME,
    MODEL_KEY,
    PLACEMENTS_METADATA_KEY,
    TREE_METADATA_KEY,
    checkpoint_dirname,
    checkpoints_root,
    component_filename,
    is_best_temp_name,
    is_trash_dirname,
    is_valid_filename,
    is_valid_key,
    is_valid_txn,
    model_shard_filename,
    parse_checkpoint_dirname,
    parse_temp_dirname,
    parse_temp_owner_name,
    parse_temp_veto_name,
    temp_dirname,
    temp_owner_name,
    temp_veto_name,
    trash_dirname,
)
from ckptd.format.reading import (
    BrokenCheckpoint,
    CheckpointInfo,
    CheckpointSurvey,
    VerifyResult,
    check_structure,
    checkpoints_tree_of,
    disk_problems,
    find_latest_checkpoint,
    index_problems,
    is_checkpoints_tree,
    list_checkpoints,
    map_verified,
    read_verified,
    scan_checkpoints,
    stream_verified,
    survey_checkpoints,
    verify_checkpoint,
)
from ckptd.format.safeio import (
    OPEN_FLAGS,
    CheckpointDir,
    check_directory,
    describe_mode,
    entry_problem,
    open_regular,
    pread_exact,
    read_bounded,
)
from ckptd.format.safejson import MAX_JSON_VALUES, brief, json_value_count, load_json
from ckptd.format.tree import (
    MAX_TREE_VALUES,
    TensorLeaf,
    UnsupportedLeafError,
    describe_placements,
    flatten_state,
    load_tree,
    tree_value_count,
    unflatten_state,
)

__all__ = [
    "drop_component",
    "BEST_NAME",
    "BestMark",
    "find_best_checkpoint",
    "is_best_temp_name",
    "is_better",
    "metric_value",
    "read_best_mark",
    "write_best_mark",
    "COVER_PRIME",
    "coverage_fingerprint",
    "coverage_key",
    "format_coverage",
    "full_coverage",
    "parse_coverage",
    "LEASE_LOCK_NAME",
    "LEASE_TEMP_NAME",
    "parse_temp_veto_name",
    "temp_veto_name",
    "BrokenCheckpoint",
    "CHECKPOINTS_DIRNAME",
    "CHECKSUM_ALGO",
    "CheckpointDir",
    "CheckpointInfo",
    "CheckpointSurvey",
    "ComponentRecord",
    "DEFAULT_MAX_SHARD_SIZE",
    "DTYPE_SIZES",
    "FORMAT_VERSION",
    "FileRecord",
    "FormatError",
    "HEADER_LENGTH_BYTES",
    "HashingWriter",
    "KEY_PATTERN",
    "LEASE_NAME",
    "MANIFEST_NAME",
    "MAX_FILE_SIZE",
    "MAX_HEADER_BYTES",
    "MAX_INDEX_BYTES",
    "MAX_JSON_VALUES",
    "MAX_MANIFEST_BYTES",
    "MAX_METADATA_DEPTH",
    "MAX_TREE_VALUES",
    "MODEL_INDEX_NAME",
    "EXPORT_METADATA_KEY",
    "HF_CONFIG_METADATA_KEY",
    "HF_CONFIG_NAME",
    "MODEL_KEY",
    "Manifest",
    "OPEN_FLAGS",
    "READ_CHUNK",
    "STORABLE_TORCH_DTYPES",
    "SafetensorsLayout",
    "PLACEMENTS_METADATA_KEY",
    "TREE_METADATA_KEY",
    "TensorEntry",
    "TensorLeaf",
    "TensorTable",
    "U64_MAX",
    "UnsupportedLeafError",
    "VerifyResult",
    "alignment_order",
    "build_model_index",
    "brief",
    "build_safetensors_layout",
    "check_directory",
    "check_structure",
    "checkpoint_dirname",
    "checkpoints_root",
    "checksum_bytes",
    "combine_checksums",
    "component_filename",
    "describe_mode",
    "disk_problems",
    "encode_header",
    "entry_problem",
    "find_latest_checkpoint",
    "describe_placements",
    "flatten_state",
    "format_checksum",
    "hash_chunks",
    "hash_fd",
    "header_span",
    "index_problems",
    "is_trash_dirname",
    "is_valid_filename",
    "is_valid_key",
    "is_valid_txn",
    "json_value_count",
    "list_checkpoints",
    "load_json",
    "load_tree",
    "manifest_problems",
    "map_verified",
    "model_shard_filename",
    "new_hasher",
    "now_timestamp",
    "open_regular",
    "parse_checkpoint_dirname",
    "parse_manifest",
    "parse_model_index",
    "parse_safetensors_header",
    "parse_temp_dirname",
    "parse_temp_owner_name",
    "plan_model_shards",
    "pread_exact",
    "read_bounded",
    "read_manifest",
    "read_manifest_bytes",
    "read_verified",
    "safetensors_dtype",
    "checkpoints_tree_of",
    "is_checkpoints_tree",
    "scan_checkpoints",
    "short_checksum",
    "stream_verified",
    "survey_checkpoints",
    "temp_dirname",
    "temp_owner_name",
    "tensor_table",
    "torch_dtype",
    "torch_dtype_name",
    "tree_value_count",
    "trash_dirname",
    "unflatten_state",
    "verify_checkpoint",
]
