"""Hidden-state access and pooling for decoder-only backbones (plain or wrapped by peft)."""

from __future__ import annotations

import torch
from torch import nn


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder, lm_head)`` of a causal LM, looking through a peft wrapper (adapters stay active).

    Calling the decoder directly gives the last hidden states without projecting every position onto the
    vocabulary: a model that needs logits only on a few positions applies ``lm_head`` to those alone.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, L, H]`` over the positions where ``mask [B, L]`` is 1; ``[B, H]``."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
