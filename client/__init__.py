"""ckptd's rank side: declare state components, save asynchronously, resume bit-exactly."""

from ckptd.format import (
    VerifyResult,
    find_best_checkpoint,
    find_latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from client.client import CheckpointClient, SaveHandle
from client.components import (
    CheckpointError,
    RNGState,
    SharingPattern,
    StateComponent,
    ValidationLevel,
)

__all__ = [
    "find_best_checkpoint",
    "CheckpointClient",
    "CheckpointError",
    "RNGState",
    "SaveHandle",
    "SharingPattern",
    "StateComponent",
    "ValidationLevel",
    "VerifyResult",
    "find_latest_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
]
