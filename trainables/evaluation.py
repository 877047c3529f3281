"""Test-split evaluation of a trained model: accuracy, per-class accuracy, confusion matrix."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from trainables.data import as_nchw
from trainables.loop import normalise
from trainables.model import LeNet


class ServingLeNet(nn.Module):
    """LeNet that takes raw (B, 3, 32, 32) pixels on the 0..255 scale, as an image file gives them.

    This is what goes to the Model Registry: callers need not know the training
    normalisation.
    """

    def __init__(self, net: LeNet):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(normalise(pixels))  # (B, 10) logits


def serving_model(state: dict) -> ServingLeNet:
    """Rebuild the served model from a checkpoint dict saved by trainables.loop.fit."""
    hparams = state["hparams"]
    net = LeNet(hparams["dilation"], hparams["padding"])
    net.load_state_dict(state["model"])
    return ServingLeNet(net).eval()


def model_input(images_u8: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) float 0..255, contiguous NCHW: the layout the
    exported (pt2) serving model was traced with."""
    return as_nchw(np.asarray(images_u8)).float().contiguous()


@torch.no_grad()
def confusion_matrix(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                     num_classes: int = 10, batch_size: int = 1000) -> np.ndarray:
    """(true, predicted) counts of a ServingLeNet over uint8 images.

    The model may be an exported graph loaded from MLflow, which has no eval();
    LeNet has no dropout or batch norm, so train/eval mode makes no difference.
    """
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    for start in range(0, len(labels), batch_size):
        predicted = model(model_input(images[start:start + batch_size])).argmax(1).numpy()
        np.add.at(counts, (labels[start:start + batch_size], predicted), 1)
    return counts


def summarize(confusion: np.ndarray, classes) -> dict:
    """{'test_acc': float, 'per_class_acc': {class: float}}."""
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {
        "test_acc": float(confusion.trace() / max(confusion.sum(), 1)),
        "per_class_acc": {name: float(acc) for name, acc in zip(classes, per_class)},
    }


def pyplot():
    """matplotlib.pyplot on the Agg backend (servers have no display), imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: np.ndarray, classes):
    """A matplotlib Figure of the confusion matrix, rows = true class."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 6))
    image = axes.imshow(confusion, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), count in np.ndenumerate(confusion):
        axes.text(col, row, str(count), ha="center", va="center", fontsize=7,
                  color="white" if count > confusion.max() / 2 else "black")
    figure.colorbar(image)
    figure.tight_layout()
    return figure
