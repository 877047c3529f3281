"""One frozen configuration per concern.

Each is a pydantic model so that a sweep file or a flag with a bad value is
refused at the edge with the field's name. They become plain dicts only at the
Ray boundary (`model_dump()`), and are rebuilt on the other side.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainables.model import geometry_error


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Frozen):
    source: str = "cifar10"  # 'cifar10', 'imagefolder:PATH' or 'synthetic'
    # Where cifar10 is downloaded and decoded once: $LENET_DATA_DIR, else ./data.
    data_dir: str = Field(default_factory=lambda: os.environ.get("LENET_DATA_DIR", "data"))
    val_fraction: float = Field(0.1, gt=0, lt=1)  # share of training images held out, per class
    test_fraction: float = Field(0.1, gt=0, lt=1)  # held out for test when the source has no test split
    seed: int = 0  # seeds the split and the synthetic images
    max_train_images: int | None = Field(None, gt=0)  # cap before the split (smoke runs); None = all
    synthetic_train_images: int = Field(2000, gt=0)  # size of the synthetic training set

    @model_validator(mode="after")
    def _known_source(self) -> "DataConfig":
        if self.source not in ("cifar10", "synthetic") and not self.source.startswith("imagefolder:"):
            raise ValueError(
                f"unknown data source {self.source!r}: use 'cifar10', 'synthetic' or 'imagefolder:PATH'"
            )
        return self


class HyperParams(_Frozen):
    lr: float = Field(0.05, gt=0)  # peak SGD learning rate (per batch of batch_size images)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum
    weight_decay: float = Field(5e-4, ge=0)  # L2 penalty on all weights
    batch_size: int = Field(128, gt=0)  # images per optimiser step, summed over workers
    epochs: int = Field(10, gt=0)  # passes over the training split
    dilation: int = Field(1, ge=1)  # spacing of both convolutions' kernel taps
    padding: int = Field(0, ge=0)  # zero border added before both convolutions
    schedule: Literal["cosine", "constant"] = "cosine"  # learning-rate shape over the run
    augment: Literal["none", "flip", "flip-crop"] = "flip"  # batched augmentation of training images
    seed: int = 0  # seeds weights and shuffling

    @model_validator(mode="after")
    def _geometry_fits(self) -> "HyperParams":
        error = geometry_error(self.dilation, self.padding)
        if error:
            raise ValueError(error)
        return self


class Resources(_Frozen):
    workers_per_trial: int = Field(1, gt=0)  # DDP processes per trial
    cpus_per_worker: int = Field(1, gt=0)  # CPU cores per worker; torch uses this many threads
    gpus_per_worker: float = Field(0, ge=0)  # 0 = CPU; a fraction packs several trials on one GPU

    @model_validator(mode="after")
    def _gpu_share(self) -> "Resources":
        gpus = self.gpus_per_worker
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(
                f"gpus_per_worker={gpus}: use a fraction in (0, 1] or a whole number of GPUs"
            )
        return self

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class SearchSpace(_Frozen):
    lr: tuple[float, float] = (0.005, 0.2)  # log-uniform range of the learning rate
    dilations: tuple[int, ...] = (1, 2)  # dilation values; crossed with paddings
    paddings: tuple[int, ...] = (0, 1, 2)  # padding values; impossible pairs are dropped
    batch_sizes: tuple[int, ...] = (64, 128, 256)  # choices of batch size
    momentums: tuple[float, ...] = (0.8, 0.9, 0.95)  # choices of SGD momentum
    augments: tuple[str, ...] = ("flip",)  # choices of augmentation

    @model_validator(mode="after")
    def _lr_range(self) -> "SearchSpace":
        low, high = self.lr
        if not 0 < low <= high:
            raise ValueError(f"lr range {low},{high}: use 0 < MIN <= MAX, e.g. --lr-range 0.005,0.2")
        return self


class SweepConfig(_Frozen):
    name: str = "lenet-sweep"  # names the Ray results folder and the MLflow parent run
    num_samples: int = Field(8, gt=0)  # trials to launch
    epochs: int = Field(10, gt=0)  # most epochs a trial may run (ASHA stops some sooner)
    search: Literal["random", "optuna"] = "random"  # random search or Optuna TPE
    scheduler: Literal["asha", "fifo"] = "asha"  # ASHA early stopping, or run every trial out
    grace_period: int = Field(2, gt=0)  # epochs before ASHA may stop a trial
    max_concurrent: int | None = Field(None, gt=0)  # None = as many as the cluster's CPUs/GPUs fit
    seed: int = 0  # seeds the search algorithm
    trial_runner: Literal["auto", "torchtrainer"] = "auto"  # auto: 1-worker trials skip TorchTrainer


class TrackingConfig(_Frozen):
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else a SQLite store in the cwd
    experiment: str = "lenet-cifar10"  # MLflow experiment name
    model_name: str = "lenet-cifar10"  # Model Registry name of the best model
    storage_path: str | None = None  # None = $LENET_STORAGE_PATH, else ./results (Ray checkpoints)

    def resolved_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()

    def resolved_storage(self) -> str:
        path = self.storage_path or os.environ.get("LENET_STORAGE_PATH") or "results"
        return path if "://" in path else os.path.abspath(path)


def default_tracking_uri() -> str:
    # SQLite in the working directory. Only the sweep driver process writes to
    # it (workers report to Ray, not to MLflow), so trials never contend for the lock.
    return "sqlite:///" + os.path.abspath("mlflow.db")


def redact(text: str) -> str:
    """Hide credentials in URIs (scheme://user:password@host -> scheme://***@host)."""
    return re.sub(r"(\w[\w+.-]*://)[^/@\s]+@", r"\1***@", text)
