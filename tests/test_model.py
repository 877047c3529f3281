"""Geometry: which (dilation, padding) pairs fit a 32px image, checked against Conv2d itself; and how a
served model is scored (the confusion matrix behind every test accuracy)."""

import numpy as np
import pytest
import torch
from torch import nn

from trainables.model import LeNet, feature_size, geometry_error, valid_geometries


def conv2d_says_valid(dilation: int, padding: int, size: int = 32) -> bool:
    """Ask PyTorch: run the two conv+pool stages on a real tensor and see if they fit."""
    stages = nn.Sequential(
        nn.Conv2d(3, 6, 5, padding=padding, dilation=dilation), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=padding, dilation=dilation), nn.MaxPool2d(2),
    )
    try:
        out = stages(torch.zeros(1, 3, size, size))
    except RuntimeError:
        return False
    return out.shape[-1] >= 1


# (dilation, padding, valid, flattened features) worked out by hand from
# out = in + 2p - d*(k-1), then //2, twice.
TABLE = [
    (1, 0, True, 16 * 5 * 5),   # the blitz: 32 -> 28 -> 14 -> 10 -> 5
    (1, 2, True, 16 * 8 * 8),   # 32 -> 32 -> 16 -> 16 -> 8
    (2, 0, True, 16 * 2 * 2),   # 32 -> 24 -> 12 -> 4 -> 2
    (2, 2, True, 16 * 5 * 5),   # 32 -> 28 -> 14 -> 10 -> 5
    (3, 0, False, 0),           # 32 -> 20 -> 10 -> -2
    (3, 2, True, 16 * 2 * 2),   # 32 -> 24 -> 12 -> 4 -> 2
    (4, 0, False, 0),           # 32 -> 16 -> 8 -> -8
    (4, 4, True, 16 * 2 * 2),   # 32 -> 24 -> 12 -> 4 -> 2
    (5, 0, False, 0),
]


@pytest.mark.parametrize("dilation,padding,valid,features", TABLE)
def test_geometry_table(dilation, padding, valid, features):
    assert (geometry_error(dilation, padding) is None) == valid
    assert conv2d_says_valid(dilation, padding) == valid
    if valid:
        assert 16 * feature_size(32, dilation, padding) ** 2 == features
        assert LeNet(dilation, padding).fc1.in_features == features


@pytest.mark.parametrize("dilation", range(1, 6))
@pytest.mark.parametrize("padding", range(0, 6))
def test_formula_agrees_with_conv2d_everywhere(dilation, padding):
    assert (geometry_error(dilation, padding) is None) == conv2d_says_valid(dilation, padding)


def test_forward_pass_for_every_valid_pair():
    pairs = valid_geometries(list(range(1, 6)), list(range(0, 6)))
    assert (1, 0) in pairs and (3, 0) not in pairs
    for dilation, padding in pairs:
        logits = LeNet(dilation, padding)(torch.randn(4, 3, 32, 32))
        assert logits.shape == (4, 10), (dilation, padding)


def test_invalid_geometry_names_values_and_fix():
    message = geometry_error(3, 0)
    assert "dilation=3" in message and "padding=0" in message and "raise the padding" in message
    with pytest.raises(ValueError, match="dilation=4"):
        LeNet(dilation=4, padding=0)


def test_confusion_matrix_counts_every_image_in_batches_without_autograd():
    from trainables.evaluation import confusion_matrix

    grad_enabled = []

    class AlwaysFirstClass(torch.nn.Module):
        def forward(self, x):
            grad_enabled.append(torch.is_grad_enabled())
            assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    labels = np.arange(25) % 10
    images = np.zeros((25, 32, 32, 3), dtype=np.uint8)
    counts = confusion_matrix(AlwaysFirstClass(), images, labels, batch_size=10)
    assert counts[:, 0].tolist() == np.bincount(labels, minlength=10).tolist() and counts.sum() == 25
    assert grad_enabled == [False, False, False]  # three batches, no autograd graph built for any
