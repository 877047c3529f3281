"""lenet-tune evaluate: score a registered model (or a run's model) on the test split.

    lenet-tune evaluate                                   # models:/lenet-cifar10@champion
    lenet-tune evaluate --model models:/lenet-cifar10/3 --data imagefolder:/tmp/cifar
    lenet-tune evaluate --model runs:/<run_id>/model
"""

from __future__ import annotations

import mlflow

from trainables.config import DataConfig, TrackingConfig
from trainables.data import load_splits
from trainables.evaluation import confusion_matrix, summarize


def evaluate_model(model_uri: str, data: DataConfig, tracking_cfg: TrackingConfig) -> dict:
    """Test accuracy and per-class accuracy of the model at model_uri."""
    mlflow.set_tracking_uri(tracking_cfg.resolved_uri())
    model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    splits = load_splits(data)
    confusion = confusion_matrix(model, splits.test_images, splits.test_labels, len(splits.classes))
    return {"model_uri": model_uri, "test_images": int(len(splits.test_labels)),
            **summarize(confusion, splits.classes)}
