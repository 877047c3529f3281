"""End to end: a real sweep and a real training run on synthetic data, read back from MLflow."""

import mlflow
import numpy as np
import pytest
import torch

from jobs.cli import main

EXPECTED_PARAMS = {"lr", "dilation", "padding", "batch_size", "momentum", "weight_decay", "epochs",
                   "workers_per_trial", "cpus_per_worker", "gpus_per_worker", "data_source"}


def child_runs(client, experiment_id, parent_id):
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.fixture(scope="module")
def sweep(ray_runtime, tmp_path_factory):
    """`lenet-tune tune --smoke`: 3 trials x 2 epochs on synthetic data, 2 CPUs."""
    folder = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{folder}/mlflow.db"
    code = main(["tune", "--smoke", "--name", "smoke", "--tracking-uri", uri,
                 "--storage-path", str(folder / "results"), "--data-dir", str(folder / "data")])
    assert code == 0
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lenet-cifar10")
    return folder, uri, client, experiment


def test_one_parent_and_one_child_per_trial(sweep):
    _, _, client, experiment = sweep
    parents = client.search_runs([experiment.experiment_id], "tags.sweep = 'smoke' and attributes.run_name = 'smoke'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["num_samples"] == "3"
    assert {"git_commit", "ray_version", "torch_version", "mlflow_version", "data_source"} <= set(parent.data.tags)
    children = child_runs(client, experiment.experiment_id, parent.info.run_id)
    assert len(children) == 3
    assert len({c.data.tags["trial_id"] for c in children}) == 3
    for child in children:
        assert EXPECTED_PARAMS <= set(child.data.params), child.data.params.keys()
        assert child.data.params["data_source"] == "synthetic"
        assert child.info.status == "FINISHED"


def test_one_metric_point_per_epoch(sweep):
    _, _, client, experiment = sweep
    parent = client.search_runs([experiment.experiment_id], "attributes.run_name = 'smoke'")[0]
    for child in child_runs(client, experiment.experiment_id, parent.info.run_id):
        epochs_run = int(child.data.tags["epochs_run"])
        assert 1 <= epochs_run <= 2
        for key in ("train_loss", "val_loss", "val_acc", "epoch_seconds", "images_per_second"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs_run + 1)), (key, steps)
        # Start-up overhead is logged once, at the first epoch.
        assert [m.step for m in client.get_metric_history(child.info.run_id, "startup_seconds")] == [1]
        # ASHA may stop trials early; such trials are tagged so users can tell.
        assert child.data.tags["stopped_early"] == ("true" if epochs_run < 2 else "false")
        assert child.data.tags["diverged"] == "false"
        # The trial's best epoch, for sorting runs in the UI.
        history = [m.value for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert child.data.metrics["best_val_acc"] == max(history)


def test_champion_is_registered_with_test_evaluation(sweep):
    _, _, client, experiment = sweep
    parent = client.search_runs([experiment.experiment_id], "attributes.run_name = 'smoke'")[0]
    assert 0.0 <= parent.data.metrics["test_acc"] <= 1.0
    assert {f"test_acc_class{i}" for i in range(10)} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/test_report.json"} <= artifacts
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/index.html", "report/trials.csv", "report/learning_curves.png"} <= report
    assert "sweep-config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    version = client.get_model_version_by_alias("lenet-cifar10", "champion")
    assert float(version.tags["test_acc"]) == pytest.approx(parent.data.metrics["test_acc"], abs=1e-6)
    model = mlflow.pytorch.load_model("models:/lenet-cifar10@champion")
    pixels = torch.randint(0, 256, (6, 3, 32, 32)).float()
    assert model(pixels).shape == (6, 10)
    # The registered model carries a signature and an input example.
    info = mlflow.models.get_model_info("models:/lenet-cifar10@champion")
    assert info.signature is not None and info.saved_input_example_info is not None


def test_train_logs_one_run_and_champion_moves_only_when_beaten(sweep, capsys):
    folder, uri, client, experiment = sweep
    before = client.get_model_version_by_alias("lenet-cifar10", "champion")
    # Through a real TorchTrainer (the sweep above ran its one-worker trials in-trial).
    code = main(["train", "--smoke", "--name", "single", "--epochs", "3", "--batch-size", "32",
                 "--trial-runner", "torchtrainer",
                 "--tracking-uri", uri, "--storage-path", str(folder / "results")])
    assert code == 0
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name LIKE 'trial-%' and tags.sweep = 'single'")
    assert len(runs) == 1
    run = runs[0]
    assert "mlflow.parentRunId" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3]
    assert run.data.metrics["test_acc"] > 0.3  # chance is 0.1 on synthetic data
    after = client.get_model_version_by_alias("lenet-cifar10", "champion")
    new_version = max(int(v.version) for v in client.search_model_versions("name = 'lenet-cifar10'"))
    beat = run.data.metrics["test_acc"] > float(before.tags["test_acc"])
    assert int(after.version) == (new_version if beat else int(before.version))
    assert "test accuracy" in capsys.readouterr().out


def test_evaluate_scores_the_champion(sweep, capsys):
    _, uri, _, _ = sweep
    assert main(["evaluate", "--data", "synthetic", "--tracking-uri", uri, "--json"]) == 0
    out = capsys.readouterr().out
    import json

    report = json.loads(out[out.index("{"):])
    assert report["test_images"] == 400 and 0 <= report["test_acc"] <= 1
    assert np.isclose(sum(1 for _ in report["per_class_acc"]), 10)


def test_backfill_relogs_epochs_mlflow_missed_from_ray_results(sweep, tmp_path):
    """A server outage or a killed driver leaves gaps in MLflow; Ray's results fill them, once."""
    import shutil
    import sqlite3

    from ray.tune import ExperimentAnalysis, ResultGrid

    from trainables.tracking import TrialLogger

    folder, uri, client, experiment = sweep
    shutil.copy(folder / "mlflow.db", tmp_path / "gappy.db")  # leave the shared store alone
    gappy_uri = f"sqlite:///{tmp_path}/gappy.db"
    gappy = mlflow.MlflowClient(gappy_uri)
    parent = gappy.search_runs([experiment.experiment_id], "attributes.run_name = 'smoke'")[0]
    kids = child_runs(gappy, experiment.experiment_id, parent.info.run_id)
    full = {k.info.run_id: [(m.step, m.value) for m in client.get_metric_history(k.info.run_id, "val_acc")]
            for k in kids}
    victim = kids[0].info.run_id
    with sqlite3.connect(tmp_path / "gappy.db") as db:  # what a driver killed after epoch 0 leaves
        db.execute("DELETE FROM metrics WHERE run_uuid = ?", (victim,))
        db.execute("DELETE FROM latest_metrics WHERE run_uuid = ?", (victim,))
        db.execute("UPDATE runs SET status = 'RUNNING', end_time = NULL WHERE run_uuid = ?", (victim,))
    assert gappy.get_metric_history(victim, "val_acc") == []

    results = ResultGrid(ExperimentAnalysis(str(folder / "results" / "smoke")))
    logger = TrialLogger(gappy_uri, experiment.experiment_id, parent.info.run_id, lambda c: {}, {}, 2)
    assert logger.backfill(results) == len(full[victim])
    for kid in kids:
        assert [(m.step, m.value) for m in gappy.get_metric_history(kid.info.run_id, "val_acc")] == \
            full[kid.info.run_id]
    assert gappy.get_run(victim).info.status == "FINISHED"
    ended = {k.info.run_id: gappy.get_run(k.info.run_id).info.end_time for k in kids}
    fresh = TrialLogger(gappy_uri, experiment.experiment_id, parent.info.run_id, lambda c: {}, {}, 2)
    assert fresh.backfill(results) == 0  # nothing missing: nothing logged twice
    # ... and no finished run reopened and finished again (its end time kept).
    assert {k.info.run_id: gappy.get_run(k.info.run_id).info.end_time for k in kids} == ended
    assert len(child_runs(gappy, experiment.experiment_id, parent.info.run_id)) == 3
