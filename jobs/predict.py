"""lenet-tune predict: classify image files with the champion (or any MLflow model).

On a laptop (the local store ./mlflow.db that `lenet-tune tune` wrote):
    lenet-tune predict cat.jpg dog.png                        # models:/lenet-cifar10@champion, top 3
    lenet-tune predict photos/*.jpg --top 1 --json
    lenet-tune predict frog.png --model models:/lenet-cifar10/2 --tracking-uri sqlite:///runs/mlflow.db
Against a cluster's tracking server:
    MLFLOW_TRACKING_URI=http://mlflow.example:5000 lenet-tune predict cat.jpg

Images of any size or mode (grey, RGBA, palette) are turned into 32x32 RGB exactly
as training decoded them; the registered model takes raw 0..255 pixels and returns
logits, so softmax gives the probabilities printed here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from jobs.runtime import UsageError
from trainables.config import TrackingConfig
from trainables.data import decode_image
from trainables.evaluation import model_input

DEFAULT_MODEL = "models:/lenet-cifar10@champion"
DEFAULT_TOP = 3
BATCH_SIZE = 256  # images per forward pass: bounded memory however many files are given


def add_parser(commands) -> None:
    parser = commands.add_parser("predict", help="classify image files with a registered model")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (PNG, JPG, ...), any size or mode; resized to 32x32 RGB")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"MLflow model URI (default {DEFAULT_MODEL})")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help=f"most probable classes to print per image (default {DEFAULT_TOP})")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    # Printed output is the predictions, not MLflow's download bars for a few small files.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    predictions = predict_images(args.images, args.model, args.top, tracking_uri=args.tracking_uri)
    if args.json:
        print(json.dumps(predictions, indent=2))
    else:
        for item in predictions:
            ranked = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in item["top"])
            print(f"{item['image']}: {ranked}")
    return 0


def predict_images(paths, model_uri: str = DEFAULT_MODEL, top_k: int = DEFAULT_TOP,
                   tracking_uri: str | None = None) -> list[dict]:
    """The top_k classes of each image, most probable first.

    Returns [{"image": path, "top": [{"class": name, "probability": p}, ...]}, ...].
    Bad paths and an unknown model raise UsageError / DataError before anything is printed.
    """
    if top_k < 1:
        raise UsageError(f"top={top_k}: print at least one class per image (--top 1 or more)")
    paths = [str(p) for p in paths]
    for path in paths:  # every path is checked before the model is fetched
        if not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "does not exist"
            raise UsageError(f"image {path} {what}: pass paths of image files")
    decoded = np.stack([decode_image(path) for path in paths])  # (N, 32, 32, 3) uint8; DataError if corrupt

    model, classes = load_classifier(model_uri, TrackingConfig(tracking_uri=tracking_uri).resolved_uri())
    probabilities = class_probabilities(model, decoded)  # (N, C)
    if len(classes) != probabilities.shape[1]:  # a model logged without metadata: name classes by index
        classes = [f"class{i}" for i in range(probabilities.shape[1])]
    if top_k > len(classes):
        raise UsageError(f"top={top_k} but model {model_uri} knows {len(classes)} classes: "
                         f"use --top {len(classes)} or less")
    results = []
    for path, row in zip(paths, probabilities):
        ranked = np.argsort(-row, kind="stable")[:top_k]
        results.append({"image": path,
                        "top": [{"class": classes[i], "probability": float(row[i])} for i in ranked]})
    return results


def load_classifier(model_uri: str, tracking_uri: str):
    """(model, class names) of an MLflow pytorch model; a missing store or model is a UsageError."""
    import mlflow
    from mlflow.exceptions import MlflowException

    needs_store = model_uri.startswith(("models:/", "runs:/"))
    if needs_store and tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists():
        # Refuse rather than let MLflow create an empty database where none was meant to be.
        raise UsageError(f"no MLflow store at {tracking_uri}: run `lenet-tune tune` first "
                         "or pass --tracking-uri of the store that holds the model")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        # One download serves both the weights and the metadata, so an alias that moves
        # meanwhile cannot pair one version's weights with another's class names.
        with tempfile.TemporaryDirectory(prefix="lenet-predict-") as scratch:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch)
            model = mlflow.pytorch.load_model(local, map_location="cpu")
            metadata = mlflow.models.Model.load(local).metadata or {}
    except (MlflowException, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load model {model_uri} from {tracking_uri} ({reason}): "
                         "pass --model models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model") from None
    return model, [str(name) for name in metadata.get("classes", [])]


@torch.no_grad()
def class_probabilities(model, images: np.ndarray) -> np.ndarray:
    """Softmax over the model's logits for uint8 (N, 32, 32, 3) images; (N, C) float64 rows summing to 1."""
    chunks = []
    for start in range(0, len(images), BATCH_SIZE):
        batch = model_input(images[start:start + BATCH_SIZE])  # (B, 3, 32, 32), 0..255
        chunks.append(torch.softmax(model(batch).double(), dim=1).numpy())  # (B, C)
    return np.concatenate(chunks)
