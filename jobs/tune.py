"""lenet-tune tune: a Ray Tune sweep whose trials are Ray Train runs, tracked in MLflow.

On a laptop (Ray starts in this process; MLflow writes ./mlflow.db and ./mlartifacts):
    lenet-tune tune --smoke
    lenet-tune tune --data imagefolder:/tmp/cifar --num-samples 8 --epochs 10
On a Ray cluster, as a Ray Job (see `lenet-tune submit --help`):
    lenet-tune submit -- tune --data cifar10 --workers-per-trial 2 --gpus-per-worker 0.5

Each Tune trial runs `trial_driver`, which builds the same TorchTrainer that
`lenet-tune train` uses (Ray 2.60's Train V2 pattern) and forwards every epoch's
metrics to Tune, where ASHA may stop it early.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import mlflow
import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from jobs.runtime import UsageError, check_fits, connect_ray, max_concurrent_trials
from trainables import tracking
from trainables.config import DataConfig, HyperParams, Resources, SearchSpace, SweepConfig, TrackingConfig
from trainables.data import load_splits
from trainables.loop import load_checkpoint
from trainables.model import geometry_error, valid_geometries
from trainables.trainer import BEST_METRIC, build_trainer

# The knobs a trial's config may carry; everything else comes from the base HyperParams.
DRIVER_MEMORY_BYTES = 64 * 1024**2
SAMPLED_KEYS = ("lr", "batch_size", "momentum", "augment", "geometry")


def default_name() -> str:
    return "lenet-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def geometry_choices(space: SearchSpace, image_size: int = 32) -> list[str]:
    """'dilation:padding' strings of every valid pair in the space; refuses an impossible space.

    A single explicit pair that cannot work is refused with Conv2d's reason; in a
    cross product, impossible pairs are dropped (never launched), and a product
    with no valid pair is refused.
    """
    if len(space.dilations) == 1 and len(space.paddings) == 1:
        error = geometry_error(space.dilations[0], space.paddings[0], image_size)
        if error:
            raise UsageError(error)
    pairs = valid_geometries(list(space.dilations), list(space.paddings), image_size)
    if not pairs:
        raise UsageError(
            f"no (dilation, padding) pair in dilations={list(space.dilations)} x paddings="
            f"{list(space.paddings)} fits {image_size}px images: lower the dilations or raise the paddings"
        )
    return [f"{d}:{p}" for d, p in pairs]


def param_space(space: SearchSpace) -> dict:
    """Tune's search space: lr log-uniform, the rest categorical."""
    return {
        "lr": tune.loguniform(*space.lr),
        "batch_size": tune.choice(list(space.batch_sizes)),
        "momentum": tune.choice(list(space.momentums)),
        "augment": tune.choice(list(space.augments)),
        "geometry": tune.choice(geometry_choices(space)),
    }


def trial_hparams(base: HyperParams, config: dict) -> HyperParams:
    """The base hyperparameters with a trial's sampled values applied."""
    sampled = {k: config[k] for k in SAMPLED_KEYS if k in config}
    if "geometry" in sampled:
        dilation, padding = (int(v) for v in str(sampled.pop("geometry")).split(":"))
        sampled.update(dilation=dilation, padding=padding)
    return base.model_copy(update=sampled)


def trial_driver(config: dict, base: dict, resources: dict, data_refs: list, trainer_storage: str) -> None:
    """One Tune trial: build the shared TorchTrainer and run it; metrics flow to Tune each epoch."""
    hparams = trial_hparams(HyperParams(**base), config)
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


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str | None
    best_run_id: str
    best_config: dict
    best_val_acc: float
    test: dict
    results_path: str
    num_trials: int


def run_sweep(sweep: SweepConfig, space: dict, base: HyperParams, data: DataConfig,
              resources: Resources, tracking_cfg: TrackingConfig, nested: bool = True) -> SweepOutcome:
    """Run every trial of `space` (Tune domains or constants) and register the best model.

    nested=True logs a parent MLflow run with one child per trial (a sweep);
    nested=False logs each trial as a top-level run (`lenet-tune train`).
    """
    tracking_uri = tracking_cfg.resolved_uri()
    storage = tracking_cfg.resolved_storage()
    cluster = connect_ray()
    check_fits(cluster, resources.workers_per_trial, resources.cpus_per_worker, resources.gpus_per_worker)
    concurrency = sweep.max_concurrent or max_concurrent_trials(
        cluster, resources.workers_per_trial, resources.cpus_per_worker, resources.gpus_per_worker)

    splits = load_splits(data)
    data_ref = ray.put(splits)  # decoded once; every trial and worker on a node shares it
    experiment_id = tracking.configure(tracking_uri, tracking_cfg.experiment)
    tags = tracking.run_tags(data.source)
    scaling_params = {**resources.model_dump(), "data_source": data.source, **{
        f"{split}_images": n for split, n in splits.sizes().items()}}

    parent_run_id = None
    if nested:
        parent = mlflow.MlflowClient(tracking_uri).create_run(
            experiment_id, run_name=sweep.name, tags={**tags, "sweep": sweep.name})
        parent_run_id = parent.info.run_id
        mlflow.MlflowClient(tracking_uri).log_batch(parent_run_id, params=[
            mlflow.entities.Param(k, v) for k, v in tracking.flat_params({
                **sweep.model_dump(), **scaling_params,
                **{f"space_{k}": v for k, v in space.items()},
                **{f"base_{k}": v for k, v in base.model_dump().items()}}).items()])

    def full_params(config: dict) -> dict:
        return {**trial_hparams(base, config).model_dump(), **scaling_params}

    logger = tracking.TrialLogger(tracking_uri, experiment_id, parent_run_id, full_params,
                                  {**tags, "sweep": sweep.name}, base.epochs)
    trainable = tune.with_parameters(
        trial_driver, base=base.model_dump(), resources=resources.model_dump(),
        # In a list, so with_parameters hands the trial the reference, not a copy of the data.
        data_refs=[data_ref],
        trainer_storage=os.path.join(storage, sweep.name, "train-runs"))
    tuner = tune.Tuner(
        # The driver only waits on its TorchTrainer: it holds no CPU or GPU (the workers do),
        # just a token amount of memory because Tune needs some resource to place it.
        tune.with_resources(trainable, {"cpu": 0, "memory": DRIVER_MEMORY_BYTES}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=BEST_METRIC, mode="max", num_samples=sweep.num_samples,
            max_concurrent_trials=concurrency,
            scheduler=make_scheduler(sweep, base.epochs), search_alg=make_search(sweep),
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(name=sweep.name, storage_path=storage, callbacks=[logger],
                                  verbose=1),
    )
    try:
        results = tuner.fit()
        return finish_sweep(results, sweep, base, splits, parent_run_id, logger, tracking_cfg, tracking_uri,
                            os.path.join(storage, sweep.name))
    except BaseException:
        if parent_run_id:
            mlflow.MlflowClient(tracking_uri).set_terminated(parent_run_id, "FAILED")
        raise


def trial_name(trial) -> str:
    return f"trial-{trial.trial_id}"


def make_scheduler(sweep: SweepConfig, max_epochs: int):
    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=max_epochs,
                         grace_period=min(sweep.grace_period, max_epochs), reduction_factor=2)


def make_search(sweep: SweepConfig):
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.seed)
    return None  # Tune's random search (BasicVariantGenerator)


def best_checkpoint(results) -> tuple[dict, str, str]:
    """(epoch metrics, checkpoint path, trial id) of the best epoch of any trial that did not diverge."""
    best = None
    for result in results:
        if result.error or result.metrics_dataframe is None:
            continue
        frame = result.metrics_dataframe
        frame = frame[(frame.get("diverged", 0) == 0) & frame[CHECKPOINT_PATH_KEY].notna()]
        if frame.empty:
            continue
        # On ties take the latest epoch: Ray keeps the newest of equally scored checkpoints.
        row = frame.sort_values([BEST_METRIC, "epoch"]).iloc[-1]
        if best is None or row[BEST_METRIC] > best[0][BEST_METRIC]:
            best = (row.to_dict(), row[CHECKPOINT_PATH_KEY], result.metrics.get("trial_id"))
    if best is None:
        raise RuntimeError("no trial finished an epoch: see the trial errors above")
    return best


def finish_sweep(results, sweep, base, splits, parent_run_id, logger, tracking_cfg, tracking_uri, path):
    """Evaluate the best checkpoint on the test split, log and register it, close the parent run."""
    metrics, checkpoint_path, trial_id = best_checkpoint(results)
    state = load_checkpoint(checkpoint_path)
    best_run_id = logger.run_ids[trial_id]
    champion = tracking.log_champion(parent_run_id or best_run_id, state, splits, tracking_cfg.model_name)
    client = mlflow.MlflowClient(tracking_uri)
    if parent_run_id:
        client.log_metric(parent_run_id, "best_val_acc", float(metrics[BEST_METRIC]))
        client.set_tag(parent_run_id, "best_run_id", best_run_id)
        client.set_terminated(parent_run_id, "FINISHED")
    return SweepOutcome(
        name=sweep.name, parent_run_id=parent_run_id, best_run_id=best_run_id,
        best_config=state["hparams"], best_val_acc=float(metrics[BEST_METRIC]), test=champion,
        results_path=path, num_trials=len(results),
    )


def smoke_overrides() -> dict:
    """--smoke: a whole sweep on small synthetic data in about a minute on 2 cores."""
    return {"data": {"source": "synthetic", "synthetic_train_images": 2000},
            "sweep": {"num_samples": 3, "epochs": 2, "grace_period": 1},
            # Small batches so that two epochs of 1,800 images are enough steps to learn.
            "space": {"batch_sizes": (32, 64)}}
