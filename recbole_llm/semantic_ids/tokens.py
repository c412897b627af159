"""Item codes as LLM tokens: one token per (level, code), written ``<a_12><b_7><c_201><d_3>``."""

from __future__ import annotations

import string

import torch

LEVEL_NAMES = string.ascii_lowercase


def code_token_names(levels: int, codebook_size: int) -> list[str]:
    """``<a_0> .. <a_{C-1}> <b_0> ...``: level-major, so level l's code k is entry ``l * C + k``."""
    if not 1 <= levels <= len(LEVEL_NAMES):
        raise ValueError(f"levels must be between 1 and {len(LEVEL_NAMES)}, not {levels}")
    return [f"<{LEVEL_NAMES[level]}_{code}>" for level in range(levels) for code in range(codebook_size)]


class CodeVocabulary:
    """Maps between codes and token ids, given the ids the tokenizer assigned to :func:`code_token_names`."""

    def __init__(self, token_ids: list[int], levels: int, codebook_size: int, vocab_size: int):
        self.levels, self.codebook_size = levels, codebook_size
        self.level_tokens = torch.tensor(token_ids, dtype=torch.long).view(levels, codebook_size)  # [L, C]
        self.code_of_token = torch.full((vocab_size,), -1, dtype=torch.long)  # [V] code index at its level
        self.code_of_token[self.level_tokens.flatten()] = torch.arange(codebook_size).repeat(levels)

    def to(self, device) -> "CodeVocabulary":
        self.level_tokens, self.code_of_token = self.level_tokens.to(device), self.code_of_token.to(device)
        return self

    def tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, L]`` of codes ``[N, L]``."""
        return self.level_tokens.gather(1, codes.t().to(self.level_tokens.device)).t()

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code indices of token ids (-1 for non-code tokens)."""
        return self.code_of_token[tokens]
