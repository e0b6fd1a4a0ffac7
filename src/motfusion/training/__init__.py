"""Training: the loop (trainer), checkpoints, and the metrics log."""

from motfusion.errors import CheckpointError, NonFiniteLossError
from motfusion.training.checkpoint import latest_checkpoint, load_model, save_checkpoint
from motfusion.training.trainer import TrainResult, lr_at, train

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "TrainResult",
    "latest_checkpoint",
    "load_model",
    "lr_at",
    "save_checkpoint",
    "train",
]
