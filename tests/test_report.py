"""The sweep report: every plot, the table and an index.html that links them, offline."""

import re

import numpy as np
import pandas as pd
import pytest

from jobs.report import PLOTS, build_report, tables_from_results

CLASSES = [f"class{i}" for i in range(10)]
MAX_EPOCHS = 4


def hand_made_sweep():
    """Five trials: two completed, one stopped early by ASHA, one diverged, one that errored."""
    trials = pd.DataFrame([
        # trial_id, lr, batch_size, momentum, dilation, padding, augment, best_val_acc, epochs_run, stopped, diverged, status
        ("a0001", 0.05, 64, 0.9, 1, 0, "flip", 0.82, 4, False, False, "TERMINATED"),
        ("a0002", 0.01, 128, 0.8, 2, 2, "none", 0.64, 4, False, False, "TERMINATED"),
        ("a0003", 0.007, 256, 0.95, 1, 1, "flip-crop", 0.31, 1, True, False, "TERMINATED"),
        ("a0004", 0.19, 64, 0.95, 2, 2, "flip", np.nan, 1, False, True, "TERMINATED"),
        ("a0005", 0.02, 128, 0.9, 1, 0, "flip", 0.40, 2, False, False, "ERROR"),
    ], columns=["trial_id", "lr", "batch_size", "momentum", "dilation", "padding", "augment",
                "best_val_acc", "epochs_run", "stopped_early", "diverged", "status"])
    curves = {}
    for trial in trials.itertuples():
        epochs = np.arange(1, trial.epochs_run + 1)
        final = 0.0 if trial.diverged else trial.best_val_acc
        curves[trial.trial_id] = pd.DataFrame({
            "epoch": epochs,
            "train_loss": np.full(len(epochs), np.nan) if trial.diverged else 2.3 / epochs,
            "val_loss": np.full(len(epochs), np.nan) if trial.diverged else 2.4 / epochs,
            "val_acc": np.linspace(0.1, final, len(epochs)) if len(epochs) > 1 else [final],
        })
    rng = np.random.default_rng(0)
    confusion = (np.diag(rng.integers(20, 40, 10)) + rng.integers(0, 4, (10, 10))).tolist()
    return trials, curves, confusion


def test_report_writes_every_file_and_links_them(tmp_path):
    trials, curves, confusion = hand_made_sweep()
    index = build_report(trials, curves, confusion, CLASSES, MAX_EPOCHS, tmp_path / "report")

    assert index == tmp_path / "report" / "index.html"
    expected = {"index.html", "trials.csv", *PLOTS}
    assert {"parallel_coordinates.png", "learning_curves.png", "early_stopping.png",
            "confusion_matrix.png", "per_class_accuracy.png"} <= set(PLOTS)
    assert {p.name for p in index.parent.iterdir()} == expected
    for name in expected:
        assert (index.parent / name).stat().st_size > 0, name
    for name in PLOTS:
        assert (index.parent / name).read_bytes().startswith(b"\x89PNG"), name

    table = pd.read_csv(index.parent / "trials.csv")
    assert len(table) == len(trials)
    assert set(table["trial_id"]) == set(trials["trial_id"])
    assert table["trial_id"].iloc[0] == "a0001"  # best first
    assert table.loc[table["trial_id"] == "a0004", "diverged"].item()

    page = index.read_text()
    links = set(re.findall(r'(?:href|src)="([^"]+)"', page))
    assert expected - {"index.html"} <= links
    assert all("://" not in link and not link.startswith("/") for link in links)  # relative: works offline
    assert "a0001" in page and "0.8200" in page  # the best trial and its val_acc in the summary
    assert "lr=0.05" in page and "diverged" in page and "stopped early" in page


@pytest.fixture(scope="module")
def tune_results(ray_runtime, tmp_path_factory):
    """A real (tiny) Tune sweep with ASHA: one trial diverges, the rest report a rising accuracy."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    def trainable(config):
        for epoch in range(1, MAX_EPOCHS + 1):
            if config["lr"] > 1:  # a diverged trial reports one NaN epoch and stops, as loop.fit does
                tune.report({"epoch": epoch, "train_loss": float("nan"), "val_acc": 0.0, "diverged": 1})
                return
            tune.report({"epoch": epoch, "train_loss": 2.0 / epoch, "val_loss": 2.1 / epoch,
                         "val_acc": config["quality"] * epoch / MAX_EPOCHS, "diverged": 0})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.5}),
        param_space={"lr": tune.grid_search([0.01, 0.02, 0.03, 5.0]),
                     "quality": tune.sample_from(lambda spec: 1.0 - spec.config.lr * 10)},
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", max_concurrent_trials=1,
                                    scheduler=ASHAScheduler(time_attr="epoch", max_t=MAX_EPOCHS,
                                                            grace_period=1, reduction_factor=2)),
        run_config=tune.RunConfig(storage_path=str(tmp_path_factory.mktemp("tune")), verbose=0),
    )
    return tuner.fit()


def test_tables_from_real_tune_results_feed_the_report(tune_results, tmp_path):
    def params_of(config):
        return {"lr": config["lr"], "batch_size": 64, "momentum": 0.9, "dilation": 1, "padding": 0, "augment": "flip"}

    trials, curves = tables_from_results(tune_results, params_of, MAX_EPOCHS)
    assert len(trials) == 4 and set(curves) == set(trials["trial_id"])
    diverged = trials[trials["diverged"]]
    assert list(diverged["lr"]) == [5.0] and diverged["best_val_acc"].isna().all()
    for trial in trials.itertuples():
        assert len(curves[trial.trial_id]) == trial.epochs_run
        assert list(curves[trial.trial_id].columns) == ["epoch", "train_loss", "val_loss", "val_acc"]
        assert trial.stopped_early == (not trial.diverged and trial.epochs_run < MAX_EPOCHS)
    # The first (best) trial always runs to the end: ASHA has nothing to compare it with yet.
    assert trials.loc[trials["lr"] == 0.01, "epochs_run"].item() == MAX_EPOCHS

    index = build_report(trials, curves, np.eye(10, dtype=int).tolist(), CLASSES, MAX_EPOCHS, tmp_path)
    assert index.exists() and len(pd.read_csv(tmp_path / "trials.csv")) == 4
