"""What runs inside one Tune trial: its hyperparameters, and for one worker the loop that trains them.

Kept apart from jobs/tune.py so that a trial's process imports only what it runs. A one-worker
trial imports Ray and Tune alone: its training runs in a child of the node's fork server
(trainables/forkserver.py), which imported torch once for every trial. The MLflow, pandas and
report code of the driver, and torch, stay out of it: every import is resident memory in each
concurrent trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainables.config import HyperParams, Resources, SweepConfig

# The knobs a trial's config may carry; everything else comes from the base HyperParams.
SAMPLED_KEYS = ("lr", "batch_size", "momentum", "augment", "geometry")


def trial_hparams(base: HyperParams, config: dict) -> HyperParams:
    """The base hyperparameters with a trial's sampled values applied."""
    sampled = {k: config[k] for k in SAMPLED_KEYS if k in config}
    if "geometry" in sampled:
        dilation, padding = (int(v) for v in str(sampled.pop("geometry")).split(":"))
        sampled.update(dilation=dilation, padding=padding)
    return base.model_copy(update=sampled)


def uses_torchtrainer(sweep: SweepConfig, resources: Resources) -> bool:
    """DDP trials always run on a TorchTrainer; one-worker trials too when asked."""
    return resources.workers_per_trial > 1 or sweep.trial_runner == "torchtrainer"


def trial_driver(config: dict, base: dict, resources: dict, data_refs: list, entry: Callable | None = None) -> None:
    """One Tune trial of one worker: `fit` in a child forked from the node's fork server.

    `entry(job, splits, report)` replaces what the child runs (trainables.forkserver.train): the
    benchmarks and tests wrap it to look inside the child. Trials on a TorchTrainer (DDP, or
    --trial-runner torchtrainer) run trainables.trainer.trainer_trial instead."""
    from trainables.forkserver import run_trial_in_fork

    run_trial_in_fork({"config": config, "base": base, "cpus": resources["cpus_per_worker"],
                       "use_gpu": resources["gpus_per_worker"] > 0}, data_refs, entry)
