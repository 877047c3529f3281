"""`lenet-tune predict` on image files the test writes, with a champion trained here on synthetic data."""

import json

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from jobs.predict import predict_images
from trainables.data import synthetic_images


@pytest.fixture(scope="module")
def champion(ray_runtime, tmp_path_factory):
    """A real `lenet-tune train` run (3 epochs of synthetic data) registered as the champion."""
    folder = tmp_path_factory.mktemp("predict")
    uri = f"sqlite:///{folder}/mlflow.db"
    code = main(["train", "--smoke", "--name", "predict", "--epochs", "3", "--batch-size", "32",
                 "--tracking-uri", uri, "--storage-path", str(folder / "results")])
    assert code == 0
    return folder, uri


def to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels, "RGB")  # (H, W, 3), as the product stores images


def test_any_size_and_mode_gives_a_probability_per_class(champion, tmp_path):
    _, uri = champion
    images, _ = synthetic_images(5, seed=11)
    files = {
        "rgb.jpg": to_pil(images[0]),
        "wide.png": to_pil(images[1]).resize((64, 48)),
        "grey.png": to_pil(images[2]).convert("L"),
        "alpha.png": to_pil(images[3]).convert("RGBA"),
        "palette.png": to_pil(images[4]).convert("P"),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    paths = [tmp_path / name for name in files]

    every_class = predict_images(paths, tracking_uri=uri, top_k=10)
    assert [item["image"] for item in every_class] == [str(p) for p in paths]
    for item in every_class:
        probabilities = [p["probability"] for p in item["top"]]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)
        assert probabilities == sorted(probabilities, reverse=True)
        assert {p["class"] for p in item["top"]} == {f"class{i}" for i in range(10)}  # names from the model

    top3 = predict_images(paths, tracking_uri=uri, top_k=3)
    for short, full in zip(top3, every_class):
        assert short["top"] == full["top"][:3]


def test_champion_beats_chance_on_held_out_images(champion, tmp_path):
    _, uri = champion
    images, labels = synthetic_images(100, seed=2024)  # neither the training nor the test seed
    paths = []
    for i, pixels in enumerate(images):
        paths.append(tmp_path / f"{i:03d}.png")  # PNG is lossless: the pixels the model sees are these
        to_pil(pixels).save(paths[-1])
    predicted = [item["top"][0]["class"] for item in predict_images(paths, tracking_uri=uri, top_k=1)]
    accuracy = np.mean([name == f"class{label}" for name, label in zip(predicted, labels)])
    assert accuracy > 0.5, accuracy  # chance is 0.1


def test_cli_prints_json_and_refuses_a_missing_file_in_one_line(champion, tmp_path, capsys):
    _, uri = champion
    images, _ = synthetic_images(1, seed=5)
    to_pil(images[0]).save(tmp_path / "one.png")  # a batch of one: the exported graph must accept it

    assert main(["predict", str(tmp_path / "one.png"), "--top", "2", "--json", "--tracking-uri", uri]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["image"] == str(tmp_path / "one.png")
    assert len(report[0]["top"]) == 2 and 0 <= report[0]["top"][1]["probability"] <= report[0]["top"][0]["probability"]

    missing = tmp_path / "missing.png"
    assert main(["predict", str(tmp_path / "one.png"), str(missing), "--tracking-uri", uri]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed for the good image either
    assert captured.err.strip() == f"lenet-tune: error: image {missing} does not exist: pass paths of image files"


def test_corrupt_image_and_unknown_model_are_one_line_errors(champion, tmp_path, capsys):
    _, uri = champion
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["predict", str(tmp_path / "broken.jpg"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot decode image {tmp_path / 'broken.jpg'}" in err

    images, _ = synthetic_images(1, seed=5)
    to_pil(images[0]).save(tmp_path / "one.png")
    assert main(["predict", str(tmp_path / "one.png"), "--model", "models:/no-such-model@champion",
                 "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load model models:/no-such-model@champion" in err


def test_a_missing_store_is_refused_without_creating_one(tmp_path, capsys):
    images, _ = synthetic_images(1, seed=5)
    to_pil(images[0]).save(tmp_path / "one.png")
    store = tmp_path / "nowhere" / "mlflow.db"
    assert main(["predict", str(tmp_path / "one.png"), "--tracking-uri", f"sqlite:///{store}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"no MLflow store at sqlite:///{store}" in err
    assert not store.parent.exists()
