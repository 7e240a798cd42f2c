"""Owner records and leases are parsed defensively: whatever a ``.owner``, ``.veto`` or lease file holds, its
parser raises ``ValueError`` or returns a record, never anything else, so one bad file can neither crash
``ckptd gc`` nor keep a daemon (and with it every ``CheckpointClient`` of that output dir) from starting.

What it proves, with real files and real processes:

- ``ckptd gc`` over a temp dir whose owner record is malformed (``"version": []``, ``1e999``, a NaN deadline,
  JSON nested too deeply, a host with a newline...) answers with exit 0, names the record in a warning and
  keeps the temp dir (an unreadable record proves no owner gone);
- ``ckptd serve --output-dir OUT`` (how the embedded daemon starts) starts and answers past such a record;
- the parsers of ``OwnerRecord``, ``LeaseRecord`` and ``ProcessIdentity`` raise only ValueError for any JSON
  value in any field (hypothesis) and for random bytes, and still read back every record ckptd writes.

The first two started as review reproductions in test_review_readers.py (issue 5, defect 9: "gc: malformed
owner records").
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd import format as fmt
from ckptd import ownership
from ckptd.cli import request_status
from ckptd.ownership import LeaseRecord, OwnerRecord, ProcessIdentity
from tests.ckptd import test_hostile_files as hf

pytestmark = pytest.mark.timeout(240)

OWNER = {"host": "h", "boot_id": "b", "pid": 1, "start_time": 1}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An output dir with a real committed checkpoint in it, as a daemon writes it."""
    out = tmp_path / "out"
    model = hf.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hf.train_step(model, opt)
    hf.write_checkpoint(out, 1, model, opt)
    return out


def plant_temp_dir(out: Path, record: dict[str, Any] | str) -> Path:
    """A temp dir of step 3, txn ``abc``, with ``record`` as its owner record; returns the record's path."""
    root = fmt.checkpoints_root(out)
    (root / fmt.temp_dirname(3, "abc")).mkdir()
    path = root / fmt.temp_owner_name(3, "abc")
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


# --------------------------------------------------------------------------- gc and the daemon, end to end


@pytest.mark.parametrize("version", [[], 1e999], ids=["version-list", "version-inf"])
def test_gc_reports_a_malformed_owner_record_instead_of_crashing(version: object, out: Path) -> None:
    root = fmt.checkpoints_root(out)
    (root / fmt.temp_dirname(3, "abc")).mkdir()
    record = {
        "owner": {"host": "h", "boot_id": "b", "pid": 1, "start_time": 1},
        "step": 3,
        "txn": "abc",
        "version": version,
    }
    (root / fmt.temp_owner_name(3, "abc")).write_text(json.dumps(record))
    r = hf.ckptd("gc", out, "--timeout", "0.2", "--endpoint", f"ipc://{out}/no-daemon.sock")
    assert r.returncode == 0, r.text


BAD_RECORDS: dict[str, dict[str, Any] | str] = {
    "deadline-nan": {"owner": OWNER, "step": 3, "txn": "abc", "deadline": math.nan},
    "deadline-minus-inf": {"owner": OWNER, "step": 3, "txn": "abc", "deadline": -math.inf},
    "created-list": {"owner": OWNER, "step": 3, "txn": "abc", "created": [1]},
    "kind-dict": {"owner": OWNER, "step": 3, "txn": "abc", "kind": {"x": 1}},
    "pid-bool": {"owner": {**OWNER, "pid": True}, "step": 3, "txn": "abc"},
    "pid-huge": {"owner": {**OWNER, "pid": 10**40}, "step": 3, "txn": "abc"},
    "host-newline": {"owner": {**OWNER, "host": "h\nckptd gc: removed everything"}, "step": 3, "txn": "abc"},
    "host-lone-surrogate": '{"owner": {"host": "\\ud800", "boot_id": "b", "pid": 1, "start_time": 1}, '
    '"step": 3, "txn": "abc"}',
    "nested-too-deeply": "[" * 60_000,
    "huge-integer": '{"step": ' + "9" * 5000 + "}",
}


@pytest.mark.parametrize("record", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_gc_names_a_malformed_owner_record_and_keeps_its_temp_dir(record: dict[str, Any] | str, out: Path) -> None:
    path = plant_temp_dir(out, record)
    r = hf.ckptd("gc", out, "--timeout", "0.2", "--endpoint", f"ipc://{out}/no-daemon.sock")
    assert r.returncode == 0, r.text
    assert hf.line_naming(r.stderr, str(path), "unreadable owner record"), r.stderr
    # An unreadable record proves nothing about its owner: the temp dir stays (no record, and young).
    assert (path.parent / fmt.temp_dirname(3, "abc")).is_dir()
    assert f"kept {fmt.temp_dirname(3, 'abc')}" in r.stdout, r.stdout


def test_a_daemon_starts_and_serves_past_a_malformed_owner_record(out: Path, tmp_path: Path) -> None:
    root = fmt.checkpoints_root(out)
    (root / fmt.temp_dirname(3, "abc")).mkdir()
    record = {"owner": {"host": "h", "boot_id": "b", "pid": 1, "start_time": 1}, "step": 3, "txn": "abc", "version": []}
    (root / fmt.temp_owner_name(3, "abc")).write_text(json.dumps(record))
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir(mode=0o700)
    endpoint = f"ipc://{sock_dir}/d.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, "--output-dir", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while request_status(endpoint, 0.5) is None:
            assert proc.poll() is None, f"ckptd serve exited with {proc.returncode}: {proc.stderr.read()[-800:]}"
            assert time.monotonic() < deadline, "ckptd serve never answered"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_malformed_lease_is_ignored_with_a_warning_not_a_crash(out: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = ownership.lease_path(out)
    path.write_text(json.dumps({"job": "j", **OWNER, "refreshed": 1e999, "version": []}))
    with caplog.at_level("WARNING", logger="ckptd.ownership"):
        assert ownership.read_lease(out) is None
        assert ownership.lease_allows(out, "another-job")
    assert any(str(path) in m and "finite Unix time" in m for m in caplog.messages), caplog.messages


# ------------------------------------------------------------------------------------- the parsers alone

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
OWNER_FIELDS = ("owner", "step", "txn", "job", "deadline", "kind", "created", "outcome", "version")
LEASE_FIELDS = ("job", "host", "boot_id", "pid", "start_time", "pid_ns", "acquired", "refreshed", "version")


def valid_owner_record() -> dict[str, Any]:
    rec = OwnerRecord(ProcessIdentity.current(), 7, "ab12", "job-a", time.time() + 60, "temp", time.time())
    return json.loads(rec.to_bytes())


def valid_lease() -> dict[str, Any]:
    return json.loads(LeaseRecord("job-a", ProcessIdentity.current(), time.time(), time.time()).to_bytes())


def parses_or_value_error(parse: Any, data: bytes) -> None:
    try:
        parse(data)
    except ValueError:
        pass  # the one exception a parser may raise; anything else fails the test


def test_every_record_ckptd_writes_reads_back() -> None:
    me = ProcessIdentity.current()
    for kind, outcome in (("temp", None), ("tombstone", None), ("veto", "vetoed"), ("veto", "committed")):
        rec = OwnerRecord(me, 7, "ab12", None, None, kind, time.time(), outcome)
        assert OwnerRecord.from_bytes(rec.to_bytes()) == rec
    lease = LeaseRecord("job-a", me, time.time() - 5, time.time())
    assert LeaseRecord.from_bytes(lease.to_bytes()) == lease
    assert ProcessIdentity.from_json(me.to_json()) == me


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(OWNER_FIELDS), value=JSON)
def test_an_owner_record_with_any_value_in_any_field_parses_or_raises_value_error(field: str, value: Any) -> None:
    raw = valid_owner_record()
    raw[field] = value
    parses_or_value_error(OwnerRecord.from_bytes, json.dumps(raw).encode())
    owner = raw["owner"] = valid_owner_record()["owner"]
    if field in owner:
        owner[field] = value
        parses_or_value_error(OwnerRecord.from_bytes, json.dumps(raw).encode())


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(LEASE_FIELDS), value=JSON)
def test_a_lease_with_any_value_in_any_field_parses_or_raises_value_error(field: str, value: Any) -> None:
    raw = valid_lease()
    raw[field] = value
    parses_or_value_error(LeaseRecord.from_bytes, json.dumps(raw).encode())


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_a_record_parse_or_raise_value_error(data: bytes) -> None:
    parses_or_value_error(OwnerRecord.from_bytes, data)
    parses_or_value_error(LeaseRecord.from_bytes, data)


@pytest.mark.parametrize(
    "field, value",
    [
        ("version", []),
        ("version", 1e999),
        ("version", 0),
        ("step", -1),
        ("step", 3.0),
        ("deadline", math.inf),
        ("deadline", 10**400),
        ("created", "yesterday"),
        ("kind", "mystery"),
        ("outcome", "maybe"),
        ("job", "no spaces allowed"),
        ("txn", "../../etc"),
    ],
)
def test_a_bad_owner_record_field_is_named_in_the_value_error(field: str, value: Any) -> None:
    raw = valid_owner_record()
    raw[field] = value
    with pytest.raises(ValueError, match=f"'{field}'"):
        OwnerRecord.from_bytes(json.dumps(raw).encode())


def test_a_veto_record_that_is_malformed_does_not_stop_a_veto(tmp_path: Path) -> None:
    """A rank vetoing a save reads the veto record first; a malformed one is overwritten, not a crash."""
    out = tmp_path / "out"
    root = fmt.checkpoints_root(out)
    ownership.make_dirs_durably(root)
    (root / fmt.temp_veto_name(5, "ab12")).write_text(
        json.dumps({"owner": OWNER, "step": 5, "txn": "ab12", "version": []})
    )
    assert ownership.veto_commit(out, 5, "ab12", time.time() + 60) is True
    assert OwnerRecord.from_bytes((root / fmt.temp_veto_name(5, "ab12")).read_bytes()).outcome == "vetoed"
    assert not os.path.isdir(root / fmt.temp_dirname(5, "ab12"))
