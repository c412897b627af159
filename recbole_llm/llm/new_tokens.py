"""New vocabulary rows that train on their own, beside a frozen (or LoRA-adapted) backbone.

``resize_token_embeddings`` makes the whole embedding matrix and LM head one trainable parameter each: for
SmolLM2 that is 2 x 49k x 576 weights trained, kept in optimizer state and written to every checkpoint, to learn a
thousand new rows. Here the base embedding and head stay as they are (frozen) and the new tokens get their own
``[n_new, H]`` parameter, read by the input embedding for ids past the base vocabulary and appended to the
head's logits. For a model with tied input/output embeddings (SmolLM2, Llama-style tiny models) the new rows are
tied too, as the base rows are.

Checkpoints then hold just these rows (they live under the backbone module and are the only trainable tensors
there besides LoRA adapters; see :mod:`recbole_llm.trainer.checkpoint`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExtendedEmbedding(nn.Module):
    """``base`` (frozen) for ids below ``base.num_embeddings``, ``new_rows`` (trainable) above."""

    def __init__(self, base: nn.Embedding, new_rows: nn.Parameter):
        super().__init__()
        self.base, self.new_rows = base, new_rows
        self.base_size = base.num_embeddings
        self.embedding_dim = base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:  # the full table, for code that reads embeddings directly
        return torch.cat([self.base.weight, self.new_rows.to(self.base.weight.dtype)], 0)

    @property
    def num_embeddings(self) -> int:
        return self.base_size + len(self.new_rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.base_size
        base = self.base(ids.clamp(max=self.base_size - 1))
        new = F.embedding((ids - self.base_size).clamp(min=0), self.new_rows).to(base.dtype)
        return torch.where(is_new.unsqueeze(-1), new, base)


class ExtendedHead(nn.Module):
    """Logits of the base head followed by the new rows' logits."""

    def __init__(self, base: nn.Linear, new_rows: nn.Parameter):
        super().__init__()
        self.base, self.new_rows = base, new_rows
        self.in_features = base.in_features
        self.out_features = base.out_features + len(new_rows)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.new_rows.to(self.base.weight.dtype)], 0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.base(hidden), F.linear(hidden, self.new_rows.to(hidden.dtype))], dim=-1)


def head_rows(lm_head: nn.Module, rows: range) -> torch.Tensor:
    """The output-embedding rows ``rows`` of a head; an :class:`ExtendedHead`'s new rows without concatenating the
    whole table."""
    if isinstance(lm_head, ExtendedHead) and rows.start >= lm_head.base.out_features:
        offset = lm_head.base.out_features
        return lm_head.new_rows[rows.start - offset:rows.stop - offset]
    return lm_head.weight[rows.start:rows.stop]


def add_trainable_tokens(model, tokenizer, tokens: list[str], seed: int = 0) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` and ``model`` (a causal LM, possibly peft-wrapped) as trainable rows.

    Returns their ids (consecutive, after the current vocabulary). New rows start from N(mean, std) of the base
    embedding, so they are distinct from each other and on the scale of real tokens. Call after LoRA is applied
    (peft freezes every non-adapter parameter when it wraps a model).
    """
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding, head = base_model.get_input_embeddings(), base_model.get_output_embeddings()
    if isinstance(embedding, ExtendedEmbedding):
        raise ValueError("the model already has added trainable tokens; add all of them in one call")
    vocabulary = len(tokenizer)
    if embedding.num_embeddings < vocabulary:
        raise ValueError(f"the tokenizer has {vocabulary} tokens but the embedding only {embedding.num_embeddings}")
    added = tokenizer.add_tokens(list(tokens), special_tokens=True)
    if added != len(tokens):
        raise ValueError(f"{len(tokens) - added} of the new tokens already exist in the tokenizer")
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    # Token ids continue after len(tokenizer); a model whose embedding has spare rows (padded vocabularies) would
    # put them inside the base table, so the new rows are placed right after the *embedding's* size instead.
    offset = embedding.num_embeddings - vocabulary
    if offset:
        raise ValueError(
            f"the embedding has {embedding.num_embeddings} rows for a {vocabulary}-token tokenizer; models with a "
            "padded vocabulary are not supported for new tokens yet"
        )
    weight = embedding.weight.detach().float()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(tokens), weight.shape[1], generator=generator) * weight.std(0).cpu() + weight.mean(0).cpu()
    new_rows = nn.Parameter(rows.to(device=weight.device, dtype=torch.float32))
    tied = head is not None and head.weight is embedding.weight
    base_model.set_input_embeddings(ExtendedEmbedding(embedding, new_rows))
    if head is not None:
        head_rows = new_rows if tied else nn.Parameter(
            (torch.randn(len(tokens), weight.shape[1], generator=generator) * head.weight.detach().float().std().cpu())
            .to(device=weight.device)
        )
        base_model.set_output_embeddings(ExtendedHead(head, head_rows))
    base_model.config.vocab_size = len(tokenizer)
    return ids
