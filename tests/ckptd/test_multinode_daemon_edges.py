"""Fresh-context review of the multi-node two-phase commit (issue 6): each test reproduces one defect against
real ``python -m ckptd serve`` processes. The other side of the peer link is played by this test: a fake
follower (a CURVE DEALER with the job's client keys, connected to the leader daemon's per-job ROUTER) or a
fake leader (a CURVE ROUTER the follower daemon connects to), so every message order can be forced.

Each test failed on the code it was written against and passes since the fix.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from ckptd import format as fmt
from ckptd import protocol as proto
from ckptd.protocol import CommitInfo, ComponentSpec, FileSpec, MsgType, PeerInfo, StageRequest
from tests.ckptd.harness import (
    Harness,
    Peer,
    Shm,
    commit_info,
    global_file,
    global_save,
    new_txn,
    outcome,
    st_bytes,
    stage_req,
    xxh3,
)

pytestmark = pytest.mark.timeout(120)

PEER_ENV = {"CKPTD_PEER_HOST": "127.0.0.1"}


# ------------------------------------------------------------------------------------------ helpers


def job_keys() -> dict[str, str]:
    sp, ss = zmq.curve_keypair()
    cp, cs = zmq.curve_keypair()
    return {
        "server_public": sp.decode(),
        "server_secret": ss.decode(),
        "client_public": cp.decode(),
        "client_secret": cs.decode(),
    }


def public(keys: dict[str, str]) -> dict[str, str]:
    return {k: keys[k] for k in ("server_public", "client_public", "client_secret")}


def rv_endpoint() -> str:
    proto.ensure_private_dir(proto.runtime_dir())
    return f"ipc://{proto.runtime_dir()}/rv-{secrets.token_hex(4)}.sock"


def start(harness: Harness, faults: str | None = None) -> Any:
    env = dict(PEER_ENV)
    if faults:
        env["CKPTD_TEST_FAULTS"] = faults
    return harness.start(endpoint=rv_endpoint(), env=env)


def listen(rank: Peer, job: str, keys: dict[str, str]) -> str:
    t, _, body = rank.request(
        MsgType.PEER_LISTEN,
        job=job,
        server_public=keys["server_public"],
        server_secret=keys["server_secret"],
        client_public=keys["client_public"],
    )
    assert t == MsgType.PEER_ADDRESS, body
    return body["address"]


def rank_spec(shm: Shm, rank: int, data: bytes) -> FileSpec:
    return FileSpec(
        path=fmt.component_filename("w", "per_rank", rank=rank),
        offset=shm.put(data),
        length=len(data),
        component="w",
        rank=rank,
    )


def two_node_commit(limit: int | None = None) -> CommitInfo:
    """Rank 0 on node 0 and rank 1 on node 1, one PER_RANK component."""
    return CommitInfo(
        components=[ComponentSpec("w", "per_rank", [0, 1])],
        topology={"world_size": 2, "nnodes": 2, "node_of_rank": [0, 1], "groups": {}},
        metadata={},
        pytorch_version=torch.__version__,
        save_total_limit=limit,
    )


def leader_part(
    shm: Shm, out: Path, step: int, txn: str, job: str, address: str, keys: dict[str, str], timeout_s: float = 30.0
) -> StageRequest:
    data = st_bytes({"w": torch.full((4,), float(step))})
    req = stage_req(
        shm,
        out,
        step,
        [rank_spec(shm, 0, data)],
        txn=txn,
        expected=[0],
        timeout_s=timeout_s,
        commit=two_node_commit(),
        job=job,
    )
    return dataclasses.replace(req, world_size=2, peer=PeerInfo(0, 2, address, **public(keys)))


def follower_part(
    shm: Shm, out: Path, step: int, txn: str, job: str, address: str, keys: dict[str, str], timeout_s: float = 30.0
) -> StageRequest:
    data = st_bytes({"w": torch.full((4,), float(step) + 0.5)})
    req = stage_req(
        shm, out, step, [rank_spec(shm, 1, data)], txn=txn, rank=1, expected=[1], timeout_s=timeout_s, job=job
    )
    return dataclasses.replace(req, world_size=2, expected_ranks=[1], peer=PeerInfo(1, 2, address, **public(keys)))


_OPEN_SOCKETS: list[zmq.Socket] = []


@pytest.fixture(autouse=True)
def _close_fake_peers(harness: Harness):
    """The fake peers' sockets close before the harness terminates its context (term() waits for them)."""
    yield
    while _OPEN_SOCKETS:
        _OPEN_SOCKETS.pop().close(linger=0)


class FakeFollower:
    """Node 1 of a two-node job, played by the test: a DEALER with the job's client keys."""

    def __init__(self, ctx: zmq.Context, address: str, keys: dict[str, str]) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        _OPEN_SOCKETS.append(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.curve_serverkey = keys["server_public"].encode()
        self.sock.curve_publickey = keys["client_public"].encode()
        self.sock.curve_secretkey = keys["client_secret"].encode()
        self.sock.connect(address)
        self.inbox: list[tuple[MsgType, int, dict]] = []

    def send(self, t: MsgType, req_id: int = 0, **body: Any) -> None:
        self.sock.send(proto.pack(t, req_id, **body))

    def wait(self, pred, what: str, timeout_s: float = 10.0) -> tuple[MsgType, int, dict]:
        for i, m in enumerate(self.inbox):
            if pred(m):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                m = proto.unpack(self.sock.recv())
                if pred(m):
                    return m
                self.inbox.append(m)
        raise AssertionError(f"no {what} within {timeout_s} s; got {self.inbox}")

    def hello(self, timeout_s: float = 10.0) -> float:
        """Round trip of a p_hello (seconds)."""
        t0 = time.monotonic()
        rid = secrets.randbits(30) + 1
        self.send(MsgType.P_HELLO, rid, node=1, pid=os.getpid())
        self.wait(lambda m: m[0] == MsgType.P_WELCOME and m[1] == rid, "p_welcome", timeout_s)
        return time.monotonic() - t0

    def join(self, txn: str, step: int) -> None:
        self.send(MsgType.P_JOIN, txn=txn, node=1, step=step)
        self.wait(lambda m: m[0] == MsgType.P_OPENED and m[2].get("txn") == txn, f"p_opened {txn}")

    def write_and_vote(self, out: Path, step: int, txn: str, data: bytes | None = None) -> None:
        """Write rank 1's file into the leader's temp dir, fsync it, and vote PREPARED."""
        root = fmt.checkpoints_root(out)
        temp = root / fmt.temp_dirname(step, txn)
        data = data if data is not None else st_bytes({"w": torch.full((4,), float(step) + 0.5)})
        name = fmt.component_filename("w", "per_rank", rank=1)
        with open(temp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        rec = fmt.FileRecord(name, len(data), xxh3(data), "w", rank=1, written_by=1)
        self.send(MsgType.P_PREPARED, txn=txn, node=1, ino=os.lstat(temp).st_ino, files=[dataclasses.asdict(rec)])

    def close(self) -> None:
        self.sock.close(linger=0)


class FakeLeader:
    """Node 0's daemon, played by the test: a CURVE ROUTER on 127.0.0.1 (no ZAP: any client key is let in)."""

    def __init__(self, ctx: zmq.Context, keys: dict[str, str]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        _OPEN_SOCKETS.append(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.curve_server = True
        self.sock.curve_secretkey = keys["server_secret"].encode()
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.inbox: list[tuple[bytes, MsgType, int, dict]] = []
        self.identity: bytes | None = None

    def wait(self, pred, what: str, timeout_s: float = 10.0) -> tuple[bytes, MsgType, int, dict]:
        for i, m in enumerate(self.inbox):
            if pred(m):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                ident, frame = self.sock.recv_multipart()
                self.identity = ident
                t, rid, body = proto.unpack(frame)
                m = (ident, t, rid, body)
                if pred(m):
                    return m
                self.inbox.append(m)
        raise AssertionError(f"no {what} within {timeout_s} s; got {[(m[1], m[3]) for m in self.inbox]}")

    def send(self, ident: bytes, t: MsgType, req_id: int = 0, **body: Any) -> None:
        self.sock.send_multipart([ident, proto.pack(t, req_id, **body)])

    def close(self) -> None:
        self.sock.close(linger=0)


def expect_outcome(rank: Peer, txn: str, timeout_s: float) -> tuple[MsgType, dict]:
    return outcome(rank, txn, timeout_s)


# ------------------------------------------------------------------------------------------ defects


def test_an_abort_while_the_temp_dir_is_being_made_finishes_and_later_saves_commit(
    harness: Harness, tmp_path: Path
) -> None:
    # Single node (no peer information at all): the regression is in the shared abort path.
    d = start(harness)
    rank = harness.peer(d.endpoint)
    rank.hello()
    shm = harness.shm()
    out = tmp_path / "out"
    # Leftover trash the first save's sweep removes: it keeps prepare_dir busy for a while.
    root = fmt.checkpoints_root(out)
    for i in range(1500):
        (root / fmt.trash_dirname(1, f"{i:08x}") / "x").mkdir(parents=True)
    data = st_bytes({"w": torch.ones(4)})
    req = stage_req(
        shm, out, 1, [global_file(shm, "weights", data)], commit=commit_info(ComponentSpec("weights", "global", [0]))
    )
    # The stage and an abort right behind it (a rank that gives up at once): the abort is dispatched while the
    # dir pool is still making the temp dir.
    rank.sock.send(proto.pack_stage(req, next(rank.ids)))
    rank.sock.send(proto.pack(MsgType.ABORT, next(rank.ids), txn=req.txn, reason="rank 0: gave up"))
    try:
        t, body = expect_outcome(rank, req.txn, 10)
        assert t == MsgType.ABORTED, body
        # And the output dir is not blocked: the next save commits.
        global_save(rank, shm, out, 2, {"w": torch.zeros(2)})
    finally:
        log = d.log_text()
    assert "Task does not support set_exception" not in log


def _leader_and_follower(harness: Harness, faults: str | None = None):
    d = start(harness, faults)
    rank = harness.peer(d.endpoint)
    rank.hello()
    job = f"rv-{secrets.token_hex(3)}"
    keys = job_keys()
    address = listen(rank, job, keys)
    follower = FakeFollower(harness.ctx, address, keys)
    follower.hello()
    return d, rank, job, keys, address, follower


SLOW_COMMIT = "before_manifest=stall,after_manifest=stall,before_rename=stall,after_rename=stall"  # 4 x 3 s


def test_a_slow_commit_completed_by_a_followers_vote_does_not_stall_the_peer_socket(
    harness: Harness, tmp_path: Path
) -> None:
    d, rank, job, keys, address, follower = _leader_and_follower(harness, SLOW_COMMIT)
    shm = harness.shm()
    out = tmp_path / "out"
    t1, t2 = new_txn(), new_txn()
    for step, txn in ((1, t1), (2, t2)):
        t, _, body = rank.stage(leader_part(shm, out, step, txn, job, address, keys, timeout_s=60))
        assert t == MsgType.ACCEPTED, body
        follower.join(txn, step)
    for txn in (t1, t2):
        rank.wait(lambda m, txn=txn: m[0] == MsgType.RELEASED and m[2].get("txn") == txn, f"released {txn}")
    time.sleep(0.5)  # the leader's own parts are durable: node 1's vote completes step 1
    follower.write_and_vote(out, 1, t1)
    # Node 1 keeps beating about step 2 once a second while step 1 commits (12 s of a slow disk).
    worst = 0.0
    end = time.monotonic() + 14
    while time.monotonic() < end:
        rid = secrets.randbits(30) + 1
        sent = time.monotonic()
        follower.send(MsgType.P_BEAT, rid, txn=t2, node=1)
        try:
            follower.wait(lambda m, rid=rid: m[0] == MsgType.P_STATE and m[1] == rid, "p_state", 1.0)
        except AssertionError:
            pass
        worst = max(worst, time.monotonic() - sent)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - sent)))
    t, body = expect_outcome(rank, t1, 10)
    assert t == MsgType.COMMITTED, body
    if not (fmt.checkpoints_root(out) / fmt.temp_dirname(2, t2)).is_dir():
        pytest.fail(f"step 2, whose node 1 beat every second, was aborted: {expect_outcome(rank, t2, 5)}")
    follower.write_and_vote(out, 2, t2)
    t, body = expect_outcome(rank, t2, 20)
    assert t == MsgType.COMMITTED, f"step 2, whose node 1 beat every second, was aborted: {body}"
    assert worst < 3.0, f"a p_beat waited {worst:.1f} s for its answer"


def test_two_clients_of_one_job_do_not_cut_each_others_saves(harness: Harness, tmp_path: Path) -> None:
    d, rank, job, keys_a, address_a, follower_a = _leader_and_follower(harness)
    shm = harness.shm()
    out_a = tmp_path / "out-a"
    txn = new_txn()
    t, _, body = rank.stage(leader_part(shm, out_a, 1, txn, job, address_a, keys_a, timeout_s=8))
    assert t == MsgType.ACCEPTED, body
    follower_a.join(txn, 1)
    # The job's second client (another output dir, its own keys made at its construction) announces before
    # its own first save, while client A's save is in flight.
    keys_b = job_keys()
    address_b = listen(rank, job, keys_b)
    assert address_b
    follower_a.write_and_vote(out_a, 1, txn)
    t, body = expect_outcome(rank, txn, 12)
    assert t == MsgType.COMMITTED, f"client A's save was lost to client B's announce: {body}"
    # And client A's next announce must not cut client B's socket either.
    assert listen(rank, job, keys_a) == address_a


def _follower_with_fake_leader(harness: Harness, faults: str | None = None):
    d = start(harness, faults)
    rank = harness.peer(d.endpoint)
    rank.hello()
    job = f"rv-{secrets.token_hex(3)}"
    keys = job_keys()
    leader = FakeLeader(harness.ctx, keys)
    return d, rank, job, keys, leader


def test_a_followers_abort_on_a_ranks_request_reaches_the_leader_at_once(harness: Harness, tmp_path: Path) -> None:
    d, rank, job, keys, leader = _follower_with_fake_leader(harness)
    shm = harness.shm()
    out = tmp_path / "out"
    txn = new_txn()
    t, _, body = rank.stage(follower_part(shm, out, 1, txn, job, leader.address, keys))
    assert t == MsgType.ACCEPTED, body
    leader.wait(lambda m: m[1] == MsgType.P_JOIN and m[3].get("txn") == txn, "p_join")
    t, _, body = rank.request(MsgType.ABORT, txn=txn, reason="rank 1: its part failed")
    assert t == MsgType.TXN_STATE and body["state"] in ("aborting", "aborted"), body
    leader.wait(lambda m: m[1] == MsgType.P_ABORT and m[3].get("txn") == txn, "p_abort", 5)


def test_a_save_rank_0_gave_up_on_is_aborted_on_the_follower_that_joined_it(harness: Harness, tmp_path: Path) -> None:
    d, rank, job, keys, address, follower = _leader_and_follower(harness)
    txn = new_txn()
    follower.send(MsgType.P_JOIN, txn=txn, node=1, step=1)
    time.sleep(0.3)
    # Rank 0's stage was refused (e.g. a conflicting job, a daemon shutting down); its client sends the
    # courtesy abort of the save to its own daemon, the leader.
    rank.request(MsgType.ABORT, txn=txn, reason="rank 0: ckptd rejected the stage request")
    deadline = time.monotonic() + 5
    state = None
    while time.monotonic() < deadline:
        rid = secrets.randbits(30) + 1
        follower.send(MsgType.P_BEAT, rid, txn=txn, node=1)
        _, _, body = follower.wait(lambda m, rid=rid: m[1] == rid or m[0] == MsgType.P_ABORTED, "answer")
        state = body.get("state", "aborted" if "reason" in body and "state" not in body else None)
        if state in ("aborted", "aborting", "unknown"):
            break
        time.sleep(1.0)
    assert state in ("aborted", "aborting", "unknown"), f"the leader still tells node 1 the save is {state!r}"


def test_replacing_a_jobs_peer_socket_never_strands_a_commit_in_flight(harness: Harness, tmp_path: Path) -> None:
    d, rank, job, keys, address, follower = _leader_and_follower(harness, "before_rename=stall")
    shm = harness.shm()
    out = tmp_path / "out"
    txn = new_txn()
    t, _, body = rank.stage(leader_part(shm, out, 1, txn, job, address, keys))
    assert t == MsgType.ACCEPTED, body
    follower.join(txn, 1)
    rank.wait(lambda m: m[0] == MsgType.RELEASED and m[2].get("txn") == txn, "released")
    time.sleep(0.5)
    follower.write_and_vote(out, 1, txn)  # the last vote: the commit starts (3 s before its rename)
    time.sleep(1.0)
    # The job restarts (same job id, new keys): its new rank 0 announces.
    new_keys = job_keys()
    new_address = listen(rank, job, new_keys)
    t, body = expect_outcome(rank, txn, 10)
    assert t == MsgType.COMMITTED, body
    # And the output dir is not blocked for the restarted job's saves.
    txn2 = new_txn()
    follower2 = FakeFollower(harness.ctx, new_address, new_keys)
    follower2.hello()
    t, _, body = rank.stage(leader_part(shm, out, 2, txn2, job, new_address, new_keys))
    assert t == MsgType.ACCEPTED, body
    follower2.join(txn2, 2)
    follower2.write_and_vote(out, 2, txn2)
    t, body = expect_outcome(rank, txn2, 10)
    assert t == MsgType.COMMITTED, body


def test_an_ipv6_peer_host_can_lead_a_job(harness: Harness, tmp_path: Path) -> None:
    d = harness.start(endpoint=rv_endpoint(), env={"CKPTD_PEER_HOST": "::1"})
    rank = harness.peer(d.endpoint)
    rank.hello()
    keys = job_keys()
    t, _, body = rank.request(
        MsgType.PEER_LISTEN,
        job="rv-v6",
        server_public=keys["server_public"],
        server_secret=keys["server_secret"],
        client_public=keys["client_public"],
    )
    assert t == MsgType.PEER_ADDRESS, body
    assert body["address"].startswith("tcp://[::1]:")


def test_a_follower_reaches_a_leader_at_an_ipv6_address(harness: Harness, tmp_path: Path) -> None:
    d = start(harness)
    rank = harness.peer(d.endpoint)
    rank.hello()
    keys = job_keys()
    sock = harness.ctx.socket(zmq.ROUTER)
    _OPEN_SOCKETS.append(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    sock.curve_server = True
    sock.curve_secretkey = keys["server_secret"].encode()
    port = sock.bind_to_random_port("tcp://[::1]")
    reply: list = []

    import threading

    def serve() -> None:
        if sock.poll(12000):
            ident, frame = sock.recv_multipart()
            t, rid, _ = proto.unpack(frame)
            if t == MsgType.P_HELLO:
                sock.send_multipart([ident, proto.pack(MsgType.P_WELCOME, rid, pid=1)])
                reply.append(t)

    th = threading.Thread(target=serve)
    th.start()
    t, _, body = rank.request(MsgType.PEER_CHECK, 20, leader=f"tcp://[::1]:{port}", **public(keys))
    th.join()
    assert t == MsgType.PEER_OK, body


def test_a_full_peer_port_range_is_refused_with_advice(harness: Harness, tmp_path: Path) -> None:
    import socket as pysocket

    taken = pysocket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        d = harness.start(endpoint=rv_endpoint(), env={**PEER_ENV, "CKPTD_PEER_PORTS": f"{port}-{port}"})
        rank = harness.peer(d.endpoint)
        rank.hello()
        keys = job_keys()
        t, _, body = rank.request(
            MsgType.PEER_LISTEN,
            job="rv-ports",
            server_public=keys["server_public"],
            server_secret=keys["server_secret"],
            client_public=keys["client_public"],
        )
    finally:
        taken.close()
    assert t == MsgType.ERROR
    assert "peer-ports" in body["message"] or "PEER_PORTS" in body["message"], body["message"]
