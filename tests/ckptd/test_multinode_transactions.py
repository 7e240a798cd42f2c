"""The multi-node half of the transaction state machine and its messages: what a leader waits for and
checks, what a follower may and may not do, and how the peer messages are validated. Real directories and
files; the two-daemon runs are in tests/multinode."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import msgpack
import pytest
import zmq

from ckptd import format as fmt
from ckptd import protocol as proto
from ckptd import transactions as tx
from ckptd.protocol import CommitInfo, ComponentSpec, PeerInfo, Prepared, StageRequest, TxnState

S = TxnState
SERVER_PUBLIC, _ = (k.decode() for k in zmq.curve_keypair())
CLIENT_PUBLIC, CLIENT_SECRET = (k.decode() for k in zmq.curve_keypair())
NODE_OF = [0, 0, 1, 1]  # 2 nodes x 2 ranks


def peer(node: int, nnodes: int = 2) -> PeerInfo:
    return PeerInfo(node, nnodes, "tcp://127.0.0.1:29600", SERVER_PUBLIC, CLIENT_PUBLIC, CLIENT_SECRET)


def commit_info(*components: ComponentSpec) -> CommitInfo:
    topology = {"world_size": 4, "nnodes": 2, "node_of_rank": NODE_OF, "groups": {}}
    return CommitInfo(list(components), topology, {}, None, None)


def request(out: Path, rank: int, node: int, commit: CommitInfo | None = None, **kw) -> StageRequest:
    fields = dict(
        txn="mn1",
        output_dir=str(out),
        step=5,
        rank=rank,
        world_size=4,
        expected_ranks=[r for r, n in enumerate(NODE_OF) if n == node],
        timeout_s=30.0,
        pid=os.getpid(),
        segment="ckptd-test",
        segment_fd=3,
        segment_ino=1,
        segment_size=4096,
        files=[],
        commit=commit,
        peer=peer(node),
    )
    fields.update(kw)
    return StageRequest(**fields)


PER_RANK = ComponentSpec("w", "per_rank", [0, 1, 2, 3])


def record(rank: int) -> fmt.FileRecord:
    return fmt.FileRecord(
        f"w_state_rank_{rank}.safetensors", 8, "xxh3-128:" + "0" * 32, "w", rank=rank, written_by=rank
    )


def leader_with_durable_parts(out: Path) -> tx.Transaction:
    t = tx.Transaction.open(request(out, 0, 0))
    t.join(request(out, 0, 0, commit=commit_info(PER_RANK)), b"r0")
    t.join(request(out, 1, 0), b"r1")
    t.root.mkdir(parents=True, exist_ok=True)
    t.temp_dir.mkdir()
    t.temp_ino = os.lstat(t.temp_dir).st_ino
    for rank, part in t.parts.items():
        part.records.append(record(rank))
        t.part_durable(part)
    return t


def vote(t: tx.Transaction, ranks=(2, 3), node: int = 1, ino: int | None = None) -> Prepared:
    return Prepared(t.txn, node, t.temp_ino if ino is None else ino, tuple(record(r) for r in ranks))


def test_the_leader_is_prepared_only_once_every_follower_node_voted(tmp_path: Path) -> None:
    t = leader_with_durable_parts(tmp_path)
    assert t.role == tx.Role.LEADER and t.missing_nodes() == [1]
    assert not t.try_prepare() and t.state == S.WRITING
    t.remote_prepared(vote(t), "sock", b"f1")
    assert t.missing_nodes() == []
    assert t.try_prepare() and t.state == S.PREPARED
    manifest = t.build_manifest()
    assert sorted(manifest.files) == [f"w_state_rank_{r}.safetensors" for r in range(4)]
    assert manifest.components["w"].files == sorted(manifest.files)


@pytest.mark.parametrize(
    ("ranks", "node", "ino_delta", "why"),
    [
        ((2,), 1, 0, "written by ranks [0, 1, 2], the commit names [0, 1, 2, 3]"),
        ((2, 3), 1, 1, "another directory"),
        ((2, 0), 1, 0, "not one of its ranks"),
    ],
)
def test_the_leader_refuses_a_commit_that_the_union_of_the_nodes_files_does_not_make(
    tmp_path: Path, ranks, node, ino_delta, why
) -> None:
    t = leader_with_durable_parts(tmp_path)
    t.remote_prepared(vote(t, ranks, node, ino=t.temp_ino + ino_delta), "sock", b"f1")
    assert not t.try_prepare()
    assert t.state == S.ABORTING and why in (t.reason or ""), t.reason


def test_a_vote_from_a_node_outside_the_job_or_a_second_vote_is_refused(tmp_path: Path) -> None:
    t = leader_with_durable_parts(tmp_path)
    with pytest.raises(tx.TxnError, match="not a follower"):
        t.remote_prepared(vote(t, node=2), "sock", b"f")
    with pytest.raises(tx.TxnError, match="not a follower"):
        t.remote_heard(0, "sock", b"f")
    t.remote_prepared(vote(t), "sock", b"f1")
    with pytest.raises(tx.TxnError, match="already reported"):
        t.remote_prepared(vote(t), "sock", b"f1")


def test_a_vote_after_the_leader_aborted_is_moot(tmp_path: Path) -> None:
    t = leader_with_durable_parts(tmp_path)
    assert t.begin_abort("a rank gave up")
    with pytest.raises(tx.TxnError, match="already aborting"):
        t.remote_prepared(vote(t), "sock", b"f1")


def test_the_leader_checks_each_remote_file_on_disk_before_the_manifest(tmp_path: Path) -> None:
    t = leader_with_durable_parts(tmp_path)
    for rank in (0, 1):
        (t.temp_dir / record(rank).path).write_bytes(b"x" * 8)
    (t.temp_dir / record(2).path).write_bytes(b"x" * 8)
    (t.temp_dir / record(3).path).write_bytes(b"x" * 7)  # not the size node 1 reported
    t.remote_prepared(vote(t), "sock", b"f1")
    assert t.try_prepare()
    t.begin_commit()
    outcome = t.commit()
    assert not outcome.renamed and "w_state_rank_3.safetensors of 8 bytes" in (outcome.error or "")
    assert not t.final_dir.exists() and not (t.temp_dir / fmt.MANIFEST_NAME).exists()


def test_a_follower_is_prepared_without_commit_info_and_committed_only_by_the_leader(tmp_path: Path) -> None:
    t = tx.Transaction.open(request(tmp_path, 2, 1))
    t.join(request(tmp_path, 2, 1), b"r2")
    t.join(request(tmp_path, 3, 1), b"r3")
    assert t.role == tx.Role.FOLLOWER and t.commit_info is None
    for part in t.parts.values():
        t.part_durable(part)
    assert t.try_prepare() and t.state == S.PREPARED
    with pytest.raises(tx.IllegalTransition):
        t.begin_commit()  # a follower never renames
    t.follower_committed()
    assert t.state == S.COMMITTED and t.path == t.final_dir


def test_only_a_follower_in_prepared_can_be_committed_by_another_daemon(tmp_path: Path) -> None:
    lead = leader_with_durable_parts(tmp_path)
    with pytest.raises(tx.IllegalTransition):
        lead.follower_committed()
    f = tx.Transaction.open(request(tmp_path, 2, 1, txn="mn2"))
    with pytest.raises(tx.IllegalTransition):
        f.follower_committed()  # OPEN: it has not even voted


def test_a_follower_cleanup_never_removes_the_leaders_temp_dir(tmp_path: Path) -> None:
    lead = leader_with_durable_parts(tmp_path)
    f = tx.Transaction.open(request(tmp_path, 2, 1))
    f.observe_dir()
    assert f.shared_ino == lead.temp_ino
    assert f.begin_abort("the leader is gone")
    f.cleanup()
    assert lead.temp_dir.is_dir()


def test_a_follower_refuses_a_tombstone_or_a_missing_temp_dir(tmp_path: Path) -> None:
    f = tx.Transaction.open(request(tmp_path, 2, 1))
    with pytest.raises(tx.TxnError, match="gone"):
        f.observe_dir()
    f.root.mkdir(parents=True)
    f.temp_dir.write_text("tombstone")
    with pytest.raises(tx.TxnError, match="not a directory"):
        f.observe_dir()


def test_the_leader_sees_a_veto_that_renamed_its_temp_dir_away(tmp_path: Path) -> None:
    t = leader_with_durable_parts(tmp_path)
    assert t.dir_replaced() is None
    os.rename(t.temp_dir, t.root / "elsewhere")
    assert "vetoed" in (t.dir_replaced() or "")


def test_the_leaders_abort_cleanup_removes_the_shared_dir_with_every_nodes_files(tmp_path: Path) -> None:
    t = leader_with_durable_parts(tmp_path)
    (t.temp_dir / record(2).path).write_bytes(b"from node 1")
    assert t.begin_abort("node 1 went silent")
    t.cleanup()
    assert not t.temp_dir.exists()
    assert [p.name for p in t.root.iterdir()] == []


def test_parts_of_one_node_must_agree_on_the_peer_information(tmp_path: Path) -> None:
    t = tx.Transaction.open(request(tmp_path, 2, 1))
    other = dataclasses.replace(peer(1), leader="tcp://127.0.0.1:29601")
    with pytest.raises(tx.TxnError, match="peer information differs"):
        t.join(request(tmp_path, 3, 1, peer=other), b"r3")


# ------------------------------------------------------------------------------------------- messages


def test_a_stage_with_peer_information_round_trips_through_the_wire_format() -> None:
    req = request(Path("/data/run"), 2, 1)
    _, _, body = proto.unpack(proto.pack_stage(req, 1))
    assert proto.parse_stage(body) == req


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"leader": "ipc:///tmp/x"}, "peer address"),
        ({"leader": "tcp://127.0.0.1:0"}, "peer address"),
        ({"leader": "tcp://a b:1"}, "peer address"),
        ({"client_secret": "short"}, "CURVE key"),
        ({"node": 2}, "'node'"),
        ({"nnodes": 1}, "'nnodes'"),
        ({"nnodes": 5}, "'nnodes'"),  # more nodes than ranks
        ({"extra": 1}, "unexpected field"),
    ],
)
def test_bad_peer_information_is_refused_with_a_reason(change: dict, why: str) -> None:
    body = dataclasses.asdict(peer(1))
    body.update(change)
    with pytest.raises(proto.ProtocolError, match=why):
        proto.parse_peer_info(body, world_size=4)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"path": "../x.safetensors"}, "not a checkpoint file name"),
        ({"checksum": "zz"}, "checksum"),
        ({"size": -1}, "'size'"),
        ({"component": "a/b"}, "component key"),
        ({"kind": "index"}, "kind"),
        ({"written_by": "0"}, "'written_by'"),
    ],
)
def test_a_forged_or_broken_vote_is_refused_field_by_field(change: dict, why: str) -> None:
    rec = {**dataclasses.asdict(record(2)), **change}
    body = {"txn": "mn1", "node": 1, "ino": 5, "files": [rec]}
    with pytest.raises(proto.ProtocolError, match=why):
        proto.parse_prepared(body)


def test_a_vote_naming_a_file_twice_or_node_zero_is_refused() -> None:
    rec = dataclasses.asdict(record(2))
    with pytest.raises(proto.ProtocolError, match="same path twice"):
        proto.parse_prepared({"txn": "mn1", "node": 1, "ino": 5, "files": [rec, rec]})
    with pytest.raises(proto.ProtocolError, match="'node'"):
        proto.parse_prepared({"txn": "mn1", "node": 0, "ino": 5, "files": [rec]})


def test_peer_listen_and_check_requests_are_validated() -> None:
    keys = {"server_public": SERVER_PUBLIC, "client_public": CLIENT_PUBLIC}
    ok = proto.parse_listen({"job": "j1", "server_secret": CLIENT_SECRET, **keys})
    assert ok.job == "j1"
    with pytest.raises(proto.ProtocolError, match="'job'"):
        proto.parse_listen({"job": "../x", "server_secret": CLIENT_SECRET, **keys})
    with pytest.raises(proto.ProtocolError, match="peer address"):
        proto.parse_check({"leader": "tcp://h", "client_secret": CLIENT_SECRET, **keys})
    raw = msgpack.packb({"v": 1, "type": "p_hello", "id": 1, "node": 1, "pid": 1})
    assert proto.unpack(raw)[0] == proto.MsgType.P_HELLO


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CKPTD_NODE_ID": "a", "GROUP_RANK": "1", "SLURM_NODEID": "2"}, "id-a"),
        ({"GROUP_RANK": "1", "SLURM_NODEID": "2"}, "torchrun-node-1"),
        ({"SLURM_NODEID": "2"}, "slurm-node-2"),
        ({}, "host-"),
    ],
)
def test_node_identity_prefers_the_override_then_torchrun_then_slurm_then_the_host(env: dict, expected: str) -> None:
    from client.planning import node_identity

    assert node_identity(env).startswith(expected)


def test_launcher_nodes_that_reach_one_daemon_are_one_node_unless_their_ids_were_given() -> None:
    from client.components import CheckpointError
    from client.planning import _nodes_by_daemon

    shared = [("torchrun-node-0", {}, "1", "h ep"), ("torchrun-node-1", {}, "1", "h ep")]
    merged = _nodes_by_daemon(shared)
    assert merged[0] == merged[1]
    apart = [("torchrun-node-0", {}, "1", "h ep0"), ("torchrun-node-1", {}, "1", "h ep1")]
    assert _nodes_by_daemon(apart) == ["torchrun-node-0", "torchrun-node-1"]
    with pytest.raises(CheckpointError, match="one daemon serves one node"):
        _nodes_by_daemon([("id-a", {}, "1", "h ep"), ("id-b", {}, "1", "h ep")])
