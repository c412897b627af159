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


def last_positions(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden state at each row's last real token of a right-padded batch, ``[B, H]``."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, L, H]`` over the positions where ``mask [B, L]`` is 1; ``[B, H]``."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@torch.no_grad()
def mean_pooled_embeddings(llm: nn.Module, tokenizer, texts: list[str], batch_size: int = 32,
                           max_tokens: int = 64, progress: bool = False) -> torch.Tensor:
    """Mean-pooled last hidden states (the final-norm output that enters the LM head) over each text, ``[N, H]``
    (SemConv's h^LLM, METHODS.md §3.2; RALLRec's "average" pooling, §2.2). Batches are length-sorted."""
    from tqdm.auto import tqdm

    from recbole_llm.llm.generation import pad_sequences

    decoder, _ = decoder_and_head(llm)
    device = next(llm.parameters()).device
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens).input_ids
    encoded = [e or [tokenizer.eos_token_id] for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pooled = []
    for start in tqdm(range(0, len(order), batch_size), desc="Text embeddings", disable=not progress, ncols=100):
        ids, mask = pad_sequences([encoded[i] for i in order[start: start + batch_size]], tokenizer.pad_token_id,
                                  device=device)
        pooled.append(masked_mean(decoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask).float().cpu())
    out = torch.cat(pooled)
    return out[torch.argsort(torch.tensor(order))]
