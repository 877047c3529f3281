"""Fault 3, node lost: a worker node of a real multi-node Ray cluster is lost mid-sweep.

Everything runs on this machine, on 127.0.0.1, with token auth: a Ray head with no CPUs (so
every trial lands on a worker node), two worker nodes of one CPU each, an MLflow server, and
the sweep driver (`lenet-tune tune` with RAY_ADDRESS). Once a trial has reported an epoch, every
process of the node running it (raylet, agents, the trial itself) is SIGKILLed, or first frozen
with SIGSTOP as a hung or cut-off machine would be. Ray declares the node dead, Tune restarts the
trial from its latest checkpoint on the surviving node, and MLflow still holds one finished run per
trial with one point per epoch. About 1.5 to 2 minutes on 2 cores; the frozen case (`-m slow`) 2 more,
most of it Ray's default heartbeat timeout.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from helpers import (LENET_TUNE, LOOPBACK, distinct_free_ports, finished_sweep, listening_addresses, runs_of, steps,
                     trial_runs, write_config)

from jobs.cluster import (
    CLUSTER_ENV,
    MLFLOW_ENV,
    LocalCluster,
    _stat,
    alive,
    mlflow_command,
    process_tree,
    ray_command,
    ray_temp_dir,
    start_process,
    stop_processes,
)

SWEEP, TRIALS, EPOCHS = "node-lost", 3, 5
pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for processes")]

# `ray start` refuses to join a cluster while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, yet that setting
# is what keeps a node on 127.0.0.1 (with it on, Ray swaps a loopback --address for this machine's
# routable address). So a worker node runs Ray's own CLI with only that refusal lifted.
JOIN_ON_LOOPBACK = ("import sys, types, ray._private.ray_constants as constants; from ray.scripts import scripts; "
                    "scripts.ray_constants = types.SimpleNamespace(**{**vars(constants), 'ENABLE_RAY_CLUSTER': True}); "
                    "sys.argv[0] = 'ray'; scripts.main()")
# Ports Ray would otherwise fix (dashboard agent 52365, ...) and so share between nodes on one host.
NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


def tree(part: dict) -> dict[int, int]:
    return process_tree(part["pid"], part["started"])


class NodeCluster:
    """A Ray head (0 CPUs), worker nodes (1 CPU each) and an MLflow server, each its own process group."""

    def __init__(self, root: Path):
        self.root = root
        self.token = secrets.token_hex(32)  # the cluster's own: ~/.ray is never read or written
        self.gcs_port, self.dashboard_port, self.mlflow_port = distinct_free_ports(3)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "LENET_"))}
        self.env.update(CLUSTER_ENV, RAY_AUTH_TOKEN=self.token,
                        PATH=os.pathsep.join([os.path.dirname(sys.executable), self.env.get("PATH", "")]))
        self.parts: list[dict] = []  # every process group started here, stopped at the end
        self.workers: dict[str, dict] = {}  # name -> part, with its Ray node id once known
        self.temp_dirs = [ray_temp_dir(root / "head")]

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def start(self, command: list[str], name: str, env: dict) -> dict:
        part = start_process(command, self.root / "logs" / f"{name}.log", env)
        self.parts.append(part)
        return part

    def start_head(self) -> None:
        folder = self.root / "head"  # its Ray temp dir is short and its own (Unix sockets live there)
        more_ports = dict(zip(("ray-client-server-port", *NODE_PORTS), distinct_free_ports(5)))
        metric_ports = dict(zip(("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT"), map(str, distinct_free_ports(2))))
        self.start(ray_command(LocalCluster(folder, self.gcs_port, self.dashboard_port, num_cpus=0, num_gpus=0),
                               folder, more_ports), "head", {**self.env, **metric_ports})
        self.start(mlflow_command(LocalCluster(self.root, mlflow_port=self.mlflow_port), self.root), "mlflow",
                   {**self.env, **MLFLOW_ENV})

    def start_worker(self, name: str) -> None:
        temp_dir = ray_temp_dir(self.root / name)
        self.temp_dirs.append(temp_dir)
        command = [sys.executable, "-c", JOIN_ON_LOOPBACK, "start", "--block", "--disable-usage-stats",
                   "--address", f"127.0.0.1:{self.gcs_port}", "--node-ip-address", "127.0.0.1",
                   "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(temp_dir)]
        for flag, port in zip(NODE_PORTS, distinct_free_ports(len(NODE_PORTS))):
            command += [f"--{flag}", str(port)]
        self.workers[name] = self.start(command, name, self.env)

    def ray_get(self, endpoint: str, **params) -> list[dict]:
        """Rows of Ray's state API (the dashboard's /api/v0/...), asked with the token."""
        reply = requests.get(f"{self.dashboard}/api/v0/{endpoint}", params={"limit": 10000, "detail": 1, **params},
                             headers={"Authorization": f"Bearer {self.token}"}, timeout=30)
        reply.raise_for_status()
        return reply.json()["data"]["result"]["result"]

    def node_states(self) -> dict[str, str]:
        return {node["node_id"]: node["state"] for node in self.ray_get("nodes")}

    def node_id(self, name: str) -> str | None:
        """The Ray node id of a worker, read from its raylet's command line."""
        for pid in tree(self.workers[name]):
            for arg in cmdline(pid):
                if arg.startswith("--node_id=") and "raylet" in cmdline(pid)[0]:
                    return arg.split("=", 1)[1]
        return None

    def wait_until_up(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            down = [p["log"] for p in self.parts if not alive(p["pid"], p["started"])]
            assert not down, f"exited while starting; see {down}"
            try:
                states = self.node_states()
                mlflow_ok = requests.get(f"{self.tracking_uri}/health", timeout=5).ok
            except requests.RequestException:
                states, mlflow_ok = {}, False
            ids = {name: self.node_id(name) for name in self.workers}
            if mlflow_ok and len(states) == 1 + len(ids) and all(states.get(i) == "ALIVE" for i in ids.values()):
                for name, node in ids.items():
                    self.workers[name]["node_id"] = node
                return
            assert time.monotonic() < deadline, f"not up in {timeout:.0f} s: nodes {states}; logs in {self.root}"
            time.sleep(1)

    def start_driver(self, command: list[str], env: dict) -> subprocess.Popen:
        """The sweep driver in its own process group; the handle is kept to read its exit status."""
        with open(self.root / "logs" / "driver.log", "ab") as log:
            driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, start_new_session=True, cwd=self.root)
        self.parts.append({"pid": driver.pid, "started": _stat(driver.pid)[2]})
        return driver

    def signal_node(self, name: str, sig: signal.Signals) -> dict[int, int]:
        """Send sig to every process of a worker node; {pid: start time} of those processes.

        Its `ray start` process group is not the whole node: Ray 2.60 gives each worker process
        (trials included) a process group of its own under the raylet, so the tree is signalled too,
        until no new process appears in it.
        """
        signalled: dict[int, int] = {}
        while new := {pid: t for pid, t in tree(self.workers[name]).items() if pid not in signalled}:
            if not signalled:  # the raylet, its agents and `ray start` all at once
                os.killpg(self.workers[name]["pid"], sig)
            for pid, started in sorted(new.items(), key=lambda item: item[1]):  # parents before children
                if alive(pid, started):
                    os.kill(pid, sig)
            signalled.update(new)
        return signalled

    def leftovers(self) -> list[int]:
        """Processes still running whose command line names one of this cluster's folders."""
        marks = [str(d) for d in self.temp_dirs] + [str(self.root)]
        return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                and any(mark in arg for arg in cmdline(int(p.name)) for mark in marks)]


@pytest.fixture
def cluster(tmp_path):
    nodes = NodeCluster(tmp_path)
    try:
        nodes.start_head()
        for name in ("worker-1", "worker-2"):
            nodes.start_worker(name)
        nodes.wait_until_up()
        yield nodes
    finally:  # everything started here, by process group, whatever happened (never `ray stop`)
        stopped = stop_processes(list(reversed(nodes.parts)), timeout=40)
        survivors = [pid for pid, started in stopped.items() if alive(pid, started)] + nodes.leftovers()
        for temp_dir in nodes.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"processes left running: {survivors}"


def reported(results: Path) -> dict[str, list[dict]]:
    """{trial id: its results so far} from Tune's result.json files in the results folder."""
    found = {}
    for path in results.glob("trial-*/result.json"):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line still being written
                pass
        if rows:
            found[rows[0]["trial_id"]] = rows
    return found


def pick_victim(cluster: NodeCluster, results: Path) -> tuple[str, str, int] | None:
    """(worker name, trial id, trial pid) of a trial mid-run on a worker node, with an epoch in MLflow."""
    actors = {a["pid"]: a for a in cluster.ray_get("actors", filter_keys="state", filter_predicates="=",
                                                     filter_values="ALIVE")}
    client, runs = runs_of(cluster.tracking_uri, SWEEP)
    in_mlflow = {r.data.tags["trial_id"]: steps(client, r) for r in trial_runs(runs)}
    for trial_id, rows in reported(results).items():
        pid, epoch = rows[-1]["pid"], rows[-1]["epoch"]
        if not (in_mlflow.get(trial_id) and epoch <= EPOCHS - 2 and pid in actors):
            continue
        for name, worker in cluster.workers.items():
            if pid in tree(worker) and actors[pid]["node_id"] == worker["node_id"]:
                return name, trial_id, pid
    return None


def wait_until_dead(cluster: NodeCluster, node_id: str, since: float, driver: subprocess.Popen | None = None,
                    timeout: float = 300) -> float | None:
    """Seconds from `since` until Ray marks the node DEAD; None if the driver exits first."""
    while cluster.node_states().get(node_id) != "DEAD":
        if driver is not None and driver.poll() is not None:
            return None
        assert time.monotonic() - since < timeout, f"node {node_id} still not DEAD after {timeout} s"
        time.sleep(0.5)
    return time.monotonic() - since


@pytest.mark.parametrize("how", ["killed", pytest.param("frozen", marks=pytest.mark.slow)])
def test_sweep_survives_losing_a_node(cluster, tmp_path, how):
    """killed: SIGKILL, so its connections close at once. frozen: SIGSTOP, so it falls silent like a
    hung or cut-off machine and only Ray's health checks notice; it is SIGKILLed once declared dead."""
    results = tmp_path / "results" / SWEEP
    driver_log = tmp_path / "logs" / "driver.log"
    driver = cluster.start_driver(
        [LENET_TUNE, "tune", "--config", write_config(tmp_path, 12000, "node-lost.yaml"), "--num-samples", str(TRIALS), "--epochs",
         str(EPOCHS), "--scheduler", "fifo", "--seed", "1", "--name", SWEEP, "--tracking-uri", cluster.tracking_uri,
         "--storage-path", str(tmp_path / "results")],
        # The results folder is one disk that every node shares, as check_multinode asks a user to vouch.
        {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}", "LENET_SHARED_STORAGE": "1"})

    def log_tail() -> str:
        return driver_log.read_text()[-4000:]

    deadline = time.monotonic() + 300
    while (victim := pick_victim(cluster, results)) is None:
        assert driver.poll() is None, "the sweep ended before a node could be lost:\n" + log_tail()
        assert time.monotonic() < deadline, "no trial reported an epoch in 300 s:\n" + log_tail()
        time.sleep(0.5)
    name, trial_id, old_pid = victim
    lost_node = cluster.workers[name]["node_id"]
    survivor = next(w for n, w in cluster.workers.items() if n != name)
    every_pid = {pid for part in cluster.parts for pid in tree(part)}
    assert listening_addresses(every_pid) <= LOOPBACK  # head, both nodes, trials, MLflow, the driver
    epoch_at_loss = reported(results)[trial_id][-1]["epoch"]
    lost_at = time.monotonic()
    if how == "frozen":
        assert old_pid in cluster.signal_node(name, signal.SIGSTOP)
        dead_after = wait_until_dead(cluster, lost_node, lost_at)
    killed = cluster.signal_node(name, signal.SIGKILL)  # a frozen node never comes back either
    assert old_pid in killed
    if how == "killed":
        dead_after = wait_until_dead(cluster, lost_node, lost_at, driver)

    while driver.poll() is None:
        assert time.monotonic() - lost_at < 420, "the sweep did not finish after the node was lost:\n" + log_tail()
        time.sleep(0.5)
    print(f"\n{how} node {name} with trial {trial_id} at epoch {epoch_at_loss}/{EPOCHS}: Ray marked the node "
          f"DEAD after {dead_after and round(dead_after, 1)} s; the sweep ended {time.monotonic() - lost_at:.0f} s "
          "after the loss")
    assert driver.returncode == 0, log_tail()
    gone_by = time.monotonic() + 60  # a killed process may take a moment to release its memory
    while left := [pid for pid, started in killed.items() if alive(pid, started)]:
        assert time.monotonic() < gone_by, f"killed node processes still running: {left}"
        time.sleep(0.5)
    wait_until_dead(cluster, lost_node, lost_at)

    # MLflow: the sweep's parent finished, one finished child per trial, one point per epoch.
    _, _, kids = finished_sweep(cluster.tracking_uri, SWEEP, TRIALS, EPOCHS)
    assert trial_id in {k.data.tags["trial_id"] for k in kids}
    assert all(kid.data.tags["epochs_run"] == str(EPOCHS) for kid in kids)

    # Ray: the lost trial reported its first epochs from the lost node, then carried on from its
    # latest checkpoint (not from scratch) in a new process on the surviving node.
    rows = reported(results)[trial_id]
    before = [r["epoch"] for r in rows if r["pid"] == old_pid]
    after = [r for r in rows if r["pid"] != old_pid]
    assert before and after and before == list(range(1, len(before) + 1)), rows
    assert [r["epoch"] for r in after] == list(range(before[-1] + 1, EPOCHS + 1)), rows
    new_actors = cluster.ray_get("actors", filter_keys="pid", filter_predicates="=", filter_values=after[0]["pid"])
    assert {a["node_id"] for a in new_actors} == {survivor["node_id"]}
