"""CALRec's quasi-round-robin merge of per-generation BM25 rankings (CALRec §3.4, METHODS.md §1.5).

Each generated item text g (with sequence log-probability s_g) retrieves the catalogue by BM25. Scores are
normalised per generation and merged by

    score(i) = max_g exp(epsilon * s_g) * norm_i(BM25(g, i)),   epsilon = 1/5000 in the paper

With the paper's min-max normalisation and a tiny epsilon every generation's BM25 top-1 scores about 1 and these
top-1s are ordered by s_g: a first round of a round robin over generations. Below them items interleave by
normalised BM25, hence "quasi".

Min-max gives a generation that matches nothing but common words the same top score as a perfect one. The
``self`` normalisation divides by the generation's BM25 against itself (:meth:`BM25Index.self_scores`) instead:
a perfect match scores about 1, noise stays near 0, so a wrong sample cannot push its noise above a right one.
"""

from __future__ import annotations

import torch


def quasi_round_robin_merge(bm25: torch.Tensor, log_probs: torch.Tensor, epsilon: float = 1 / 5000,
                            self_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Merge ``bm25 [B, N, I]`` (N generations per user) into ``[B, I]`` scores.

    ``self_scores [B, N]``: normalise each generation by its self-score; None: min-max over the catalogue (the
    paper). An item that no generation reaches (BM25 0 for all of them) gets ``-inf``, so a ranking never lists
    an item for which the method has no evidence above one it has.
    """
    tiny = torch.finfo(bm25.dtype).tiny
    if self_scores is None:
        low = bm25.amin(dim=-1, keepdim=True)
        high = bm25.amax(dim=-1, keepdim=True)
        normalised = (bm25 - low) / (high - low).clamp(min=tiny)
    else:
        normalised = bm25 / self_scores.unsqueeze(-1).clamp(min=tiny)
    weight = torch.exp(epsilon * log_probs).unsqueeze(-1)  # [B, N, 1]
    score = (weight * normalised).amax(dim=1)
    reached = (bm25 > 0).any(dim=1)
    return score.masked_fill(~reached, float("-inf"))
