"""The blitz LeNet, with dilation and padding as hyperparameters.

Plain single-device PyTorch: nothing here knows about Ray, MLflow or devices.
"""

from __future__ import annotations

import torch
from torch import nn

KERNEL_SIZE = 5  # both convolutions, as in the blitz
POOL_SIZE = 2  # both max-pools
NUM_CLASSES = 10


def conv_output_size(size: int, dilation: int, padding: int, kernel: int = KERNEL_SIZE) -> int:
    """Conv2d's output formula (stride 1): size + 2*padding - dilation*(kernel-1).

    Dilation spreads the kernel's taps apart: a 5x5 kernel with dilation 2 covers
    9x9 pixels, so it eats 8 pixels of border instead of 4. Padding adds them back.
    """
    return size + 2 * padding - dilation * (kernel - 1)


def feature_size(image_size: int, dilation: int, padding: int) -> int:
    """Side of the feature map after conv-pool-conv-pool, or <= 0 when impossible."""
    size = image_size
    for _ in range(2):
        size = conv_output_size(size, dilation, padding)
        if size < POOL_SIZE:
            return 0
        size //= POOL_SIZE
    return size


def geometry_error(dilation: int, padding: int, image_size: int = 32) -> str | None:
    """Say why (dilation, padding) cannot work on image_size pictures, or None if it can."""
    if dilation < 1:
        return f"dilation={dilation} must be >= 1"
    if padding < 0:
        return f"padding={padding} must be >= 0"
    size = image_size
    for stage in (1, 2):
        conv = conv_output_size(size, dilation, padding)
        if conv < POOL_SIZE:
            return (
                f"dilation={dilation}, padding={padding} leaves a {max(conv, 0)}px map after conv{stage} "
                f"on {image_size}px images ({size} + 2*{padding} - {dilation}*{KERNEL_SIZE - 1} = {conv}); "
                f"the max-pool needs at least {POOL_SIZE}px: lower the dilation or raise the padding"
            )
        size = conv // POOL_SIZE
    return None


def valid_geometries(
    dilations: list[int], paddings: list[int], image_size: int = 32
) -> list[tuple[int, int]]:
    """Every (dilation, padding) pair of the cross product that fits image_size."""
    return [(d, p) for d in dilations for p in paddings if geometry_error(d, p, image_size) is None]


class LeNet(nn.Module):
    """conv(3->6,k5) -> ReLU -> pool -> conv(6->16,k5) -> ReLU -> pool -> fc120 -> fc84 -> fc10."""

    def __init__(self, dilation: int = 1, padding: int = 0, image_size: int = 32):
        super().__init__()
        error = geometry_error(dilation, padding, image_size)
        if error:
            raise ValueError(error)
        self.conv1 = nn.Conv2d(3, 6, KERNEL_SIZE, padding=padding, dilation=dilation)
        self.pool = nn.MaxPool2d(POOL_SIZE, POOL_SIZE)
        self.conv2 = nn.Conv2d(6, 16, KERNEL_SIZE, padding=padding, dilation=dilation)
        # The blitz hard-codes 16*5*5, true only for dilation 1 and padding 0.
        side = feature_size(image_size, dilation, padding)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, H, W) float, normalised
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 6, H1, H1)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 16, S, S)
        x = torch.flatten(x, 1)  # (B, 16*S*S)
        x = torch.relu(self.fc1(x))  # (B, 120)
        x = torch.relu(self.fc2(x))  # (B, 84)
        return self.fc3(x)  # (B, 10) logits
