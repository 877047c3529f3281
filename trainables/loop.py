"""The training loop: small functions that return numbers, and the Ray Train worker.

`train_epoch` and `evaluate` are plain PyTorch. `fit` runs the epochs and hands
each epoch's metrics and checkpoint to a `report` function, so the same loop
serves Ray Train workers (`train_loop_per_worker`) and tests alike. Only
`train_loop_per_worker` touches `ray.train`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainables.config import HyperParams
from trainables.data import Splits, as_nchw
from trainables.model import LeNet
from trainables.optim import SGD

# CIFAR-10 channel statistics on the 0..255 scale; batches are normalised on the fly.
MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)
CHECKPOINT_FILE = "checkpoint.pt"

ReportFn = Callable[[dict, "str | None"], None]  # (metrics, checkpoint folder or None)


# x * SCALE + SHIFT == (x - MEAN) / STD: one multiply-add in place, no temporaries per batch.
SCALE = tuple(1 / s for s in STD)
SHIFT = tuple(-m / s for m, s in zip(MEAN, STD))


def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float, zero mean and unit variance per channel, same memory format."""
    scale, shift = _scale_and_shift(images_u8.device)
    return images_u8.float().mul_(scale).add_(shift)


@functools.cache
def _scale_and_shift(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SCALE and SHIFT as (1, 3, 1, 1) tensors on `device`, made once rather than every batch."""
    return (torch.tensor(SCALE, device=device).view(1, 3, 1, 1),
            torch.tensor(SHIFT, device=device).view(1, 3, 1, 1))


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Batched flips (and 2px random translations): no per-sample Python work."""
    if mode == "none":
        return x
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    if mode == "flip-crop":
        # One random shift per batch keeps it a cheap view; shuffling mixes shifts across epochs.
        dy, dx = torch.randint(-2, 3, (2,), generator=generator, device=generator.device).tolist()
        x = torch.roll(F.pad(x, (2, 2, 2, 2)), shifts=(dy, dx), dims=(2, 3))[:, :, 2:-2, 2:-2]
    return x


def lr_at(hp: HyperParams, step: int, total_steps: int) -> float:
    """Learning rate at a global step: a stateless function, so resuming needs no scheduler state."""
    if hp.schedule == "constant":
        return hp.lr
    warmup = max(1, total_steps // 50)  # a short ramp keeps a large lr from blowing up at step 0
    if step < warmup:
        return hp.lr * (step + 1) / warmup
    return 0.5 * hp.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


def build_optimizer(model: torch.nn.Module, hp: HyperParams) -> SGD:
    """Nesterov momentum SGD (plain SGD when momentum is 0); the loop sets its lr every step."""
    return SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
               nesterov=hp.momentum > 0)


def train_epoch(model, optimizer: SGD, images, labels, hp: HyperParams, epoch: int,
                batch_size: int, rank: int = 0, world_size: int = 1) -> float:
    """One pass over this worker's shard with `optimizer` (build_optimizer's SGD: the lr is set on it every
    step); returns the mean training loss (nan if it diverged)."""
    model.train()
    # All workers draw the same permutation and take every world_size-th image,
    # so shards are disjoint and equal-sized (DDP needs the same step count).
    generator = torch.Generator().manual_seed(hp.seed * 100_003 + epoch)
    usable = len(labels) // world_size * world_size
    order = torch.randperm(len(labels), generator=generator)[:usable][rank::world_size].to(images.device)
    steps = len(order) // batch_size
    total_steps = steps * hp.epochs
    aug_generator = torch.Generator(device=images.device).manual_seed(hp.seed * 7919 + epoch * 31 + rank)
    loss_sum = torch.zeros((), device=images.device)
    for i in range(steps):
        idx = order[i * batch_size:(i + 1) * batch_size]
        x = augment_batch(normalise(images[idx]), hp.augment, aug_generator)
        optimizer.lr = lr_at(hp, (epoch - 1) * steps + i, total_steps)
        loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
    return (loss_sum / max(steps, 1)).item()


@torch.no_grad()
def evaluate(model, images, labels, batch_size: int = 250) -> dict:
    """Sums over the given images: {'loss_sum', 'correct', 'count'} (add across workers, then divide)."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device)
    for start in range(0, len(labels), batch_size):
        x = normalise(images[start:start + batch_size])
        y = labels[start:start + batch_size]
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return {"loss_sum": loss_sum.item(), "correct": correct.item(), "count": len(labels)}


def _all_reduce_sums(sums: dict) -> dict:
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    keys = sorted(sums)
    buf = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        buf = buf.cuda()
    dist.all_reduce(buf)
    return dict(zip(keys, buf.tolist()))


def fit(hp: HyperParams, splits: Splits, device: torch.device, report: ReportFn,
        resume_state: dict | None = None, rank: int = 0, world_size: int = 1,
        wrap_model: Callable | None = None) -> None:
    """Train for hp.epochs, calling report(metrics, checkpoint_dir) after every epoch."""
    torch.manual_seed(hp.seed)
    model = LeNet(hp.dilation, hp.padding)
    model = wrap_model(model) if wrap_model else model.to(device)
    optimizer = build_optimizer(model, hp)
    start_epoch = 1
    if resume_state:
        _unwrap(model).load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        start_epoch = resume_state["epoch"] + 1

    train_x, train_y = as_device_tensors(splits.train_images, splits.train_labels, device)
    # Each worker scores its own slice of the validation split; sums are added up.
    val_x, val_y = as_device_tensors(splits.val_images[rank::world_size], splits.val_labels[rank::world_size], device)
    per_worker_batch = max(1, hp.batch_size // world_size)
    # Every worker takes the same number of whole batches (train_epoch's shards).
    images_seen = (len(train_y) // world_size // per_worker_batch) * per_worker_batch * world_size

    for epoch in range(start_epoch, hp.epochs + 1):
        started = time.perf_counter()
        train_loss = train_epoch(model, optimizer, train_x, train_y, hp, epoch, per_worker_batch, rank, world_size)
        train_seconds = time.perf_counter() - started
        if not math.isfinite(train_loss):
            # Stop at the first non-finite loss: no checkpoint, never the best trial.
            report({"epoch": epoch, "train_loss": train_loss, "val_acc": 0.0, "diverged": 1}, None)
            return
        sums = _all_reduce_sums(evaluate(model, val_x, val_y))
        release_freed_memory()
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": sums["loss_sum"] / sums["count"],
            "val_acc": sums["correct"] / sums["count"],
            "epoch_seconds": time.perf_counter() - started,
            "images_per_second": images_seen / train_seconds,
            "diverged": 0,
        }
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            if rank == 0:  # one copy of the weights is enough: DDP keeps them identical
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch, "hparams": hp.model_dump(), "classes": list(splits.classes),
                            "metrics": metrics}, os.path.join(checkpoint_dir, CHECKPOINT_FILE))
            report(metrics, checkpoint_dir if rank == 0 else None)


def release_freed_memory() -> None:
    """Give the OS back what this epoch freed: glibc keeps freed heap for reuse, and with one
    process per concurrent trial that is resident memory every trial holds (30-65 MB measured)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            _libc().malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


def load_checkpoint(checkpoint_dir: str, device: torch.device | str = "cpu") -> dict:
    """The dict `fit` saved: model and optimizer state, epoch, hparams, classes, metrics."""
    return torch.load(os.path.join(checkpoint_dir, CHECKPOINT_FILE), map_location=device, weights_only=False)


def _resume_state(checkpoint, device: torch.device) -> dict | None:
    """What `fit` saved in the Ray checkpoint a restarted run was handed, or None on a fresh start."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as checkpoint_dir:
        return load_checkpoint(checkpoint_dir, device)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def as_device_tensors(images, labels, device):
    """The split as (N, 3, 32, 32) uint8 and (N,) tensors on `device`, all of it: batches are cut there.

    A CPU reads the channels-last view in place (oneDNN's convolutions take it without a reorder).
    A GPU gets one plain NCHW copy and trains in float32 without autocast: on an H200 (benchmarks/gpu.sh,
    two runs) bf16 autocast was 16-47% slower at batch 128 and 512, since 6- and 16-channel convolutions
    are too small for tensor cores to repay the casts, and channels-last ran from 4% faster to 17% slower.
    """
    x = as_nchw(images).to(device)
    if device.type == "cuda":
        x = x.contiguous()
    return x, torch.as_tensor(labels).to(device)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function (config comes from trainables.trainer.build_trainer)."""
    import ray
    import ray.train
    import ray.train.torch

    hp = HyperParams(**config["hparams"])
    # 1. Threads = the CPUs Ray gave this worker, so concurrent trials never oversubscribe.
    torch.set_num_threads(config["cpus_per_worker"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # 2. Data: the splits from the object store, zero-copy on this node.
    splits = ray.get(config["data_ref"])
    device = ray.train.torch.get_device()
    # 3. Resume from the latest checkpoint if this trial restarted.
    resume_state = _resume_state(ray.train.get_checkpoint(), device)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        # 4. Every worker reports; only rank 0 attaches the checkpoint.
        saved = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=saved)

    fit(hp, splits, device, report, resume_state, rank, world_size,
        # 5. Ray Train moves the model to the device and wraps it in DDP when world_size > 1.
        wrap_model=ray.train.torch.prepare_model)
