"""MLflow tracking: one parent run per sweep, one nested run per trial, and the champion model.

Workers never talk to MLflow. They report to Ray; the sweep driver logs rank 0's
reports through `TrialLogger`, a Tune callback. One writer process keeps a SQLite
store free of "database is locked", and a slow tracking server never stalls a
training step.
"""

from __future__ import annotations

import math
import numbers
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import mlflow
import torch
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune

from trainables.config import redact
from trainables.data import Splits
from trainables.evaluation import confusion_matrix, model_input, plot_confusion, serving_model, summarize

EPOCH_METRICS = ("train_loss", "val_loss", "val_acc", "epoch_seconds", "images_per_second")
CHAMPION_ALIAS = "champion"
PARENT_TAG = "mlflow.parentRunId"
CONFIG_ARTIFACT = "sweep-config.yaml"


def check_reachable(tracking_uri: str, timeout_s: float = 10) -> str | None:
    """None if a tracking server answers its health check, else why not (http(s) URIs only).

    MLflow's own client retries for minutes; a sweep should fail before training instead.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        response = requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as error:
        return type(error).__name__
    return None if response.ok else f"HTTP {response.status_code}"


def configure(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at tracking_uri and return the experiment's id, creating it if needed."""
    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found:
        return found.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # Artifacts beside the database file, so the whole store is one folder to keep or delete.
        db_path = Path(tracking_uri[len("sqlite:///"):])
        artifact_location = (db_path.parent / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(experiment, artifact_location=artifact_location)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(data_source: str) -> dict:
    import ray

    return {
        "git_commit": git_commit(),
        "data_source": data_source,
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    }


def flat_params(params: dict) -> dict:
    """MLflow params are strings; None becomes 'None' rather than vanishing; no credentials."""
    return {key: redact(str(value)) for key, value in params.items()}


def find_child_run(client: MlflowClient, experiment_id: str, parent_run_id: str | None, trial_id: str):
    """The run already logged for this trial (a restarted or resumed trial), or None."""
    query = f"tags.trial_id = '{trial_id}'"
    if parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    runs = client.search_runs([experiment_id], query, max_results=1)
    return runs[0] if runs else None


def find_parent_run(client: MlflowClient, experiment_id: str, name: str):
    """The parent run of the sweep called `name`, or None."""
    runs = client.search_runs([experiment_id], f"tags.sweep = '{name}' and attributes.run_name = '{name}'",
                              max_results=1)
    return runs[0] if runs else None


def open_parent_run(tracking_uri: str, experiment_id: str, name: str, resume: bool, tags: dict,
                    params: dict, resolved_config: dict) -> str:
    """The sweep's parent run: the existing one when a sweep resumes, else a new one.

    The resolved configuration goes on it as a YAML artifact, so a sweep can be
    rerun exactly (`lenet-tune tune --config sweep-config.yaml --name NEW`).
    """
    client = MlflowClient(tracking_uri)
    found = find_parent_run(client, experiment_id, name)
    if found and resume:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in flat_params(params).items()])
    client.log_text(run_id, redact(yaml.safe_dump(resolved_config, sort_keys=False)), CONFIG_ARTIFACT)
    return run_id


def stopped_early(ended_cleanly: bool, diverged: bool, epochs_run: int, max_epochs: int) -> bool:
    """ASHA stops a trial by ending it early and cleanly: say so, so users don't mistake it for a crash."""
    return ended_cleanly and not diverged and epochs_run < max_epochs


class TrialLogger(tune.Callback):
    """Logs every Tune trial as an MLflow run (nested under parent_run_id when given).

    trial_params(config) turns a trial's sampled config into the full parameter dict.
    Metrics are logged with step = epoch; an epoch already logged is never logged again,
    so a trial that resumes from a checkpoint leaves no duplicate points.

    Tune runs the hooks in its event loop, between every other trial's events, so they only hand
    each step to one writer thread, which runs them in order: MLflow's calls (3-7 ms each on a local
    SQLite store, a network round trip to a server) hold up no trial. Tune's `on_experiment_end`
    waits for the writer, so every step is done when `Tuner.fit()` returns.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str | None,
                 trial_params, tags: dict, max_epochs: int):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.trial_params = trial_params
        self.tags = tags
        self.max_epochs = max_epochs
        self.run_ids: dict[str, str] = {}  # trial_id -> MLflow run id
        self.logged_epochs: dict[str, set[int]] = {}
        self.started_at: dict[str, float] = {}  # trial_id -> time.time() when Tune launched it
        self.broken = False  # set at the first MLflow failure: warn once, then stop logging
        self._writer: ThreadPoolExecutor | None = None  # started by the first hook; not pickled

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_writer"}

    def __setstate__(self, state: dict) -> None:  # Tune restores its callbacks when a sweep resumes
        self.__dict__.update({**state, "_writer": None})

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def run_id_for(self, trial, reopen: bool = False) -> str:
        """The trial's MLflow run: created at its first sight, or found again in a resumed sweep
        (and marked RUNNING again when `reopen`: Tune is starting the trial, not just reporting it)."""
        if trial.trial_id in self.run_ids:
            return self.run_ids[trial.trial_id]
        client = self.client
        existing = find_child_run(client, self.experiment_id, self.parent_run_id, trial.trial_id)
        if existing:  # resumed sweep: continue the same run
            run_id = existing.info.run_id
            history = client.get_metric_history(run_id, "val_acc")
            self.logged_epochs[trial.trial_id] = {int(m.step) for m in history}
            if reopen:
                client.update_run(run_id, status="RUNNING")
        else:
            tags = {**self.tags, "trial_id": trial.trial_id, "mlflow.runName": f"trial-{trial.trial_id}"}
            if self.parent_run_id:
                tags[PARENT_TAG] = self.parent_run_id
            run_id = client.create_run(self.experiment_id, tags=tags).info.run_id
            params = flat_params(self.trial_params(trial.config))
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            self.logged_epochs[trial.trial_id] = set()
        self.run_ids[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started_at[trial.trial_id] = time.time()
        self._submit(self.run_id_for, as_logged(trial), True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._submit(self._log_result, as_logged(trial), dict(result), time.time())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._submit(self._finish, as_logged(trial), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._submit(self._finish, as_logged(trial), "FAILED")

    def on_experiment_end(self, trials, **info):
        self.flush()

    def _submit(self, action, *args) -> None:
        """Hand a logging step to the writer thread, behind every step handed to it before."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trial-logger")
        self._writer.submit(self._safely, action, *args)

    def flush(self) -> None:
        """Wait until every step handed to the writer is done (or skipped, MLflow being down)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def _safely(self, action, *args) -> None:
        """Run a logging step; if MLflow fails, warn once and let training go on.

        The results stay in Ray's results folder either way: a tracking server that
        dies mid-sweep must not take finished trials down with it.
        """
        if self.broken:  # each call to a dead server costs its timeouts; stop asking
            return
        try:
            action(*args)
        except Exception as error:  # MlflowException, requests' and SQLAlchemy's errors alike
            self.broken = True
            print(f"lenet-tune: warning: MLflow at {redact(self.tracking_uri)} failed ({type(error).__name__}); "
                  "training goes on and every result stays in the Ray results folder", flush=True)

    def _log_result(self, trial, result: dict, received: float | None = None) -> None:
        """Log one report's epoch metrics; `received` is when Tune had it (for startup_seconds)."""
        run_id = self.run_id_for(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        seen = self.logged_epochs.setdefault(trial.trial_id, set())
        if epoch in seen:
            return
        timestamp = int(result.get("timestamp", 0) * 1000)
        metrics = [
            Metric(key, float(result[key]), timestamp, epoch)
            for key in EPOCH_METRICS
            if key in result and isinstance(result[key], numbers.Real)
        ]
        started = self.started_at.pop(trial.trial_id, None)
        if started is not None and "epoch_seconds" in result:
            # Start-up overhead: from launch to the first report, less the epoch itself.
            startup = (received or time.time()) - started - float(result["epoch_seconds"])
            metrics.append(Metric("startup_seconds", max(startup, 0.0), timestamp, epoch))
        tags = [RunTag("diverged", "true")] if result.get("diverged") else []
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        seen.add(epoch)  # only once MLflow has it

    def backfill(self, results) -> int:
        """Log every epoch MLflow missed from Ray's own results; returns the points added.

        A tracking server that was down, or a driver killed between a report and its
        logging, leaves gaps; Ray's results folder has every reported epoch. Epochs
        already in MLflow are skipped, so this adds nothing on a clean sweep.
        """
        self.flush()  # steps still queued would otherwise look missing, and be logged twice
        added = 0
        for result in results:
            frame = result.metrics_dataframe
            if frame is None or frame.empty or "trial_id" not in frame:
                continue
            # pandas fills a key that a report did not carry with NaN; every report carries train_loss.
            rows = [{k: v for k, v in row.items()
                     if k == "train_loss" or not (isinstance(v, float) and math.isnan(v))}
                    for row in frame.to_dict("records")]
            trial = SimpleNamespace(trial_id=rows[-1]["trial_id"], config=result.config, last_result=rows[-1])
            run_id = self.run_id_for(trial)
            before = len(self.logged_epochs[trial.trial_id])
            for row in rows:
                self._log_result(trial, row)
            missed = len(self.logged_epochs[trial.trial_id]) - before
            # A run still RUNNING never heard its trial end (MLflow was down, or the driver died).
            if missed or self.client.get_run(run_id).info.status == "RUNNING":
                self._finish(trial, "FAILED" if result.error else "FINISHED")
            added += missed
        return added

    def _finish(self, trial, status: str) -> None:
        # The tags and the best as one batch, then the status (a run reads FINISHED only when complete).
        run_id = self.run_id_for(trial)
        last = trial.last_result or {}
        epochs_run = int(last.get("epoch", 0))
        diverged = bool(last.get("diverged"))
        stopped = stopped_early(status == "FINISHED", diverged, epochs_run, self.max_epochs)
        tags = [RunTag("epochs_run", str(epochs_run)), RunTag("diverged", "true" if diverged else "false"),
                RunTag("stopped_early", "true" if stopped else "false")]
        metrics = []
        client = self.client
        best = last.get("val_acc")
        if isinstance(best, (int, float)) and math.isfinite(best):
            history = client.get_metric_history(run_id, "val_acc")
            best = max([m.value for m in history] + [best])
            metrics.append(Metric("best_val_acc", best, int(time.time() * 1000), 0))
        client.log_batch(run_id, metrics=metrics, tags=tags)
        client.set_terminated(run_id, status)


def as_logged(trial) -> SimpleNamespace:
    """What the writer thread needs of a Tune trial, as it is now (Tune goes on updating the trial)."""
    return SimpleNamespace(trial_id=trial.trial_id, config=trial.config, last_result=dict(trial.last_result or {}))


def log_champion(run_id: str, checkpoint_state: dict, splits: Splits, model_name: str) -> dict:
    """Evaluate a checkpoint on the test split, log it on run_id, register it, maybe promote it.

    The alias `champion` moves to the new version only when its test accuracy beats
    the current champion's. Returns the test summary plus the registry outcome.
    """
    model = serving_model(checkpoint_state)
    confusion = confusion_matrix(model, splits.test_images, splits.test_labels, len(splits.classes))
    summary = summarize(confusion, splits.classes)
    example_pixels = model_input(splits.test_images[:4])  # (4, 3, 32, 32) raw pixels
    example = example_pixels.numpy()
    with torch.no_grad():
        example_logits = model(example_pixels).numpy()
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("test_acc", summary["test_acc"])
        mlflow.log_metrics({f"test_acc_{name}": acc for name, acc in summary["per_class_acc"].items()})
        mlflow.log_dict({"classes": list(splits.classes), "confusion": confusion.tolist(),
                         **summary}, "evaluation/test_report.json")
        mlflow.log_figure(plot_confusion(confusion, splits.classes), "evaluation/confusion_matrix.png")
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=mlflow.models.infer_signature(example, example_logits),
            input_example=example,
            # torch.export's graph: loading it runs no pickled code and needs no lenet-tune install.
            serialization_format="pt2",
            # Class names travel with the model, so `predict` can name what it sees.
            metadata={"classes": list(splits.classes), "test_acc": summary["test_acc"]},
        )
    version = mlflow.register_model(info.model_uri, model_name, tags={"test_acc": f"{summary['test_acc']:.6f}",
                                                                      "run_id": run_id})
    promoted, previous = promote_if_better(model_name, version.version, summary["test_acc"])
    return {**summary, "confusion": confusion.tolist(), "classes": list(splits.classes),
            "model_uri": info.model_uri, "version": version.version,
            "promoted": promoted, "previous_champion_acc": previous}


def promote_if_better(model_name: str, version: str, test_acc: float):
    """Move the champion alias to `version` if it beats the current champion. (promoted, old acc)."""
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
        current_acc = float(current.tags.get("test_acc", "nan"))
    except MlflowException:
        current, current_acc = None, None
    if current is None or not (current_acc >= test_acc):  # nan compares False: replace it
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
        return True, current_acc
    return False, current_acc


