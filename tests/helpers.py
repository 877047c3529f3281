"""Helpers shared by the test files that start real processes and read real MLflow stores."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import mlflow

from jobs.runtime import free_port

LENET_TUNE = os.path.join(os.path.dirname(sys.executable), "lenet-tune")  # the installed command
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def listening_addresses(pids) -> set[str]:
    """The local addresses ("127.0.0.1", "0.0.0.0", "::"...) of every TCP socket these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone meanwhile
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]  # /proc writes each 32 bits host-order
                packed = b"".join(words)
                found.add(socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed))
    return found


def runs_of(uri: str, sweep: str):
    """(client, every run tagged with this sweep), or no runs while the experiment does not exist yet."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lenet-cifar10")
    if experiment is None:
        return client, []
    return client, client.search_runs([experiment.experiment_id], f"tags.sweep = '{sweep}'")


def parent_runs(runs):
    return [r for r in runs if "trial_id" not in r.data.tags]


def trial_runs(runs):
    return [r for r in runs if "trial_id" in r.data.tags]


def steps(client, run, key="val_acc"):
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def finished_sweep(uri: str, sweep: str, trials: int, epochs: int):
    """(client, parent, trial runs) of a sweep that finished whole: one FINISHED parent, `trials`
    FINISHED trial runs with distinct trial ids, each with one val_acc point per epoch 1..epochs."""
    client, runs = runs_of(uri, sweep)
    parents, kids = parent_runs(runs), trial_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(kids) == trials and len({k.data.tags["trial_id"] for k in kids}) == trials
    for kid in kids:
        assert kid.info.status == "FINISHED", kid.data.tags["trial_id"]
        assert steps(client, kid) == list(range(1, epochs + 1)), kid.data.tags["trial_id"]
    return client, parents[0], kids


def write_config(folder, images: int, name: str = "sweep.yaml") -> str:
    """A sweep file: `images` synthetic training images, batches of 64 (big enough data that an
    epoch lasts a second or more where the tests need trials to overlap or be caught mid-run)."""
    path = folder / name
    path.write_text(f"data: {{source: synthetic, synthetic_train_images: {images}}}\nspace: {{batch_sizes: [64]}}\n")
    return str(path)
