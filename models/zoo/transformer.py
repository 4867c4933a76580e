"""A small transformer encoder on token ids, mean-pooled into a classifier head."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 1000
SEQ_LEN = 16
D_MODEL = 64


class TinyEncoder(nn.Module):
    """Token + learned position embeddings, 2 encoder layers, mean pool, 8 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, D_MODEL)
        self.positions = nn.Parameter(torch.randn(SEQ_LEN, D_MODEL) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=D_MODEL, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True
        )
        # enable_nested_tensor only matters with padding masks, which we never pass.
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions[: ids.shape[1]]
        return self.head(self.encoder(x).mean(dim=1))


def build() -> nn.Module:
    """A fresh :class:`TinyEncoder`; weights come from the safetensors file."""
    return TinyEncoder()
