"""lenet-tune tune: a Ray Tune sweep whose trials are Ray Train runs, tracked in MLflow.

On a laptop (Ray starts in this process; MLflow writes ./mlflow.db and ./mlartifacts):
    lenet-tune tune --smoke
    lenet-tune tune --data imagefolder:/tmp/cifar --num-samples 8 --epochs 10
On a Ray cluster, as a Ray Job (see `lenet-tune submit --help`):
    lenet-tune submit -- tune --data cifar10 --workers-per-trial 2 --gpus-per-worker 0.5

A multi-worker trial runs `trainer_trial`, which builds the TorchTrainer that `lenet-tune
train` uses too (Ray 2.60's Train V2 pattern); a one-worker trial runs `trial_driver`, which
trains the same loop in a child of the node's fork server. Either forwards every epoch's
metrics to Tune, where ASHA may stop it early.
"""

from __future__ import annotations

import datetime
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from jobs.progress import ProgressLine
from jobs.report import build_report, tables_from_results
from jobs.runtime import (SweepInterrupted, UsageError, check_fits, check_multinode, check_ray_address,
                          connect_ray, max_concurrent_trials)
from trainables import tracking
from trainables.config import DataConfig, HyperParams, Resources, SearchSpace, SweepConfig, TrackingConfig
from trainables.data import load_splits
from trainables.loop import load_checkpoint
from trainables.model import geometry_error, valid_geometries
from trainables.forkserver import start_fork_servers, stop_fork_servers
from trainables.trainer import BEST_METRIC, trainer_trial
from trainables.trial import trial_driver, trial_hparams, uses_torchtrainer

# The driver of a TorchTrainer trial holds no CPU, just this token amount of memory.
DRIVER_MEMORY_BYTES = 64 * 1024**2


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
              resources: Resources, tracking_cfg: TrackingConfig, nested: bool = True,
              resume: bool = False, search_space: SearchSpace | None = None) -> SweepOutcome:
    """Run every trial of `space` (Tune domains or constants) and register the best model.

    nested=True logs a parent MLflow run with one child per trial (a sweep);
    nested=False logs each trial as a top-level run (`lenet-tune train`).
    resume=True restores the sweep of that name from its results folder: finished
    trials are kept, unfinished ones continue from their checkpoints, and MLflow
    runs continue rather than start again.
    """
    tracking_uri = tracking_cfg.resolved_uri()
    storage = tracking_cfg.resolved_storage()
    sweep_dir = os.path.join(storage, sweep.name)
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise UsageError(f"no sweep to resume at {sweep_dir}: check --name and --storage-path")
    if not resume and tune.Tuner.can_restore(sweep_dir):
        raise UsageError(f"a sweep named {sweep.name!r} already exists in {storage}: "
                         f"pick another --name, or continue it with --resume {sweep.name}")
    if problem := tracking.check_reachable(tracking_uri):
        raise UsageError(f"MLflow tracking server {tracking_uri} is unreachable ({problem}): "
                         "start it (lenet-tune cluster up) or pass another --tracking-uri")
    if not ray.is_initialized():
        check_ray_address(os.environ.get("RAY_ADDRESS", ""))  # before the data load, which takes a while
    splits = load_splits(data)  # data errors surface before any cluster work
    cluster = connect_ray()
    check_fits(cluster, resources.workers_per_trial, resources.cpus_per_worker, resources.gpus_per_worker)
    check_multinode(storage, tracking_uri, sum(1 for node in ray.nodes() if node["Alive"]))
    data_ref = ray.put(splits)  # decoded once; every trial and worker on a node shares it
    # Save Tune's experiment state at most a second apart (default: 10 s or more), so a
    # driver killed right after a trial finishes does not run that trial again on --resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # MLflow's client retries a dead server for about four minutes per call by default;
    # a few seconds is enough to ride out a blip without stalling the sweep.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

    experiment_id = tracking.configure(tracking_uri, tracking_cfg.experiment)
    tags = {**tracking.run_tags(data.source), "sweep": sweep.name}
    scaling_params = {**resources.model_dump(), "data_source": data.source, **{
        f"{split}_images": n for split, n in splits.sizes().items()}}
    # In the --config file's own shape, so `lenet-tune tune --config` can rerun it exactly.
    resolved = {"sweep": sweep.model_dump(mode="json"), "hparams": base.model_dump(mode="json"),
                "data": data.model_dump(mode="json"), "resources": resources.model_dump(mode="json"),
                "tracking": tracking_cfg.model_dump(mode="json"),
                **({"space": search_space.model_dump(mode="json")} if search_space else {})}
    parent_run_id = None
    if nested:
        parent_run_id = tracking.open_parent_run(tracking_uri, experiment_id, sweep.name, resume, tags, {
            **sweep.model_dump(), **scaling_params, **{f"space_{k}": v for k, v in space.items()},
            **{f"base_{k}": v for k, v in base.model_dump().items()}}, resolved)

    trainable = make_trainable(sweep, base, resources, data_ref, sweep_dir)
    logger = tracking.TrialLogger(
        tracking_uri, experiment_id, parent_run_id,
        lambda config: {**trial_hparams(base, config).model_dump(), **scaling_params},
        tags, base.epochs)
    if resume:
        # Tune keeps the search space, searcher state and callbacks (our TrialLogger) in the folder.
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = make_tuner(trainable, space, sweep, base, resources, cluster, storage, logger)
    try:
        try:
            results, interrupted = fit_noting_interrupts(tuner)
        finally:
            stop_fork_servers()  # the one-worker trials' fork servers, one per node, end with the sweep
        if interrupted:
            raise KeyboardInterrupt
        try:
            if added := logger.backfill(results):
                print(f"lenet-tune: logged {added} epoch(s) that MLflow had missed, from {sweep_dir}", flush=True)
            return finish_sweep(results, sweep, base, splits, parent_run_id, experiment_id, tracking_cfg,
                                tracking_uri, sweep_dir)
        except (UsageError, RuntimeError):
            raise
        except Exception as error:  # the tracking server went away before the result was recorded
            raise SweepInterrupted(
                f"MLflow at {tracking_uri} failed while recording the result ({type(error).__name__}); "
                f"every trial's result is kept in {sweep_dir}: once MLflow is back, run "
                f"lenet-tune tune --resume {sweep.name}", exit_code=1) from None
    except KeyboardInterrupt:
        close_parent(tracking_uri, parent_run_id, "KILLED")
        raise SweepInterrupted(f"sweep {sweep.name!r} interrupted; continue it with: "
                               f"lenet-tune tune --resume {sweep.name}") from None
    except (UsageError, RuntimeError):
        close_parent(tracking_uri, parent_run_id, "FAILED")
        raise


def close_parent(tracking_uri: str, parent_run_id: str | None, status: str) -> None:
    """Mark the parent run, if MLflow can still be reached (it may be why we are closing)."""
    if parent_run_id:
        try:
            mlflow.MlflowClient(tracking_uri).set_terminated(parent_run_id, status)
        except Exception:
            pass


def fit_noting_interrupts(tuner: tune.Tuner):
    """tuner.fit(), and whether Ctrl-C stopped it.

    Tune catches the first SIGINT, saves its state and returns normally; it then puts
    back whatever handler was installed before. Installing our own marker first is
    how we learn that it happened.
    """
    if threading.current_thread() is not threading.main_thread() or os.environ.get(
            "TUNE_DISABLE_SIGINT_HANDLER", "0") != "0":
        return tuner.fit(), False
    previous = signal.getsignal(signal.SIGINT)

    def put_back_by_tune(signum, frame):  # a second Ctrl-C stops at once
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, put_back_by_tune)
    try:
        results = tuner.fit()
        return results, signal.getsignal(signal.SIGINT) is put_back_by_tune
    finally:
        signal.signal(signal.SIGINT, previous)


def make_trainable(sweep, base, resources, data_ref, sweep_dir):
    """The trial function with its constant arguments bound and its resources declared."""
    # The data in a list, so with_parameters hands the trial the reference, not a copy of the data.
    bound = {"base": base.model_dump(), "resources": resources.model_dump(), "data_refs": [data_ref]}
    if uses_torchtrainer(sweep, resources):
        trainable = tune.with_parameters(trainer_trial, **bound, trainer_storage=os.path.join(sweep_dir, "train-runs"))
        # The driver only waits on its TorchTrainer: it holds no CPU or GPU (the workers do),
        # just a token amount of memory because Tune needs some resource to place it.
        return tune.with_resources(trainable, {"cpu": 0, "memory": DRIVER_MEMORY_BYTES})
    # The trial holds its worker's CPUs and GPU share; its forked child trains on them. The fork
    # servers start now, so they import torch while Tune starts up rather than in the first trials.
    start_fork_servers()
    return tune.with_resources(tune.with_parameters(trial_driver, **bound),
                               {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker})


def make_tuner(trainable, space, sweep, base, resources, cluster, storage, logger) -> tune.Tuner:
    concurrency = sweep.max_concurrent or max_concurrent_trials(
        cluster, resources.workers_per_trial, resources.cpus_per_worker, resources.gpus_per_worker)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=BEST_METRIC, mode="max", num_samples=sweep.num_samples,
            # Random search carries the limit itself (make_search); Tune would warn and ignore it here.
            max_concurrent_trials=concurrency if sweep.search != "random" else None,
            scheduler=make_scheduler(sweep, base.epochs), search_alg=make_search(sweep, concurrency),
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=storage, verbose=1,
            callbacks=[logger, ProgressLine(sweep.num_samples, base.epochs)],
            # Used by in-trial (one-worker) runs; TorchTrainer trials keep their own.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=BEST_METRIC, checkpoint_score_order="max"),
            failure_config=tune.FailureConfig(max_failures=2),
        ),
    )


def trial_name(trial) -> str:
    return f"trial-{trial.trial_id}"


def make_scheduler(sweep: SweepConfig, max_epochs: int):
    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=max_epochs,
                         grace_period=min(sweep.grace_period, max_epochs), reduction_factor=2)


def make_search(sweep: SweepConfig, concurrency: int | None = None):
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.seed)
    # Tune ignores TuneConfig.max_concurrent_trials for this searcher: it must carry the limit itself.
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency or 0)


def best_checkpoint(results) -> tuple[dict, str, str]:
    """(epoch metrics, checkpoint path, trial id) of the best epoch of any trial that did not diverge."""
    best = None
    for result in results:
        if result.error or result.metrics_dataframe is None:
            continue
        frame = result.metrics_dataframe
        if result.best_checkpoints:  # an in-trial run: Tune kept the checkpoints itself
            frame = frame.merge(pd.DataFrame(
                [{"epoch": m["epoch"], CHECKPOINT_PATH_KEY: c.path} for c, m in result.best_checkpoints]),
                on="epoch", how="left")
        if CHECKPOINT_PATH_KEY not in frame:
            continue
        frame = frame[(frame.get("diverged", 0) == 0) & frame[CHECKPOINT_PATH_KEY].notna()]
        if frame.empty:
            continue
        # On ties take the latest epoch: Ray keeps the newest of equally scored checkpoints.
        row = frame.sort_values([BEST_METRIC, "epoch"]).iloc[-1]
        if best is None or row[BEST_METRIC] > best[0][BEST_METRIC]:
            best = (row.to_dict(), row[CHECKPOINT_PATH_KEY], result.metrics.get("trial_id"))
    if best is None:
        if any(r.metrics and r.metrics.get("diverged") for r in results):
            raise UsageError("every trial diverged (non-finite loss): lower the learning rate (--lr-range / --lr)")
        raise RuntimeError("no trial finished an epoch: see the trial errors above")
    return best


def finish_sweep(results, sweep, base, splits, parent_run_id, experiment_id, tracking_cfg, tracking_uri, path):
    """Evaluate the best checkpoint on the test split, log and register it, report, close the parent run."""
    metrics, checkpoint_path, trial_id = best_checkpoint(results)
    state = load_checkpoint(checkpoint_path)
    client = mlflow.MlflowClient(tracking_uri)
    best_run_id = tracking.find_child_run(client, experiment_id, parent_run_id, trial_id).info.run_id
    champion = tracking.log_champion(parent_run_id or best_run_id, state, splits, tracking_cfg.model_name)
    report_dir = write_report(results, base, champion, path)
    client.log_artifacts(parent_run_id or best_run_id, str(report_dir), "report")
    if parent_run_id:
        client.log_metric(parent_run_id, "best_val_acc", float(metrics[BEST_METRIC]))
        client.set_tag(parent_run_id, "best_run_id", best_run_id)
        client.set_terminated(parent_run_id, "FINISHED")
    return SweepOutcome(
        name=sweep.name, parent_run_id=parent_run_id, best_run_id=best_run_id,
        best_config=state["hparams"], best_val_acc=float(metrics[BEST_METRIC]), test=champion,
        results_path=path, num_trials=len(results),
    )


def resume_configs(name: str, tracking_cfg: TrackingConfig) -> dict:
    """The configs a sweep ran with, read back from its parent run's sweep-config.yaml."""
    experiment_id = tracking.configure(tracking_cfg.resolved_uri(), tracking_cfg.experiment)
    found = tracking.find_parent_run(mlflow.MlflowClient(tracking_cfg.resolved_uri()), experiment_id, name)
    if found is None:
        raise UsageError(f"no sweep named {name!r} in {tracking_cfg.resolved_uri()}: check --resume and --tracking-uri")
    if found.info.status == "FINISHED":
        raise UsageError(f"sweep {name!r} already finished: start a new one with --name")
    saved = yaml.safe_load(mlflow.artifacts.load_text(f"{found.info.artifact_uri}/{tracking.CONFIG_ARTIFACT}"))
    return {"sweep": SweepConfig(**saved["sweep"]), "hparams": HyperParams(**saved["hparams"]),
            "data": DataConfig(**saved["data"]), "resources": Resources(**saved["resources"]),
            # Where to log is where the user points now (the saved copy has credentials redacted).
            "tracking": tracking_cfg}


def write_report(results, base: HyperParams, champion: dict, sweep_dir: str) -> Path:
    """The sweep report (table, plots, index.html) in the results folder, or a temp folder
    when results live in object storage; MLflow gets a copy either way."""
    trials, curves = tables_from_results(results, lambda c: trial_hparams(base, c).model_dump(), base.epochs)
    folder = Path(sweep_dir) / "report" if "://" not in sweep_dir else Path(tempfile.mkdtemp()) / "report"
    return build_report(trials, curves, champion["confusion"], champion["classes"], base.epochs, folder).parent


def smoke_overrides() -> dict:
    """--smoke: a whole sweep on small synthetic data in about a minute on 2 cores."""
    return {"data": {"source": "synthetic", "synthetic_train_images": 2000},
            "sweep": {"num_samples": 3, "epochs": 2, "grace_period": 1},
            # Small batches so that two epochs of 1,800 images are enough steps to learn.
            "space": {"batch_sizes": (32, 64)}}
