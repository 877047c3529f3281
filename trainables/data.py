"""Image sources, decoded once into uint8 arrays and split into train/val/test.

Every source ends as the same `Splits`: (N, 32, 32, 3) uint8 images (channels-last,
as decoded) and int64 labels. The sweep driver builds it once and puts it in Ray's object store;
trials and workers on a node then read the same shared memory instead of
re-reading files, and batches are normalised on the fly (no per-sample PIL
transforms in the hot path).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from trainables.config import DataConfig

IMAGE_SIZE = 32
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


class DataError(ValueError):
    """A user's data problem, reported in one line with the fix."""


@dataclass(frozen=True)
class Splits:
    # (N, 32, 32, 3) uint8: channels-last, the layout oneDNN's CPU convolutions read without a
    # reorder (about 5% more images/s); `as_nchw` views it as the (N, 3, 32, 32) tensor torch expects.
    train_images: np.ndarray
    train_labels: np.ndarray  # (N,) int64
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_labels), "val": len(self.val_labels), "test": len(self.test_labels)}


def load_splits(cfg: DataConfig) -> Splits:
    """Decode cfg.source (cached) and split it; the test split is never trained or tuned on."""
    if cfg.source == "synthetic":
        images, labels = synthetic_images(cfg.synthetic_train_images, seed=cfg.seed)
        test = synthetic_images(max(cfg.synthetic_train_images // 5, 100), seed=cfg.seed + 1)
        classes = tuple(f"class{i}" for i in range(10))
    elif cfg.source == "cifar10":
        images, labels, test = load_cifar10(Path(cfg.data_dir))
        classes = CIFAR10_CLASSES
    else:
        images, labels, test, classes = load_imagefolder(Path(cfg.source.split(":", 1)[1]), Path(cfg.data_dir))

    rng = np.random.default_rng(cfg.seed)
    if test is None:  # no separate test split: carve one out first, stratified
        held, keep = stratified_split(labels, cfg.test_fraction, rng)
        test = (images[held], labels[held])
        images, labels = images[keep], labels[keep]
    if cfg.max_train_images and cfg.max_train_images < len(labels):
        _, keep = stratified_split(labels, 1 - cfg.max_train_images / len(labels), rng)
        images, labels = images[keep], labels[keep]
    val, train = stratified_split(labels, cfg.val_fraction, rng)
    return Splits(
        images[train], labels[train], images[val], labels[val], test[0], test[1], tuple(classes)
    )


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator):
    """(held, kept) index arrays: `fraction` of every class held out, the rest kept."""
    held, kept = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cut = int(round(len(idx) * fraction))
        held.append(idx[:cut])
        kept.append(idx[cut:])
    return np.sort(np.concatenate(held)), np.sort(np.concatenate(kept))


def synthetic_images(n: int, seed: int = 0, num_classes: int = 10):
    """Deterministic, learnable images: a smooth per-class template plus noise.

    The templates come from a fixed seed so that train and test sets (drawn with
    different seeds) share classes.
    """
    templates = np.random.default_rng(12345).uniform(0, 255, size=(num_classes, 3, 4, 4))
    templates = templates.repeat(8, axis=2).repeat(8, axis=3)  # blocky 32x32 patterns
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    noise = rng.normal(0, 40, size=(n, 3, IMAGE_SIZE, IMAGE_SIZE))
    images = np.clip(0.7 * templates[labels] + noise + 40, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels.astype(np.int64)


def load_cifar10(data_dir: Path):
    """torchvision's CIFAR-10, downloaded once, cached as uint8 arrays; one process at a time."""
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    cache = data_dir / "cifar10-uint8-nhwc.npz"
    with FileLock(str(data_dir / "cifar10.lock")):
        if not cache.exists():
            from torchvision.datasets import CIFAR10

            try:
                train = CIFAR10(str(data_dir), train=True, download=True)
                test = CIFAR10(str(data_dir), train=False, download=True)
            except Exception as error:  # urllib/URLError, socket errors, bad archive
                if created:  # leave nothing half-written behind
                    shutil.rmtree(data_dir, ignore_errors=True)
                raise DataError(
                    f"could not download CIFAR-10 into {data_dir} ({type(error).__name__}); "
                    "without network, unpack the images and use --data imagefolder:PATH"
                ) from None
            _save_npz(cache, train_images=train.data, train_labels=train.targets,  # .data is NHWC uint8
                      test_images=test.data, test_labels=test.targets)
        arrays = np.load(cache)
        return (arrays["train_images"], arrays["train_labels"].astype(np.int64),
                (arrays["test_images"], arrays["test_labels"].astype(np.int64)))


def load_imagefolder(root: Path, data_dir: Path):
    """PATH/train/<class>/*.jpg (and optional PATH/test/<class>/...), decoded once and cached."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist: pass --data imagefolder:PATH with PATH/train/<class>/")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"no train/ folder in {root}: lay images out as {root}/train/<class>/<image>")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class sub-folders in {train_dir}: put each class's images in {train_dir}/<class>/")
    images, labels = _decode_cached(train_dir, classes, root, data_dir)
    test = None
    if (root / "test").is_dir():
        test = _decode_cached(root / "test", classes, root, data_dir)
    return images, labels, test, classes


def _decode_cached(folder: Path, classes: list[str], root: Path, data_dir: Path):
    files = [
        (path, label)
        for label, cls in enumerate(classes)
        for path in sorted((folder / cls).glob("*")) if path.suffix.lower() in IMAGE_SUFFIXES
    ] if all((folder / c).is_dir() for c in classes) else None
    if files is None:
        missing = [c for c in classes if not (folder / c).is_dir()]
        raise DataError(f"{folder} lacks class folders {missing}: test/ must use the same classes as train/")
    if not files:
        raise DataError(f"no images in {folder}/<class>/: expected {sorted(IMAGE_SUFFIXES)} files")
    # The key changes whenever a file is added, removed, resized or touched.
    key = hashlib.sha256(
        "".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p, _ in files).encode()
    ).hexdigest()[:16]
    cache_dir = root / ".lenet-cache" if os.access(root, os.W_OK) else data_dir / "imagefolder-cache"
    cache = cache_dir / f"{folder.name}-{key}-nhwc.npz"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if not cache.exists():
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                decoded = list(pool.map(decode_image, (p for p, _ in files)))  # PIL drops the GIL
            _save_npz(cache, images=np.stack(decoded), labels=np.array([y for _, y in files]))
        arrays = np.load(cache)
        return arrays["images"], arrays["labels"].astype(np.int64)


def decode_image(path: Path | str) -> np.ndarray:
    """Any size or mode (grey, RGBA, palette) to (32, 32, 3) uint8 RGB, as in training."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's palette-transparency chatter
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
                return np.array(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        # Refuse rather than skip: a silently smaller dataset is a wrong result.
        raise DataError(f"cannot decode image {path} ({error}): delete or replace the file") from None


def as_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 array -> (N, 3, 32, 32) tensor over the same memory (channels-last strides)."""
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only shared memory; nothing writes to them.
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(images).permute(0, 3, 1, 2)


def _save_npz(path: Path, **arrays) -> None:
    # Write to a temporary name and rename, so a crash never leaves a half cache.
    tmp = path.with_suffix(".partial.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)
