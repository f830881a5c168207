"""Where a stage runs: in this process (:func:`training.align.trainer.run`) or on Ray Train
(:func:`training.align.ray_train.train_on_ray`, whose workers call :func:`~training.align.trainer.run` with their
rank). The one module that knows both, so the loop and its Ray launcher import one way (ray_train -> trainer).
"""

from __future__ import annotations

from training.align.config import TrainConfig
from training.align.ray_train import train_on_ray
from training.align.trainer import Parts, TrainResult, run


def train(config: TrainConfig, parts: Parts | None = None) -> TrainResult:
    """Run a stage: in this process, or on Ray Train with ``config.ray`` (``parts`` then unused).

    Raises:
        TrainError, ValueError, DataFormatError (see :func:`training.align.trainer.run`).
    """
    if config.ray:
        return train_on_ray(config)
    return run(config, parts)


__all__ = ["train"]
