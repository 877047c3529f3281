"""Sweep files: every shipped example parses; bad keys and values are refused by key path."""

import re
from pathlib import Path

import pytest

from jobs.cli import build_parser, configs_from_args, main
from jobs.runtime import UsageError
from jobs.tune import param_space

SWEEPS = sorted((Path(__file__).parents[1] / "sweeps").glob("*.yaml"))


def configs(*argv):
    return configs_from_args(build_parser().parse_args(["tune", *argv]))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_examples_parse_into_valid_spaces(path):
    loaded = configs("--config", str(path))
    assert loaded["sweep"].epochs == loaded["hparams"].epochs
    assert param_space(loaded["space"])  # every geometry list has valid pairs


def test_three_examples_are_shipped():
    assert {p.name for p in SWEEPS} == {"laptop.yaml", "gpu-box.yaml", "cluster.yaml"}


def test_file_values_apply_and_flags_override(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("sweep: {num_samples: 5, epochs: 4}\nresources: {cpus_per_worker: 2}\n"
                    "space: {dilations: [1, 2, 3], paddings: [2]}\n")
    loaded = configs("--config", str(path), "--num-samples", "7")
    assert loaded["sweep"].num_samples == 7 and loaded["sweep"].epochs == 4
    assert loaded["hparams"].epochs == 4 and loaded["resources"].cpus_per_worker == 2
    assert loaded["space"].dilations == (1, 2, 3)


@pytest.mark.parametrize("text,message", [
    ("sweep: {num_sample: 5}\n", "unknown key sweep.num_sample"),
    ("spaces: {lr: [0.1, 0.2]}\n", "unknown key 'spaces'"),
    ("resources: {gpus_per_worker: 1.5}\n", "resources: gpus_per_worker=1.5"),
    ("hparams: {lr: -0.1}\n", "hparams.lr=-0.1"),
    ("space: {lr: [0.2, 0.1]}\n", "space: lr range 0.2,0.1"),
    ("sweep: [1, 2]\n", "sweep must be a mapping"),
    ("sweep: {num_samples: 5\n", "not valid YAML at line"),
])
def test_bad_files_are_refused_with_the_key_path(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)) as error:
        configs("--config", str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_cli_refuses_bad_file_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("sweep: {num_sample: 5}\n")
    assert main(["tune", "--config", "bad.yaml"]) == 2
    assert "unknown key sweep.num_sample" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
