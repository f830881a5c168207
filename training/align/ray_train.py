"""Data-parallel training on Ray Train: ``TorchTrainer`` with N workers, DDP over gloo (CPU) or NCCL (GPU).

Every worker builds the model from the preset (same seeds, so the same initial weights), reads the data,
and takes its share of every step's examples (rank r: positions r*B .. (r+1)*B - 1 of the step's global
batch of N*B); DDP averages the gradients. Rank 0 writes the metrics, the resume checkpoint (holding every
rank's RNG state) and the export into ``out_dir``, which must therefore be storage every worker reaches
(a local folder on one machine; a shared file system on a cluster).

Without ``ray_address`` a private local Ray cluster is started with its own temp dir (never joining or
stopping another cluster on the machine) and shut down at the end.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from training.align.config import TrainConfig
from training.align.trainer import TrainError, TrainResult, checkpoint_path, read_metrics, run

log = logging.getLogger(__name__)


def _worker_loop(loop_config: dict) -> dict:
    """Runs on each Ray Train worker (the process group is already initialised by TorchTrainer)."""
    import ray.train
    import torch

    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    ctx = ray.train.get_context()
    config = TrainConfig.model_validate(loop_config["config"])
    result = run(config, rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    summary = {"step": result.step, "completed": result.completed, "num_examples": result.num_examples,
               "cached_states": result.cached_states, **result.last}
    ray.train.report(summary)
    return summary


def train_on_ray(config: TrainConfig):
    """Run ``config`` on Ray Train with ``config.num_workers`` workers.

    Returns:
        :class:`training.align.trainer.TrainResult` (without the in-process model).
    Raises:
        training.align.trainer.TrainError: the Ray run failed (its error is chained).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out_dir = Path(config.out_dir).resolve()
    if checkpoint_path(out_dir).exists() and not config.resume:
        raise TrainError(f"{out_dir} already holds a checkpoint of a run; pass --resume to continue it, or use "
                         "another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    abs_cfg = config.model_copy(update={
        "out_dir": str(out_dir),
        "export_dir": str(Path(config.export_path).resolve()),
        "init_from": str(Path(config.init_from).resolve()) if config.init_from else None,
        "data": [d.model_copy(update={"path": d.path if d.path == "builtin" else str(Path(d.path).resolve()),
                                      "media_root": str(Path(d.media_root).resolve()) if d.media_root else None})
                 for d in config.data],
        "progress": False,
    })
    own = config.ray_address is None and not ray.is_initialized()
    connected = False  # we connected this driver to a cluster and disconnect it at the end
    temp_dir = None
    if own:
        # a short path: Ray's unix socket paths must stay under ~107 characters
        temp_dir = tempfile.mkdtemp(prefix="pm-train-", dir="/tmp" if os.path.isdir("/tmp") else None)
        ray.init(address="local", num_cpus=max(2, config.num_workers * config.cpus_per_worker), _temp_dir=temp_dir,
                 include_dashboard=False,
                 logging_level=logging.ERROR)
    elif config.ray_address is not None and not ray.is_initialized():
        ray.init(address=config.ray_address)
        connected = True
    use_gpu = (config.device or "cpu").startswith("cuda")
    try:
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"config": abs_cfg.model_dump(mode="json"), "threads": config.cpus_per_worker},
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": config.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name="polymodal-train", storage_path=str(out_dir / "ray")),
        )
        try:
            fit = trainer.fit()
        except Exception as e:  # Ray wraps worker errors in its own types
            raise TrainError(f"the Ray Train run failed: {e}") from e
    finally:
        if own or connected:
            ray.shutdown()  # stops our private cluster, or only disconnects from a given one
    rows = read_metrics(out_dir)
    last = {k: v for k, v in (rows[-1] if rows else {}).items() if k not in ("step", "epoch", "lr", "elapsed_s")}
    step = int(rows[-1]["step"]) if rows else 0
    completed = step >= config.max_steps
    export = Path(abs_cfg.export_path) if completed and (Path(abs_cfg.export_path) / "export.json").is_file() else None
    reported = getattr(fit, "return_value", None) or getattr(fit, "metrics", None) or {}
    return TrainResult(step=step, completed=completed, out_dir=out_dir, export_dir=export,
                       metrics_path=out_dir / "metrics.jsonl", last=last,
                       num_examples=int(reported.get("num_examples", -1)),
                       cached_states=bool(reported.get("cached_states", False)))


__all__ = ["train_on_ray"]
