"""Eight trials logging every epoch at once into the default SQLite store lose nothing.

The sweep runs in its own process, whose in-process Ray claims 8 logical CPUs, so
all 8 one-CPU trials really run together on a 2-core machine. Meanwhile this test
reads the store the way `lenet-tune ui` would, so the writer also meets a reader.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import parent_runs, runs_of, steps, trial_runs, write_config

from trainables.tracking import EPOCH_METRICS

TRIALS = 8
EPOCHS = 5
# Starts Ray with 8 logical CPUs through the product's own connect_ray (loopback, token
# auth), then runs the ordinary CLI, which finds Ray already up and reuses it.
DRIVER = ("import sys\n"
          "from jobs.runtime import connect_ray\n"
          f"connect_ray(num_cpus={TRIALS})\n"
          "from jobs.cli import main\n"
          "sys.exit(main(sys.argv[1:]))\n")


def start_sweep(folder, name):
    # 8,000 synthetic images: an epoch lasts seconds when 8 trials share 2 cores, so they overlap.
    command = [sys.executable, "-c", DRIVER, "tune", "--config", write_config(folder, 8000), "--name", name,
               "--num-samples", str(TRIALS), "--epochs", str(EPOCHS), "--scheduler", "fifo",
               "--cpus-per-worker", "1", "--lr-range", "0.005,0.05"]  # no trial diverges and stops early
    # No --tracking-uri or --storage-path: the default store, ./mlflow.db, is what is under test.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "LENET_STORAGE_PATH", "RAY_ADDRESS")}
    log = open(folder / "sweep.log", "w")
    # Its own process group, so a failing test takes the driver's Ray down with it.
    return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), log


def watch_store(driver, folder, name, uri, deadline):
    """Poll the store while the sweep runs: the most child runs seen RUNNING with points at once."""
    # The store's tables exist once Tune has made the sweep's folder; reading earlier could
    # race the driver's own schema creation.
    while driver.poll() is None and not (folder / "results" / name).exists() and time.time() < deadline:
        time.sleep(0.5)
    most = 0
    while driver.poll() is None and time.time() < deadline:
        _, runs = runs_of(uri, name)
        live = [r for r in trial_runs(runs) if r.info.status == "RUNNING" and "val_acc" in r.data.metrics]
        most = max(most, len(live))
        time.sleep(1)
    return most


@pytest.mark.timeout(600)
def test_eight_concurrent_trials_lose_no_point_and_never_lock_the_store(tmp_path):
    name = "concurrent"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    driver, log = start_sweep(tmp_path, name)
    try:
        most_live = watch_store(driver, tmp_path, name, uri, deadline=time.time() + 420)
        code = driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        log.close()
    output = (tmp_path / "sweep.log").read_text(errors="replace")
    assert code == 0, output[-4000:]
    # A lock or any MLflow failure shows here: TrialLogger prints its warning and stops logging.
    assert output.lower().count("database is locked") == 0, output[-4000:]
    assert "OperationalError" not in output, output[-4000:]
    assert "warning: MLflow at" not in output, output[-4000:]

    client, runs = runs_of(uri, name)
    parents = parent_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = trial_runs(runs)
    assert len(kids) == TRIALS and len({k.data.tags["trial_id"] for k in kids}) == TRIALS
    assert all(k.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for k in kids)

    points = 0
    first_epoch_at, last_epoch_at = [], []
    for kid in kids:
        assert kid.info.status == "FINISHED" and kid.data.tags["epochs_run"] == str(EPOCHS)
        # Nothing but the per-epoch metrics, start-up once, and the best at the end.
        assert set(kid.data.metrics) == {*EPOCH_METRICS, "startup_seconds", "best_val_acc"}
        for key in EPOCH_METRICS:
            history = client.get_metric_history(kid.info.run_id, key)
            # One point per epoch: no step missing, none twice.
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), (kid.data.tags["trial_id"], key)
            points += len(history)
            if key == "val_acc":
                logged_at = {m.step: m.timestamp for m in history}
                first_epoch_at.append(logged_at[1])
                last_epoch_at.append(logged_at[EPOCHS])
        assert steps(client, kid, "startup_seconds") == [1]
    assert points == TRIALS * EPOCHS * len(EPOCH_METRICS)

    # Really concurrent: every trial was launched, and had reported its first epoch,
    # before any trial finished; and the store was seen holding 8 live, logging runs.
    assert max(k.info.start_time for k in kids) < min(k.info.end_time for k in kids)
    assert max(first_epoch_at) < min(last_epoch_at), (first_epoch_at, last_epoch_at)
    assert most_live == TRIALS
