"""CALRec's quasi-round-robin merge of per-generation BM25 rankings (CALRec §3.4, METHODS.md §1.5).

Each generated item text g (with sequence log-probability s_g) retrieves the catalogue by BM25. Scores are
min-max normalised per generation and merged by

    score(i) = max_g exp(epsilon * s_g) * minmax_i(BM25(g, i)),   epsilon = 1/5000 in the paper

With a tiny epsilon every generation's BM25 top-1 scores about 1 and these top-1s are ordered by s_g: a first
round of a round robin over generations. Below them items interleave by normalised BM25, hence "quasi".
"""

from __future__ import annotations

import torch


def quasi_round_robin_merge(bm25: torch.Tensor, log_probs: torch.Tensor, epsilon: float = 1 / 5000) -> torch.Tensor:
    """Merge ``bm25 [B, N, I]`` (N generations per user) into ``[B, I]`` scores.

    An item that no generation reaches (BM25 0 for all of them) gets ``-inf``, so a ranking never lists an item
    for which the method has no evidence above one it has.
    """
    low = bm25.amin(dim=-1, keepdim=True)
    high = bm25.amax(dim=-1, keepdim=True)
    normalised = (bm25 - low) / (high - low).clamp(min=torch.finfo(bm25.dtype).tiny)
    weight = torch.exp(epsilon * log_probs).unsqueeze(-1)  # [B, N, 1]
    score = (weight * normalised).amax(dim=1)
    reached = (bm25 > 0).any(dim=1)
    return score.masked_fill(~reached, float("-inf"))
