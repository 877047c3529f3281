"""Data sources: shapes and dtypes, stratified splits, the decode cache, and clear errors."""

import numpy as np
import pytest

from tests.conftest import write_imagefolder
from trainables import data as data_module
from trainables.config import DataConfig
from trainables.data import DataError, load_splits, stratified_split, synthetic_images


def check_arrays(images, labels):
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (32, 32, 3)
    assert labels.dtype == np.int64 and labels.shape == (len(images),)


def test_synthetic_is_deterministic_and_shaped():
    images, labels = synthetic_images(200, seed=3)
    check_arrays(images, labels)
    again, _ = synthetic_images(200, seed=3)
    assert np.array_equal(images, again)
    assert set(labels.tolist()) == set(range(10))


def test_splits_are_stratified_and_disjoint():
    splits = load_splits(DataConfig(source="synthetic", synthetic_train_images=1000, val_fraction=0.2))
    for images, labels in ((splits.train_images, splits.train_labels), (splits.val_images, splits.val_labels),
                           (splits.test_images, splits.test_labels)):
        check_arrays(images, labels)
    assert splits.sizes() == {"train": 800, "val": 200, "test": 200}
    # 100 images per class, 20% held out of every class
    assert np.bincount(splits.val_labels).tolist() == [20] * 10
    held, kept = stratified_split(np.repeat(np.arange(4), 10), 0.3, np.random.default_rng(0))
    assert len(set(held) & set(kept)) == 0 and len(held) == 12


def test_max_train_images_caps_before_split():
    splits = load_splits(DataConfig(source="synthetic", synthetic_train_images=1000, max_train_images=500))
    assert splits.sizes()["train"] + splits.sizes()["val"] == 500


def test_imagefolder_any_size_and_mode_with_test_split(tmp_path):
    root = write_imagefolder(tmp_path / "pets", per_class=10, test_per_class=4,
                             sizes=((32, 32), (64, 48), (17, 20)), modes=("RGB", "L", "RGBA", "P"))
    splits = load_splits(DataConfig(source=f"imagefolder:{root}", val_fraction=0.2))
    assert splits.classes == ("cat", "dog", "frog")
    assert splits.sizes() == {"train": 24, "val": 6, "test": 12}  # test/ is used as-is
    check_arrays(splits.train_images, splits.train_labels)
    check_arrays(splits.test_images, splits.test_labels)


def test_imagefolder_without_test_carves_one(tmp_path):
    root = write_imagefolder(tmp_path / "pets", per_class=20)
    splits = load_splits(DataConfig(source=f"imagefolder:{root}", test_fraction=0.25, val_fraction=0.2))
    assert splits.sizes() == {"train": 36, "val": 9, "test": 15}
    assert np.bincount(splits.test_labels).tolist() == [5, 5, 5]


def test_decode_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "pets", per_class=4)
    calls = []
    real_decode = data_module.decode_image
    monkeypatch.setattr(data_module, "decode_image", lambda path: calls.append(path) or real_decode(path))
    cfg = DataConfig(source=f"imagefolder:{root}", test_fraction=0.25)
    first = load_splits(cfg)
    assert len(calls) == 12
    second = load_splits(cfg)
    assert len(calls) == 12, "second load decoded images again instead of using the cache"
    assert np.array_equal(first.train_images, second.train_images)
    write_imagefolder(tmp_path / "more", classes=("cat",), per_class=1)
    (tmp_path / "more/train/cat/0000.jpg").rename(root / "train/cat/extra.jpg")
    load_splits(cfg)
    assert len(calls) == 12 + 13, "a new file must invalidate the cache"


def test_cifar10_reads_its_uint8_cache_without_downloading(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar10-uint8-nhwc.npz",
             train_images=rng.integers(0, 255, (100, 32, 32, 3), dtype=np.uint8),
             train_labels=np.arange(100) % 10,
             test_images=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
             test_labels=np.arange(20) % 10)

    def no_download(*args, **kwargs):
        raise AssertionError("must not download when the cache exists")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    splits = load_splits(DataConfig(source="cifar10", data_dir=str(tmp_path)))
    assert splits.sizes() == {"train": 90, "val": 10, "test": 20}
    assert splits.classes[0] == "airplane"


def test_cifar10_without_network_points_to_imagefolder(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):  # what torchvision raises when the download is blocked
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="imagefolder:PATH"):
        load_splits(DataConfig(source="cifar10", data_dir=str(tmp_path / "d")))
    assert not (tmp_path / "d" / "cifar10-uint8.npz").exists()


@pytest.mark.parametrize("layout,message", [
    ("missing", "does not exist"),
    ("no-train", "no train/ folder"),
    ("no-classes", "no class sub-folders"),
    ("empty-class", "no images"),
    ("corrupt", "cannot decode image"),
])
def test_bad_imagefolder_is_refused_with_the_path(tmp_path, layout, message):
    root = tmp_path / "bad"
    if layout == "no-train":
        root.mkdir()
    elif layout == "no-classes":
        (root / "train").mkdir(parents=True)
    elif layout == "empty-class":
        (root / "train" / "cat").mkdir(parents=True)
    elif layout == "corrupt":
        write_imagefolder(root, per_class=2)
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=message) as error:
        load_splits(DataConfig(source=f"imagefolder:{root}"))
    assert str(root) in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="unknown data source 'mnist'"):
        DataConfig(source="mnist")
