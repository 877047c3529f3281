"""TrialLogger on a real SQLite MLflow store, called the way Tune calls it: hooks, then on_experiment_end."""

import threading
import time
from types import SimpleNamespace

import mlflow
from ray import cloudpickle

from trainables import tracking


def make_logger(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.configure(uri, "lenet-cifar10")
    parent = tracking.open_parent_run(uri, experiment_id, "unit", False, {"sweep": "unit"}, {}, {})
    logger = tracking.TrialLogger(uri, experiment_id, parent, lambda config: dict(config), {"sweep": "unit"},
                                  max_epochs=2)
    return mlflow.MlflowClient(uri), experiment_id, logger


def tune_trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"lr": 0.01}, last_result={})  # what the logger reads


def report(trial, epoch: int, val_acc: float) -> dict:
    trial.last_result = {"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "val_acc": val_acc,
                         "epoch_seconds": 0.1, "images_per_second": 1.0, "timestamp": time.time()}
    return trial.last_result


def runs_of_trial(client, experiment_id, trial_id):
    return client.search_runs([experiment_id], f"tags.trial_id = '{trial_id}'")


def test_hooks_hand_mlflow_calls_to_the_writer_and_experiment_end_waits_for_them(tmp_path, monkeypatch):
    client, experiment_id, logger = make_logger(tmp_path)
    trial = tune_trial("t1")
    logger.on_trial_start(0, [], trial)
    logger.flush()  # the trial's run exists

    # MLflow stalls (a slow server): the writer waits at every log_batch until the gate opens.
    gate, in_tunes_thread = threading.Event(), []
    log_batch = mlflow.MlflowClient.log_batch

    def stalled(self, *args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            in_tunes_thread.append(kwargs)  # a hook calling MLflow itself: don't hang the test on it
        else:
            gate.wait(60)
        return log_batch(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", stalled)
    for epoch, val_acc in ((1, 0.3), (2, 0.5)):
        logger.on_trial_result(0, [], trial, report(trial, epoch, val_acc))
    logger.on_trial_complete(0, [], trial)
    assert in_tunes_thread == []  # every hook returned without calling MLflow
    (run,) = runs_of_trial(client, experiment_id, "t1")
    assert run.info.status == "RUNNING" and "val_acc" not in run.data.metrics  # still queued

    gate.set()
    logger.on_experiment_end([])  # Tune's last call: returns once the writer is done
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_acc")] == [(1, 0.3), (2, 0.5)]
    assert run.data.metrics["best_val_acc"] == 0.5
    assert run.data.tags["epochs_run"] == "2" and run.data.tags["stopped_early"] == "false"


def test_a_logger_restored_for_a_resumed_sweep_continues_each_trials_run(tmp_path):
    client, experiment_id, logger = make_logger(tmp_path)
    saved = cloudpickle.dumps(logger)  # Tune pickles its callbacks with the sweep, before any trial runs
    trial = tune_trial("t1")
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, report(trial, 1, 0.4))
    cloudpickle.dumps(logger)  # a logger with its writer running still pickles
    logger.on_experiment_end([])  # the sweep is interrupted after epoch 1

    restored = cloudpickle.loads(saved)  # `lenet-tune tune --resume`
    restored.on_trial_start(0, [], trial)
    restored.on_trial_result(0, [], trial, report(trial, 1, 0.4))  # Tune replays nothing twice into MLflow...
    restored.on_trial_result(0, [], trial, report(trial, 2, 0.3))
    restored.on_trial_complete(0, [], trial)
    restored.on_experiment_end([])
    (run,) = runs_of_trial(client, experiment_id, "t1")  # ... and the trial keeps its one run
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    assert run.data.metrics["best_val_acc"] == 0.4  # the best over both processes' epochs
    assert run.info.status == "FINISHED"
