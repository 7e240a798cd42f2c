"""Hugging Face ``transformers``: a ``Trainer`` whose checkpoints are ckptd's (``pip install 'ckptd[hf]'``).

``CkptdTrainer`` is a drop-in ``transformers.Trainer``. Where the Trainer would write ``checkpoint-N/``
synchronously (model, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``), it
calls ``save_async`` and goes on training: the daemon writes and commits the checkpoint, the loop stalls
for the staging copy only. The save schedule stays the Trainer's own (``save_strategy``, ``save_steps``);
``save_total_limit`` and ``metric_for_best_model`` become ckptd's retention and best mark.

``trainer.train(resume_from_checkpoint=True)`` resumes from ckptd's newest committed checkpoint (a fresh
start when there is none, instead of the Trainer's error), through the Trainer's own resume path: the
trainer state it restores is the checkpoint's, so its data skipping and RNG restore work unchanged.
``trainer.save_model(dest)`` is ``client.save_model``: a Hugging Face directory with ``config.json`` that
``from_pretrained`` loads, committed atomically by the daemon.

The components (keys ``model``, ``optimizer``, ``scheduler``, ``trainer_state``, ``rng``) are REPLICATED
(``rng`` PER_RANK), as a DDP run holds them; ``ckptd ls`` / ``ckptd export`` work on the checkpoints.

Example::

    from client.integrations.hf import CkptdTrainer

    trainer = CkptdTrainer(model=model, args=TrainingArguments("runs/hf", save_steps=500), train_dataset=ds)
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model("runs/hf/final")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import transformers

from ckptd import format as fmt
from client.client import CheckpointClient
from client.components import RNGState, SharingPattern, StateComponent

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"


class _TrainerAttr:
    """The state of ``trainer.<name>`` (the model, optimizer or scheduler the Trainer holds at save time)."""

    def __init__(self, trainer: transformers.Trainer, name: str) -> None:
        self.trainer, self.name = trainer, name

    @property
    def module(self) -> Any:
        return getattr(self.trainer, self.name)  # what components.hf_config reads the model's config from

    def state_dict(self) -> Any:
        return getattr(self.trainer, self.name).state_dict()

    def load_state_dict(self, state: Any) -> None:
        getattr(self.trainer, self.name).load_state_dict(state)


class _TrainerStateJSON:
    """``trainer.state`` as the JSON the Trainer would write; loaded, it is kept for the resume's
    ``trainer_state.json``."""

    def __init__(self, trainer: transformers.Trainer) -> None:
        self.trainer = trainer
        self.loaded: Any = None

    def state_dict(self) -> Any:
        # What TrainerState.save_to_json writes (NaN included: json.dumps allows it, and so does the tree).
        return json.loads(json.dumps(dataclasses.asdict(self.trainer.state)))

    def load_state_dict(self, state: Any) -> None:
        self.loaded = state


class _DeferredRNG:
    """The RNGs, restored when the Trainer restores them (after skipping the resumed epoch's batches)."""

    def __init__(self) -> None:
        self.rng = RNGState()
        self.loaded: Any = None

    def state_dict(self) -> Any:
        return self.rng.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.loaded = state

    def apply(self) -> None:
        if self.loaded is not None:
            self.rng.load_state_dict(self.loaded)


class CkptdTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that checkpoints through ckptd (see the module docs).

    Args:
        *args, **kwargs: as for ``transformers.Trainer``.
        ckptd_output_dir: the ckptd output dir (default: ``args.output_dir``).
        ckptd_options: more ``CheckpointClient`` keyword arguments (``endpoint``, ``timeout_s``, ...).

    Example:
        >>> trainer = CkptdTrainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        *args: Any,
        ckptd_output_dir: str | os.PathLike | None = None,
        ckptd_options: dict | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.ckptd_output_dir = Path(ckptd_output_dir or self.args.output_dir)
        self.ckptd_options = dict(ckptd_options or {})
        self._ckptd: CheckpointClient | None = None
        self._trainer_state = _TrainerStateJSON(self)
        self._rng = _DeferredRNG()
        self._resume_path: Path | None = None  # the ckptd checkpoint being resumed from
        self._shim: str | None = None  # the temp dir holding its trainer_state.json for the Trainer

    # -- the client ------------------------------------------------------------------------------------

    @property
    def ckptd(self) -> CheckpointClient:
        """The CheckpointClient (made at the first save or resume: it needs the optimizer the Trainer made)."""
        if self._ckptd is None:
            args = self.args
            best = args.metric_for_best_model
            if best is not None and not best.startswith("eval_"):
                best = f"eval_{best}"
            components = [
                StateComponent("model", _TrainerAttr(self, "model"), SharingPattern.REPLICATED),
                StateComponent("optimizer", _TrainerAttr(self, "optimizer"), SharingPattern.REPLICATED),
                StateComponent("scheduler", _TrainerAttr(self, "lr_scheduler"), SharingPattern.REPLICATED),
                StateComponent("trainer_state", self._trainer_state, SharingPattern.REPLICATED),
                StateComponent("rng", self._rng, SharingPattern.PER_RANK),
            ]
            options = {
                "save_total_limit": args.save_total_limit,
                "best_metric": best,
                "greater_is_better": bool(args.greater_is_better),
                **self.ckptd_options,
            }
            self._ckptd = CheckpointClient(self.ckptd_output_dir, components, **options)
        return self._ckptd

    # -- saving ----------------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's synchronous checkpoint, as one ``save_async``: returns once the state is staged."""
        self.store_flos()
        # As the Trainer does before writing trainer_state.json: the exportable callbacks' state (early
        # stopping's patience, TrainerControl) is the one of now, so that a resume restores it.
        from transformers.trainer_callback import ExportableState

        for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()
        metrics = {}
        for entry in reversed(self.state.log_history):
            if any(k.startswith("eval_") for k in entry):
                metrics = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k.startswith("eval_")}
                break
        self.ckptd.save_async(self.state.global_step, metadata=metrics)
        if self.state.best_global_step:
            # What the Trainer records for load_best_model_at_end (committed by the time it is loaded).
            best = fmt.checkpoints_root(self.ckptd_output_dir) / fmt.checkpoint_dirname(self.state.best_global_step)
            self.state.best_model_checkpoint = str(best)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the model (only) of the best checkpoint, once every save has committed."""
        assert self.state.best_model_checkpoint is not None
        self.ckptd.wait()
        reader = CheckpointClient(
            self.ckptd_output_dir,
            [StateComponent("model", _TrainerAttr(self, "model"), SharingPattern.REPLICATED)],
            read_only=True,
            **{k: v for k, v in self.ckptd_options.items() if k == "endpoint"},
        )
        with reader:
            logger.info("loading the best model from %s", reader.load(self.state.best_model_checkpoint))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model alone as a Hugging Face directory (``client.save_model``), committed before it returns."""
        dest = output_dir or self.args.output_dir
        self.ckptd.save_model(dest, step=self.state.global_step).wait()

    # -- resuming --------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint`` True (or ``"latest"``) resumes from ckptd's newest
        committed checkpoint if there is one, a path from that checkpoint."""
        path = None
        if resume_from_checkpoint is True or resume_from_checkpoint == "latest":
            path = self._newest_intact()
            if path is None:
                logger.info("no ckptd checkpoint in %s: starting fresh", self.ckptd_output_dir)
        elif resume_from_checkpoint:
            path = Path(resume_from_checkpoint)
        if path is None:
            return self._train_and_wait(None, kwargs)
        self._resume_path = path
        # The Trainer reads trainer_state.json from the directory it resumes from before it makes the
        # optimizer; the checkpoint's own trainer state is written to a temp dir for that read only.
        self._shim = tempfile.mkdtemp(prefix="ckptd-hf-resume-")
        try:
            state = self._read_trainer_state(path)
            Path(self._shim, TRAINER_STATE_NAME).write_text(json.dumps(state))
            return self._train_and_wait(self._shim, kwargs)
        finally:
            shutil.rmtree(self._shim, ignore_errors=True)
            self._shim = None

    def _newest_intact(self) -> Path | None:
        """The newest committed checkpoint whose files all verify, as ``load("latest")`` falls back: the trainer
        state handed to the Trainer and the model and optimizer loaded later then come from the same one."""
        for path in reversed(fmt.list_checkpoints(self.ckptd_output_dir)):
            result = fmt.verify_checkpoint(path)
            if result:
                return path
            warnings.warn(
                f"{path} failed verification ({'; '.join(result.problems[:2])}); falling back to the next newest "
                "checkpoint",
                RuntimeWarning,
                stacklevel=3,
            )
        return None

    def _train_and_wait(self, resume: str | None, kwargs: dict) -> Any:
        out = super().train(resume_from_checkpoint=resume, **kwargs)
        if self._ckptd is not None:
            self._ckptd.wait()  # every save of this run committed (or raises CheckpointError)
        return out

    def _read_trainer_state(self, path: Path) -> Any:
        holder = _TrainerStateJSON(self)
        reader = CheckpointClient(
            self.ckptd_output_dir,
            [StateComponent("trainer_state", holder, SharingPattern.REPLICATED)],
            read_only=True,
            **{k: v for k, v in self.ckptd_options.items() if k == "endpoint"},
        )
        with reader:
            reader.load(path)
        return holder.loaded

    def _resuming_from_ckptd(self, checkpoint: str | None) -> bool:
        return checkpoint is not None and self._shim is not None and os.path.samefile(checkpoint, self._shim)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self._resuming_from_ckptd(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        # else: the model is loaded with the rest, once the optimizer exists (_load_optimizer_and_scheduler)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self._resuming_from_ckptd(checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)
        assert self._resume_path is not None
        loaded = self.ckptd.load(self._resume_path)
        logger.info("resumed from %s", loaded)

    def _load_scaler(self, checkpoint: str | None) -> None:
        if not self._resuming_from_ckptd(checkpoint):
            super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if not self._resuming_from_ckptd(checkpoint):
            return super()._load_rng_state(checkpoint)
        self._rng.apply()
