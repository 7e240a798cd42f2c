"""What a training rank declares: its state components, how each is shared, and the errors it sees."""

from __future__ import annotations

import enum
import logging
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ckptd import format as fmt

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A save or load that did not happen; the message says what, what was expected, and what to do."""


class SharingPattern(enum.Enum):
    GLOBAL = "global"  # one copy in the whole job, written by global rank 0
    PER_RANK = "per_rank"  # different on every rank, each rank writes its own
    REPLICATED = "replicated"  # identical on every rank, written once by global rank 0
    PER_GROUP = "per_group"  # identical within each instance of a named group, different between them
    PER_NODE = "per_node"  # one per node, written by the node's local rank 0
    SHARDED = "sharded"  # DTensors (FSDP2, tensor parallel): each distinct shard written once, resharded on load


class ValidationLevel(enum.Enum):
    NONE = "none"
    QUICK = "quick"  # keys, shapes, dtypes and non-tensor values
    TENSOR = "tensor"  # plus a content hash of every tensor's raw bytes
    FULL = "full"  # plus an element-wise comparison against rank 0


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


@dataclass
class StateComponent:
    """One piece of training state and how it is shared across ranks (see docs/concepts.md)."""

    key: str
    stateful: Any
    sharing_pattern: SharingPattern
    process_group_name: str | None = None
    required: bool = True
    validate_replication: bool = False
    validation_level: str | ValidationLevel = "tensor"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not fmt.is_valid_key(self.key):
            raise ValueError(
                f"StateComponent key {self.key!r} is invalid: expected {fmt.KEY_PATTERN} "
                "(letters, digits, '_', '.', '-', not starting with a separator, no '..'); rename the component"
            )
        if isinstance(self.sharing_pattern, str):
            try:
                self.sharing_pattern = SharingPattern(self.sharing_pattern)
            except ValueError:
                raise ValueError(
                    f"StateComponent {self.key!r}: sharing_pattern {self.sharing_pattern!r} is not one of "
                    f"{[p.value for p in SharingPattern]}"
                ) from None
        if not isinstance(self.sharing_pattern, SharingPattern):
            raise TypeError(f"StateComponent {self.key!r}: sharing_pattern must be a SharingPattern")
        if not (hasattr(self.stateful, "state_dict") and hasattr(self.stateful, "load_state_dict")):
            raise TypeError(
                f"StateComponent {self.key!r}: stateful must have state_dict() and load_state_dict(), "
                f"got {type(self.stateful).__name__}"
            )
        if self.sharing_pattern == SharingPattern.PER_GROUP:
            if not self.process_group_name:
                raise ValueError(f"StateComponent {self.key!r}: PER_GROUP needs process_group_name")
            if not fmt.is_valid_key(self.process_group_name):
                raise ValueError(
                    f"StateComponent {self.key!r}: process_group_name {self.process_group_name!r} is invalid; "
                    f"expected {fmt.KEY_PATTERN}"
                )
        try:
            self.validation_level = ValidationLevel(
                self.validation_level.value
                if isinstance(self.validation_level, ValidationLevel)
                else str(self.validation_level).lower()
            )
        except ValueError:
            raise ValueError(
                f"StateComponent {self.key!r}: validation_level {self.validation_level!r} is not one of "
                f"{[v.value for v in ValidationLevel]}"
            ) from None
        if self.validate_replication and self.sharing_pattern not in _VALIDATED:
            warnings.warn(
                f"StateComponent {self.key!r}: validate_replication applies to REPLICATED components (and the "
                "plain values of SHARDED ones) only; "
                f"ignored for {self.sharing_pattern.value}",
                stacklevel=3,
            )
        if not isinstance(self.metadata, dict):
            raise TypeError(f"StateComponent {self.key!r}: metadata must be a dict")

    @property
    def effective_validation(self) -> ValidationLevel:
        if not self.validate_replication or self.sharing_pattern not in _VALIDATED:
            return ValidationLevel.NONE
        assert isinstance(self.validation_level, ValidationLevel)
        return self.validation_level


# Patterns whose state must agree across ranks: REPLICATED, and the plain (non-DTensor) values of SHARDED.
_VALIDATED = (SharingPattern.REPLICATED, SharingPattern.SHARDED)


class RNGState:
    """Every random number generator a training step touches: torch CPU, each visible CUDA device,
    Python ``random`` and NumPy (when importable). Declare it PER_RANK."""

    def state_dict(self) -> dict[str, Any]:
        import torch

        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        try:
            import numpy as np

            state["numpy"] = np.random.get_state()
        except ImportError:
            pass
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        torch.set_rng_state(state["torch"])
        random.setstate(_as_tuple(state["python"]))
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if len(cuda) != torch.cuda.device_count():
                logger.warning(
                    "checkpoint holds RNG state for %d CUDA devices, %d visible; restoring the first %d",
                    len(cuda),
                    torch.cuda.device_count(),
                    min(len(cuda), torch.cuda.device_count()),
                )
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
        if "numpy" in state:
            try:
                import numpy as np

                np.random.set_state(state["numpy"])
            except ImportError:
                logger.warning("checkpoint holds NumPy RNG state but NumPy is not installed; not restored")


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def hf_config(stateful: Any) -> dict[str, Any] | None:
    """The Hugging Face config of a model (``model.config``, also through a DDP ``.module``) as the JSON object
    ``config.json`` holds, with ``architectures`` filled in as ``save_pretrained`` does; None for a model
    without one. The model's own config object is never changed.

    Args:
        stateful: the model component's stateful (any object).

    Example:
        >>> hf_config(torch.nn.Linear(2, 2)) is None
        True
    """
    model = stateful
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "module"):
        model = model.module
        config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    if not callable(to_json):
        return None
    import json

    try:
        out = json.loads(to_json(use_diff=False))
    except Exception as e:  # noqa: BLE001 - a config that cannot be serialised is left out, the weights are not
        logger.warning(
            "the model's config could not be serialised (%s: %s); no config.json is written", type(e).__name__, e
        )
        return None
    if not isinstance(out, dict):
        return None
    problem = checked_config(out)
    if problem is not None:
        logger.warning("the model's config is left out of the checkpoint (no config.json is written): %s", problem)
        return None
    if not out.get("architectures"):
        cls = type(model)
        # FSDP2's fully_shard swaps the module's class for a subclass named FSDP<Name>.
        if cls.__name__.startswith("FSDP") and len(cls.__mro__) > 1 and cls.__mro__[1].__name__ == cls.__name__[4:]:
            cls = cls.__mro__[1]
        out["architectures"] = [cls.__name__]
    return out


MAX_CONFIG_BYTES = 1 << 20  # a config rides in every save's manifest: a few KB usually, never megabytes


def checked_config(config: Any) -> str | None:
    """Why a Hugging Face config (as parsed JSON) cannot ride in a manifest, or None.

    Example:
        >>> checked_config({"model_type": "llama"}) is None
        True
    """
    import json

    from ckptd import protocol as proto

    problem = proto.json_problem(config, fmt.HF_CONFIG_METADATA_KEY)
    if problem is not None:
        return problem
    size = len(json.dumps(config))
    if size > MAX_CONFIG_BYTES:
        return f"it is {size} bytes of JSON, more than the {MAX_CONFIG_BYTES} a manifest carries"
    return None
