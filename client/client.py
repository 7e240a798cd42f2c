"""CheckpointClient: the rank-side API (save_async / wait / load / close)."""

from __future__ import annotations

import gc
import json
import logging
import os
import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptd import format as fmt
from ckptd import protocol as proto
from ckptd.protocol import MsgType, TxnState
from client import loader, planning, staging
from client.components import CheckpointError, StateComponent, ValidationLevel
from client.transport import DaemonLink, DaemonUnavailable

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
HEARTBEAT_TIMEOUT_S = 15.0
DEFAULT_TXN_TIMEOUT_S = 300.0


@dataclass
class SaveHandle:
    """A save in flight. ``wait()`` returns the committed checkpoint's path or raises CheckpointError."""

    step: int
    txn: str
    client: CheckpointClient = field(repr=False)
    path: Path | None = None
    error: str | None = None
    staged_s: float = 0.0
    bytes_staged: int = 0
    started_at: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic, repr=False)

    def done(self) -> bool:
        """True once the save has committed or failed; never blocks."""
        if self.path is None and self.error is None:
            self.client._progress(0.0)
        return self.path is not None or self.error is not None

    def wait(self, timeout: float | None = None) -> Path:
        """Block until committed; returns the checkpoint path. Raises CheckpointError if it aborted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.path is None and self.error is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"save of step {self.step} not committed within {timeout} s (still in flight)")
            self.client._progress(0.2 if remaining is None else min(0.2, remaining))
        if self.error is not None:
            raise CheckpointError(self.error)
        assert self.path is not None
        return self.path


class CheckpointClient:
    """Asynchronous, transactional checkpoints for one training rank. See docs/quickstart.md."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        components: list[StateComponent] | Any,
        process_groups: dict[str, Any] | None = None,
        endpoint: str | None = None,
        save_total_limit: int | None = None,
        *,
        max_shard_size: int = fmt.DEFAULT_MAX_SHARD_SIZE,
        timeout_s: float = DEFAULT_TXN_TIMEOUT_S,
        staging_slabs: int = 1,
        verify_on_load: bool = True,
    ) -> None:
        if not isinstance(components, (list, tuple)):
            provider = components
            if not hasattr(provider, "get_state_components"):
                raise TypeError("components must be a list of StateComponent or have get_state_components()")
            components = list(provider.get_state_components())
            if process_groups is None and hasattr(provider, "get_process_groups"):
                process_groups = provider.get_process_groups()
        for c in components:
            if not isinstance(c, StateComponent):
                raise TypeError(f"components must be StateComponent instances, got {type(c).__name__}")
        if save_total_limit is not None and (not isinstance(save_total_limit, int) or save_total_limit < 1):
            raise ValueError(f"save_total_limit must be a positive integer or None, got {save_total_limit!r}")
        if staging_slabs < 1:
            raise ValueError("staging_slabs must be at least 1")
        # Absolute but not resolved: paths handed back keep the form (and symlinks) the caller used.
        self.output_dir = Path(os.path.abspath(os.path.expanduser(output_dir)))
        self.components = list(components)
        self.save_total_limit = save_total_limit
        self.max_shard_size = int(max_shard_size)
        self.timeout_s = float(timeout_s)
        self.staging_slabs = staging_slabs
        self.verify_on_load = verify_on_load
        self._closed = False
        self._inflight: dict[str, SaveHandle] = {}
        self._slabs: list[staging.Slab] = []
        self._side_streams: dict[int, Any] = {}
        self._layouts: staging.LayoutCache = {}
        self._group = _make_sync_group()
        self.topology = planning.discover_topology(process_groups, self._group)
        if self.topology.nnodes > 1:
            raise CheckpointError(
                f"this job spans {self.topology.nnodes} nodes; the multi-node commit (leader daemon) is not "
                "available in this version of ckptd; run on one node"
            )
        self.plans = planning.plan(self.components, self.topology)
        self.rank = self.topology.rank
        self.endpoint = proto.resolve_endpoint(endpoint)
        self._link = DaemonLink(self.endpoint)
        self._is_local_leader = self.topology.local_rank == 0
        self._link_generation = self._link.generation
        self._ensure_daemon()
        self._barrier()

    # -- collective helpers ---------------------------------------------------------------------------

    def _all_gather(self, obj: Any) -> list[Any]:
        if self._group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.topology.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def _barrier(self) -> None:
        if self._group is not None:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    # -- daemon ---------------------------------------------------------------------------------------

    def _ensure_daemon(self) -> None:
        try:
            self._link.ensure_daemon(may_start=self._is_local_leader, output_dir=self.output_dir)
        except DaemonUnavailable as e:
            raise CheckpointError(str(e)) from None
        self._link_generation = self._link.generation

    def _daemon_healthy(self) -> bool:
        return self._link.embedded_alive() is not False and self._link.generation == self._link_generation

    # -- events ---------------------------------------------------------------------------------------

    def _progress(self, timeout_s: float) -> None:
        """Receive daemon notifications for up to ``timeout_s`` and settle handles; detect a dead daemon."""
        if not self._inflight:
            return
        self._link.pump(timeout_s)
        for ev in self._link.take_events():
            self._apply_event(ev)
        if not self._inflight:
            return
        if self._link.embedded_alive() is False:
            code = self._link.process.returncode if self._link.process else None
            self._fail_all(f"the ckptd process exited (code {code}) before committing")
        elif self._link.generation != self._link_generation:
            self._fail_all(f"the connection to ckptd at {self.endpoint} was lost (daemon killed or restarted)")
        else:
            self._heartbeat()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        for h in list(self._inflight.values()):
            if now - h.last_beat < HEARTBEAT_S:
                continue
            h.last_beat = now
            try:
                reply = self._link.request(MsgType.QUERY, HEARTBEAT_TIMEOUT_S, txn=h.txn)
            except DaemonUnavailable as e:
                self._fail_all(f"ckptd stopped answering ({e})")
                return
            except CheckpointError as e:
                self._settle(h.txn, error=str(e))
                continue
            for ev in self._link.take_events():
                self._apply_event(ev)
            state = reply.body.get("state")
            if h.txn in self._inflight and state == TxnState.UNKNOWN.value:
                self._settle(h.txn, error="ckptd does not know this save (it was restarted)")

    def _apply_event(self, ev: Any) -> None:
        txn = ev.body.get("txn")
        if ev.type == MsgType.RELEASED:
            self._release_slab(txn)
        elif ev.type == MsgType.COMMITTED:
            self._settle(txn, path=Path(ev.body["path"]))
        elif ev.type == MsgType.ABORTED:
            self._settle(txn, error=str(ev.body.get("reason")))

    def _settle(self, txn: str, path: Path | None = None, error: str | None = None) -> None:
        self._release_slab(txn)
        h = self._inflight.pop(txn, None)
        if h is None:
            return
        if path is not None:
            h.path = path
            logger.info(
                "step %d committed: %s (%.3f s after save_async)", h.step, path, time.monotonic() - h.started_at
            )
        else:
            h.error = (
                f"checkpoint for step {h.step} was not committed: {error}; earlier checkpoints are untouched "
                "and training can continue (the next save retries)"
            )
            logger.error("%s", h.error)

    def _fail_all(self, reason: str) -> None:
        for txn in list(self._inflight):
            self._settle(txn, error=reason)

    def _release_slab(self, txn: str | None) -> None:
        for slab in self._slabs:
            if slab.busy_txn == txn:
                slab.busy_txn = None

    # -- save -----------------------------------------------------------------------------------------

    def _acquire_slab(self, need: int) -> staging.Slab:
        """A free slab of at least ``need`` bytes; waits for the daemon to release one (back-pressure)."""
        t0 = time.perf_counter()
        while True:
            free = [s for s in self._slabs if s.busy_txn is None]
            if free or len(self._slabs) < self.staging_slabs:
                break
            self._progress(0.05)
        waited = time.perf_counter() - t0
        if waited > 0.001:
            logger.info("save_async waited %.3f s for the daemon to release the staging slab (back-pressure)", waited)
        slab = next((s for s in free if s.size >= need), None) if free else None
        if slab is None:
            if free:
                victim = min(free, key=lambda s: s.size)
                self._slabs.remove(victim)
                staging.destroy_slab(victim)
                logger.info("state grew to %s; reallocating the staging slab", staging.describe_size(need))
            slab = staging.create_slab(int(need * staging.GROWTH) if free else need, self.rank)
            self._slabs.append(slab)
        return slab

    def save_async(self, step: int, metadata: dict[str, Any] | None = None) -> SaveHandle:
        """Snapshot this rank's share into shared memory, hand it to the daemon, and return.

        Collective: every rank must call it with the same step. Returns once the bytes are staged; the
        returned handle's ``wait()`` gives the committed path.
        """
        self._check_open()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if metadata is not None:
            try:
                json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metadata must be a JSON-able dict ({e})") from None
        t0 = time.perf_counter()
        if not self._daemon_healthy():
            self._link.reset()
            self._ensure_daemon()
        error: str | None = None
        slab: staging.Slab | None = None
        images: list[staging.FileImage] = []
        digests: dict[str, str | None] = {}
        full_states: dict[str, Any] = {}
        # The snapshot allocates many small objects; a cyclic GC pass in the middle of it is pure stall.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for p in self.plans:
                level = p.component.effective_validation
                if not p.writes and level == ValidationLevel.NONE:
                    continue
                try:
                    state = p.component.stateful.state_dict()
                except Exception as e:
                    raise CheckpointError(f"component {p.key!r}: state_dict() raised {type(e).__name__}: {e}") from e
                if level != ValidationLevel.NONE:
                    digests[p.key] = staging.replication_digest(state, p.key, level)
                if level == ValidationLevel.FULL:
                    full_states[p.key] = state
                if p.writes:
                    images += staging.component_images(p, state, self.max_shard_size, self._layouts)
            need = staging.layout(images)
            slab = self._acquire_slab(need)
            stats = staging.copy_into(slab, images, self._side_streams)
        except (fmt.FormatError, CheckpointError, OSError) as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - every rank must reach the collective, or the others hang
            logger.exception("staging failed on rank %d", self.rank)
            error = f"{type(e).__name__}: {e}"
        finally:
            if gc_was_enabled:
                gc.enable()
        t_staged = time.perf_counter()
        txn = secrets.token_hex(8)
        # The one collective of the save path: every rank learns that every rank staged, agrees on the
        # step and the transaction id, and compares replication digests.
        votes = self._all_gather((error, step, txn, digests))
        problem = _agree(votes, self.plans)
        if problem is None and any(p.component.effective_validation == ValidationLevel.FULL for p in self.plans):
            problem = self._compare_with_rank0(full_states)
        if problem is not None:
            if slab is not None:
                slab.busy_txn = None
            raise CheckpointError(f"save of step {step} failed before the hand-off: {problem}; nothing was written")
        txn = votes[0][2]
        assert slab is not None
        slab.busy_txn = txn
        handle = SaveHandle(step=step, txn=txn, client=self)
        self._inflight[txn] = handle
        req = self._stage_request(step, txn, slab, images, metadata)
        try:
            self._link.request(MsgType.STAGE, HEARTBEAT_TIMEOUT_S, stage=req)
        except CheckpointError as e:
            self._settle(txn, error=str(e))
            try:
                self._link.request(MsgType.ABORT, 5.0, txn=txn, reason=f"rank {self.rank}: {e}")
            except CheckpointError:
                pass
            raise CheckpointError(handle.error or str(e)) from None
        handle.staged_s = t_staged - t0
        handle.bytes_staged = stats.bytes
        logger.debug(
            "step %d staged %s in %.4f s (+%.4f s hand-off)",
            step,
            staging.describe_size(stats.bytes),
            t_staged - t0,
            time.perf_counter() - t_staged,
        )
        return handle

    def _compare_with_rank0(self, states: dict[str, Any]) -> str | None:
        """FULL validation: every tensor compared byte for byte against rank 0's, after the digests agreed
        (so every rank holds the same keys, shapes and dtypes and the broadcasts line up)."""
        if self._group is None:
            return None
        import torch.distributed as dist

        differ: list[str] = []
        for key in sorted(states):
            for leaf in fmt.flatten_state(states[key], key)[1]:
                mine = leaf.tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                theirs = mine.clone() if self.rank == 0 else torch.empty_like(mine)
                dist.broadcast(theirs, src=0, group=self._group)
                if self.rank != 0 and not torch.equal(mine, theirs):
                    differ.append(leaf.path)
        verdicts = self._all_gather(differ[:5])
        bad = [f"rank {r}: {', '.join(v)}" for r, v in enumerate(verdicts) if v]
        if bad:
            return f"REPLICATED state differs from rank 0 element-wise (validation level full): {'; '.join(bad)}"
        return None

    def _stage_request(
        self,
        step: int,
        txn: str,
        slab: staging.Slab,
        images: list[staging.FileImage],
        metadata: dict[str, Any] | None,
    ) -> proto.StageRequest:
        topo = self.topology
        node_ranks = topo.node_ranks(topo.node)
        commit = None
        if self.rank == node_ranks[0]:
            commit = proto.CommitInfo(
                components=[planning.component_spec(p, topo) for p in self.plans],
                topology=topo.describe(),
                metadata=dict(metadata or {}),
                pytorch_version=torch.__version__,
                save_total_limit=self.save_total_limit,
            )
        return proto.StageRequest(
            txn=txn,
            output_dir=str(self.output_dir),
            step=step,
            rank=self.rank,
            world_size=topo.world_size,
            expected_ranks=node_ranks,
            timeout_s=self.timeout_s,
            pid=os.getpid(),
            segment=slab.name,
            segment_size=slab.size,
            files=[img.spec() for img in images],
            commit=commit,
        )

    def wait(self, timeout: float | None = None) -> list[Path]:
        """Block until every save in flight has committed; raises CheckpointError if any aborted."""
        handles = list(self._inflight.values())
        errors = []
        paths = []
        for h in handles:
            try:
                paths.append(h.wait(timeout))
            except CheckpointError as e:
                errors.append(str(e))
        if errors:
            raise CheckpointError("; ".join(errors))
        return paths

    # -- load -----------------------------------------------------------------------------------------

    def load(
        self,
        checkpoint: str | os.PathLike | None | bool = "latest",
        *,
        strict: bool = True,
        verify: bool | None = None,
        fallback: bool = True,
    ) -> Path | None:
        """Restore every component from a committed checkpoint; returns its path, or None for a fresh start.

        ``checkpoint`` is "latest", a checkpoint path, or None/False. With "latest", a checkpoint that fails
        verification is skipped with a warning and the next newest is tried (``fallback``). Sizes are always
        checked; checksums too unless ``verify=False`` (an extra pass over the bytes at ~17 GiB/s).
        """
        self._check_open()
        if checkpoint is None or checkpoint is False:
            return None
        if checkpoint is True:
            checkpoint = "latest"
        if self._inflight:
            self.wait()
        verify = self.verify_on_load if verify is None else verify
        local_error = None
        try:
            cands, may_fall_back = loader.candidates(self.output_dir, checkpoint)
        except CheckpointError as e:
            cands, may_fall_back, local_error = [], False, str(e)
        votes = self._all_gather((local_error, [str(c) for c in cands]))
        for r, (err, _) in enumerate(votes):
            if err:
                raise CheckpointError(f"rank {r}: {err}")
        if any(v[1] != votes[0][1] for v in votes):
            raise CheckpointError(
                f"ranks see different checkpoints under {self.output_dir}; output_dir must be shared by every rank"
            )
        if not cands:
            logger.info("no committed checkpoint under %s; starting fresh", self.output_dir)
            return None
        failures = []
        for ckpt in cands:
            t0 = time.perf_counter()
            verdict: tuple[str, str] | None = None
            result = None
            try:
                result = loader.read_share(ckpt, self.plans, self.topology, strict, verify)
            except loader.VerificationFailed as e:
                verdict = ("verify", str(e))
            except CheckpointError as e:
                verdict = ("fatal", str(e))
            except Exception as e:  # noqa: BLE001 - reported to every rank so none is left waiting
                verdict = ("fatal", f"{type(e).__name__}: {e}")
            votes = self._all_gather(verdict)
            fatal = [(r, v[1]) for r, v in enumerate(votes) if v and v[0] == "fatal"]
            if fatal:
                raise CheckpointError("; ".join(f"rank {r}: {m}" for r, m in fatal))
            bad = [(r, v[1]) for r, v in enumerate(votes) if v]
            if not bad:
                assert result is not None
                self._apply(ckpt, result)
                logger.info(
                    "loaded %s (%s in %.3f s)", ckpt, staging.describe_size(result.bytes_read), time.perf_counter() - t0
                )
                return ckpt
            msg = "; ".join(f"rank {r}: {m}" for r, m in bad)
            failures.append(f"{ckpt.name}: {msg}")
            if not (fallback and may_fall_back):
                raise CheckpointError(f"{ckpt} failed verification: {msg}; run 'ckptd verify {ckpt}'")
            text = f"{ckpt} failed verification ({msg}); falling back to the next newest checkpoint"
            logger.warning("%s", text)
            warnings.warn(text, RuntimeWarning, stacklevel=2)
        raise CheckpointError(
            f"no committed checkpoint under {self.output_dir} could be loaded: {' | '.join(failures)}; "
            "run 'ckptd verify' on them, or start fresh with load(None)"
        )

    def _apply(self, ckpt: Path, result: loader.ReadResult) -> None:
        for p in self.plans:
            if p.key not in result.states:
                continue
            try:
                p.component.stateful.load_state_dict(result.states[p.key])
            except Exception as e:
                raise CheckpointError(
                    f"{ckpt}: component {p.key!r}: load_state_dict failed ({type(e).__name__}: {e}); "
                    "the checkpoint does not match the object it is loaded into"
                ) from e

    # -- lifecycle ------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointClient is closed; create a new one")

    def close(self, wait: bool = True) -> None:
        """Finish (or, with wait=False, abandon to the daemon) the saves in flight and free the slabs."""
        if self._closed:
            return
        if wait:
            try:
                self.wait()
            except CheckpointError as e:
                logger.error("a save failed before close: %s", e)
        self._closed = True
        try:
            self._link.request(MsgType.BYE, 2.0, pid=os.getpid())
        except CheckpointError:
            pass
        for slab in self._slabs:
            staging.destroy_slab(slab)
        self._slabs.clear()
        self._link.close()

    def __enter__(self) -> CheckpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_slabs", None):
            for slab in self._slabs:
                try:
                    os.unlink(os.path.join(staging.SHM_DIR, slab.name))
                except OSError:
                    pass


def _agree(votes: list[Any], plans: list[planning.ComponentPlan]) -> str | None:
    errors = [f"rank {r}: {v[0]}" for r, v in enumerate(votes) if v[0]]
    if errors:
        return "; ".join(errors)
    steps = {v[1] for v in votes}
    if len(steps) != 1:
        return f"ranks passed different steps {sorted(steps)}; save_async must be called with the same step everywhere"
    for p in plans:
        if p.component.effective_validation == ValidationLevel.NONE:
            continue
        ref = votes[0][3].get(p.key)
        differ = [r for r, v in enumerate(votes) if v[3].get(p.key) != ref]
        if differ:
            return (
                f"REPLICATED component {p.key!r} differs from rank 0 on rank(s) {differ} "
                f"(validation level {p.component.effective_validation.value}); the replicas have diverged"
            )
    return None


def _make_sync_group() -> Any:
    """A gloo group of our own, so the snapshot collective never interleaves with the trainer's NCCL."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")
