"""A real local cluster, driven through the installed `lenet-tune` command as a user would.

`cluster up` starts a Ray head and an MLflow server on free loopback ports, with a token in a
scratch HOME; a smoke sweep goes through the Ray Jobs API and is read back from the MLflow
server over plain HTTP; missing or wrong tokens and dead addresses are refused in one line;
`cluster down` leaves no process and no port behind. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from helpers import LENET_TUNE, LOOPBACK, distinct_free_ports, listening_addresses

from jobs.cluster import alive, port_in_use, process_tree, stop_cluster
from jobs.cli import main
from jobs.runtime import free_port

pytestmark = [pytest.mark.timeout(1500),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for processes and sockets")]


class Cluster:
    def __init__(self, root: Path):
        self.folder = root / "cluster"
        self.home = root / "home"  # the token lands here, never in the real ~/.ray
        self.home.mkdir()
        self.workdir = root / "work"
        self.workdir.mkdir()
        self.ray_port, self.dashboard_port, self.mlflow_port = distinct_free_ports(3)
        self.outputs: list[str] = []  # everything the commands printed: the token must not be there

    def env(self, **changes) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in (
            "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS", "MLFLOW_TRACKING_URI",
            "LENET_STORAGE_PATH")}
        env["HOME"] = str(self.home)
        env.update(changes)
        return env

    def cli(self, *args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
        done = subprocess.run([LENET_TUNE, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.workdir, env=self.env(**env))
        self.outputs += [done.stdout, done.stderr]
        return done

    @property
    def state(self) -> dict:
        return json.loads((self.folder / "cluster.json").read_text())

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def jobs(self) -> list[dict]:
        reply = requests.get(f"{self.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {self.token()}"},
                             timeout=30)
        reply.raise_for_status()
        return reply.json()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = Cluster(tmp_path_factory.mktemp("local-cluster"))
    try:
        up = local.cli("cluster", "up", "--folder", str(local.folder), "--ray-port", str(local.ray_port),
                       "--dashboard-port", str(local.dashboard_port), "--mlflow-port", str(local.mlflow_port),
                       "--num-cpus", "2", "--timeout", "480", timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        yield local
    finally:  # stop whatever is still recorded, even when `up` or a test failed half-way
        if (local.folder / "cluster.json").exists():
            local.cli("cluster", "down", "--folder", str(local.folder), timeout=300)
        stop_cluster(local.folder)  # a no-op unless the command above failed
        if (stopped := local.folder / "cluster.stopped.json").exists():  # Ray's session logs in /tmp
            shutil.rmtree(json.loads(stopped.read_text())["ray"]["temp_dir"], ignore_errors=True)


def mlflow_get(cluster, endpoint: str, **params) -> dict:
    reply = requests.get(f"{cluster.mlflow}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    reply.raise_for_status()
    return reply.json()


def mlflow_post(cluster, endpoint: str, body: dict) -> dict:
    reply = requests.post(f"{cluster.mlflow}/api/2.0/mlflow/{endpoint}", json=body, timeout=30)
    reply.raise_for_status()
    return reply.json()


def cluster_processes(cluster) -> dict[int, int]:
    state = cluster.state
    return {pid: started for part in ("ray", "mlflow")
            for pid, started in process_tree(state[part]["pid"], state[part]["started"]).items()}


def test_status_reports_both_parts_healthy_on_loopback(cluster):
    done = cluster.cli("cluster", "status", "--folder", str(cluster.folder))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Ray     healthy: dashboard + Jobs API {cluster.dashboard}" in done.stdout
    assert f"MLflow  healthy: {cluster.mlflow}" in done.stdout
    assert "2 CPU" in done.stdout
    state = cluster.state
    assert state["ray"]["gcs_address"] == f"127.0.0.1:{cluster.ray_port}"
    # The node advertises loopback, not the machine's routable address.
    nodes = requests.get(f"{cluster.dashboard}/nodes?view=summary", timeout=30,
                         headers={"Authorization": f"Bearer {cluster.token()}"}).json()
    assert {n["raylet"]["nodeManagerAddress"] for n in nodes["data"]["summary"]} == {"127.0.0.1"}
    assert listening_addresses(cluster_processes(cluster)) <= LOOPBACK


def test_second_up_and_taken_ports_are_refused_in_one_line(cluster):
    again = cluster.cli("cluster", "up", "--folder", str(cluster.folder))
    assert again.returncode == 2 and "already running" in again.stderr, again.stderr
    elsewhere = cluster.cli("cluster", "up", "--folder", str(cluster.folder.parent / "other"),
                            "--dashboard-port", str(cluster.dashboard_port))
    assert elsewhere.returncode == 2, elsewhere.stderr
    port = cluster.dashboard_port
    assert elsewhere.stderr.strip() == (f"lenet-tune: error: --dashboard-port {port}: port {port} on 127.0.0.1 "
                                        "is in use; pass another --dashboard-port")
    assert not (cluster.folder.parent / "other" / "cluster.json").exists()


def test_submitted_sweep_lands_in_the_mlflow_server(cluster):
    done = cluster.cli("submit", "--folder", str(cluster.folder), "--", "tune", "--smoke", "--name", "cl-smoke",
                       timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].endswith("SUCCEEDED")

    experiment = mlflow_get(cluster, "experiments/get-by-name", experiment_name="lenet-cifar10")["experiment"]
    runs = mlflow_post(cluster, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                "max_results": 100})["runs"]
    parents = [r for r in runs if r["info"]["run_name"] == "cl-smoke"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    parent_id = parents[0]["info"]["run_id"]
    children = [r for r in runs if {"key": "mlflow.parentRunId", "value": parent_id} in r["data"].get("tags", [])]
    assert len(children) == 3
    for child in children:
        assert {"val_acc", "train_loss"} <= {m["key"] for m in child["data"].get("metrics", [])}
        history = mlflow_get(cluster, "metrics/get-history", run_id=child["info"]["run_id"], metric_key="val_acc")
        assert 1 <= len(history["metrics"]) <= 2  # one point per epoch run (ASHA may stop after one)

    champion = mlflow_get(cluster, "registered-models/alias", name="lenet-cifar10", alias="champion")
    assert champion["model_version"]["status"] == "READY"
    # Artifacts went through the server into the folder `cluster up` was given.
    assert any(path.is_file() for path in (cluster.folder / "mlartifacts").rglob("*"))
    assert (cluster.folder / "results" / "cl-smoke").is_dir()

    assert listening_addresses(cluster_processes(cluster)) <= LOOPBACK  # job drivers and workers too
    token = cluster.token()
    assert all(token not in job["entrypoint"] and token not in json.dumps(job.get("runtime_env"))
               for job in cluster.jobs())
    assert all(token not in output for output in cluster.outputs)


def test_jobs_commands_list_follow_and_stop(cluster, monkeypatch, capsys):
    """The plain entry point, in this process: the installed command is exercised above and below."""
    monkeypatch.setenv("HOME", str(cluster.home))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LENET_STORAGE_PATH"):
        monkeypatch.delenv(name, raising=False)

    def lenet_tune(*args: str) -> tuple[int, str, str]:
        command, words = (args[:args.index("--")], args[args.index("--"):]) if "--" in args else (args, ())
        code = main([*command, "--folder", str(cluster.folder), *words])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = lenet_tune("submit", "--no-wait", "--", "tune", "--smoke", "--name", "cl-stopped")
    assert code == 0, out + err
    job_id = out.split()[1]  # "submitted ID to URL: ..."
    code, out, _ = lenet_tune("jobs", "list")
    assert f"{job_id}  " in out and "tune --smoke --name cl-stopped" in out

    code, out, err = lenet_tune("jobs", "stop", job_id)
    assert code == 0 and f"stop requested for {job_id}" in out, out + err
    deadline = time.monotonic() + 120
    while not (out := lenet_tune("jobs", "status", job_id)[1]).startswith(f"{job_id} STOPPED"):
        assert time.monotonic() < deadline, out
        time.sleep(1)
    code, out, _ = lenet_tune("jobs", "logs", job_id, "--follow")
    assert out.strip().splitlines()[-1] == f"job {job_id} STOPPED"

    code, _, err = lenet_tune("jobs", "status", "raysubmit_nope")
    assert code == 2 and "jobs list" in err


@pytest.mark.parametrize("token,status", [(None, "401"), ("not-the-token", "403")])
def test_submission_without_the_right_token_is_refused(cluster, token, status):
    before = len(cluster.jobs())
    stranger = cluster.folder.parent / f"stranger-{status}"  # a HOME with no ~/.ray/auth_token
    stranger.mkdir(exist_ok=True)
    env = {"HOME": str(stranger), **({"RAY_AUTH_TOKEN": token} if token else {})}
    done = cluster.cli("submit", "--address", cluster.dashboard, "--", "tune", "--smoke", **env)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert status in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(cluster.jobs()) == before


def test_address_where_nothing_listens_fails_fast_in_one_line(cluster):
    nobody = free_port()
    started = time.monotonic()
    done = cluster.cli("submit", "--address", f"http://127.0.0.1:{nobody}", "--", "tune", "--smoke")
    assert time.monotonic() - started < 30
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and f"127.0.0.1:{nobody}" in done.stderr, done.stderr


def test_down_stops_every_recorded_process_and_frees_the_ports(cluster):
    state = cluster.state
    processes = cluster_processes(cluster)
    assert len(processes) > 5  # GCS, raylet, dashboard, agents, MLflow...
    ports = [*state["ray"]["ports"].values(), state["mlflow"]["port"]]

    done = cluster.cli("cluster", "down", "--folder", str(cluster.folder))
    assert done.returncode == 0, done.stdout + done.stderr
    assert [pid for pid, started in processes.items() if alive(pid, started)] == []
    assert [port for port in ports if port_in_use(port)] == []
    assert not (cluster.folder / "cluster.json").exists()
    assert cluster.cli("cluster", "status", "--folder", str(cluster.folder)).returncode == 1
