"""Per-user item sequences from RecBole's sequential training split, whatever split produced it.

RecBole's SequentialDataset turns every interaction after a user's first into a row ``(history -> target)``, then
splits the rows. Under leave-one-out the training rows of a user are contiguous and in time order; under a global
temporal split (``group_by: ~``) they are interleaved with every other user's, in global time order. So a user's
sequence is rebuilt by explicit grouping, never from row adjacency: the user's rows ordered by time (ties by
history length, then row order: RecBole's sorts are stable, so rows that tie on its float32 times keep the
order their histories were built in), the first row's history, then every row's target.
"""

from __future__ import annotations

import numpy as np


def user_sequences(dataset) -> dict[int, list[int]]:
    """``{user id: [item ids in time order]}`` of a RecBole sequential dataset's rows (users in id order).

    Each sequence is the earliest row's history followed by each row's target, so it holds every transition the
    rows hold and no other (a user's training rows of a temporal split are one run of their timeline)."""
    inter = dataset.inter_feat
    users = inter[dataset.uid_field].numpy()
    targets = inter[dataset.iid_field].numpy()
    lengths = inter[dataset.item_list_length_field].numpy()
    times = inter[dataset.time_field].numpy() if dataset.time_field in inter.interaction else np.zeros(len(users))
    order = np.lexsort((np.arange(len(users)), lengths, times, users))  # last key is the primary one
    histories = inter[dataset.item_id_list_field].numpy()
    users, starts = np.unique(users[order], return_index=True)
    ends = np.r_[starts[1:], len(order)]
    sequences = {}
    for user, start, end in zip(users.tolist(), starts, ends):
        first = order[start]
        sequences[user] = histories[first, : lengths[first]].tolist() + targets[order[start:end]].tolist()
    return sequences


def last_items(sequence, n: int):
    """The last ``n`` items of ``sequence`` (none for ``n = 0``; ``sequence[-0:]`` would be all of them)."""
    return sequence[max(len(sequence) - n, 0):]
