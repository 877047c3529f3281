"""Baselines for LeNet on CIFAR-10 without Ray or MLflow: the numbers the service must beat.

Two loops train the same `trainables.model.LeNet`:

- `blitz_loop`: the PyTorch 60-minute blitz as published (ImageFolder of JPEGs,
  DataLoader batch 4, two workers, SGD lr 0.001 momentum 0.9).
- `plain_loop`: a tuned plain loop (the whole uint8 dataset in memory, channels-last,
  batches cut by `randperm`, normalised per batch, batch 128, SGD lr 0.05 momentum 0.9).

Every function returns a dict of numbers; `main` prints a Markdown table.

Run on a laptop (2 cores, idle: under a minute):
    PYTHONPATH=. python benchmarks/baselines.py --train-dir /tmp/cifar/train
    PYTHONPATH=. python benchmarks/baselines.py --plain-epochs 10 --linear-decay --json /tmp/baselines.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from trainables.data import stratified_split
from trainables.model import LeNet

# Per-channel statistics of the CIFAR-10 training set (the usual published values).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
EVAL_BATCH_SIZE = 1000  # large: evaluation keeps no activations for backward
BUSY_MACHINE_CORES = 0.2  # other work's average CPU use above which timings are flagged, in cores


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` intra-op threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot, or None off Linux.

    Counts every process on the kernel, ours and others', plus time stolen by the
    hypervisor, so machine-busy minus our own CPU time is what others took.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (the blitz's DataLoader workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@contextlib.contextmanager
def other_cpu_load(into: dict) -> Iterator[None]:
    """Set into["other_cpu_load"]: cores kept busy by other work during the block, on average.

    A shared machine slows both loops, and two intra-op threads stall whenever one of
    them is descheduled, so a number above ~0.2 means the timings are low.
    """
    busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    yield
    if busy is not None:
        other = (busy_cpu_seconds() - busy) - (own_cpu_seconds() - own)
        into["other_cpu_load"] = max(other, 0.0) / (time.perf_counter() - start)


# ---------------------------------------------------------------- data


def load_imagefolder_uint8(train_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode an ImageFolder tree into (images (N,3,H,W) uint8, labels (N,) int64, class names).

    Files come in ImageFolder's own order, so index i here is sample i of
    `torchvision.datasets.ImageFolder(train_dir)`: a split made on these labels
    can be reused as a `Subset` of the blitz dataset.
    """
    folder = torchvision.datasets.ImageFolder(train_dir)  # scans paths only, decodes nothing
    samples = folder.samples
    # decode_jpeg on one small file at a time beats PIL and a thread pool here:
    # a 32x32 JPEG decodes in ~40 us, less than a thread hand-off costs.
    # RGB mode: a grey JPEG would otherwise decode to 1 channel and break the stack.
    images = torch.stack([decode_jpeg(read_file(path), mode=ImageReadMode.RGB) for path, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels, list(folder.classes)


# ---------------------------------------------------------------- the blitz loop


def blitz_transform() -> transforms.Compose:
    """The blitz's transform: to [0, 1], then to [-1, 1] with mean 0.5 and std 0.5."""
    return transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )


def blitz_loop(
    train_dir: str | Path,
    epochs: int = 1,
    time_budget_s: float | None = None,
    threads: int = 2,
    seed: int = 0,
    train_indices: torch.Tensor | None = None,
) -> dict:
    """Train LeNet exactly as the 60-minute blitz does; return throughput and losses.

    An epoch stops early after `time_budget_s` seconds, so throughput can be measured
    on a slice (a full epoch takes ~50 s on 2 cores). `train_indices` picks samples
    of `ImageFolder(train_dir)`.
    """
    torch.manual_seed(seed)  # the DataLoader's shuffle draws from the global generator
    dataset = torchvision.datasets.ImageFolder(train_dir, transform=blitz_transform())
    train_set = dataset if train_indices is None else Subset(dataset, train_indices.tolist())
    loader = DataLoader(train_set, batch_size=4, shuffle=True, num_workers=2)
    model = LeNet()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    epoch_seconds, train_loss, images_seen = [], [], 0
    with torch_threads(threads):
        for _ in range(epochs):
            start = time.perf_counter()  # includes starting the workers: every epoch pays it
            loss_sum, epoch_images = 0.0, 0
            for inputs, targets in loader:
                optimizer.zero_grad()
                loss = criterion(model(inputs), targets)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(targets)
                epoch_images += len(targets)
                if time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
                    break
            epoch_seconds.append(time.perf_counter() - start)
            train_loss.append(loss_sum / epoch_images)
            images_seen += epoch_images
    return {
        "images_per_second": images_seen / sum(epoch_seconds),
        "images_seen": images_seen,
        "epoch_seconds": epoch_seconds,
        "train_loss": train_loss,
    }


def blitz_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """The blitz's test loop: fraction of images whose arg-max logit is the label."""
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in loader:
            correct += (model(inputs).argmax(1) == targets).sum().item()
            total += len(targets)
    return correct / total


# ---------------------------------------------------------------- the tuned plain loop


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) uint8 -> float32 with CIFAR mean 0 and std 1 per channel, same memory format."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    # Folding /255 into the scale makes it one multiply-add over the batch.
    return images_uint8.float().mul_(1 / (255 * std)).sub_(mean / std)


def plain_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One pass over a fresh permutation; returns the mean training loss per image."""
    order = torch.randperm(len(labels), generator=generator)
    criterion = nn.CrossEntropyLoss()
    model.train()
    loss_sum = torch.zeros(())  # summed as a tensor: .item() every step would sync for nothing
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        inputs, targets = normalise(images_uint8[batch]), labels[batch]
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(inputs), targets)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(batch)
    return loss_sum.item() / len(order)


def accuracy(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose arg-max logit is the label."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for first in range(0, len(labels), EVAL_BATCH_SIZE):
            logits = model(normalise(images_uint8[first : first + EVAL_BATCH_SIZE]))
            correct += (logits.argmax(1) == labels[first : first + EVAL_BATCH_SIZE]).sum().item()
    return correct / len(labels)


def plain_loop(
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.05,
    momentum: float = 0.9,
    threads: int = 2,
    seed: int = 0,
    eval_images: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
    linear_decay: bool = False,
) -> dict:
    """Train LeNet from in-memory uint8 tensors; return throughput, losses and accuracies.

    With eval data the result also holds `eval_acc` per epoch. Evaluation time is left
    out of the clock and the throughput.
    `linear_decay` lowers lr linearly from `lr` (first epoch) towards 0 (after the last):
    a constant lr of 0.05 plateaus near 55% while decay reaches 62.6% at 10 epochs.
    """
    # Channels-last (N,H,W,C in memory) lets oneDNN's convolutions skip reordering each
    # batch: ~1.6x on 2 cores (12k -> 19.7k images/s). One copy here; indexing keeps it.
    images_uint8 = images_uint8.contiguous(memory_format=torch.channels_last)
    if eval_images is not None:
        eval_images = eval_images.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(seed)  # the model's initial weights
    generator = torch.Generator().manual_seed(seed)  # the batch order
    model = LeNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    epoch_seconds, train_loss, eval_acc = [], [], []
    with torch_threads(threads):
        for epoch in range(epochs):
            if linear_decay:
                for group in optimizer.param_groups:
                    group["lr"] = lr * (1 - epoch / epochs)
            start = time.perf_counter()
            train_loss.append(plain_epoch(model, optimizer, images_uint8, labels, batch_size, generator))
            epoch_seconds.append(time.perf_counter() - start)
            if eval_images is not None:
                eval_acc.append(accuracy(model, eval_images, eval_labels))
    result = {
        "images_per_second": epochs * len(labels) / sum(epoch_seconds),
        "epoch_seconds": epoch_seconds,
        "train_loss": train_loss,
    }
    if eval_images is not None:
        result["eval_acc"] = eval_acc
    return result


# ---------------------------------------------------------------- entry point


def run(
    train_dir: str,
    blitz_seconds: float,
    plain_epochs: int,
    eval_fraction: float,
    threads: int,
    seed: int,
    linear_decay: bool = False,
) -> dict:
    """Decode, split, time both loops; return every number main prints."""
    start = time.perf_counter()
    images, labels, class_names = load_imagefolder_uint8(train_dir)
    decode_seconds = time.perf_counter() - start
    # The product's per-class split (trainables.data), as torch indices into ImageFolder's order.
    eval_idx, train_idx = (torch.from_numpy(i) for i in
                           stratified_split(labels.numpy(), eval_fraction, np.random.default_rng(seed)))

    blitz_load, plain_load = {}, {}
    with other_cpu_load(blitz_load):
        blitz = blitz_loop(
            train_dir, epochs=1, time_budget_s=blitz_seconds, threads=threads, seed=seed, train_indices=train_idx
        )
    with other_cpu_load(plain_load):
        plain = plain_loop(
            images[train_idx],
            labels[train_idx],
            epochs=plain_epochs,
            threads=threads,
            seed=seed,
            eval_images=images[eval_idx],
            eval_labels=labels[eval_idx],
            linear_decay=linear_decay,
        )
    return {
        "images": len(labels),
        "classes": len(class_names),
        "train_images": len(train_idx),
        "eval_images": len(eval_idx),
        "decode_seconds": decode_seconds,
        "threads": threads,
        "blitz": blitz | blitz_load,
        "plain": plain | plain_load,
        "plain_over_blitz": plain["images_per_second"] / blitz["images_per_second"],
    }


def markdown_table(results: dict) -> str:
    """A small summary table of both loops."""
    blitz, plain = results["blitz"], results["plain"]
    # Project the blitz's partial epoch onto the full training split for comparison.
    blitz_epoch = results["train_images"] / blitz["images_per_second"]
    rows = [
        "| loop | images/s | s per epoch | train loss (last epoch) | eval acc |",
        "|---|---:|---:|---:|---:|",
        f"| blitz (batch 4, {blitz['images_seen']:,} images) | {blitz['images_per_second']:,.0f} "
        f"| {blitz_epoch:.1f} (projected) | {blitz['train_loss'][-1]:.3f} | - |",
        f"| plain (batch 128, {len(plain['epoch_seconds'])} epochs) | {plain['images_per_second']:,.0f} "
        f"| {sum(plain['epoch_seconds']) / len(plain['epoch_seconds']):.2f} "
        f"| {plain['train_loss'][-1]:.3f} | {plain['eval_acc'][-1]:.1%} |",
        "",
        f"plain/blitz throughput: **{results['plain_over_blitz']:.1f}x**; "
        f"decoding {results['images']:,} JPEGs took {results['decode_seconds']:.1f} s; "
        f"{results['threads']} threads.",
    ]
    loads = [loop.get("other_cpu_load", 0.0) for loop in (blitz, plain)]
    if max(loads) > BUSY_MACHINE_CORES:
        rows.append(
            f"WARNING: other work kept {loads[0]:.1f} / {loads[1]:.1f} cores busy during the blitz / plain loop: "
            "these numbers are low; rerun on an idle machine."
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the blitz loop against a tuned plain loop on CIFAR-10 (CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--train-dir", default="/tmp/cifar/train", help="ImageFolder tree of training JPEGs")
    parser.add_argument("--blitz-seconds", type=float, default=20.0, help="wall-clock seconds of blitz training")
    parser.add_argument("--plain-epochs", type=int, default=2, help="epochs of the plain loop")
    parser.add_argument("--linear-decay", action="store_true", help="plain loop: lr falls linearly to 0 over the epochs")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="fraction of each class held out for eval")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for training")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights and batch order")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if not Path(args.train_dir).is_dir():
        parser.error(f"--train-dir {args.train_dir} is not a directory: point it at the unpacked CIFAR-10 train/")
    if not 0 < args.eval_fraction < 1:
        parser.error(f"--eval-fraction {args.eval_fraction} must lie strictly between 0 and 1")
    if args.blitz_seconds <= 0 or args.plain_epochs < 1 or args.threads < 1:
        parser.error("--blitz-seconds must be > 0, --plain-epochs and --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(
        args.train_dir,
        args.blitz_seconds,
        args.plain_epochs,
        args.eval_fraction,
        args.threads,
        args.seed,
        args.linear_decay,
    )
    print(markdown_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
