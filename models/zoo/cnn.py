"""A small CNN on 3x32x32 images (CIFAR-sized)."""

from __future__ import annotations

from torch import nn


def build() -> nn.Module:
    """Three conv blocks (16/32/64 channels) then a linear head to 10 logits."""

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        block(3, 16),  # 16x16
        block(16, 32),  # 8x8
        block(32, 64),  # 4x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
