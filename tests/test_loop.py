"""The loop: it learns, it resumes from a checkpoint at the next epoch, it stops on divergence."""

import os
import shutil

import pytest
import torch

from trainables.config import DataConfig, HyperParams, Resources
from trainables.data import load_splits
from trainables.loop import fit, load_checkpoint


@pytest.fixture(scope="module")
def splits():
    return load_splits(DataConfig(source="synthetic", synthetic_train_images=1500))


def collect(hp, splits, tmp_path, resume_state=None):
    """Run fit and keep every report and a copy of every checkpoint."""
    reports = []

    def report(metrics, checkpoint_dir):
        kept = None
        if checkpoint_dir:
            kept = tmp_path / f"epoch-{metrics['epoch']}"
            shutil.copytree(checkpoint_dir, kept)
        reports.append((metrics, kept))

    torch.set_num_threads(2)
    fit(hp, splits, torch.device("cpu"), report, resume_state)
    return reports


def test_loss_falls_and_accuracy_beats_chance(splits, tmp_path):
    reports = collect(HyperParams(epochs=3, batch_size=32, lr=0.05), splits, tmp_path)
    metrics = [m for m, _ in reports]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < 0.5 * metrics[0]["train_loss"]
    assert metrics[-1]["val_acc"] > 0.5  # chance is 0.1
    for m in metrics:
        assert m["epoch_seconds"] > 0 and m["images_per_second"] > 0 and m["diverged"] == 0


def test_stopped_run_resumes_at_next_epoch_from_checkpoint(splits, tmp_path):
    hp = HyperParams(epochs=3, batch_size=32, lr=0.05)
    first = collect(hp.model_copy(update={"epochs": 2}), splits, tmp_path / "a")
    state = load_checkpoint(str(first[-1][1]))
    assert state["epoch"] == 2
    resumed = collect(hp, splits, tmp_path / "b", resume_state=state)
    assert [m["epoch"] for m, _ in resumed] == [3]
    # Resuming continues training: it starts from the checkpoint's weights, not from scratch.
    fresh_epoch1 = first[0][0]["train_loss"]
    assert resumed[0][0]["train_loss"] < fresh_epoch1


def test_resumed_epoch_is_the_epoch_an_uninterrupted_run_trains(splits, tmp_path):
    # Weights, momentum buffers and the step's lr all come back: epoch 3 after a resume from epoch 2's
    # checkpoint is bit for bit epoch 3 of a run that never stopped (a lost momentum would differ).
    hp = HyperParams(epochs=3, batch_size=32, lr=0.05)
    straight = collect(hp, splits, tmp_path / "straight")
    state = load_checkpoint(str(straight[1][1]))
    assert state["optimizer"]["momentum_buffers"] is not None
    resumed = collect(hp, splits, tmp_path / "resumed", resume_state=state)
    for key in ("train_loss", "val_loss", "val_acc"):
        assert resumed[0][0][key] == straight[2][0][key], key
    without_momentum = {**state, "optimizer": {"momentum_buffers": None}}
    assert collect(hp, splits, tmp_path / "cold", resume_state=without_momentum)[0][0]["train_loss"] != \
        straight[2][0]["train_loss"]


def test_diverging_trial_stops_at_first_non_finite_loss(splits, tmp_path):
    reports = collect(HyperParams(epochs=3, batch_size=32, lr=1e4, schedule="constant"), splits, tmp_path)
    assert len(reports) == 1
    metrics, checkpoint = reports[0]
    assert metrics["diverged"] == 1 and metrics["val_acc"] == 0.0 and checkpoint is None


def test_trainer_resumes_from_latest_checkpoint(ray_runtime, tmp_path, splits):
    """A real TorchTrainer: a run stopped after epoch 1 restarts at epoch 2 from its checkpoint."""
    import ray

    from trainables.trainer import build_trainer

    data_ref = ray.put(splits)
    hp = HyperParams(epochs=1, batch_size=64)
    first = build_trainer(hp, Resources(), data_ref, "resume-me", str(tmp_path)).fit()
    assert first.error is None and first.metrics["epoch"] == 1
    second = build_trainer(hp.model_copy(update={"epochs": 2}), Resources(), data_ref, "resume-me",
                           str(tmp_path)).fit()
    assert second.error is None
    assert second.metrics["epoch"] == 2
    history = second.metrics_dataframe
    assert history["epoch"].tolist() == [1, 2]
    # Epoch 1's row is the first run's own record (same timing), not a re-run of epoch 1.
    assert history.iloc[0]["epoch_seconds"] == first.metrics["epoch_seconds"]
    best = load_checkpoint(second.checkpoint.path)
    assert best["epoch"] == 2 and os.path.exists(second.checkpoint.path)


def test_two_worker_ddp_trainer_learns(ray_runtime, tmp_path, splits):
    """Two Ray Train workers, one CPU each, DDP over gloo: the same loop learns on sharded batches."""
    import ray

    from trainables.trainer import build_trainer

    hp = HyperParams(epochs=3, batch_size=64, lr=0.05)
    result = build_trainer(hp, Resources(workers_per_trial=2, cpus_per_worker=1), ray.put(splits), "ddp",
                           str(tmp_path)).fit()
    assert result.error is None
    assert result.metrics["epoch"] == 3
    assert result.metrics["val_acc"] > 0.4  # chance is 0.1
    assert load_checkpoint(result.checkpoint.path)["epoch"] == 3


def test_trainer_leaves_no_placement_group_or_cleaner_behind(ray_runtime, tmp_path, splits):
    """LeNetTorchTrainer stops Train's placement-group cleaner without waiting for it: it must still go."""
    import time

    import ray
    from ray.util.state import list_actors

    from trainables.controller import PlacementGroupCleanerStoppedInPassing
    from trainables.trainer import build_trainer

    trainer = build_trainer(HyperParams(epochs=1, batch_size=64), Resources(), ray.put(splits), "tidy",
                            str(tmp_path))
    assert PlacementGroupCleanerStoppedInPassing in {type(c) for c in trainer._create_default_callbacks()}
    assert trainer.fit().error is None
    deadline = time.monotonic() + 30
    while True:
        cleaners = list_actors(filters=[("class_name", "=", "PlacementGroupCleaner"), ("state", "=", "ALIVE")])
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        if not cleaners and not groups or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert cleaners == [] and groups == []
