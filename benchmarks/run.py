"""Every speed target of issue 4 beside its baseline, measured in one run on the same data.

On a 2-core laptop, with the CIFAR-10 training JPEGs in /tmp/cifar/train/<class>/ (under 10 minutes):
    PYTHONPATH=. python benchmarks/run.py
    PYTHONPATH=. python benchmarks/run.py --json /tmp/bench.json
    PYTHONPATH=. python benchmarks/run.py --sweep    # adds the default sweep: 65% val in 10 minutes? (+~10 min)
    PYTHONPATH=. python benchmarks/run.py --help     # every option, with defaults and units

It prints the environment (cores, threads, CPU taken by other processes), one
Markdown table of targets (product, baseline, ratio, target, met) and a detail
table per target. Ratios, not absolute numbers, are what carry across machines:

1. throughput: `trainables.loop.train_epoch` (one worker, the product's HyperParams,
   batch 128) against `baselines.plain_loop` on the same uint8 tensors, 1 and 2 threads.
2. per-trial overhead: trial wall time less its epochs, in a 4-trial, 2-epoch sweep
   (`jobs.tune.run_sweep`) for each trial runner and for 2-worker DDP trials.
3. time to 55% val: `jobs.train.run_training` with default hyperparameters against the
   blitz loop on the same train/val split (the blitz is capped by time; see --blitz-seconds).
4. CPU placement: torch threads inside real trials, and trials x CPUs against cores.
5. memory: anonymous memory (PSS) of the trial processes (thin trial, fork server, forked child) and
   the object store, 1 vs 2 trials (benchmarks/memory.py).
6. tracking cost: seconds Tune's event loop spent in TrialLogger's hooks as a share of each sweep's wall
   time (the hooks hand MLflow's calls to a writer thread, whose busy seconds are shown beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import ray  # first: psutil comes with Ray (ray/thirdparty_files), which puts it on sys.path
import psutil
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset

from benchmarks.baselines import blitz_accuracy, blitz_transform, other_cpu_load, plain_loop, torch_threads
from benchmarks.memory import TARGET_EXTRA_TRIAL_MB, dataset_mb, extra_trial, trials_memory, worker_floor
from trainables.config import DataConfig, HyperParams, Resources, SweepConfig, TrackingConfig
from trainables.data import as_nchw, decode_image, load_imagefolder, load_splits, stratified_split
from trainables.loop import build_optimizer, train_epoch
from trainables.model import LeNet

TARGETS = {"throughput_ratio": 0.95, "overhead_single_s": 3.0, "overhead_multi_s": 8.0,
           "sooner_than_blitz": 10.0, "extra_trial_mb": TARGET_EXTRA_TRIAL_MB, "tracking_share": 0.02}


# ---------------------------------------------------------------- environment and noise


def environment(seconds: float = 3.0) -> dict:
    """What readers need to judge the noise: cores, default threads, load by other processes."""
    import mlflow

    idle = {}
    with other_cpu_load(idle):
        time.sleep(seconds)
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch_default_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
            "other_cpu_load_at_start": idle.get("other_cpu_load"), "torch": torch.__version__,
            "ray": ray.__version__, "mlflow": mlflow.__version__}


@contextlib.contextmanager
def others_load(into: dict):
    """into['other_cpu_load']: cores busy outside this process tree (Ray's processes are ours).

    baselines.other_cpu_load counts Ray's raylet and trial workers as "others", so
    phases that run Ray use this instead; both agree where no Ray runs.
    """
    def outside() -> dict:
        ours = {psutil.Process().pid} | {p.pid for p in psutil.Process().children(recursive=True)}
        seconds = {}
        for process in psutil.process_iter(["cpu_times"]):
            if process.pid not in ours and process.info["cpu_times"] is not None:
                seconds[process.pid] = sum(process.info["cpu_times"][:2])
        return seconds

    before, start = outside(), time.perf_counter()
    yield
    after = outside()
    busy = sum(after[pid] - before.get(pid, 0.0) for pid in after)
    into["other_cpu_load"] = max(busy, 0.0) / (time.perf_counter() - start)
    into["load_average_1min"] = os.getloadavg()[0]


# ---------------------------------------------------------------- 1. throughput


def product_images_per_second(images, labels, threads: int, augment: str) -> float:
    """One epoch of the product's train_epoch (its HyperParams and optimiser), in images/s."""
    hp = HyperParams(augment=augment)
    torch.manual_seed(hp.seed)
    model = LeNet(hp.dilation, hp.padding)
    optimizer = build_optimizer(model, hp)
    with torch_threads(threads):
        start = time.perf_counter()
        train_epoch(model, optimizer, images, labels, hp, epoch=1, batch_size=hp.batch_size)
        seconds = time.perf_counter() - start
    return (len(labels) // hp.batch_size) * hp.batch_size / seconds


def throughput(images, labels, threads_list=(1, 2), repeats: int = 5) -> dict:
    """Best of `repeats` interleaved epochs per loop: a busy neighbour only ever slows a run down.

    With as many threads as cores, one descheduled thread stalls the other at every
    barrier, so short epochs, repeated, find the quiet moments; every sample is kept.
    """
    product_images_per_second(images[:1280], labels[:1280], 1, "none")  # warm oneDNN up
    # What-if: plain NCHW memory, the layout the product stored before channels-last (copied once).
    layouts = {"channels_last": images, "nchw": images.contiguous()}
    rows = {}
    for threads in threads_list:
        samples, load = defaultdict(list), {}
        with other_cpu_load(load):
            for _ in range(repeats):
                samples["plain"].append(plain_loop(images, labels, 1, threads=threads)["images_per_second"])
                for key, augment, layout in (("product_none", "none", "channels_last"),
                                             ("product_flip", "flip", "channels_last"),
                                             ("product_none_nchw", "none", "nchw")):
                    samples[key].append(product_images_per_second(layouts[layout], labels, threads, augment))
        best = {key: max(values) for key, values in samples.items()}
        rows[f"{threads}_threads"] = {
            "threads": threads, "images": len(labels), **best,
            **{f"ratio_{key[8:]}": best[key] / best["plain"] for key in best if key.startswith("product_")},
            "samples": dict(samples), **load}
    return rows


# ---------------------------------------------------------------- the clock on TrialLogger


class SweepClock:
    """Times TrialLogger's callbacks and the sweep's phases; records each trial's start, epochs and end.

    Patches classes and module functions for the duration of a `with` block; the
    callbacks run in this (the driver's) process, so the driver's clock sees them all.
    """

    HOOKS = ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error")

    def __enter__(self):
        import jobs.tune
        from trainables import tracking

        self.callback_seconds, self.callback_calls = 0.0, 0
        self.trials: dict[str, dict] = {}
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.patches = [mock.patch.object(tracking.TrialLogger, hook, self._hook(hook, getattr(tracking.TrialLogger, hook)))
                        for hook in self.HOOKS]
        self.patches += [mock.patch.object(jobs.tune, name, self._phase(name, getattr(jobs.tune, name)))
                         for name in ("load_splits", "fit_noting_interrupts", "finish_sweep")]
        # Every step TrialLogger's writer thread runs (MLflow's calls, off Tune's loop) goes through _safely.
        self.patches.append(mock.patch.object(tracking.TrialLogger, "_safely",
                                              self._phase("trial_logger_writer", tracking.TrialLogger._safely)))
        for patch in self.patches:
            patch.start()
        self.started = time.time()
        return self

    def __exit__(self, *exc):
        self.wall_seconds = time.time() - self.started
        for patch in self.patches:
            patch.stop()

    def _hook(self, hook: str, original):
        clock = self

        def timed(logger, *args, **info):
            trial = info["trial"] if "trial" in info else args[2]
            record = clock.trials.setdefault(trial.trial_id, {"results": []})
            now = time.time()
            if hook == "on_trial_start":
                record["start"] = now
            elif hook == "on_trial_result":
                result = info["result"] if "result" in info else args[3]
                record["results"].append({"time": now, **{k: result.get(k) for k in (
                    "epoch", "val_acc", "epoch_seconds", "images_per_second", "time_total_s")}})
            else:
                record["end"] = now
            started = time.perf_counter()
            try:
                return original(logger, *args, **info)
            finally:
                clock.callback_seconds += time.perf_counter() - started
                clock.callback_calls += 1
        return timed

    def _phase(self, name: str, original):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.phase_seconds[name] += time.perf_counter() - started
        return timed

    def per_trial(self, slots: int) -> list[dict]:
        """Per trial: its driver's start and end, its training span, and the overheads around its epochs.

        waiting_seconds: time between the driver's start and its first epoch while `slots`
        other trials were training (a TorchTrainer trial's driver holds no CPU, so it can
        start and then wait for workers); own_overhead_seconds is wall less epochs less that.
        """
        rows = []
        for trial_id, record in self.trials.items():
            results = [r for r in record["results"] if r.get("epoch_seconds") is not None]
            if "start" not in record or not results:
                continue
            epochs = sum(r["epoch_seconds"] for r in results)
            end = record.get("end", results[-1]["time"])
            rows.append({"trial_id": trial_id, "start": record["start"], "end": end, "epochs": len(results),
                         "train_start": results[0]["time"] - results[0]["epoch_seconds"],
                         "train_end": results[-1]["time"], "epoch_seconds": epochs,
                         "startup_seconds": results[0]["time"] - record["start"] - results[0]["epoch_seconds"],
                         "wall_seconds": end - record["start"], "overhead_seconds": end - record["start"] - epochs,
                         "tune_overhead_seconds": (results[-1]["time_total_s"] or 0) - epochs})
        for row in rows:
            others = [(r["train_start"], r["train_end"]) for r in rows if r is not row]
            row["waiting_seconds"] = seconds_full(row["start"], row["train_start"], others, slots)
            row["own_overhead_seconds"] = row["overhead_seconds"] - row["waiting_seconds"]
        return rows


def seconds_full(start: float, end: float, intervals: list[tuple[float, float]], slots: int) -> float:
    """Seconds of [start, end] during which at least `slots` of the intervals were open."""
    cuts = sorted({start, end, *(t for interval in intervals for t in interval if start < t < end)})
    return sum(high - low for low, high in zip(cuts, cuts[1:])
               if sum(a <= (low + high) / 2 < b for a, b in intervals) >= slots)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def scratch_tracking(root: Path) -> TrackingConfig:
    return TrackingConfig(tracking_uri=f"sqlite:///{root}/mlflow.db", storage_path=str(root / "results"),
                          experiment="benchmark", model_name="lenet-benchmark")


def fixed_space(hp: HyperParams) -> dict:
    """One configuration (as `lenet-tune train` passes it), so every trial does the same work."""
    return {"lr": hp.lr, "batch_size": hp.batch_size, "momentum": hp.momentum, "augment": hp.augment,
            "geometry": f"{hp.dilation}:{hp.padding}"}


# ---------------------------------------------------------------- 2 and 6. overhead and tracking cost


def sweep_overhead(label: str, resources: Resources, runner: str, data: DataConfig, scratch: Path,
                   trials: int = 4, epochs: int = 2, cores: int = 2) -> dict:
    """A sweep of `trials` identical trials through run_sweep; per-trial overhead and TrialLogger's share."""
    from jobs.tune import run_sweep

    hp = HyperParams(epochs=epochs)
    sweep = SweepConfig(name="overhead-" + re.sub(r"\W+", "-", label).strip("-"), num_samples=trials, epochs=epochs,
                        scheduler="fifo", trial_runner=runner)
    cpus_per_trial = resources.workers_per_trial * resources.cpus_per_worker
    slots = cores // cpus_per_trial  # trials the machine can train at once
    load = {}
    with others_load(load), SweepClock() as clock:
        run_sweep(sweep, fixed_space(hp), hp, data, resources, scratch_tracking(scratch))
    rows = clock.per_trial(slots)
    training = max_overlap([(r["train_start"], r["train_end"]) for r in rows])
    fit_seconds = clock.phase_seconds["fit_noting_interrupts"]
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {
        "runner": label, "trials": len(rows), "epochs_per_trial": epochs,
        "workers_per_trial": resources.workers_per_trial, "cpus_per_worker": resources.cpus_per_worker,
        # Trials whose drivers were alive at once, and trials training at once (holding CPUs).
        "concurrent_drivers": max_overlap([(r["start"], r["end"]) for r in rows]),
        "concurrent_trials": training, "cpus_in_use": training * cpus_per_trial, "cores": cores,
        "overhead_mean_s": mean("own_overhead_seconds"),
        "overhead_max_s": float(np.max([r["own_overhead_seconds"] for r in rows])),
        "waiting_mean_s": mean("waiting_seconds"), "wall_minus_epochs_mean_s": mean("overhead_seconds"),
        "startup_mean_s": mean("startup_seconds"), "tune_overhead_mean_s": mean("tune_overhead_seconds"),
        "epoch_seconds_mean": float(np.mean([r["epoch_seconds"] / r["epochs"] for r in rows])),
        # Slot-seconds the sweep spent beyond epochs, spread over its trials.
        "amortized_overhead_s": (fit_seconds * min(slots, len(rows)) - sum(r["epoch_seconds"] for r in rows)) / len(rows),
        "tune_fit_seconds": fit_seconds, "run_sweep_seconds": clock.wall_seconds,
        "load_data_seconds": clock.phase_seconds["load_splits"],
        "finish_seconds": clock.phase_seconds["finish_sweep"],  # test evaluation, model logging, report
        "tracking_callback_seconds": clock.callback_seconds, "tracking_callback_calls": clock.callback_calls,
        "tracking_share_of_fit": clock.callback_seconds / fit_seconds,
        "tracking_writer_seconds": clock.phase_seconds["trial_logger_writer"],
        "tracking_writer_share_of_fit": clock.phase_seconds["trial_logger_writer"] / fit_seconds,
        "per_trial": rows, **load,
    }


# ---------------------------------------------------------------- 3. time to accuracy


def product_time_to_accuracy(data: DataConfig, scratch: Path, target: float, cpus: int = 2) -> dict:
    """`lenet-tune train` with default hyperparameters: seconds (startup + epochs) until val_acc >= target."""
    from jobs.train import run_training

    load = {}
    with others_load(load), SweepClock() as clock:
        outcome = run_training(SweepConfig(name="time-to-accuracy"), HyperParams(), data,
                               Resources(cpus_per_worker=cpus), scratch_tracking(scratch))
    (trial,) = clock.per_trial(slots=1)
    results = [r for r in clock.trials[trial["trial_id"]]["results"] if r.get("epoch_seconds") is not None]
    elapsed = trial["startup_seconds"] + np.cumsum([r["epoch_seconds"] for r in results])
    reached = next((i for i, r in enumerate(results) if r["val_acc"] >= target), None)
    return {
        "cpus_per_worker": cpus, "epochs": len(results), "startup_seconds": trial["startup_seconds"],
        "val_acc": [r["val_acc"] for r in results], "seconds_after_epoch": elapsed.tolist(),
        "seconds_to_target": None if reached is None else float(elapsed[reached]),
        "epoch_reaching_target": None if reached is None else reached + 1,
        # The same moment on the command's clock: data loading, Ray scheduling and checkpoints included.
        "command_seconds_to_target": None if reached is None else results[reached]["time"] - clock.started,
        "command_seconds": clock.wall_seconds, "images_per_second": float(np.mean([r["images_per_second"] for r in results])),
        "final_val_acc": results[-1]["val_acc"], "test_acc": outcome.test["test_acc"], **load,
    }


def product_split_indices(labels: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the decoded train/ tree of the product's train and val splits.

    Replays load_splits's draws for a tree without test/ (test carved first, then the
    cap, then val); `same_split_as_product` checks the replay against load_splits itself.
    """
    rng = np.random.default_rng(cfg.seed)
    keep = np.arange(len(labels))
    _, kept = stratified_split(labels, cfg.test_fraction, rng)
    keep = keep[kept]
    if cfg.max_train_images and cfg.max_train_images < len(keep):
        _, kept = stratified_split(labels[keep], 1 - cfg.max_train_images / len(keep), rng)
        keep = keep[kept]
    val, train = stratified_split(labels[keep], cfg.val_fraction, rng)
    return keep[train], keep[val]


def same_split_as_product(root: Path, cfg: DataConfig, splits) -> tuple[np.ndarray, np.ndarray]:
    """The product's (train, val) indices, checked to address the same images in ImageFolder's order."""
    if (root / "test").is_dir():
        raise SystemExit(f"{root}/test exists: the blitz comparison assumes the product carves test from train/")
    images, labels, _, _ = load_imagefolder(root, Path(cfg.data_dir))
    train_idx, val_idx = product_split_indices(labels, cfg)
    if not (np.array_equal(images[val_idx], splits.val_images) and np.array_equal(labels[train_idx], splits.train_labels)):
        raise SystemExit("could not replay the product's split: trainables.data.load_splits changed its draws")
    folder = torchvision.datasets.ImageFolder(root / "train")  # the blitz's dataset, paths only
    if folder.targets != labels.tolist() or any(
            not np.array_equal(decode_image(folder.samples[i][0]), images[i]) for i in val_idx[:3]):
        raise SystemExit("ImageFolder orders the images differently from the product: indices would not match")
    return train_idx, val_idx


def blitz_time_to_accuracy(train_dir: Path, train_idx, val_idx, target: float, budget_s: float,
                           evals_per_epoch: int = 2, threads: int = 2, seed: int = 0) -> dict:
    """The blitz loop (baselines.blitz_loop's recipe), scored on the val split `evals_per_epoch` times an epoch.

    blitz_loop scores once, at the end; this is the same recipe (ImageFolder, batch 4,
    two DataLoader workers, SGD lr 0.001 momentum 0.9) with evaluations in between.
    As in the baselines, the clock counts training only and stops at the first
    evaluation after `budget_s`.
    """
    torch.manual_seed(seed)
    dataset = torchvision.datasets.ImageFolder(train_dir, transform=blitz_transform())
    loader = DataLoader(Subset(dataset, train_idx.tolist()), batch_size=4, shuffle=True, num_workers=2)
    val_loader = DataLoader(Subset(dataset, val_idx.tolist()), batch_size=4, num_workers=2)
    model = LeNet()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    eval_steps = {len(loader) * k // evals_per_epoch for k in range(1, evals_per_epoch + 1)}
    curve, trained, images, load = [], 0.0, 0, {}
    def finished() -> bool:
        return curve[-1][2] >= target or trained >= budget_s

    with torch_threads(threads), other_cpu_load(load):
        epoch = 0
        while not curve or not finished():
            start = time.perf_counter()  # includes starting the DataLoader workers, as every blitz epoch does
            for step, (inputs, labels) in enumerate(loader, 1):
                optimizer.zero_grad()
                criterion(model(inputs), labels).backward()
                optimizer.step()
                images += len(labels)
                if step in eval_steps:
                    trained += time.perf_counter() - start
                    curve.append((trained, epoch + step / len(loader), blitz_accuracy(model, val_loader)))
                    if finished():
                        break
                    start = time.perf_counter()
            epoch += 1
    reached = curve[-1][2] >= target
    extrapolated = None
    if not reached and len(curve) >= 2 and curve[-1][2] > curve[-2][2]:
        # Linear from the last two points: accuracy gains slow down, so this is a lower bound.
        (t1, _, a1), (t2, _, a2) = curve[-2:]
        extrapolated = t2 + (target - a2) * (t2 - t1) / (a2 - a1)
    return {"seconds_to_target": curve[-1][0] if reached else None, "budget_s": budget_s,
            "trained_seconds": trained, "epochs_trained": curve[-1][1], "last_val_acc": curve[-1][2],
            "extrapolated_seconds_to_target": extrapolated, "images_per_second": images / trained,
            "curve": curve, "threads": threads, **load}


# ---------------------------------------------------------------- 4 and 5. placement and memory


def placement_and_memory(splits, scratch: Path, cluster: dict) -> dict:
    """memory.py's real trials (1 trial of 2 CPUs, then 2 of 1 CPU, 1 epoch on the full data) and fresh
    worker, with the placement they should get: torch threads = CPUs, Tune's concurrency cap."""
    from jobs.runtime import max_concurrent_trials

    data_ref = ray.put(splits)
    shapes = trials_memory(data_ref, scratch)
    for shape in shapes.values():
        cpus = shape["cpus_per_trial"]  # one-worker trials: a trial's CPUs are its worker's
        shape["max_concurrent_trials"] = max_concurrent_trials(cluster, 1, cpus, 0)
    return {"shapes": shapes, "worker_floor": worker_floor(data_ref), "dataset_mb": dataset_mb(splits),
            **extra_trial(shapes),
            "threads_equal_cpus": all(set(s["torch_threads"]) == {s["cpus_per_trial"]} for s in shapes.values())}


# ---------------------------------------------------------------- optional: the default sweep


def default_sweep(data: DataConfig, scratch: Path, target: float) -> dict:
    """`lenet-tune tune --data imagefolder:...` as shipped: seconds until some trial first reaches target."""
    from jobs.tune import param_space, run_sweep
    from trainables.config import SearchSpace

    load = {}
    with others_load(load), SweepClock() as clock:
        outcome = run_sweep(SweepConfig(name="default-sweep"), param_space(SearchSpace()), HyperParams(), data,
                            Resources(), scratch_tracking(scratch), search_space=SearchSpace())
    times = [r["time"] for t in clock.trials.values() for r in t["results"] if (r["val_acc"] or 0) >= target]
    return {"seconds": clock.wall_seconds, "best_val_acc": outcome.best_val_acc, "test_acc": outcome.test["test_acc"],
            "trials": outcome.num_trials, "seconds_to_target": min(times) - clock.started if times else None,
            "tracking_share_of_fit": clock.callback_seconds / clock.phase_seconds["fit_noting_interrupts"], **load}


# ---------------------------------------------------------------- report


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def verdict(ok) -> str:
    return "n/a" if ok is None else ("**yes**" if ok else "**no**")


def markdown(results: dict) -> str:
    env, rows = results["environment"], []
    rows += [f"Environment: {env['usable_cores']} cores, torch {env['torch']} ({env['torch_default_threads']} threads "
             f"by default), Ray {env['ray']}, MLflow {env['mlflow']}; other processes kept "
             f"{fmt(env['other_cpu_load_at_start'])} cores busy at the start (1-min load average "
             f"{env['load_average_1min']:.1f}). Total run {results['seconds']:.0f} s."
             + (f" What-if: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={results['train_health_check_s']:g}."
                if results.get("train_health_check_s") is not None else ""), ""]
    rows += ["| # | target | product | baseline | ratio / value | target | met |", "|---|---|---:|---:|---:|---:|---|"]
    for key, tp in results["throughput"].items():
        rows.append(f"| 1 | images/s, {tp['threads']} thread(s), augment none | {tp['product_none']:,.0f} "
                    f"| plain loop {tp['plain']:,.0f} | {tp['ratio_none']:.2f}x | >= 0.95x "
                    f"| {verdict(tp['ratio_none'] >= TARGETS['throughput_ratio'])} |")
        rows.append(f"| 1 | images/s, {tp['threads']} thread(s), product default (flip) | {tp['product_flip']:,.0f} "
                    f"| plain loop {tp['plain']:,.0f} | {tp['ratio_flip']:.2f}x | (info) | |")
    for sweep in results.get("overhead", []):
        limit = TARGETS["overhead_multi_s" if sweep["workers_per_trial"] > 1 else "overhead_single_s"]
        waiting = (f"; +{sweep['waiting_mean_s']:.1f} s waiting for another trial's workers"
                   if sweep["waiting_mean_s"] >= 0.5 else "")
        rows.append(f"| 2 | per-trial overhead, {sweep['runner']} ({sweep['trials']} trials, {sweep['concurrent_trials']} "
                    f"training at once) | {sweep['overhead_mean_s']:.1f} s (max {sweep['overhead_max_s']:.1f}{waiting}) "
                    f"| - | sweep-level {sweep['amortized_overhead_s']:.1f} s per trial | <= {limit:.0f} s "
                    f"| {verdict(sweep['overhead_mean_s'] <= limit)} |")
    if "time_to_accuracy" in results:
        tta = results["time_to_accuracy"]
        product, blitz = tta["product"], tta["blitz"]
        if product["seconds_to_target"] is None:
            ratio_text, ok = "product never reached it", False
        elif blitz["seconds_to_target"] is not None:
            ratio = blitz["seconds_to_target"] / product["seconds_to_target"]
            ratio_text, ok = f"{ratio:.1f}x", ratio >= TARGETS["sooner_than_blitz"]
        else:
            ratio = blitz["trained_seconds"] / product["seconds_to_target"]
            ok = True if ratio >= TARGETS["sooner_than_blitz"] else None  # a lower bound
            ratio_text = f">= {ratio:.1f}x"
            if blitz["extrapolated_seconds_to_target"]:
                ratio_text += f" (~{blitz['extrapolated_seconds_to_target'] / product['seconds_to_target']:.1f}x extrapolated)"
        blitz_text = (f"{blitz['seconds_to_target']:.0f} s" if blitz["seconds_to_target"] is not None
                      else f">= {blitz['trained_seconds']:.0f} s ({blitz['last_val_acc']:.1%} then)")
        rows.append(f"| 3 | seconds to {tta['target']:.0%} val acc | {fmt(product['seconds_to_target'], '.0f')} s "
                    f"| blitz {blitz_text} | {ratio_text} | >= 10x | {verdict(ok)} |")
    if "placement_and_memory" in results:
        pm = results["placement_and_memory"]
        threads = ", ".join(f"{s['cpus_per_trial']} CPU -> {s['torch_threads']}" for s in pm["shapes"].values())
        rows.append(f"| 4 | torch threads in a trial = its CPUs | {threads} | - | - | equal | "
                    f"{verdict(pm['threads_equal_cpus'])} |")
        placed = [f"{s['runner']}: {s['cpus_in_use']}" for s in results.get("overhead", [])]
        ok = all(s["cpus_in_use"] <= s["cores"] for s in results.get("overhead", [])) if placed else None
        rows.append(f"| 4 | CPUs held by concurrent trials <= cores | {'; '.join(placed) or '-'} | "
                    f"{env['usable_cores']} cores | - | <= cores | {verdict(ok)} |")
        floor = pm["worker_floor"]
        # Judged on anonymous memory (PSS), as memory.py does: forked trials share the fork server's pages.
        extra = pm["extra_trial_anon_mb"]
        rows.append(f"| 5 | memory added by a 2nd concurrent trial (anonymous, PSS) | {extra:.0f} MB (private dirty "
                    f"{pm['extra_trial_private_dirty_mb']:.0f}, USS {pm['extra_trial_mb']:.0f}) | a Ray worker "
                    f"importing torch and running `fit` itself {floor['after_epoch_mb']:.0f} MB "
                    f"(torch import {floor['torch_imported_mb']:.0f}); dataset {pm['dataset_mb']:.0f} MB | - "
                    f"| <= {TARGETS['extra_trial_mb']:.0f} MB | {verdict(extra <= TARGETS['extra_trial_mb'])} |")
    if results.get("overhead"):
        worst = max(results["overhead"], key=lambda s: s["tracking_share_of_fit"])
        rows.append(f"| 6 | MLflow logging time on Tune's event loop / sweep wall (worst: {worst['runner']}) | "
                    f"{worst['tracking_callback_seconds']:.3f} s / {worst['tune_fit_seconds']:.0f} s | writer "
                    f"thread {worst['tracking_writer_seconds']:.2f} s "
                    f"({worst['tracking_writer_share_of_fit']:.1%}), off the loop "
                    f"| {worst['tracking_share_of_fit']:.2%} | <= 2% | "
                    f"{verdict(worst['tracking_share_of_fit'] <= TARGETS['tracking_share'])} |")
    return "\n".join(rows + [""] + details(results))


def details(results: dict) -> list[str]:
    rows = ["### 1. Throughput (best of the repeats, one epoch each, same uint8 tensors)", "",
            "| threads | images | plain loop | product none | product flip | product none, NCHW memory (what-if) | other CPU load |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for tp in results["throughput"].values():
        rows.append(f"| {tp['threads']} | {tp['images']:,} | {tp['plain']:,.0f} | {tp['product_none']:,.0f} "
                    f"({tp['ratio_none']:.2f}x) | {tp['product_flip']:,.0f} ({tp['ratio_flip']:.2f}x) "
                    f"| {tp['product_none_nchw']:,.0f} ({tp['ratio_none_nchw']:.2f}x) "
                    f"| {fmt(tp.get('other_cpu_load'))} |")
    if results.get("overhead"):
        rows += ["", "### 2 and 6. Per-trial overhead and tracking cost (seconds)", "",
                 "| runner | drivers / training at once x CPUs | epoch s | own overhead (mean / max) | waiting "
                 "| startup_seconds | Tune time_total_s - epochs | sweep-level per trial | Tune fit | run_sweep "
                 "| finish (test, model, report) | TrialLogger hooks (calls) | share | writer thread "
                 "| other CPU load |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in results["overhead"]:
            rows.append(f"| {s['runner']} | {s['concurrent_drivers']} / {s['concurrent_trials']} x "
                        f"{s['workers_per_trial'] * s['cpus_per_worker']} | {s['epoch_seconds_mean']:.1f} "
                        f"| {s['overhead_mean_s']:.1f} / {s['overhead_max_s']:.1f} | {s['waiting_mean_s']:.1f} "
                        f"| {s['startup_mean_s']:.1f} | {s['tune_overhead_mean_s']:.1f} | {s['amortized_overhead_s']:.1f} "
                        f"| {s['tune_fit_seconds']:.0f} | {s['run_sweep_seconds']:.0f} | {s['finish_seconds']:.0f} "
                        f"| {s['tracking_callback_seconds']:.3f} ({s['tracking_callback_calls']}) "
                        f"| {s['tracking_share_of_fit']:.2%} | {s['tracking_writer_seconds']:.2f} "
                        f"({s['tracking_writer_share_of_fit']:.1%}) | {fmt(s.get('other_cpu_load'))} |")
        rows += ["", "Own overhead: a trial's wall time (TrialLogger's on_trial_start to on_trial_complete, "
                 "driver clock) less its epochs and less time spent waiting while another trial trained. "
                 "startup_seconds is what the product logs to MLflow. Sweep-level: (Tune fit wall x trials the "
                 "cores can train at once - all epoch seconds) / trials, so it includes Tune's own start and actor launches."]
    if "time_to_accuracy" in results:
        tta = results["time_to_accuracy"]
        product, blitz = tta["product"], tta["blitz"]
        rows += ["", f"### 3. Time to {tta['target']:.0%} on the same {tta['val_images']:,}-image val split "
                 f"({tta['train_images']:,} training images)", "",
                 f"- product (`lenet-tune train`, defaults, {product['cpus_per_worker']} CPUs): startup "
                 f"{product['startup_seconds']:.1f} s, then val acc " + ", ".join(
                     f"{acc:.1%}@{sec:.0f}s" for acc, sec in zip(product["val_acc"], product["seconds_after_epoch"]))
                 + f"; {product['images_per_second']:,.0f} images/s; on the command's clock (data load, "
                 f"scheduling, checkpoints) {fmt(product['command_seconds_to_target'], '.0f')} s; whole command "
                 f"{product['command_seconds']:.0f} s (final val {product['final_val_acc']:.1%}, test {product['test_acc']:.1%}).",
                 f"- blitz (batch 4, 2 DataLoader workers, {blitz['threads']} threads): {blitz['images_per_second']:,.0f} "
                 f"images/s; val acc " + ", ".join(f"{acc:.1%}@{sec:.0f}s (epoch {ep:.1f})" for sec, ep, acc in blitz["curve"])
                 + (f"; capped at {blitz['budget_s']:.0f} s of training" if blitz["seconds_to_target"] is None else "")
                 + (f"; linear extrapolation to {tta['target']:.0%}: ~{blitz['extrapolated_seconds_to_target']:.0f} s "
                    "(a lower bound: gains slow down)" if blitz["extrapolated_seconds_to_target"] else "")
                 + f"; other CPU load {fmt(blitz.get('other_cpu_load'))}."]
    if "placement_and_memory" in results:
        pm = results["placement_and_memory"]
        rows += ["", "### 4 and 5. Threads and memory of real trials (1 epoch, full data; peaks while all trials ran)", "",
                 "| trials x CPUs | torch threads | max concurrent (max_concurrent_trials) | USS sum MB | USS max MB "
                 "| RSS max MB | object store MB | data writeable in trial |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for s in pm["shapes"].values():
            rows.append(f"| {s['trials']} x {s['cpus_per_trial']} | {s['torch_threads']} | {s['max_concurrent_trials']} "
                        f"| {s['uss_sum_mb']:.0f} | {s['uss_max_mb']:.0f} | {s['rss_max_mb']:.0f} "
                        f"| {s['object_store_mb']:.0f} | {bool(s['data_writeable'])} |")
        floor = pm["worker_floor"]
        rows += ["", f"USS is memory held by that process alone; the dataset ({pm['dataset_mb']:.0f} MB) sits once in the "
                 "object store and is mapped, read-only, into every trial. Baseline, a fresh Ray worker: bare "
                 f"{floor['bare_mb']:.0f} MB, after `import torch` {floor['torch_imported_mb']:.0f} MB, after one epoch "
                 f"of `trainables.loop.fit` on the shared data (no Tune, Train or MLflow) {floor['after_epoch_mb']:.0f} MB."]
    if "default_sweep" in results:
        ds = results["default_sweep"]
        rows += ["", f"### Default sweep: {ds['trials']} trials in {ds['seconds']:.0f} s, best val "
                 f"{ds['best_val_acc']:.1%} (test {ds['test_acc']:.1%}); first val >= 65% after "
                 f"{fmt(ds['seconds_to_target'], '.0f')} s (target: within 600 s: "
                 f"{verdict(ds['seconds_to_target'] is not None and ds['seconds_to_target'] <= 600)}); "
                 f"TrialLogger share {ds['tracking_share_of_fit']:.1%}."]
    return rows


# ---------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> dict:
    started = time.time()
    root = Path(args.data)
    results = {"command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]), "environment": environment()}
    print(json.dumps(results["environment"]), flush=True)
    full = DataConfig(source=f"imagefolder:{root}")
    splits = load_splits(full)
    # The product's layout: channels-last memory viewed as NCHW (plain_loop uses the same).
    images, labels = as_nchw(splits.train_images[:args.throughput_images]), torch.as_tensor(
        splits.train_labels[:args.throughput_images])
    results["throughput"] = throughput(images, labels, args.threads, args.repeats)
    print(json.dumps(results["throughput"]), flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="lenet-bench-"))
    from jobs.runtime import connect_ray

    if args.train_health_check_s is not None:  # before Ray starts: its processes inherit the environment
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.train_health_check_s)
        results["train_health_check_s"] = args.train_health_check_s
    try:
        cluster = connect_ray(num_cpus=args.cpus)
        cores = int(cluster["CPU"])
        if not args.skip_time_to_accuracy:
            product = product_time_to_accuracy(full, scratch, args.target_acc, cpus=cores)
            print(json.dumps(product), flush=True)
        if not args.skip_overhead:
            subset = DataConfig(source=f"imagefolder:{root}", max_train_images=args.overhead_images)
            one_cpu, ddp = Resources(cpus_per_worker=1), Resources(workers_per_trial=2, cpus_per_worker=1)
            runs = [("in-trial (default)", one_cpu, "auto"), ("torchtrainer", one_cpu, "torchtrainer"),
                    ("DDP 2 workers", ddp, "auto")]
            results["overhead"] = [
                sweep_overhead(label, resources, runner, subset, scratch, args.trials, args.epochs, cores)
                for label, resources, runner in runs]
            print(json.dumps([{k: v for k, v in s.items() if k != "per_trial"} for s in results["overhead"]]), flush=True)
        results["placement_and_memory"] = placement_and_memory(splits, scratch, cluster)
        print(json.dumps(results["placement_and_memory"]), flush=True)
        if args.sweep:
            results["default_sweep"] = default_sweep(full, scratch, args.sweep_acc)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    if not args.skip_time_to_accuracy:
        train_idx, val_idx = same_split_as_product(root, full, splits)
        budget = args.blitz_seconds or max(60.0, args.time_budget - (time.time() - started) - 40)
        blitz = blitz_time_to_accuracy(root / "train", train_idx, val_idx, args.target_acc, budget,
                                       args.evals_per_epoch, threads=max(args.threads))
        results["time_to_accuracy"] = {"target": args.target_acc, "train_images": len(train_idx),
                                       "val_images": len(val_idx), "product": product, "blitz": blitz}
    results["seconds"] = time.time() - started
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure issue 4's targets against their baselines on the same data (CPU, in-process Ray).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="/tmp/cifar", help="image tree with train/<class>/*.jpg (no test/)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the in-process Ray (cores)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads for the throughput runs")
    parser.add_argument("--throughput-images", type=int, default=10000, help="images per timed throughput epoch")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per loop and thread count (best kept)")
    parser.add_argument("--overhead-images", type=int, default=10000, help="--max-train-images of the overhead sweeps")
    parser.add_argument("--trials", type=int, default=4, help="trials per overhead sweep")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per overhead trial")
    parser.add_argument("--target-acc", type=float, default=0.55, help="val accuracy for time-to-accuracy (fraction)")
    parser.add_argument("--blitz-seconds", type=float, default=None,
                        help="cap on blitz training seconds (None: what is left of --time-budget, at least 60)")
    parser.add_argument("--time-budget", type=float, default=570, help="seconds the default run aims to finish in")
    parser.add_argument("--evals-per-epoch", type=int, default=2, help="blitz val evaluations per epoch")
    parser.add_argument("--train-health-check-s", type=float, default=None,
                        help="what-if: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the whole run (the product's default: 0.2 s)")
    parser.add_argument("--sweep", action="store_true", help="also run the default sweep (65%% val in 10 min?), ~10 min")
    parser.add_argument("--sweep-acc", type=float, default=0.65, help="val accuracy the default sweep should reach")
    parser.add_argument("--skip-overhead", action="store_true", help="skip the three overhead sweeps")
    parser.add_argument("--skip-time-to-accuracy", action="store_true", help="skip the training run and the blitz")
    parser.add_argument("--keep", action="store_true", help="keep the scratch MLflow store and Ray results")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if not (Path(args.data) / "train").is_dir():
        parser.error(f"--data {args.data} has no train/ folder: point it at the unpacked CIFAR-10 (PATH/train/<class>/)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    print("\n" + markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
