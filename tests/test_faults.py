"""Faults injected for real: killed workers and drivers, diverging trials, unreachable servers.

Each test checks that nothing is lost or duplicated: one MLflow run per trial, one
metric point per epoch, finished trials never run again.
"""

import os
import signal
import subprocess
import threading
import time

import mlflow
import pytest
import requests
from helpers import LENET_TUNE, finished_sweep, parent_runs, runs_of, steps, trial_runs, write_config

from jobs.cli import main
from jobs.cluster import MLFLOW_ENV, LocalCluster, mlflow_command, start_process, stop_processes
from jobs.runtime import free_port


def train_killing_a_process_mid_run(tmp_path, name: str, pick, *flags) -> tuple[dict, object]:
    """`lenet-tune train` for 6 epochs; once 2 are in MLflow and `pick()` names a process ({"pid": ...},
    optionally "watch": a pid that must end after the kill), SIGKILL it. The run must still end whole: one
    MLflow run, one point per epoch. Returns what was killed (with "watch_gone") and the run."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    killed = {}

    def kill_mid_run():
        deadline = time.time() + 300
        while time.time() < deadline:
            client, runs = runs_of(uri, name)
            logged = steps(client, trial_runs(runs)[0]) if trial_runs(runs) else []
            target = pick() if len(logged) >= 2 else None
            if target:
                killed.update(target, epochs_logged=len(logged))
                os.kill(target["pid"], signal.SIGKILL)
                if "watch" in target:
                    gone_by = time.time() + 15
                    while os.path.exists(f"/proc/{target['watch']}") and time.time() < gone_by:
                        time.sleep(0.1)
                    killed["watch_gone"] = not os.path.exists(f"/proc/{target['watch']}")
                return
            time.sleep(0.3)

    watcher = threading.Thread(target=kill_mid_run, daemon=True)
    watcher.start()
    code = main(["train", "--config", write_config(tmp_path, 20000, "faults.yaml"), "--epochs", "6",
                 "--batch-size", "64", "--name", name, "--tracking-uri", uri,
                 "--storage-path", str(tmp_path / "results"), *flags])
    watcher.join(timeout=5)
    assert code == 0
    assert killed, "the run finished before its process could be killed"
    assert 2 <= killed["epochs_logged"] < 6
    client, runs = runs_of(uri, name)
    assert len(runs) == 1  # still exactly one MLflow run
    assert steps(client, runs[0]) == [1, 2, 3, 4, 5, 6]  # resumed from the last checkpoint: no gaps, no repeats
    return killed, runs[0]


def test_killed_training_worker_resumes_with_one_point_per_epoch(ray_runtime, tmp_path):
    from ray.util.state import list_actors

    def a_worker():
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        return {"pid": workers[0].pid} if workers else None

    _, run = train_killing_a_process_mid_run(tmp_path, "kill-worker", a_worker, "--trial-runner", "torchtrainer")
    assert run.data.tags["epochs_run"] == "6"


@pytest.mark.parametrize("victim", ["training process", "trial process"])
def test_killed_one_worker_trial_resumes_and_leaves_no_training_behind(ray_runtime, tmp_path, victim):
    """A one-worker trial is a thin Tune process and the child of the node's fork server that trains.
    Kill the child: the trial fails and Tune restarts it from its checkpoint. Kill the trial: its child
    stops too (it must not keep the CPUs Tune gives the restarted trial), and the trial restarts."""
    import ray
    from ray.util.state import list_actors

    from trainables.forkserver import SERVER_PREFIX

    def the_victim():
        alive = list_actors(filters=[("state", "=", "ALIVE")])
        trial = [a for a in alive if "ImplicitFunc" in a.class_name]
        server = [a for a in alive if a.class_name == "ForkServer"]
        children = ray.get(ray.get_actor(SERVER_PREFIX + server[0].node_id).children.remote()) if server else []
        if not (trial and len(children) == 1):
            return None
        return {"pid": children[0] if victim == "training process" else trial[0].pid, "watch": children[0]}

    killed, _ = train_killing_a_process_mid_run(tmp_path, "kill-" + victim.split()[0], the_victim)
    assert killed["watch_gone"]  # the old child ended (and was reaped) while the sweep went on
    # The sweep's end stopped the fork server too.
    assert not [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "ForkServer"]


def start_sweep(tmp_path, uri, name, *extra):
    command = [LENET_TUNE, "tune", "--config", write_config(tmp_path, 8000, "faults.yaml"), "--num-samples", "4",
               "--epochs", "4", "--scheduler", "fifo", "--name", name, "--tracking-uri", uri,
               "--storage-path", str(tmp_path / "results"), *extra]
    log = open(tmp_path / f"{name}.log", "w")
    # Its own process group: the in-process Ray started by the driver goes down with it.
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.parametrize("how", [
    "SIGKILL",
    pytest.param("SIGINT", marks=pytest.mark.slow),
])
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_runtime, tmp_path, how):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    name = f"interrupted-{how.lower()}"
    driver = start_sweep(tmp_path, uri, name)
    try:
        deadline = time.time() + 300
        finished = []
        while time.time() < deadline and driver.poll() is None:
            client, runs = runs_of(uri, name)
            finished = [r for r in trial_runs(runs) if r.info.status == "FINISHED"]
            if finished:
                break
            time.sleep(0.5)
        assert finished and driver.poll() is None, "no trial finished before the sweep ended"
        if how == "SIGKILL":
            os.killpg(driver.pid, signal.SIGKILL)
        else:
            os.kill(driver.pid, signal.SIGINT)
        code = driver.wait(timeout=120)
        assert code == (130 if how == "SIGINT" else -signal.SIGKILL)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    time.sleep(1)
    client, _ = runs_of(uri, name)
    before = {r.data.tags["trial_id"]: client.get_metric_history(r.info.run_id, "val_acc") for r in finished}

    resumed = subprocess.run([LENET_TUNE, "tune", "--resume", name, "--tracking-uri", uri,
                              "--storage-path", str(tmp_path / "results")],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client, _, kids = finished_sweep(uri, name, trials=4, epochs=4)  # the same parent, continued
    for kid in kids:
        if kid.data.tags["trial_id"] in before:  # finished before the interruption: not run again
            after = client.get_metric_history(kid.info.run_id, "val_acc")
            assert [(m.step, m.value, m.timestamp) for m in after] == \
                [(m.step, m.value, m.timestamp) for m in before[kid.data.tags["trial_id"]]]


def test_diverging_trial_is_marked_and_never_champion(ray_runtime, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(["tune", "--smoke", "--lr-range", "0.02,100000", "--num-samples", "4", "--seed", "3",
                 "--scheduler", "fifo", "--name", "diverge", "--tracking-uri", uri,
                 "--storage-path", str(tmp_path / "results")])
    assert code == 0, capsys.readouterr().err
    client, runs = runs_of(uri, "diverge")
    kids = trial_runs(runs)
    diverged = [k for k in kids if k.data.tags["diverged"] == "true"]
    healthy = [k for k in kids if k.data.tags["diverged"] == "false"]
    assert diverged and healthy, "pick a seed that samples both kinds of learning rate"
    for kid in diverged:
        assert kid.info.status == "FINISHED" and steps(client, kid) == [1]  # stopped at once, not retried
        assert float(kid.data.params["lr"]) > 1
    parent = parent_runs(runs)[0]
    assert parent.data.tags["best_run_id"] in {k.info.run_id for k in healthy}


def test_unreachable_tracking_server_fails_fast_naming_the_uri(workdir, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    assert main(["tune", "--smoke", "--tracking-uri", uri]) == 2
    assert time.time() - started < 30
    err = capsys.readouterr().err.strip()
    assert uri in err and len(err.splitlines()) == 1
    assert os.listdir(workdir) == []


def test_gpus_on_a_cluster_without_gpus_are_refused_up_front(ray_runtime, workdir, capsys):
    assert main(["tune", "--smoke", "--gpus-per-worker", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--gpus-per-worker 1.0" in err and "0 GPUs" in err
    assert os.listdir(workdir) == []


def start_mlflow_server(folder, port) -> dict:
    """The MLflow server `lenet-tune cluster up` runs, on port, in its own process group."""
    server = start_process(mlflow_command(LocalCluster(folder, mlflow_port=port), folder), folder / "mlflow.log",
                           {**os.environ, **MLFLOW_ENV})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return server
        except requests.RequestException:
            time.sleep(1)
    stop_processes([server], timeout=10)
    raise RuntimeError("mlflow server did not start")


@pytest.mark.slow
def test_tracking_server_dying_mid_sweep_loses_no_result(ray_runtime, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    driver = None
    try:
        driver = start_sweep(tmp_path, uri, "outage")
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            client, runs = runs_of(uri, "outage")
            if any(steps(client, kid) for kid in trial_runs(runs)):
                break
            time.sleep(0.5)
        stop_processes([server], timeout=40)  # the tracking server dies mid-sweep
        code = driver.wait(timeout=600)
        log = (tmp_path / "outage.log").read_text()
        assert code == 1 and "lenet-tune tune --resume outage" in log
        assert "Traceback" not in log.split("warning: MLflow")[-1]
        # Training finished regardless: every trial's last epoch is in Ray's results.
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(str(tmp_path / "results" / "outage"))
        assert len(analysis.trials) == 4
        assert all(t.last_result.get("epoch") == 4 for t in analysis.trials)

        server = start_mlflow_server(tmp_path, port)  # back, with the same store
        resumed = subprocess.run([LENET_TUNE, "tune", "--resume", "outage", "--tracking-uri", uri,
                                  "--storage-path", str(tmp_path / "results")],
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        # Every epoch logged before the outage or back-filled from Ray's results, once.
        client, _, _ = finished_sweep(uri, "outage", trials=4, epochs=4)
        assert client.get_model_version_by_alias("lenet-cifar10", "champion")
        assert "epoch(s) that MLflow had missed" in resumed.stdout
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        stop_processes([server], timeout=40)


def test_planted_secrets_never_reach_mlflow_or_the_output(ray_runtime, tmp_path, monkeypatch, capsys):
    from trainables.config import redact

    secret = "planted-s3cr3t-value"
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN_PLANTED"):
        monkeypatch.setenv(name, secret)
    assert redact(f"https://user:{secret}@mlflow.example/x") == "https://***@mlflow.example/x"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["tune", "--smoke", "--num-samples", "2", "--name", "secret", "--tracking-uri", uri,
                 "--storage-path", str(tmp_path / "results")]) == 0
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    client, runs = runs_of(uri, "secret")
    for run in runs:
        assert secret not in repr(run.data.params) + repr(run.data.tags)
    parent = parent_runs(runs)[0]
    config = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/sweep-config.yaml")
    assert secret not in config
