"""A 3-layer MLP on 64-d feature vectors."""

from __future__ import annotations

from torch import nn


def build() -> nn.Module:
    """64 -> 128 -> 64 -> 10, GELU activations, LayerNorm at the input."""
    return nn.Sequential(
        nn.LayerNorm(64),
        nn.Linear(64, 128),
        nn.GELU(),
        nn.Linear(128, 64),
        nn.GELU(),
        nn.Linear(64, 10),
    )
