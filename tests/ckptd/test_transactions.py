"""The transaction state machine: every transition, legal and illegal, and the commit's point of no return.

Table-driven over ``transactions.LEGAL``; the I/O steps run on real directories and files."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from ckptd import format as fmt
from ckptd import transactions as tx
from ckptd.faults import FaultInjector
from ckptd.protocol import CommitInfo, ComponentSpec, StageRequest, TxnState

S = TxnState
STATES = [s for s in TxnState if s != S.UNKNOWN]

EXPECTED_LEGAL = {
    (S.OPEN, S.WRITING),
    (S.OPEN, S.ABORTING),
    (S.WRITING, S.PREPARED),
    (S.WRITING, S.ABORTING),
    (S.PREPARED, S.COMMITTING),
    (S.PREPARED, S.COMMITTED),  # a multi-node follower, on the leader's word
    (S.PREPARED, S.ABORTING),
    (S.COMMITTING, S.COMMITTED),
    (S.COMMITTING, S.ABORTING),
    (S.ABORTING, S.ABORTED),
}


def request(
    output_dir: Path, *, rank: int = 0, expected: tuple[int, ...] = (0,), commit: CommitInfo | None = None, **kw
) -> StageRequest:
    fields = dict(
        txn="t1",
        output_dir=str(output_dir),
        step=3,
        rank=rank,
        world_size=max(expected) + 1,
        expected_ranks=list(expected),
        timeout_s=30.0,
        pid=os.getpid(),
        segment="ckptd-test",
        segment_fd=3,
        segment_ino=1,
        segment_size=4096,
        files=[],
        commit=commit,
    )
    fields.update(kw)
    return StageRequest(**fields)


def info(*components: ComponentSpec) -> CommitInfo:
    return CommitInfo(list(components), {}, {}, None, None)


def txn_in(state: TxnState, output_dir: Path) -> tx.Transaction:
    t = tx.Transaction.open(request(output_dir))
    t.state = state  # the one place a test sets a state directly: to start each row of the table from it
    return t


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(STATES, STATES)))
def test_every_transition_is_legal_exactly_when_the_table_says_so(src: TxnState, dst: TxnState, tmp_path: Path) -> None:
    t = txn_in(src, tmp_path)
    if (src, dst) in EXPECTED_LEGAL:
        t._move(dst)
        assert t.state == dst
    else:
        with pytest.raises(tx.IllegalTransition):
            t._move(dst)
        assert t.state == src


def test_legal_table_matches_the_documented_one() -> None:
    assert {(a, b) for a, targets in tx.LEGAL.items() for b in targets} == EXPECTED_LEGAL
    assert tx.LEGAL[S.COMMITTED] == frozenset() and tx.LEGAL[S.ABORTED] == frozenset()


@pytest.mark.parametrize("state", STATES)
def test_abort_is_taken_only_before_committing(state: TxnState, tmp_path: Path) -> None:
    t = txn_in(state, tmp_path)
    taken = t.begin_abort("a rank aborted")
    assert taken == (state in (S.OPEN, S.WRITING, S.PREPARED))
    assert t.state == (S.ABORTING if taken else state)


@pytest.mark.parametrize("state", [s for s in STATES if s != S.OPEN])
def test_a_part_can_join_only_an_open_transaction(state: TxnState, tmp_path: Path) -> None:
    t = txn_in(state, tmp_path)
    with pytest.raises(tx.TxnError, match=f"already {state.value}"):
        t.join(request(tmp_path), b"id")


def test_last_part_moves_open_to_writing_and_a_disagreeing_part_is_refused(tmp_path: Path) -> None:
    t = tx.Transaction.open(request(tmp_path, expected=(0, 1)))
    t.join(request(tmp_path, rank=1, expected=(0, 1)), b"r1")
    assert t.state == S.OPEN
    with pytest.raises(tx.TxnError, match="step 4 vs 3"):
        t.join(request(tmp_path, rank=0, expected=(0, 1), step=4), b"r0")
    with pytest.raises(tx.TxnError, match="job 'other' vs None"):
        t.join(request(tmp_path, rank=0, expected=(0, 1), job="other"), b"r0")
    with pytest.raises(tx.TxnError, match="already staged"):
        t.join(request(tmp_path, rank=1, expected=(0, 1)), b"r1")
    t.join(request(tmp_path, rank=0, expected=(0, 1)), b"r0")
    assert t.state == S.WRITING


def test_a_hand_off_past_its_absolute_deadline_opens_nothing(tmp_path: Path) -> None:
    import time

    with pytest.raises(tx.TxnError, match="after its deadline"):
        tx.Transaction.open(request(tmp_path, deadline=time.time() - 5))


def _written(t: tx.Transaction, rank: int, component: str, path: str) -> None:
    part = t.parts[rank]
    part.records.append(fmt.FileRecord(path=path, size=8, checksum="0" * 32, component=component, written_by=rank))
    t.part_durable(part)


@pytest.mark.parametrize(
    ("components", "files", "why"),
    [
        ([], [], "names no component"),
        ([ComponentSpec("w", "global", [0])], [], "'w' has no file written"),
        ([ComponentSpec("w", "global", [0])], [("x", "x_state.safetensors")], "components the commit does not name"),
        (
            [ComponentSpec("w", "per_rank", [0, 1])],
            [("w", "w_state_rank_0.safetensors")],
            "written by ranks [0], the commit names [0, 1]",
        ),
    ],
)
def test_the_daemon_refuses_a_commit_that_cannot_be_a_checkpoint(
    components: list[ComponentSpec], files: list[tuple[str, str]], why: str, tmp_path: Path
) -> None:
    t = tx.Transaction.open(request(tmp_path, expected=(0, 1)))
    t.join(request(tmp_path, rank=0, expected=(0, 1), commit=info(*components)), b"r0")
    t.join(request(tmp_path, rank=1, expected=(0, 1)), b"r1")
    for comp, path in files:
        _written(t, 0, comp, path)
    for part in t.parts.values():
        t.part_durable(part)
    assert not t.try_prepare()
    assert t.state == S.ABORTING and why in (t.reason or ""), t.reason


def test_a_complete_transaction_is_prepared_only_when_every_part_is_durable(tmp_path: Path) -> None:
    t = tx.Transaction.open(request(tmp_path, expected=(0, 1)))
    t.join(request(tmp_path, rank=0, expected=(0, 1), commit=info(ComponentSpec("w", "per_rank", [0, 1]))), b"r0")
    t.join(request(tmp_path, rank=1, expected=(0, 1)), b"r1")
    t.parts[0].records.append(fmt.FileRecord("w_state_rank_0.safetensors", 8, "0" * 32, "w", written_by=0))
    t.part_durable(t.parts[0])
    assert not t.try_prepare() and t.state == S.WRITING
    _written(t, 1, "w", "w_state_rank_1.safetensors")
    assert t.try_prepare() and t.state == S.PREPARED


def _prepared_on_disk(tmp_path: Path, step: int = 3, **faults: str) -> tx.Transaction:
    """A PREPARED single-rank transaction whose one file really is in its temp dir, fsynced."""
    rule = ",".join(f"{k}={v}" for k, v in faults.items())
    t = tx.Transaction.open(request(tmp_path, step=step, txn=f"t{step}x"), FaultInjector.parse(rule))
    t.join(request(tmp_path, step=step, txn=f"t{step}x", commit=info(ComponentSpec("w", "global", [0]))), b"r0")
    t.root.mkdir(parents=True, exist_ok=True)
    t.temp_dir.mkdir()
    t.temp_ino = t.temp_dir.stat().st_ino
    data = fmt.build_safetensors_layout([]).header
    (t.temp_dir / "w_state.safetensors").write_bytes(data)
    t.parts[0].records.append(
        fmt.FileRecord("w_state.safetensors", len(data), fmt.checksum_bytes(data), "w", written_by=0)
    )
    t.part_durable(t.parts[0])
    assert t.try_prepare()
    return t


@pytest.mark.parametrize("point", ["before_manifest", "after_manifest", "before_rename"])
def test_failure_before_the_rename_aborts_and_leaves_no_checkpoint(point: str, tmp_path: Path) -> None:
    t = _prepared_on_disk(tmp_path, **{point: "eio"})
    t.begin_commit()
    outcome = t.commit()
    assert not outcome.renamed and "EIO" in (outcome.error or "")
    t.finish_commit(outcome)
    assert t.state == S.ABORTING
    t.cleanup()
    t.finish_abort()
    assert t.state == S.ABORTED
    assert not t.final_dir.exists() and not t.temp_dir.exists()


@pytest.mark.parametrize("point", ["after_rename"])
def test_failure_after_the_rename_is_a_committed_checkpoint_with_a_warning(point: str, tmp_path: Path) -> None:
    t = _prepared_on_disk(tmp_path, **{point: "eio"})
    t.begin_commit()
    outcome = t.commit()
    assert outcome.renamed and outcome.path == t.final_dir
    t.finish_commit(outcome)
    assert t.state == S.COMMITTED and any("EIO" in w for w in t.warnings), t.warnings
    assert not t.begin_abort("too late")
    assert t.state == S.COMMITTED
    assert fmt.verify_checkpoint(t.final_dir)


def test_resave_swaps_atomically_and_a_failure_between_the_renames_keeps_the_new_one(tmp_path: Path) -> None:
    first = _prepared_on_disk(tmp_path)
    first.begin_commit()
    first.finish_commit(first.commit())
    old_txn = fmt.read_manifest(first.final_dir).txn
    again = tx.Transaction.open(request(tmp_path, txn="t3y"), FaultInjector.parse("between_renames=eio"))
    again.join(request(tmp_path, txn="t3y", commit=info(ComponentSpec("w", "global", [0]))), b"r0")
    again.temp_dir.mkdir()
    again.temp_ino = again.temp_dir.stat().st_ino
    data = fmt.build_safetensors_layout([]).header
    (again.temp_dir / "w_state.safetensors").write_bytes(data)
    again.parts[0].records.append(
        fmt.FileRecord("w_state.safetensors", len(data), fmt.checksum_bytes(data), "w", written_by=0)
    )
    again.part_durable(again.parts[0])
    assert again.try_prepare()
    again.begin_commit()
    outcome = again.commit()
    again.finish_commit(outcome)
    assert again.state == S.COMMITTED and outcome.warnings
    assert fmt.read_manifest(again.final_dir).txn == "t3y" != old_txn


def test_retention_runs_only_after_a_commit(tmp_path: Path) -> None:
    t = _prepared_on_disk(tmp_path)
    with pytest.raises(tx.IllegalTransition):
        t.apply_retention(1)


def test_ledger_commits_in_hand_over_order_bounds_live_transactions_and_keeps_jobs_apart(tmp_path: Path) -> None:
    ledger = tx.Ledger(max_live=2, finished_kept=1)
    a = tx.Transaction.open(request(tmp_path, txn="a", job="j1"))
    b = tx.Transaction.open(request(tmp_path, txn="b", job="j1", step=4))
    ledger.admit(a)
    ledger.admit(b)
    assert ledger.next_in_line(tmp_path) is a
    with pytest.raises(tx.TxnError, match="limit 2"):
        ledger.admit(tx.Transaction.open(request(tmp_path / "x", txn="c", job="j1")))
    ledger.retire(a)
    assert ledger.next_in_line(tmp_path) is b
    with pytest.raises(tx.TxnError, match="may not write the same output_dir"):
        ledger.admit(tx.Transaction.open(request(tmp_path, txn="d", job="j2")))
    ledger.retire(b)
    assert ledger.get("a") is None and ledger.get("b") is b  # only the newest finished one is remembered


def test_whatever_replaced_the_temp_dir_is_never_renamed_into_place(tmp_path: Path) -> None:
    """Something else at the temp name (a rank renamed the temp dir away, and something was made in its
    place) must never become ``checkpoint-<step>``: the rename checks it is the directory this save made."""
    t = _prepared_on_disk(tmp_path)
    t.temp_dir.rename(t.root / "elsewhere")
    t.temp_dir.mkdir()
    t.begin_commit()
    outcome = t.commit()
    assert not outcome.renamed and "not the directory this save wrote" in (outcome.error or "")
    assert not t.final_dir.exists()
