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
held in an attribute of a component's stateful), or given as ``CheckpointClient(..., optimizers=[...])``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from client import sharding

logger = logging.getLogger(__name__)


class BackgroundCopy:
    """One save's deferred copies, running on a thread of their own (copy_ releases the GIL)."""

    def __init__(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor, bool]], side_streams: dict[int, Any], pinned: bool
    ) -> None:
        from client import staging

        self.nbytes = sum(dst.nbytes for dst, _, _ in pairs)
        self._error: str | None = None
        self._done = threading.Event()

        def run() -> None:
            try:
                staging.copy_pairs(pairs, side_streams, pinned)
            except Exception as e:  # noqa: BLE001 - reported by join(), the save then aborts
                logger.exception("the background copy of a save failed")
                self._error = f"{type(e).__name__}: {e}"
            finally:
                self._done.set()

        self._thread = threading.Thread(target=run, name="ckptd-overlap-copy", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._done.is_set()

    def join(self) -> str | None:
        """Wait for the copy; returns why it failed, or None."""
        self._thread.join()
        return self._error


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

    def __init__(self, client: Any, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.pending: PendingHandOff | None = None
        ref = weakref.ref(client)

        def before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            c = ref()
            if c is not None:
                c._finish_overlap(block=True)

        self._hooks = [o.register_step_pre_hook(before_step) for o in optimizers]

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
        return cls(client, found)

    def deferrable(self) -> Callable[[torch.Tensor], bool]:
        """Whether a tensor to stage shares memory with a parameter or state tensor of an optimizer (as of
        now): only ``step()`` changes it, so it may be copied after ``save_async`` returns."""
        owned: set[tuple[Any, int]] = set()
        for o in self.optimizers:
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

        def defer(src: torch.Tensor) -> bool:
            key = _storage_key(src)
            return key is not None and key in owned

        return defer

    def start_copy(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor, bool]], side_streams: dict[int, Any], pinned: bool
    ) -> BackgroundCopy:
        return BackgroundCopy(pairs, side_streams, pinned)

    def close(self) -> None:
        """Remove the hooks and wait for a copy still running (its slab is about to be unmapped)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.pending is not None:
            self.pending.copying.join()
