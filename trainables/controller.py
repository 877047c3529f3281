"""What Ray Train's controller unpickles from our TorchTrainer: kept free of torch.

Ray Train runs each trial's controller in a fresh process that never runs a torch op: it only
tells the workers what to do. Whatever it unpickles (the backend config, the callbacks) imports
its module there. TorchTrainer's default `TorchConfig` lives in the `ray.train.torch` package,
whose `__init__` imports torch, and so did trainables.trainer: 1.3 s of a 2-core machine in
every DDP trial, on the path to its first epoch.

`ProcessGroupConfig` asks the workers for the same setup as `TorchConfig` (the same backend
choice, address, environment variables and timeouts), by calling Ray's own worker-side functions
from `ray.train.torch.config`, which are imported on the workers only. TPUs are not handled.
This module must not import torch, ray.train.torch or trainables.trainer (a test checks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray._private import ray_constants
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.util import TrainingFramework

logger = logging.getLogger(__name__)


@dataclass
class ProcessGroupConfig(BackendConfig):
    """TorchConfig's fields, for TorchTrainer(torch_config=...); TorchTrainer fills in `backend`."""

    backend: str | None = None  # "gloo" on CPUs, "nccl" on GPUs: TorchTrainer picks it when None
    timeout_s: int = 1800  # seconds a collective may wait before the process group fails (TorchConfig's)

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        # Read where the trainer is built (the Tune trial's process, which has torch), not in the controller.
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


def on_worker(name: str, **kwargs):
    """Call ray.train.torch.config's function `name` on a worker, where importing torch is due anyway."""
    from ray.train.torch import config

    return getattr(config, name)(**kwargs)


def set_master_address(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class ProcessGroupBackend(Backend):
    """ray.train.torch.config._TorchBackend's steps for Train V2 worker groups, run from the controller."""

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        backend = backend_config.backend  # TorchTrainer chose it: gloo, or nccl when the workers have GPUs
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(set_master_address, addr=addr, port=port)
        # RANK, LOCAL_RANK, WORLD_SIZE...: what torch.distributed expects before init_process_group.
        worker_group.execute(on_worker, "_set_torch_distributed_env_vars")
        ray.get([worker_group.execute_single_async(rank, on_worker, "_setup_torch_process_group", backend=backend,
                                                   world_rank=rank, world_size=len(worker_group),
                                                   init_method="env://", timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        futures = worker_group.execute_async(on_worker, "_shutdown_torch", destroy_process_group=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:  # as TorchConfig: say so and go on, the workers are stopped next anyway
            logger.warning(f"Torch process group shutdown timed out after {timeout_s} seconds")


class PlacementGroupCleanerStoppedInPassing(PlacementGroupCleanerCallback):
    """Train's placement-group cleaner, told to stop without waiting for it to finish.

    The cleaner removes a run's placement group if the controller dies without doing so. At a
    normal end the controller has removed the group already and then waits for the cleaner's
    monitor thread, which only looks up every second: 0.5-1 s at the end of every trial.
    Told in passing, the cleaner still stops (or finds the controller gone and the group
    removed, and exits), so nothing is left behind and no trial waits.
    """

    def _stop_cleaner(self):
        if self._cleaner:
            self._cleaner.stop.remote()
            self._cleaner = None
