"""Loss functions shared by recbole_llm models."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, key: torch.Tensor, tau: float, symmetric: bool = False) -> torch.Tensor:
    """InfoNCE with cosine similarity and in-batch negatives (CALRec eq. for L_TT / L_UT).

    With ``symmetric=False`` it is the paper's form: for each key (target) i the softmax runs over the queries j,

        L = -(1/N) sum_i log[ exp(cos(q_i, k_i)/tau) / sum_j exp(cos(q_j, k_i)/tau) ]

    ``symmetric=True`` averages it with the transposed form (softmax over keys for each query).
    """
    similarity = F.normalize(query.float(), dim=-1) @ F.normalize(key.float(), dim=-1).T / tau  # [q, k]
    labels = torch.arange(similarity.shape[0], device=similarity.device)
    per_key = F.cross_entropy(similarity.T, labels)
    if not symmetric:
        return per_key
    return 0.5 * (per_key + F.cross_entropy(similarity, labels))
