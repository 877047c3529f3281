"""Shared fixtures: a real in-process Ray runtime, a scratch working directory, image trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def ray_runtime():
    """One in-process Ray (2 CPUs, loopback only) for the whole session, shut down at the end."""
    import ray

    from jobs.runtime import connect_ray

    resources = connect_ray(num_cpus=2)
    yield resources
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder, as a user would in a fresh checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LENET_STORAGE_PATH", raising=False)
    return tmp_path


def write_imagefolder(root: Path, classes=("cat", "dog", "frog"), per_class=6, test_per_class=0,
                      sizes=((32, 32),), modes=("RGB",)) -> Path:
    """A small ImageFolder tree of learnable images: each class has its own colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for label, cls in enumerate(classes):
            folder = root / split / cls
            if count:
                folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = sizes[i % len(sizes)]
                mode = modes[i % len(modes)]
                colour = np.zeros((size[1], size[0], 3), dtype=np.uint8)
                colour[..., label % 3] = 200
                pixels = np.clip(colour + rng.integers(0, 40, colour.shape), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels, "RGB").convert(mode)
                image.save(folder / f"{i:04d}.{'png' if i % 2 else 'jpg'}" if mode == "RGB"
                           else folder / f"{i:04d}.png")
    return root
