"""The one builder of the TorchTrainer, shared by `lenet-tune train` and every tune trial."""

from __future__ import annotations

import os

from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.tune.integration.ray_train import TuneReportCallback

from trainables.config import HyperParams, Resources
from trainables.controller import PlacementGroupCleanerStoppedInPassing, ProcessGroupConfig
from trainables.loop import train_loop_per_worker
from trainables.trial import trial_hparams

BEST_METRIC = "val_acc"
# Ray Train's controller polls its workers every 2 s by default, and a run's start and every
# report wait for a poll: with LeNet epochs of about a second that was most of a DDP trial's
# overhead. Polling five times a second costs the controller little CPU. Ray passes the
# variable from the process that builds the trainer to the controller; a user's value wins.
HEALTH_CHECK_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Train starts a preemption watcher actor (one more process per trial) that tells workers a
# node is about to be reclaimed; this loop does not ask, it checkpoints every epoch and a lost
# node restarts the trial from there. Off by default; a user's value wins.
PREEMPTION_WATCHER = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
TRAINER_DEFAULTS = (HEALTH_CHECK_INTERVAL, PREEMPTION_WATCHER)


class LeNetTorchTrainer(TorchTrainer):
    """Ray's TorchTrainer with two callbacks changed, each costing every trial time on a small machine.

    - No Ray Data machinery without Ray Datasets: Ray 2.60 starts a DatasetManager actor for every
      run, datasets or not; the data here is one object-store array every worker maps, so that
      process only slowed each DDP trial's start (about 1 s of 8-10 on 2 cores).
    - The placement-group cleaner is stopped without waiting (above).
    """

    def _create_default_callbacks(self) -> list:
        callbacks = []
        for callback in super()._create_default_callbacks():
            if isinstance(callback, DatasetsCallback) and not self.datasets:
                continue
            if type(callback) is PlacementGroupCleanerCallback:
                callback = PlacementGroupCleanerStoppedInPassing()
            callbacks.append(callback)
        return callbacks


def worker_config(hparams: HyperParams, resources: Resources, data_ref) -> dict:
    """What a worker needs, as plain values: the Ray boundary."""
    return {
        "hparams": hparams.model_dump(),
        "cpus_per_worker": resources.cpus_per_worker,
        "use_gpu": resources.use_gpu,
        "data_ref": data_ref,
    }


def build_trainer(
    hparams: HyperParams,
    resources: Resources,
    data_ref,
    name: str,
    storage_path: str,
    max_failures: int = 2,
    callbacks: list | None = None,
) -> LeNetTorchTrainer:
    """A TorchTrainer running `train_loop_per_worker` on resources.workers_per_trial workers.

    data_ref is the ObjectRef of the shared `Splits`. Re-running with the same name
    and storage_path resumes from that run's latest checkpoint.
    """
    for variable, value in TRAINER_DEFAULTS:
        os.environ.setdefault(variable, value)
    worker_resources = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        # A fraction (e.g. 0.25) lets Ray pack several trials on one GPU.
        worker_resources["GPU"] = resources.gpus_per_worker
    return LeNetTorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(hparams, resources, data_ref),
        torch_config=ProcessGroupConfig(),  # TorchConfig's setup, minus torch in the controller
        scaling_config=ScalingConfig(
            num_workers=resources.workers_per_trial,
            use_gpu=resources.use_gpu,
            resources_per_worker=worker_resources,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            # Keep the best two by validation accuracy; the best is what we evaluate and register.
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=BEST_METRIC, checkpoint_score_order="max"
            ),
            # A killed worker restarts the group, which resumes from the latest checkpoint.
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks or [],
        ),
    )


def trainer_trial(config: dict, base: dict, resources: dict, data_refs: list, trainer_storage: str) -> None:
    """One Tune trial on the shared TorchTrainer (DDP, or --trial-runner torchtrainer).

    Here rather than in trainables/trial.py, whose one-worker trials must not import torch: Tune
    imports a trial function's module as it starts the trial's process, so torch and Ray Train
    load then, not on the trial's clock."""
    trainer = build_trainer(
        trial_hparams(HyperParams(**base), config),
        Resources(**resources),
        data_refs[0],
        # Trial ids are unique per sweep, so a restarted trial finds its own checkpoints.
        name=tune.get_context().get_trial_id(),
        storage_path=trainer_storage,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()
