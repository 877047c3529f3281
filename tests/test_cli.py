"""Bad input: one line naming the value and the fix, exit status 2, no traceback, nothing written."""

import os
import subprocess

import pytest
from helpers import LENET_TUNE

from jobs.cli import main
from jobs.runtime import free_port

BAD_INPUT = [
    (["tune", "--epochs", "0"], "epochs=0"),
    (["tune", "--num-samples", "-1"], "num_samples=-1"),
    (["tune", "--workers-per-trial", "0"], "workers_per_trial=0"),
    (["tune", "--cpus-per-worker", "0"], "cpus_per_worker=0"),
    (["tune", "--gpus-per-worker", "1.5"], "gpus_per_worker=1.5"),
    (["tune", "--data", "mnist"], "unknown data source 'mnist'"),
    (["tune", "--dilations", "3", "--paddings", "0"], "dilation=3, padding=0"),
    (["tune", "--dilations", "4,5", "--paddings", "0,1"], "no (dilation, padding) pair"),
    (["tune", "--lr-range", "0,0.1"], "lr"),
    (["train", "--lr", "-1"], "lr=-1.0"),
    (["train", "--dilation", "4", "--padding", "0"], "dilation=4, padding=0"),
    (["tune", "--search", "grid"], "invalid choice: 'grid'"),
    (["tune", "--scheduler", "pbt"], "invalid choice: 'pbt'"),
]


@pytest.mark.parametrize("argv,named", BAD_INPUT)
def test_bad_flag_is_one_line_exit_2_and_writes_nothing(argv, named, workdir, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's own refusals exit directly
        raise SystemExit(main(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert named in err, err
    assert len(err.splitlines()) == 1, err
    assert os.listdir(workdir) == []  # no mlflow.db, no results folder, no data folder


def test_missing_imagefolder_refused_before_any_work(workdir, capsys):
    assert main(["tune", "--data", f"imagefolder:{workdir / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope does not exist" in err and "imagefolder:PATH" in err
    assert os.listdir(workdir) == []


def test_installed_command_prints_no_traceback(workdir):
    """The real console script, as a user runs it."""
    command = [LENET_TUNE, "tune", "--epochs", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "lenet-tune: error: hparams.epochs=0: Input should be greater than 0"
    )


def test_help_states_defaults_and_units(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    for phrase in ("default 8", "default 0 = CPU", "--smoke", "log-uniform"):
        assert phrase in text


def test_multinode_cluster_refuses_local_storage_and_sqlite(monkeypatch):
    from jobs.runtime import UsageError, check_multinode

    check_multinode("/tmp/results", "sqlite:///x.db", alive_nodes=1)  # one node: anything goes
    with pytest.raises(UsageError, match="storage path /tmp/results is local"):
        check_multinode("/tmp/results", "http://127.0.0.1:5000", alive_nodes=3)
    with pytest.raises(UsageError, match="MLflow URI sqlite:///x.db is a local store"):
        check_multinode("s3://bucket/results", "sqlite:///x.db", alive_nodes=3)
    check_multinode("s3://bucket/results", "http://10.0.0.1:5000", alive_nodes=3)
    monkeypatch.setenv("LENET_SHARED_STORAGE", "1")
    check_multinode("/mnt/nfs/results", "http://127.0.0.1:5000", alive_nodes=2)


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections and never answers, like a hung or foreign service."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.mark.parametrize("kind", ["refused", "silent", "dashboard-url", "no-port"])
def test_unreachable_ray_address_fails_fast_in_one_line(kind, silent_port, workdir):
    import time

    # free_port closes its probe again, so nothing listens on the "refused" port.
    address = {"refused": f"127.0.0.1:{free_port()}", "silent": f"127.0.0.1:{silent_port}",
               "dashboard-url": "http://127.0.0.1:8265", "no-port": "127.0.0.1"}[kind]
    command = [LENET_TUNE, "tune", "--smoke"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": address})
    assert time.monotonic() - started < 30  # the bound: ray.init alone retries for minutes
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"RAY_ADDRESS={address}" in done.stderr and "unset RAY_ADDRESS" in done.stderr
    assert os.listdir(workdir) == []
