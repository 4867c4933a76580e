"""Hugging Face text encoders, loaded safely and offline, and their forward pass.

A ``huggingface`` model is a local folder (``config.json``,
``model.safetensors``, tokenizer files).  :func:`load_text_encoder` loads it
with the transformers library, **local files only** (no hub access),
**safetensors only** (``use_safetensors=True``: a ``pytorch_model.bin`` is
never unpickled; a folder that has only that is refused with
:class:`~models.errors.UnsafeWeightsFile`), and **never**
``trust_remote_code``, so no code from the folder runs.  Only a worker that
loads such a model imports transformers.

:class:`TextEncoder` is an ``nn.Module`` (the model cache measures, moves and
casts it like any other) that pools the last hidden state (mean over the
attention mask, or the first token) and optionally L2-normalises it: the
same embedding sentence-transformers' ``encode()`` makes for a
Transformer + Pooling + Normalize model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.errors import ModelLoadError, TextTooLong, UnsafeWeightsFile
from models.repository import WEIGHTS_FILE
from models.spec import ModelSpec

__all__ = ["TextEncoder", "load_text_encoder"]

PICKLED = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")


class TextEncoder(nn.Module):
    """A transformers encoder, its tokenizer, and the pooling that makes one embedding per text."""

    def __init__(self, model: nn.Module, tokenizer: Any, spec: ModelSpec) -> None:
        super().__init__()
        assert spec.text is not None
        self.model = model
        self.tokenizer = tokenizer  # not a module: never moved or cast
        self.pooling = spec.pooling
        self.normalize = spec.normalize
        self.max_tokens = spec.text.max_tokens
        self.truncate = spec.text.truncate
        self.pad_id = int(tokenizer.pad_token_id or 0)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (special tokens included); TextTooLong past ``max_tokens``."""
        ids: list[list[int]] = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                if not self.truncate:
                    raise TextTooLong(
                        f"text {i} is {len(row)} tokens, over this model's {self.max_tokens}: "
                        "shorten or split it (or set truncate = true under [inputs] in its "
                        "model.toml to cut it)"
                    )
                ids[i] = [*row[: self.max_tokens - 1], row[-1]]  # keep the closing special token
        return ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def embed(self, token_ids: list[list[int]], device: torch.device) -> np.ndarray:
        """One forward pass over ``token_ids``, padded to the longest; float32 embeddings."""
        longest = max(len(row) for row in token_ids)
        ids = np.full((len(token_ids), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for i, row in enumerate(token_ids):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        with torch.inference_mode():
            out = self(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        return out.float().cpu().numpy()


def check_folder(folder: Path) -> None:
    """Refuse a folder whose weights are not safetensors, before transformers reads it."""
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist: check the model repository")
    if not (folder / WEIGHTS_FILE).is_file():
        pickled = [name for name in PICKLED if (folder / name).exists()]
        if pickled:
            raise UnsafeWeightsFile(
                f"refusing {folder}: it has {pickled[0]} but no {WEIGHTS_FILE}; pickle-based "
                "weights can execute code when loaded. Convert them to safetensors "
                "(transformers: model.save_pretrained(folder, safe_serialization=True))"
            )
        raise ModelLoadError(f"{folder} has no {WEIGHTS_FILE}: put the model's safetensors there")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: copy the model's whole folder there")


def load_text_encoder(spec: ModelSpec) -> TextEncoder:
    """Load ``spec``'s folder offline, safetensors only, no remote code."""
    assert spec.weights is not None
    folder = Path(spec.weights)
    check_folder(folder)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only below
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
        model = AutoModel.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load {folder} with transformers ({e})") from e
    return TextEncoder(model.eval(), tokenizer, spec).eval()
