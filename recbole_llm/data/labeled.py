"""Labeled (CTR) datasets: the same rows and the same split for every model of a CTR comparison.

RecBole builds a CONTEXT model's rows (every interaction) and a sequential CTR model's rows (every interaction
after a user's first, with its earlier history, as DIN uses) in two dataset classes whose sorts break ties in
timestamps differently, so even one global temporal split gives the two model families different test rows. In a
labeled run (``eval_args.mode: labeled``) :func:`labeled_dataset_class` swaps in these subclasses, which
differ from RecBole's only in what a comparison needs to be fair:

* an exact total order: sorting by time uses the file's timestamps at full precision (RecBole's float32 rounds
  Unix seconds to minutes, so later items could enter a history) and breaks ties by user token, then item token
  (RALLRec sorts its samples by ``(timestamp, user, item)``, METHODS.md §2.1), independent of file order and of
  internal id numbering;
* ``min_history_length: k``: only rows with at least k earlier interactions of the same user are kept, in both
  classes (RALLRec drops samples with fewer than 5); a sequential dataset has no row for a user's first
  interaction anyway, so comparing sequential and context models needs k >= 1;
* ``eval_max_interactions: n``: valid and test each keep a seeded sample of n rows, chosen by a hash of (user
  token, item token, timestamp, seed), so every model scores exactly the same rows;
* the sequential class keeps the rating behind the label as a history list (``rating_list``, RALLRec's stars)
  and removes the scored row's own rating, which would leak the label.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from recbole.data.dataset import Dataset, SequentialDataset
from recbole.data.interaction import cat_interactions
from recbole.utils import FeatureSource, FeatureType, ModelType

from recbole_llm.errors import UsageError


class LabeledProtocolError(UsageError, ValueError):
    """A labeled-protocol setting that cannot apply to this run."""


def is_labeled(config) -> bool:
    return all(mode == "labeled" for mode in config["eval_args"]["mode"].values())


class _LabeledRows:
    """What both labeled dataset classes add to RecBole's (see the module docstring)."""

    def _token_rank(self, field: str, values: np.ndarray) -> np.ndarray:
        tokens = np.asarray(self.field2id_token[field]).astype(str)
        rank = np.empty(len(tokens), dtype=np.int64)
        rank[np.argsort(tokens, kind="stable")] = np.arange(len(tokens))
        return rank[values]

    def _change_feat_format(self):
        # RecBole stores float fields as float32, which rounds Unix timestamps to 64-128 s: within a user, items
        # rated a minute apart would tie and sort by file order or id, putting later items into a row's history.
        # The exact order is taken here, from the float64 column, before the conversion.
        if self.time_field:
            frame = self.inter_feat
            users, items = frame[self.uid_field].to_numpy(np.int64), frame[self.iid_field].to_numpy(np.int64)
            order = np.lexsort((self._token_rank(self.iid_field, items), self._token_rank(self.uid_field, users),
                                frame[self.time_field].to_numpy(np.float64)))
            self._pair_base = int(items.max(initial=0)) + 1
            keys = users * self._pair_base + items
            by_key = np.argsort(keys, kind="stable")
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            self._pair_keys, self._pair_rank = keys[by_key], rank[by_key]
        super()._change_feat_format()

    def _exact_rank(self, inter=None) -> np.ndarray:
        """Each row's place in the exact (time, user token, item token) order, found by its (user, item); the
        current rows, or those of ``inter``."""
        inter = self.inter_feat if inter is None else inter
        keys = inter[self.uid_field].numpy() * self._pair_base + inter[self.iid_field].numpy()
        return self._pair_rank[np.searchsorted(self._pair_keys, keys)]

    def sort(self, by, ascending=True):
        by = [by] if isinstance(by, str) else list(by)
        if not self.time_field or self.time_field not in by or ascending is not True:
            return super().sort(by, ascending)
        # time is replaced by the exact rank, which already breaks ties by user token, then item token
        columns = [self._exact_rank() if key == self.time_field else self.inter_feat[key].numpy()
                   for key in by[: by.index(self.time_field) + 1]]
        order = np.lexsort(columns[::-1])  # lexsort's last key is the primary one
        self.inter_feat._reindex(torch.from_numpy(order))

    def _min_history(self) -> int:
        return int(self.config["min_history_length"] or 0)

    def build(self):
        datasets = super().build()
        n = self.config["eval_max_interactions"]
        if n is None or len(datasets) < 3:
            return datasets
        return [datasets[0], *(self._eval_sample(part, int(n)) for part in datasets[1:])]

    def _eval_sample(self, part, n: int):
        if len(part) <= n:
            return part
        inter = part.inter_feat
        users = np.asarray(self.field2id_token[self.uid_field])[inter[self.uid_field].numpy()]
        items = np.asarray(self.field2id_token[self.iid_field])[inter[self.iid_field].numpy()]
        times = inter[self.time_field].numpy() if self.time_field in inter.interaction else np.zeros(len(inter))
        seed = self.config["seed"]
        keys = [hashlib.blake2b(f"{seed}|{u}|{i}|{t!r}".encode(), digest_size=8).digest()
                for u, i, t in zip(users, items, times.tolist())]
        chosen = np.sort(np.argsort(np.array(keys, dtype=object), kind="stable")[:n])
        return part.copy(inter[torch.from_numpy(chosen)])


class LabeledDataset(_LabeledRows, Dataset):
    """RecBole's Dataset with the labeled protocol's row set and order (context and general models)."""

    def _change_feat_format(self):
        super()._change_feat_format()
        k = self._min_history()
        if k > 0:
            self.sort(by=[self.uid_field, self.time_field])
            users = self.inter_feat[self.uid_field].numpy()
            starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
            position = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
            if self.config["train_on_training_period"]:  # a CF model's graph: the unscored rows train it too
                self._unscored_rows = self.inter_feat[torch.from_numpy(np.flatnonzero(position < k))]
            self.inter_feat = self.inter_feat[torch.from_numpy(np.flatnonzero(position >= k))]

    def build(self):
        """With ``train_on_training_period`` (set by :mod:`recbole_llm.collaborative` for its CF model), the rows
        ``min_history_length`` keeps from being scored still train, where they fall in the training period:
        every interaction up to the last training row in the exact order; none of the valid or test period."""
        datasets = super().build()
        unscored = getattr(self, "_unscored_rows", None)
        if unscored is None or not len(datasets[0]):
            return datasets
        train = datasets[0]
        period = self._exact_rank(unscored) <= train._exact_rank().max()
        train.inter_feat = cat_interactions([train.inter_feat, unscored[torch.from_numpy(np.flatnonzero(period))]])
        return datasets


class LabeledSequentialDataset(_LabeledRows, SequentialDataset):
    """RecBole's SequentialDataset with the labeled protocol's rows and order, and the rating history."""

    def _set_label_by_threshold(self):
        threshold = self.config["threshold"]
        if threshold is None:
            return super()._set_label_by_threshold()
        (field, value), = threshold.items()
        if field not in self.inter_feat:
            raise ValueError(f"Field [{field}] not in inter_feat.")
        self.set_field_property(self.label_field, FeatureType.FLOAT, FeatureSource.INTERACTION, 1)
        self.inter_feat[self.label_field] = (self.inter_feat[field] >= value).astype(int)
        self.label_source_field = field  # kept until the history lists are built, then dropped from the rows

    def _change_feat_format(self):
        super()._change_feat_format()  # builds the history lists (data augmentation)
        source = getattr(self, "label_source_field", None)
        if source and source != self.label_field and source in self.inter_feat.interaction:
            self._del_col(self.inter_feat, source)  # the scored row's own rating is its label
        k = self._min_history()
        if k > self.max_item_list_len:
            raise LabeledProtocolError(
                f"min_history_length={k} exceeds MAX_ITEM_LIST_LENGTH={self.max_item_list_len}: a sequential row "
                "cannot show that many earlier items; raise MAX_ITEM_LIST_LENGTH or lower min_history_length")
        if k > 1:
            lengths = self.inter_feat[self.item_list_length_field].numpy()
            self.inter_feat = self.inter_feat[torch.from_numpy(np.flatnonzero(lengths >= k))]


def labeled_dataset_class(config):
    """The labeled dataset class for a run, or None where RecBole's own choice stands (ranking runs, and models
    with a dataset class of their own in RecBole)."""
    from recbole.data import dataset as recbole_datasets

    if not is_labeled(config):
        if config["min_history_length"] or config["eval_max_interactions"] is not None:
            raise LabeledProtocolError(
                "min_history_length and eval_max_interactions apply to labeled (CTR) evaluation only "
                f"(eval_args.mode: labeled); this run evaluates with mode {config['eval_args']['mode']}. "
                "Remove them or use a labeled protocol.")
        return None
    if config["eval_max_users"] is not None:
        raise LabeledProtocolError(
            "eval_max_users samples the users of a ranking run; a labeled (CTR) run scores rows: use "
            f"--eval_max_interactions={config['eval_max_users']} instead (a seeded sample of valid and test rows).")
    if hasattr(recbole_datasets, config["model"] + "Dataset"):
        return None
    return {ModelType.SEQUENTIAL: LabeledSequentialDataset, ModelType.GENERAL: LabeledDataset,
            ModelType.CONTEXT: LabeledDataset, ModelType.TRADITIONAL: LabeledDataset,
            ModelType.DECISIONTREE: LabeledDataset}.get(config["MODEL_TYPE"])
