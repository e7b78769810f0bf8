"""Training: the trainer, checkpoints and progress callbacks."""

from dnis.train.progress import Progress, SilentProgress
from dnis.train.trainer import TrainConfig, Trainer, TrainResult

__all__ = ["Progress", "SilentProgress", "TrainConfig", "TrainResult", "Trainer"]
