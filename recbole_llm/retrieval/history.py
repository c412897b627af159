"""Which of a user's earlier items go into a prompt: retrieval by similarity to the target, and reranking.

A row's history is its RecBole item list, oldest first (only items *before* the scored interaction: the
sequential dataset builds it from earlier rows), so a position is also a recency rank. Everything here returns
positions into that list, so prompts can read any history field (ids, ratings, timestamps) at them.

Selections (RALLRec's official prompt builders, METHODS.md §2.6-2.8):

* ``simple``: the last K items, oldest first (no retrieval; TALLRec / ReLLa's plain prompt);
* ``sequential``: the K most similar items, oldest first;
* ``high``: the K most similar items, most similar first;
* ``rerank`` (RALLRec): of the K most similar, the K1 = floor(alpha K) most recent, most recent first, then the
  K2 = K - K1 most recent of the remaining history, oldest first.

Similarities are one batched product per row, ``[B, H, d] x [B, d]``: a row compares its target only with its own
history (at most ``MAX_ITEM_LIST_LENGTH`` items), so there is no item-by-item matrix and no index to build.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SELECTIONS = ("rerank", "high", "sequential", "simple")


def history_similarity(item_vectors: torch.Tensor, histories: torch.Tensor, lengths: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row's target with each of its history items, ``[B, H]``; -inf past the length.

    ``item_vectors [n_items, d]`` are L2-normalised rows, ``histories [B, H]`` item ids (oldest first, padded with
    0 after ``lengths``), ``targets [B]`` item ids."""
    scores = torch.einsum("bhd,bd->bh", item_vectors[histories], item_vectors[targets]).float()
    valid = torch.arange(histories.shape[1], device=histories.device) < lengths.unsqueeze(1)
    return scores.masked_fill(~valid, float("-inf"))


def select_history(similarity: np.ndarray, length: int, k: int, how: str = "rerank",
                   alpha: float = 2 / 3) -> list[int]:
    """Positions (into a history of ``length`` items, oldest first) of the items one prompt shows, in prompt order.

    ``similarity`` holds one score per position (only the first ``length`` are read); see the module docstring
    for ``how``."""
    if how not in SELECTIONS:
        raise ValueError(f"unknown history selection {how!r}; use one of {', '.join(SELECTIONS)}")
    k = min(k, length)
    if how == "simple" or k == 0:
        return list(range(length - k, length))
    scores = np.asarray(similarity[:length], dtype=np.float64)
    most_similar = np.argsort(-scores, kind="stable")[:k]  # ties: the older item first (stable)
    if how == "high":
        return most_similar.tolist()
    if how == "sequential":
        return sorted(most_similar.tolist())
    k1 = math.floor(alpha * k)
    relevant = sorted(most_similar.tolist(), reverse=True)[:k1]  # most recent first
    chosen = set(relevant)
    latest = [p for p in range(length - 1, -1, -1) if p not in chosen][: k - k1]
    return relevant + sorted(latest)
