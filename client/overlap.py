"""Overlapped staging: the large tensors only ``optimizer.step()`` changes are copied after ``save_async``
returns, while the next forward and backward run; the optimizer's next ``step()`` waits for that copy.

Why it is safe (DESIGN §7): a checkpoint must hold exactly the values at the ``save_async`` call. The
parameters and the optimizer's state tensors change only inside ``optimizer.step()`` (forward and backward
read them; gradients live elsewhere), so copying them any time before the next ``step()`` copies the same
bytes. Everything else (buffers that forward mutates, such as BatchNorm's running stats; RNG state;
counters; anything that does not share memory with an optimizer's parameters or state; small tensors) is
copied before ``save_async`` returns. A pre-step hook on every optimizer blocks until the copy is done, and
the part is handed to the daemon only then, so no byte the daemon writes can come from after the save.

A tensor is "owned by an optimizer" when it shares storage with one of its parameters or state tensors;
that is decided at every save, so optimizer state created later (AdamW's moments, at the first step) counts
from the next save on. The optimizers are found among the components (a ``torch.optim.Optimizer``, or one
held in an attribute of a component's stateful) at every save, so an optimizer replaced on its stateful is
hooked before it can step into a copy; or they are given as ``CheckpointClient(..., optimizers=[...])``.

What breaks the premise, and what is done about it:

* modules that write their parameters in ``forward``: ``nn.Embedding`` / ``nn.EmbeddingBag`` with
  ``max_norm`` renormalise the rows they look up in place. Their weights are never deferred.
* anything else that writes a deferred tensor in place between ``save_async`` and the hand-off (a
  ``p.data.copy_`` in the loop, a ``load_state_dict``, a user pre-step hook that runs before ours): every
  deferred tensor's version counter is compared at the hand-off with its value at ``save_async``. A change
  fails that save (it may hold values from after the save; nothing is committed) and turns overlapped
  staging off for the rest of the client's life, with an error naming the tensor.

The hand-off normally happens on the trainer's thread (the pre-step hook, or any client call). A loop that
makes neither for a long time after a save (an evaluation) would let the save's deadline pass, so the copy
thread hands the part off itself once the save is within ``late_margin`` of its deadline.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from client import sharding

logger = logging.getLogger(__name__)


LATE_MARGIN_S = 30.0  # the copy thread hands a part off itself this long before the save's deadline


class BackgroundCopy:
    """One save's deferred copies, running on a thread of their own (copy_ releases the GIL).

    Args:
        pairs: ``(destination view, source, big)`` per deferred tensor.
        names: the sources' names (for errors), in the same order.
        side_streams, pinned: as for ``staging.copy_pairs``.
        hand_off_at: ``time.time()`` from which the copy thread hands off itself (may be set later).
        late_hand_off: called on the copy thread, every 0.5 s from ``hand_off_at`` on, until ``handed`` is
            set: it hands the part off if it can (which sets ``handed``).
    """

    def __init__(
        self,
        pairs: list[tuple[torch.Tensor, torch.Tensor, bool]],
        names: list[str],
        side_streams: dict[int, Any],
        pinned: bool,
        hand_off_at: float | None = None,
        late_hand_off: Callable[[], None] | None = None,
    ) -> None:
        from client import staging

        self.nbytes = sum(dst.nbytes for dst, _, _ in pairs)
        # In-place writes bump a tensor's version counter: compared at the hand-off (see the module doc).
        self._versions = [(name, src, src._version) for name, (_, src, _) in zip(names, pairs, strict=True)]
        self._error: str | None = None
        self._done = threading.Event()
        self.handed = threading.Event()  # set once the part is handed off, settled or abandoned
        self.hand_off_at = hand_off_at  # time.time() from which the copy thread hands off (set after the vote)

        def run() -> None:
            try:
                staging.copy_pairs(pairs, side_streams, pinned)
            except Exception as e:  # noqa: BLE001 - reported by join(), the save then aborts
                logger.exception("the background copy of a save failed")
                self._error = f"{type(e).__name__}: {e}"
            finally:
                self._done.set()
            if late_hand_off is None:
                return
            while not self.handed.wait(0.5):
                at = self.hand_off_at
                if at is not None and time.time() >= at:
                    try:
                        late_hand_off()
                    except Exception:  # noqa: BLE001 - the trainer's thread hands it off (or settles it) later
                        logger.exception("the copy thread could not hand the part off")
                        return

        self._thread = threading.Thread(target=run, name="ckptd-overlap-copy", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._done.is_set()

    def join(self) -> str | None:
        """Wait for the copy (not for the thread, which may be the caller); returns why it failed, or None."""
        self._done.wait()
        return self._error

    def written_meanwhile(self) -> list[str]:
        """The deferred tensors written in place since ``save_async`` (their values may be from after it)."""
        return [name for name, src, version in self._versions if src._version != version]

    def stop(self) -> None:
        """Let the thread end (its late hand-off is no longer wanted) and wait for it."""
        self.handed.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


@dataclass
class PendingHandOff:
    """A save whose bytes are still being copied: handed to the daemon once the copy is done."""

    handle: Any  # client.SaveHandle
    request: Any  # protocol.StageRequest
    copying: BackgroundCopy


def find_optimizers(components: list[Any]) -> list[torch.optim.Optimizer]:
    """The optimizers among the components: a stateful that is one, or holds one in an attribute."""
    found: list[torch.optim.Optimizer] = []

    def add(x: Any) -> None:
        if isinstance(x, torch.optim.Optimizer) and not any(x is o for o in found):
            found.append(x)

    for c in components:
        add(c.stateful)
        for value in getattr(c.stateful, "__dict__", {}).values():
            add(value)
    return found


def _storage_key(t: torch.Tensor) -> tuple[Any, int] | None:
    t = sharding.local_tensor(t)
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


class Overlap:
    """Overlapped staging of one client: the optimizers' pre-step hooks, and the save awaiting hand-off.

    Example:
        >>> ov = Overlap.for_components(client, components, None)  # None when no optimizer is declared
    """

    def __init__(
        self, client: Any, optimizers: list[torch.optim.Optimizer], components: list[Any] | None = None
    ) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self.pending: PendingHandOff | None = None
        self.running: BackgroundCopy | None = None  # the newest copy thread, pending or not
        self.off_because: str | None = None  # set when a deferred tensor was written before its hand-off
        self._components = components  # None: the optimizers were given, never looked for again
        ref = weakref.ref(client)

        def before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            c = ref()
            if c is not None:
                c._overlap_before_step()

        self._before_step = before_step
        self._hooks: list[Any] = []
        self._hook(optimizers)

    def _hook(self, optimizers: list[torch.optim.Optimizer]) -> None:
        for o in optimizers:
            if not any(o is h for h in self.optimizers):
                self.optimizers.append(o)
                self._hooks.append(o.register_step_pre_hook(self._before_step))

    @classmethod
    def for_components(cls, client: Any, components: list[Any], optimizers: list[Any] | None) -> Overlap | None:
        """Overlap for these components, or None when no optimizer owns any of their tensors."""
        found = list(optimizers) if optimizers is not None else find_optimizers(components)
        for o in found:
            if not isinstance(o, torch.optim.Optimizer):
                raise TypeError(f"optimizers must be torch.optim.Optimizer instances, got {type(o).__name__}")
        if not found:
            return None
        logger.info("overlapped staging on: %d optimizer(s) hooked", len(found))
        return cls(client, found, components if optimizers is None else None)

    def deferrable(self) -> Callable[[torch.Tensor], bool] | None:
        """Whether a tensor to stage shares memory with a parameter or state tensor of an optimizer (as of
        now): only ``step()`` changes it, so it may be copied after ``save_async`` returns. None once
        overlapped staging is off."""
        if self.off_because is not None:
            return None
        current = self.optimizers
        if self._components is not None:
            current = find_optimizers(self._components)
            self._hook(current)  # an optimizer replaced on its stateful: hooked before it can step
        owned: set[tuple[Any, int]] = set()
        for o in current:
            for group in o.param_groups:
                for p in group["params"]:
                    key = _storage_key(p)
                    if key is not None:
                        owned.add(key)
            for state in o.state.values():
                for v in state.values() if isinstance(state, dict) else ():
                    if isinstance(v, torch.Tensor):
                        key = _storage_key(v)
                        if key is not None:
                            owned.add(key)

        owned -= self._written_by_forward()

        def defer(src: torch.Tensor) -> bool:
            key = _storage_key(src)
            return key is not None and key in owned

        return defer

    def _written_by_forward(self) -> set[tuple[Any, int]]:
        """Storages of parameters that a module of the components writes in its forward."""
        out: set[tuple[Any, int]] = set()
        for c in self._components or []:
            if not isinstance(c.stateful, torch.nn.Module):
                continue
            for m in c.stateful.modules():
                if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.max_norm is not None:
                    key = _storage_key(m.weight)
                    if key is not None:
                        out.add(key)
        return out

    def start_copy(
        self,
        pairs: list[tuple[torch.Tensor, torch.Tensor, bool]],
        names: list[str],
        side_streams: dict[int, Any],
        pinned: bool,
        hand_off_at: float | None = None,
        late_hand_off: Callable[[], None] | None = None,
    ) -> BackgroundCopy:
        self.running = BackgroundCopy(pairs, names, side_streams, pinned, hand_off_at, late_hand_off)
        return self.running

    def close(self) -> None:
        """Remove the hooks and wait for the copy thread (its slab is about to be unmapped), whether or not
        its save is still pending (an interrupted hand-off leaves it running)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.running is not None:
            self.running.stop()
