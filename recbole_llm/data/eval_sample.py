"""A seeded sample of evaluation users for ranking runs (``eval_max_users``): the same users for every model.

Ranking every test user with an LLM is slow on a CPU (a beam search or sampled generations per user), so a quick
comparison may rank for a sample of users instead. ``eval_max_users: n`` keeps, in the valid and the test part,
every row of n users chosen among all users of the dataset by a hash of (seed, user token); training is untouched.
The choice depends on neither the model type nor the split loader, so Pop, SASRec, KGAT and an LLM recommender
of one comparison rank for exactly the same users; it is part of the protocol (recorded with every result). Labeled
(CTR) runs sample rows instead (``eval_max_interactions``, :mod:`recbole_llm.data.labeled`).

In a run of several processes (:mod:`recbole_llm.distributed`) each process evaluates a shard of those users: the
user ids in contiguous, unpadded blocks, one per rank, the same block in the valid and the test part (a user's
valid rows are the history its test ranking may exclude). The shards together are exactly the users of a
single-process run; the trainer gathers their per-user results before RecBole's evaluator computes any metric
(:mod:`recbole_llm.trainer.parallel`).
"""

from __future__ import annotations

import hashlib
from functools import cache

import numpy as np
import torch

from recbole_llm import distributed


def sampled_users(tokens, n: int, seed) -> np.ndarray:
    """``[len(tokens)]`` bool: the ``n`` user tokens (index 0, RecBole's padding, never) of smallest hash."""
    keys = [hashlib.blake2b(f"{seed}|{token}".encode(), digest_size=8).digest() for token in tokens[1:]]
    keep = np.zeros(len(tokens), dtype=bool)
    keep[1 + np.argsort(np.array(keys, dtype=object), kind="stable")[:n]] = True
    return keep


def rank_users(n_users: int) -> np.ndarray:
    """``[n_users]`` bool: the user ids this process evaluates (all of them in a single process)."""
    keep = np.zeros(n_users, dtype=bool)
    block = distributed.shard(n_users - 1)  # id 0 is RecBole's padding
    keep[block.start + 1: block.stop + 1] = True
    return keep


def evaluated_users(dataset) -> np.ndarray:
    """``[user_num]`` bool: the users whose valid and test rows this process evaluates."""
    keep = rank_users(dataset.user_num)
    n = dataset.config["eval_max_users"]
    if n is not None:
        keep &= sampled_users(dataset.field2id_token[dataset.uid_field], int(n), dataset.config["seed"])
    return keep


def _build(self):
    """The dataset's own ``build``, then valid and test cut to the evaluated users, all parts as instances of the
    original class (so saved dataloaders pickle as RecBole's own)."""
    parts = self.original_class.build(self)
    if len(parts) == 3:
        keep = torch.from_numpy(evaluated_users(self))
        parts = [parts[0], *(part.copy(part.inter_feat[keep[part.inter_feat[self.uid_field]]]) for part in parts[1:])]
    for part in parts:
        part.__class__ = self.original_class
    return parts


@cache
def _sampled_class(cls: type) -> type:
    # a direct subclass adds nothing to the instance layout, so an existing dataset can take it as its class
    return type(cls.__name__, (cls,), {"__module__": __name__, "original_class": cls, "build": _build})


def sample_eval_users(dataset):
    """``dataset`` (any RecBole dataset, whatever class RecBole chose or loaded it as) with the user sample and this
    process's shard applied when it builds its parts."""
    dataset.__class__ = _sampled_class(type(dataset))
    return dataset
