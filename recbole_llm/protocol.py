"""The evaluation protocol: what must be identical for results to share a table, and history exclusion.

The protocol is the split, the metrics and cut-offs, the validation metric, whether a user's earlier items are
removed from the full ranking (``exclude_history``), the users ranked (all, or a seeded sample: ``eval_max_users``,
:mod:`recbole_llm.data.eval_sample`), and for labeled (CTR) runs the label threshold, the rows kept
(``min_history_length``) and the seeded evaluation sample (``eval_max_interactions``, see
:mod:`recbole_llm.data.labeled`). RecBole decides the last one by model type: its full-sort
loader removes the training history for general and context models and nothing for sequential models, so in one
RecBole comparison Pop is ranked without the user's history and SASRec with it. Here it is one setting:

* ``exclude_history: ~`` (default): RecBole's behaviour for the model type, so a single run is exactly RecBole's;
* ``True`` / ``False``: applied to every model. A comparison resolves ``~`` once (from the model whose split it
  uses) and gives that value to every model, and each result records it.

Exclusion uses the user's *whole* earlier history (every item of the earlier splits and of the row's own
sequence), not the last ``MAX_ITEM_LIST_LENGTH`` items a sequential model reads; the target item itself is never
excluded (a repeat consumption stays rankable), as in RecBole.
"""

from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import ModelType

PROTOCOL_KEYS = ("eval_args", "metrics", "topk", "valid_metric", "exclude_history", "eval_max_users", "threshold",
                 "min_history_length", "eval_max_interactions")


def excludes_history(config) -> bool:
    """The resolved ``exclude_history``: the user's value, else RecBole's default for the model type."""
    value = config["exclude_history"]
    return config["MODEL_TYPE"] != ModelType.SEQUENTIAL if value is None else bool(value)


def protocol_of(config) -> dict:
    """The protocol a run is evaluated under, with ``exclude_history`` resolved."""
    protocol = {key: config[key] for key in PROTOCOL_KEYS}
    protocol["exclude_history"] = excludes_history(config)
    return protocol


def apply_history_exclusion(config, train_data, valid_data, test_data) -> None:
    """Make the full-sort loaders of valid and test exclude (or keep) history as :func:`excludes_history` says."""
    exclude = excludes_history(config)
    # ``_dataset``: every RecBole loader has it (knowledge-aware training loaders have no ``dataset``)
    earlier = [train_data._dataset]
    for loader in (valid_data, test_data):
        if isinstance(loader, FullSortEvalDataLoader):
            if loader.is_sequential and exclude:
                _exclude_sequential_history(config, loader, earlier)
            elif not loader.is_sequential and not exclude:
                _keep_history(loader)
        earlier.append(loader._dataset)


def _keep_history(loader) -> None:
    collate = loader.collate_fn

    def without_history(index):
        interaction, _, positive_u, positive_i = collate(index)
        return interaction, None, positive_u, positive_i

    loader.collate_fn = without_history


def _user_items(config, datasets) -> list[np.ndarray]:
    """Per user id, every item in the rows (targets and item sequences) of ``datasets``."""
    uid, iid = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    seq = iid + config["LIST_SUFFIX"]
    users, items = [], []
    for dataset in datasets:
        inter = dataset.inter_feat
        users.append(inter[uid].numpy())
        items.append(inter[iid].numpy())
        if seq in inter.interaction:
            sequences = inter[seq].numpy()
            users.append(np.repeat(inter[uid].numpy(), sequences.shape[1]))
            items.append(sequences.ravel())
    users, items = np.concatenate(users), np.concatenate(items)
    keep = items > 0  # sequence padding
    pairs = np.unique(np.stack([users[keep], items[keep]], axis=1), axis=0)
    n_users = int(max(users.max(initial=0), *(d.user_num for d in datasets))) + 1
    bounds = np.searchsorted(pairs[:, 0], np.arange(n_users + 1))
    return [pairs[bounds[u]: bounds[u + 1], 1] for u in range(n_users)]


def _exclude_sequential_history(config, loader, earlier) -> None:
    history = _user_items(config, earlier)
    uid, seq = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
    collate = loader.collate_fn

    def with_history(index):
        interaction, _, positive_u, positive_i = collate(index)
        sequences = interaction[seq]
        rows, items = [], []
        for row, (user, target) in enumerate(zip(interaction[uid].tolist(), positive_i.tolist())):
            own = sequences[row]
            seen = np.union1d(history[user], own[own > 0].numpy())
            seen = seen[seen != target]
            rows.append(np.full(len(seen), row))
            items.append(seen)
        return (interaction, (torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(items))),
                positive_u, positive_i)

    loader.collate_fn = with_history
