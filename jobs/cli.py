"""The `lenet-tune` command: parse flags into configs, call the job's plain function, print a summary.

    lenet-tune tune --smoke          # a whole sweep on synthetic data, about a minute
    lenet-tune tune --data imagefolder:/tmp/cifar --num-samples 8 --epochs 10
    lenet-tune train --lr 0.05 --epochs 10 --data cifar10
    lenet-tune evaluate --model models:/lenet-cifar10@champion
    lenet-tune ui
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from pydantic import ValidationError

from jobs.runtime import SweepInterrupted, UsageError, opt_out_of_telemetry
from trainables.config import (DataConfig, HyperParams, Resources, SearchSpace, SweepConfig, TrackingConfig,
                                redact)
from trainables.data import DataError


# Job modules that register their own sub-command (add_parser) and handle it (run).
PLUGGED_COMMANDS: list[str] = ["jobs.predict", "jobs.cluster", "jobs.submit"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (plus exit 2), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data, scaling and tracking")
    group.add_argument("--data", help="'cifar10' (download), 'imagefolder:PATH' or 'synthetic' (default cifar10)")
    group.add_argument("--data-dir", help="where cifar10 is downloaded and cached (default ./data)")
    group.add_argument("--max-train-images", type=int, help="cap on training images, stratified (default all)")
    group.add_argument("--seed", type=int, help="seeds the split, weights and search (default 0)")
    group.add_argument("--epochs", type=int, help="epochs per trial (default 10; 2 with --smoke)")
    group.add_argument("--workers-per-trial", type=int, help="DDP workers per trial (default 1)")
    group.add_argument("--cpus-per-worker", type=int, help="CPU cores per worker = torch threads (default 1)")
    group.add_argument("--gpus-per-worker", type=float,
                       help="GPUs per worker; a fraction in (0,1] packs trials on a GPU (default 0 = CPU)")
    group.add_argument("--name", help="sweep / run name: Ray results folder and MLflow run (default lenet-DATE)")
    group.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    group.add_argument("--experiment", help="MLflow experiment (default lenet-cifar10)")
    group.add_argument("--storage-path", help="Ray results and checkpoints (default $LENET_STORAGE_PATH or ./results)")
    group.add_argument("--trial-runner", choices=["auto", "torchtrainer"],
                       help="auto: one-worker trials run the loop in a child forked from one torch-holding "
                            "process per node, skipping TorchTrainer start-up; multi-worker trials always use "
                            "TorchTrainer (default auto)")
    group.add_argument("--config", metavar="FILE.yaml",
                       help="sweep file with sections sweep, space, hparams, resources, data, tracking "
                            "(examples in sweeps/); flags override it")
    group.add_argument("--smoke", action="store_true",
                       help="small synthetic data, 3 trials x 2 epochs: a whole sweep in about a minute")


def add_hparams(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hyperparameters")
    group.add_argument("--lr", type=float, help="peak SGD learning rate (default 0.05)")
    group.add_argument("--batch-size", type=int, help="images per step over all workers (default 128)")
    group.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    group.add_argument("--weight-decay", type=float, help="L2 penalty (default 5e-4)")
    group.add_argument("--dilation", type=int, help="dilation of both convolutions (default 1)")
    group.add_argument("--padding", type=int, help="padding of both convolutions in pixels (default 0)")
    group.add_argument("--augment", choices=["none", "flip", "flip-crop"], help="batched augmentation (default flip)")
    group.add_argument("--schedule", choices=["cosine", "constant"], help="learning-rate schedule (default cosine)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lenet-tune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    tune_cmd = commands.add_parser("tune", help="search hyperparameters with Ray Tune + Ray Train")
    add_common(tune_cmd)
    space = tune_cmd.add_argument_group("search")
    space.add_argument("--resume", metavar="NAME",
                       help="continue the interrupted sweep NAME with its saved configuration: finished "
                            "trials are kept, unfinished ones resume from checkpoints, MLflow runs continue")
    space.add_argument("--num-samples", type=int, help="trials to launch (default 8; 3 with --smoke)")
    space.add_argument("--search", choices=["random", "optuna"], help="search algorithm (default random)")
    space.add_argument("--scheduler", choices=["asha", "fifo"], help="early stopping (default asha)")
    space.add_argument("--grace-period", type=int, help="epochs before ASHA may stop a trial (default 2)")
    space.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster fits)")
    space.add_argument("--lr-range", type=_floats, metavar="MIN,MAX", help="log-uniform lr range (default 0.005,0.2)")
    space.add_argument("--dilations", type=_ints, metavar="D,...", help="dilations to try (default 1,2)")
    space.add_argument("--paddings", type=_ints, metavar="P,...", help="paddings to try (default 0,1,2)")
    space.add_argument("--batch-sizes", type=_ints, metavar="B,...", help="batch sizes to try (default 64,128,256)")
    space.add_argument("--momentums", type=_floats, metavar="M,...", help="momentums to try (default 0.8,0.9,0.95)")

    train_cmd = commands.add_parser("train", help="one training run with fixed hyperparameters")
    add_common(train_cmd)
    add_hparams(train_cmd)

    eval_cmd = commands.add_parser("evaluate", help="test-split accuracy of a registered or logged model")
    eval_cmd.add_argument("--model", default="models:/lenet-cifar10@champion",
                          help="MLflow model URI (default models:/lenet-cifar10@champion)")
    eval_cmd.add_argument("--data", help="data source of the test split (default cifar10)")
    eval_cmd.add_argument("--data-dir", help="where cifar10 is cached (default ./data)")
    eval_cmd.add_argument("--seed", type=int, help="split seed used in training (default 0)")
    eval_cmd.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    eval_cmd.add_argument("--json", action="store_true", help="print JSON")

    ui_cmd = commands.add_parser("ui", help="serve the MLflow UI for the tracking store")
    ui_cmd.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    ui_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ui_cmd.add_argument("--port", type=int, default=5000, help="port (default 5000)")

    # Commands that live in their own job module: each has add_parser(commands) and run(args) -> int.
    for name in PLUGGED_COMMANDS:
        importlib.import_module(name).add_parser(commands)
    return parser


def _given(args, **names) -> dict:
    """{config_field: value} for the flags the user actually gave."""
    return {field: getattr(args, flag) for field, flag in names.items()
            if getattr(args, flag, None) is not None}


# Sections of a sweep file (--config), each validated by its frozen config.
SECTIONS = {"data": DataConfig, "hparams": HyperParams, "resources": Resources,
            "tracking": TrackingConfig, "sweep": SweepConfig, "space": SearchSpace}


def load_sweep_file(path: str) -> dict:
    """{section: {field: value}} from a YAML sweep file; unknown sections are refused."""
    import yaml

    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except OSError as error:
        raise UsageError(f"cannot read sweep file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UsageError(f"sweep file {path} is not valid YAML{line}: fix its syntax") from None
    if not isinstance(raw, dict):
        raise UsageError(f"sweep file {path} must be a mapping of sections: {', '.join(SECTIONS)}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise UsageError(f"{path}: unknown key {section!r}: use one of {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UsageError(f"{path}: {section} must be a mapping of fields, not {values!r}")
    return raw


def build(section: str, values: dict, source: str = ""):
    """SECTIONS[section](**values), with a bad value reported by its key path."""
    try:
        return SECTIONS[section](**values)
    except ValidationError as error:
        raise UsageError(source + describe_validation_error(error, section)) from None


def configs_from_args(args) -> dict:
    """Frozen configs: defaults < --smoke < --config file < flags."""
    layers = {section: {} for section in SECTIONS}
    if getattr(args, "smoke", False):
        from jobs.tune import smoke_overrides

        for section, values in smoke_overrides().items():
            layers[section].update(values)
    source = ""
    if getattr(args, "config", None):
        for section, values in load_sweep_file(args.config).items():
            layers[section].update(values)
        source = f"{args.config}: "
    flags = {
        "data": _given(args, source="data", data_dir="data_dir", max_train_images="max_train_images",
                       seed="seed"),
        "hparams": _given(args, lr="lr", batch_size="batch_size", momentum="momentum",
                          weight_decay="weight_decay", dilation="dilation", padding="padding",
                          augment="augment", schedule="schedule", seed="seed", epochs="epochs"),
        "resources": _given(args, workers_per_trial="workers_per_trial", cpus_per_worker="cpus_per_worker",
                            gpus_per_worker="gpus_per_worker"),
        "tracking": _given(args, tracking_uri="tracking_uri", experiment="experiment",
                           storage_path="storage_path"),
        "sweep": _given(args, num_samples="num_samples", search="search", scheduler="scheduler",
                        grace_period="grace_period", max_concurrent="max_concurrent", seed="seed",
                        trial_runner="trial_runner", name="name", epochs="epochs"),
        "space": _given(args, lr="lr_range", dilations="dilations", paddings="paddings",
                        batch_sizes="batch_sizes", momentums="momentums"),
    }
    for section, values in flags.items():
        layers[section].update(values)
    # One number of epochs for the sweep and its trials, wherever it was given.
    epochs = layers["hparams"].get("epochs", layers["sweep"].get("epochs"))
    if epochs is not None:
        layers["hparams"]["epochs"] = layers["sweep"]["epochs"] = epochs
    from jobs.tune import default_name

    layers["sweep"].setdefault("name", default_name())
    return {section: build(section, values, source) for section, values in layers.items()}


def describe_validation_error(error: ValidationError, section: str = "") -> str:
    """One line naming the key path, the bad value and what is expected."""
    first = error.errors()[0]
    path = ".".join([section] + [str(part) for part in first["loc"]]).strip(".")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown key {path}: remove it (see lenet-tune tune --help for the keys)"
    if isinstance(first.get("input"), dict):  # a whole-model check: its message names the values
        return f"{path}: {message}" if path else message
    return f"{path}={first.get('input')!r}: {message}"


def run_command(args) -> int:
    if getattr(args, "handler", None):  # a plugged command: its module parses and runs it
        return args.handler(args)
    if args.command == "ui":
        from jobs.ui import serve_ui

        tracking = TrackingConfig(**_given(args, tracking_uri="tracking_uri"))
        return serve_ui(tracking.resolved_uri(), args.host, args.port)
    if args.command == "evaluate":
        from jobs.evaluate import evaluate_model

        data = DataConfig(**_given(args, source="data", data_dir="data_dir", seed="seed"))
        report = evaluate_model(args.model, data, TrackingConfig(**_given(args, tracking_uri="tracking_uri")))
        print(json.dumps(report, indent=2) if args.json else
              f"{report['model_uri']}: test accuracy {report['test_acc']:.4f} on {report['test_images']} images")
        return 0

    configs = configs_from_args(args)
    if args.command == "tune" and args.resume:
        from jobs.tune import resume_configs, run_sweep

        configs = resume_configs(args.resume, configs["tracking"])
        outcome = run_sweep(configs["sweep"], {}, configs["hparams"], configs["data"],
                            configs["resources"], configs["tracking"], resume=True)
    elif args.command == "tune":
        from jobs.tune import param_space, run_sweep

        space = param_space(configs["space"])  # refuses an impossible geometry before any work
        outcome = run_sweep(configs["sweep"], space, configs["hparams"], configs["data"],
                            configs["resources"], configs["tracking"], search_space=configs["space"])
    else:
        from jobs.train import run_training

        outcome = run_training(configs["sweep"], configs["hparams"], configs["data"],
                               configs["resources"], configs["tracking"])
    print_summary(outcome, configs["tracking"])
    return 0


def print_summary(outcome, tracking) -> None:
    test = outcome.test
    print(f"\n{outcome.num_trials} trial(s) in {outcome.name}; best val_acc {outcome.best_val_acc:.4f}, "
          f"test accuracy {test['test_acc']:.4f}")
    print(f"best config: {json.dumps(outcome.best_config)}")
    champion = "now the champion" if test["promoted"] else f"champion kept ({test['previous_champion_acc']:.4f})"
    print(f"registered {tracking.model_name} version {test['version']}: {champion}")
    print(f"results: {outcome.results_path}\nMLflow: {redact(tracking.resolved_uri())}  (browse: lenet-tune ui)")


def main(argv: list[str] | None = None) -> int:
    opt_out_of_telemetry()
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except SweepInterrupted as interrupted:
        print(f"lenet-tune: {redact(str(interrupted))}", file=sys.stderr)
        return interrupted.exit_code
    except ValidationError as error:
        message = describe_validation_error(error)
    except (UsageError, DataError) as error:
        message = str(error)
    print(f"lenet-tune: error: {redact(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
