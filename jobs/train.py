"""lenet-tune train: one training run with given hyperparameters, tracked in MLflow.

On a laptop:
    lenet-tune train --data imagefolder:/tmp/cifar --epochs 10 --lr 0.05
    lenet-tune train --smoke
On a Ray cluster:
    lenet-tune submit -- train --data cifar10 --workers-per-trial 2 --gpus-per-worker 1

It is a sweep of exactly one fixed configuration: the same trainer builder,
the same per-epoch tracking and the same test evaluation and registration as
`lenet-tune tune`, but logged as one top-level MLflow run.
"""

from __future__ import annotations

from jobs.tune import SweepOutcome, run_sweep
from trainables.config import DataConfig, HyperParams, Resources, SweepConfig, TrackingConfig


def run_training(sweep: SweepConfig, hparams: HyperParams, data: DataConfig, resources: Resources,
                 tracking_cfg: TrackingConfig) -> SweepOutcome:
    """Train once; of `sweep` only the name and trial runner matter."""
    sweep = sweep.model_copy(update={"num_samples": 1, "epochs": hparams.epochs, "scheduler": "fifo",
                                     "search": "random"})
    fixed = {  # constants, not search domains: exactly one trial
        "lr": hparams.lr, "batch_size": hparams.batch_size, "momentum": hparams.momentum,
        "augment": hparams.augment, "geometry": f"{hparams.dilation}:{hparams.padding}",
    }
    return run_sweep(sweep, fixed, hparams, data, resources, tracking_cfg, nested=False)
