"""What runs inside one Tune trial: its hyperparameters, and the trainer or loop that trains them.

Kept apart from jobs/tune.py so that a trial's process imports only Ray, torch and
the trainables, not the driver's MLflow, pandas and report code (about 36 MB less
resident memory per concurrent trial).
"""

from __future__ import annotations

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from trainables.config import HyperParams, Resources, SweepConfig
from trainables.loop import train_in_tune_trial
from trainables.trainer import build_trainer, worker_config

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


def trial_driver(config: dict, base: dict, resources: dict, data_refs: list, trainer_storage: str,
                 torchtrainer: bool) -> None:
    """One Tune trial: the shared TorchTrainer (or, for one worker, the same loop in-trial)."""
    hparams = trial_hparams(HyperParams(**base), config)
    if not torchtrainer:
        train_in_tune_trial(worker_config(hparams, Resources(**resources), data_refs[0]))
        return
    trainer = build_trainer(
        hparams,
        Resources(**resources),
        data_refs[0],
        # Trial ids are unique per sweep, so a restarted trial finds its own checkpoints.
        name=tune.get_context().get_trial_id(),
        storage_path=trainer_storage,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()
