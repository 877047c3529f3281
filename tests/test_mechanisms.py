"""The mechanisms behind the speed targets: threads per trial, one shared dataset, no oversubscription.

benchmarks/run.py times them; these tests check that they are in place, with no
timed asserts. Each trial here runs the product's own one-worker path (`trial_driver`:
training in a child of the node's fork server), then the child reports what it saw.
"""

from __future__ import annotations

import itertools
import os
import sys

import pytest
import ray
import torch
from ray import cloudpickle, tune

from jobs.runtime import UsageError, check_fits, max_concurrent_trials
from trainables.config import DataConfig, HyperParams, Resources
from trainables.data import load_splits
from trainables.forkserver import train
from trainables.trial import trial_driver

# The trial function below lives in this test module, which Ray's workers cannot import.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def backing_file(address: int) -> str:
    """The file (or [anon]) behind the memory mapping that holds `address` in this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else "[anon]"
    return "unmapped"


# The probes below travel by value to the trial's processes: what they name at module level is
# imported there too, so they import torch inside (the thin trial must not) and take plain dicts.


def probe_child(job: dict, splits, report) -> None:
    """In the forked child: the product's training, then what the child saw (threads, data)."""
    import torch

    train(job, splits, report)
    report({
        "epoch": 2,  # after fit's epoch 1
        "torch_threads": torch.get_num_threads(),
        "data_writeable": bool(splits.train_images.flags.writeable),
        "data_mapping": backing_file(splits.train_images.ctypes.data),
        "child_pid": os.getpid(),
    }, None)


def probe_trial(config: dict, base: dict, data_refs: list) -> None:
    """The product's one-worker trial (a thin process; its child trains), then what the thin process imported."""
    trial_driver({}, base, {"cpus_per_worker": config["cpus"], "gpus_per_worker": 0}, data_refs, entry=probe_child)
    tune.report({"epoch": 3, "data_ref": data_refs[0].hex(), "trial_pid": os.getpid(),
                 "trial_imported_torch": "torch" in sys.modules})


@pytest.fixture(scope="module")
def probed(ray_runtime, tmp_path_factory):
    """Two real trials on the 2-CPU runtime: cpus_per_worker 1, then 2; the driver's data ref."""
    splits = load_splits(DataConfig(source="synthetic", synthetic_train_images=600))
    data_ref = ray.put(splits)
    trainable = tune.with_resources(
        # In a list, as jobs/tune.py does, so the trial gets the reference rather than the arrays.
        tune.with_parameters(probe_trial, base=HyperParams(epochs=1, batch_size=64).model_dump(), data_refs=[data_ref]),
        lambda config: {"cpu": config["cpus"]},
    )
    grid = tune.Tuner(
        trainable,
        param_space={"cpus": tune.grid_search([1, 2])},
        run_config=tune.RunConfig(storage_path=str(tmp_path_factory.mktemp("mechanisms")), verbose=0),
    ).fit()
    assert not grid.errors, grid.errors
    # Each trial's two reports after fit's: the child's (epoch 2), then the thin trial's (epoch 3).
    reports = {result.config["cpus"]: {**result.metrics_dataframe.set_index("epoch").loc[2].to_dict(),
                                       **result.metrics} for result in grid}
    return reports, data_ref.hex()


@pytest.mark.parametrize("cpus", [1, 2])
def test_torch_threads_in_a_trial_equal_its_cpus(probed, cpus):
    reports, _ = probed
    assert reports[cpus]["torch_threads"] == cpus


def test_one_worker_trials_train_in_a_forked_child_and_import_no_torch_themselves(probed):
    reports, _ = probed
    for metrics in reports.values():
        assert metrics["child_pid"] != metrics["trial_pid"]
        assert metrics["trial_imported_torch"] is False  # the fork server imported it, once per node


def test_trials_read_the_one_shared_copy_of_the_data(probed):
    reports, driver_ref = probed
    for metrics in reports.values():
        # The trial was handed the driver's object, not a copy put there for it...
        assert metrics["data_ref"] == driver_ref
        # ...and reads it in place: read-only arrays mapped from the object store's shared memory.
        assert metrics["data_writeable"] is False
        assert "plasma" in metrics["data_mapping"], metrics["data_mapping"]  # e.g. /dev/shm/plasmaXis5Sd


def test_an_idle_fork_server_ends_itself(ray_runtime):
    """A sweep stops its fork servers at its end; one whose driver was killed outright ends itself once idle."""
    import time

    from trainables.forkserver import ForkServer

    server = ForkServer.remote(idle_exit_s=0.5)
    assert ray.get(server.children.remote()) == []
    deadline = time.monotonic() + 60
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(server.children.remote())
            time.sleep(0.2)


CLUSTERS = [{"CPU": 2}, {"CPU": 3}, {"CPU": 16}, {"CPU": 16, "GPU": 1}, {"CPU": 8, "GPU": 4}, {"CPU": 64, "GPU": 8}]


@pytest.mark.parametrize("cluster", CLUSTERS, ids=lambda c: "-".join(f"{v}{k}" for k, v in c.items()))
def test_concurrent_trials_never_oversubscribe_cores_or_gpus(cluster):
    for workers, cpus, gpus in itertools.product([1, 2, 4], [1, 2, 3], [0, 0.25, 0.5, 1]):
        if gpus and not cluster.get("GPU"):
            continue
        fits = max_concurrent_trials(cluster, workers, cpus, gpus)
        assert fits * workers * cpus <= cluster["CPU"]
        assert fits * workers * gpus <= cluster.get("GPU", 0) + 1e-9
        # ...and it uses what there is: one more trial would not fit.
        more = fits + 1
        assert more * workers * cpus > cluster["CPU"] or more * workers * gpus > cluster.get("GPU", 0) + 1e-9


def test_laptop_shapes():
    two_cores = {"CPU": 2}
    assert max_concurrent_trials(two_cores, 1, 1, 0) == 2  # the default: two one-thread trials
    assert max_concurrent_trials(two_cores, 1, 2, 0) == 1
    assert max_concurrent_trials(two_cores, 2, 1, 0) == 1  # one DDP trial of two workers
    assert max_concurrent_trials({"CPU": 16, "GPU": 1}, 1, 1, 0.25) == 4  # four trials share a GPU
    with pytest.raises(UsageError, match="--cpus-per-worker"):
        check_fits(two_cores, 1, 3, 0)  # could never be scheduled: refused, not left waiting


def test_a_trial_process_imports_no_torch_tracking_or_reporting_code():
    """Tune imports a trial's function by module: that module must not pull in torch, MLflow and
    friends (each concurrent trial would pay their memory; the fork server holds torch)."""
    import subprocess

    probe = ("import sys, trainables.trial, trainables.forkserver; print(sorted(m for m in "
             "('mlflow', 'matplotlib', 'jobs.tune', 'trainables.tracking', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_what_ray_train_hands_its_controller_imports_no_torch(tmp_path):
    """Ray Train unpickles the trainer's run context (with its backend config) and callbacks in a
    fresh controller process per trial, which never runs a torch op: none of it may import torch
    (Ray's own TorchConfig does, through the ray.train.torch package: 1.3 s of each DDP trial)."""
    import subprocess

    from ray import cloudpickle

    from trainables.trainer import build_trainer

    trainer = build_trainer(HyperParams(), Resources(workers_per_trial=2), data_ref=None, name="t",
                            storage_path=str(tmp_path))
    handed = tmp_path / "controller-args.pkl"
    handed.write_bytes(cloudpickle.dumps({"train_run_context": trainer.train_run_context,
                                          "callbacks": trainer._create_default_callbacks()}))
    probe = (f"import pickle, sys; args = pickle.loads(open({str(handed)!r}, 'rb').read()); "
             "print(args['train_run_context'].backend_config.backend, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["gloo", "False"]  # TorchTrainer still picked the backend


def test_images_are_viewed_channels_last_without_a_copy():
    from trainables.data import as_nchw

    splits = load_splits(DataConfig(source="synthetic", synthetic_train_images=200))
    view = as_nchw(splits.train_images)
    assert view.shape == (len(splits.train_labels), 3, 32, 32)
    assert view.is_contiguous(memory_format=torch.channels_last)  # what oneDNN's convolutions read as is
    assert view.data_ptr() == splits.train_images.ctypes.data  # the stored array itself, not a copy
    assert view[torch.tensor([3, 1, 4])].is_contiguous(memory_format=torch.channels_last)  # batches keep it


def test_train_controller_polls_fast_and_skips_the_preemption_watcher_unless_the_user_says_otherwise(monkeypatch):
    from trainables.trainer import TRAINER_DEFAULTS, build_trainer

    assert dict(TRAINER_DEFAULTS) == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                                      "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    for name, _ in TRAINER_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    build_trainer(HyperParams(), Resources(), data_ref=None, name="t", storage_path="/tmp/unused")
    assert all(os.environ[name] == value for name, value in TRAINER_DEFAULTS)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    build_trainer(HyperParams(), Resources(), data_ref=None, name="t", storage_path="/tmp/unused")
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


def test_trainer_changes_only_the_dataset_manager_the_cleaner_stop_and_the_backend_config():
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from trainables.controller import PlacementGroupCleanerStoppedInPassing, ProcessGroupConfig
    from trainables.trainer import LeNetTorchTrainer, build_trainer

    def kinds(trainer) -> set:
        return {type(c) for c in trainer._create_default_callbacks()}

    trainer = build_trainer(HyperParams(), Resources(), data_ref=None, name="t", storage_path="/tmp/unused")
    ours = kinds(trainer)
    rays = kinds(TorchTrainer(lambda: None))
    assert rays - ours == {DatasetsCallback, PlacementGroupCleanerCallback}  # everything else is Ray's own
    assert ours - rays == {PlacementGroupCleanerStoppedInPassing}
    # TorchConfig's fields and choices, in a class the controller can unpickle without torch.
    rays_config = TorchTrainer(lambda: None).backend_config
    assert isinstance(trainer.backend_config, ProcessGroupConfig)
    assert trainer.backend_config.to_dict() == rays_config.to_dict()  # backend gloo, env://, same timeout
    assert trainer.backend_config.framework == rays_config.framework
    assert trainer.backend_config.train_func_context is rays_config.train_func_context  # sets the CUDA device
    # Given Ray Datasets, the Ray Data machinery stays.
    with_data = LeNetTorchTrainer(lambda: None, datasets={"train": lambda: None})  # a factory: nothing starts
    assert DatasetsCallback in kinds(with_data)


def test_placement_group_cleaner_is_told_to_stop_without_a_wait(monkeypatch):
    # Train's own callback blocks in ray.get on the cleaner's stop (up to its 1 s poll); ours only sends it.
    import asyncio

    from ray.train.v2._internal.callbacks import placement_group_callback

    from trainables.controller import PlacementGroupCleanerStoppedInPassing

    sent, waited = [], []
    monkeypatch.setattr(placement_group_callback.ray, "get", lambda *a, **k: waited.append(a))

    class Cleaner:  # the one method the callback calls on Train's cleaner actor
        class stop:  # lower case: it mirrors an actor method and its .remote()
            @staticmethod
            def remote():
                sent.append("stop")

    callback = PlacementGroupCleanerStoppedInPassing()
    callback._cleaner = Cleaner()
    asyncio.run(callback.before_controller_shutdown())  # the hook Train calls at a normal end
    assert sent == ["stop"] and waited == [] and callback._cleaner is None
