"""PyTorch Lightning: a ``CheckpointIO`` plugin whose checkpoints are ckptd's (``pip install 'ckptd[lightning]'``).

``Trainer(plugins=[CkptdCheckpointIO("runs/pl")])``: every checkpoint Lightning saves (``ModelCheckpoint``,
``trainer.save_checkpoint``) becomes a ``save_async``: the loop stalls for the staging copy only, and the
daemon commits ``runs/pl/checkpoints/checkpoint-<global_step>``. The checkpoint dict is stored as two
components: ``model`` (its ``state_dict``, as Hugging Face shards) and ``trainer`` (everything else:
optimizer and scheduler states, loops, callbacks, hyperparameters; tensors and plain values only, no
pickle).

Lightning keeps its own file bookkeeping (top-k, ``last.ckpt``, ``ckpt_path="last"``), so at each path it
asks for, the plugin writes a small pointer file (JSON naming the ckptd checkpoint) instead of a pickle.
``load_checkpoint(path)`` follows the pointer and rebuilds the dict; ``remove_checkpoint(path)`` removes the
pointer and, once no pointer names it and its save has committed, the ckptd checkpoint (renamed out of
sight first, as retention does). Two saves at one global step (a top-k file and ``last.ckpt``) share one
checkpoint.

Single process (one device, or CPU) only for now: Lightning calls a ``CheckpointIO`` on global rank 0
alone, while a ckptd save is collective over every rank, so under DDP the plugin refuses to start rather
than hang.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import CheckpointIO

from ckptd import format as fmt
from client.client import CheckpointClient
from client.components import CheckpointError, SharingPattern, StateComponent

logger = logging.getLogger(__name__)

POINTER_KIND = "ckptd-pointer"
MAX_POINTER_BYTES = 64 * 1024


class _Part:
    """One component's share of the checkpoint dict being saved (set just before each save)."""

    def __init__(self) -> None:
        self.state: Any = None

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


class CkptdCheckpointIO(CheckpointIO):
    """Lightning checkpoints saved asynchronously by ckptd (see the module docs).

    Args:
        output_dir: the ckptd output dir the checkpoints are committed in.
        **client_options: more ``CheckpointClient`` keyword arguments (``endpoint``, ``timeout_s``, ...).

    Example:
        >>> trainer = lightning.pytorch.Trainer(plugins=[CkptdCheckpointIO("runs/pl")])  # doctest: +SKIP
        >>> trainer.fit(model, ckpt_path="last")  # doctest: +SKIP
    """

    def __init__(self, output_dir: str | os.PathLike, **client_options: Any) -> None:
        super().__init__()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise CheckpointError(
                "CkptdCheckpointIO runs in a single process only: Lightning calls it on global rank 0 alone, and "
                "a ckptd save is collective over every rank; under DDP use CheckpointClient in the LightningModule"
            )
        self.output_dir = Path(os.path.abspath(output_dir))
        self.client_options = client_options
        self._model, self._rest = _Part(), _Part()
        self._client: CheckpointClient | None = None
        self._handles: dict[int, Any] = {}  # global step -> the save handle (the newest per step)
        self._pointers: dict[Path, Path] = {}  # every pointer this plugin wrote -> the checkpoint it names
        self._previous: dict[Path, Path | None] = {}  # a pointer whose save is in flight -> what it named before

    @property
    def client(self) -> CheckpointClient:
        if self._client is None:
            components = [
                StateComponent(fmt.MODEL_KEY, self._model, SharingPattern.GLOBAL),
                StateComponent("trainer", self._rest, SharingPattern.GLOBAL),
            ]
            self._client = CheckpointClient(self.output_dir, components, **self.client_options)
        return self._client

    def _final(self, step: int) -> Path:
        return fmt.checkpoints_root(self.output_dir) / fmt.checkpoint_dirname(step)

    def _settle_pointers(self) -> None:
        """Pointers whose save has since failed name what they named before (or go): a ``last.ckpt`` never
        names a save that aborted. (After a crash, ``load_checkpoint`` falls back instead.)"""
        for path, before in list(self._previous.items()):
            target = self._pointers.get(path)
            step = fmt.parse_checkpoint_dirname(target.name) if target is not None else None
            handle = self._handles.get(step) if step is not None else None
            if handle is None or not handle.done():
                continue
            del self._previous[path]
            if handle.error is None:
                continue
            logger.warning("the save behind %s failed (%s); it names %s again", path, handle.error, before)
            self._handles.pop(step, None)  # a later save at that step is retried
            if before is None:
                path.unlink(missing_ok=True)
                self._pointers.pop(path, None)
            else:
                _write_pointer(path, before)
                self._pointers[path] = before

    def _owned(self, target: Path) -> bool:
        """Whether ``target`` is a checkpoint of this plugin's output dir (the only ones it may remove)."""
        root = Path(os.path.realpath(fmt.checkpoints_root(self.output_dir)))
        return Path(os.path.realpath(target.parent)) == root and fmt.parse_checkpoint_dirname(target.name) is not None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Hand the checkpoint to the daemon (returns once it is staged) and write the pointer at ``path``."""
        if storage_options is not None:
            raise TypeError(f"CkptdCheckpointIO takes no storage_options, got {storage_options!r}")
        self._settle_pointers()
        step = int(checkpoint.get("global_step", 0))
        if step not in self._handles:
            self._model.state = checkpoint.get("state_dict", {})
            self._rest.state = {k: v for k, v in checkpoint.items() if k != "state_dict"}
            try:
                self._handles[step] = self.client.save_async(step, metadata={"lightning_path": str(path)})
            finally:
                self._model.state = self._rest.state = None  # the slab holds the snapshot now
        # Written now, so that a crash right after the hand-off still leaves it (load falls back if that save
        # never committed); if the save fails while this process lives, it names its old target again.
        path = Path(path)
        try:
            before: Path | None = _read_pointer(path) if path.exists() else None
        except CheckpointError:
            before = None
        _write_pointer(path, self._final(step))
        self._pointers[path] = self._final(step)
        self._previous.setdefault(path, before)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint dict of the ckptd checkpoint the pointer at ``path`` names (its save committed)."""
        self._settle_pointers()
        target = _read_pointer(Path(path))
        step = fmt.parse_checkpoint_dirname(target.name)
        handle = self._handles.get(step) if step is not None else None
        if handle is not None:
            handle.wait()
        if not target.is_dir() and step is not None:
            # Its save never committed (the process died right after the hand-off, or it aborted): the newest
            # committed checkpoint before it, with a warning, as load("latest") falls back.
            older = [
                c for c in fmt.list_checkpoints(target.parent.parent) if fmt.parse_checkpoint_dirname(c.name) <= step
            ]
            if not older:
                raise CheckpointError(f"{path} names {target}, which was never committed, and no earlier one exists")
            logger.warning("%s names %s, which was never committed; loading %s instead", path, target, older[-1])
            target = older[-1]
        model, rest = _Part(), _Part()
        reader = CheckpointClient(
            target.parent.parent,
            [StateComponent(fmt.MODEL_KEY, model, SharingPattern.GLOBAL), StateComponent("trainer", rest, "global")],
            read_only=True,
        )
        with reader:
            reader.load(target)
        if not isinstance(rest.state, dict):
            raise CheckpointError(f"{target}: its 'trainer' component is not a Lightning checkpoint dict")
        return {**rest.state, "state_dict": model.state}

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the pointer at ``path`` and, once nothing else points at it, its committed checkpoint."""
        self._settle_pointers()
        path = Path(path)
        try:
            target = _read_pointer(path)
        except CheckpointError:
            target = None
        path.unlink(missing_ok=True)
        self._pointers.pop(path, None)
        self._previous.pop(path, None)
        if target is None or not self._owned(target):
            return  # only a checkpoint of this output dir is ever removed
        if any(t == target for t in self._pointers.values()):
            return  # another pointer (of any ModelCheckpoint) still names it
        if any(p.is_file() and _points_at(p, target) for p in path.parent.glob("*")):
            return
        step = fmt.parse_checkpoint_dirname(target.name)
        try:
            mark = fmt.read_best_mark(self.output_dir)
        except fmt.FormatError:
            return  # an unreadable mark protects nothing by name: remove nothing
        if mark is not None and mark.step == step:
            return  # the best checkpoint stays, as with ckptd's own retention
        handle = self._handles.pop(step, None) if step is not None else None
        if handle is not None:
            try:
                handle.wait()
            except CheckpointError:
                return  # never committed: nothing to remove
        trash = target.parent / fmt.trash_dirname(step or 0, secrets.token_hex(4))
        try:
            os.rename(target, trash)  # out of sight at once; a crash leaves trash that sweeps remove
        except FileNotFoundError:
            return  # gone already (the daemon's retention)
        shutil.rmtree(trash, ignore_errors=True)

    def teardown(self) -> None:
        """Every save committed (or raises CheckpointError), then the client closed."""
        if self._client is not None:
            try:
                self._client.wait()
            finally:
                self._settle_pointers()
                self._client.close()
                self._client = None


def _write_pointer(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    tmp.write_text(json.dumps({"kind": POINTER_KIND, "checkpoint": str(target)}) + "\n")
    os.replace(tmp, path)


def _read_pointer(path: Path) -> Path:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_POINTER_BYTES + 1)
        raw = json.loads(data) if len(data) <= MAX_POINTER_BYTES else None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a ckptd checkpoint pointer ({e})") from None
    if not isinstance(raw, dict) or raw.get("kind") != POINTER_KIND or not isinstance(raw.get("checkpoint"), str):
        raise CheckpointError(
            f"{path}: not a ckptd checkpoint pointer (a Lightning .ckpt of another CheckpointIO?); load it without "
            "CkptdCheckpointIO"
        )
    return Path(raw["checkpoint"])


def _points_at(path: Path, target: Path) -> bool:
    try:
        return _read_pointer(path) == target
    except CheckpointError:
        return False
