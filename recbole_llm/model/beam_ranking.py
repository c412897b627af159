"""RecBole's scoring verbs for generative recommenders that rank the items their beams write.

A model that writes items as token sequences (SemConv's codes, ILM's titles) ranks, per user, the ``beams`` items
its beam search constrained to the catalogue reaches, with their sequence log-probabilities; every other item
scores -inf. The mixin gives ``full_sort_predict`` and ``predict`` from one method the model defines::

    beam_items(users [B], histories, banned [B, n_items] | None) -> (item ids [B, K], log-probabilities [B, K])

(item id -1 or a -inf score: a beam that reached no item). Under ``exclude_history`` the evaluator drops every
earlier item of a user, so the beams are told to avoid them (``banned``) and all K of them count.
"""

from __future__ import annotations

import math

import torch

from recbole_llm.data.sequences import user_sequences
from recbole_llm.protocol import excludes_history
from recbole_llm.settings import SettingError


class BeamRanking:
    """Mixin for a RecBole ``SequentialRecommender`` (see the module docstring)."""

    beams: int
    generation_batch_size: int

    def setup_beam_ranking(self, config, dataset, beams_key: str) -> None:
        """Read the protocol and refuse beam widths the catalogue or ``topk`` cannot use (before any training)."""
        items, top_k = self.n_items - 1, max(config["topk"])
        if self.beams > items:
            raise SettingError(f"{beams_key}={self.beams} exceeds the {items} items of the catalogue: every beam "
                               f"past them is wasted search; e.g. --{beams_key}={min(items, 20)}")
        if top_k > self.beams:
            raise SettingError(
                f"topk={config['topk']} asks for {top_k} items per user, but {type(self).__name__} ranks only its "
                f"{beams_key}={self.beams} beams (every other item scores -inf, so metrics at {top_k} would count "
                f"arbitrary items); use --{beams_key}={top_k} or a smaller topk")
        self.exclude_history = excludes_history(config)
        self.train_items = user_sequences(dataset) if self.exclude_history else None

    def _histories(self, interaction) -> list[list[int]]:
        lengths = interaction[self.ITEM_SEQ_LEN].tolist()
        return [seq[:n] for seq, n in zip(interaction[self.ITEM_SEQ].tolist(), lengths)]

    def earlier_items(self, interaction) -> torch.Tensor:
        """``[B, n_items]`` bool: each row's earlier items (its user's training items and the row's own history),
        the items the protocol removes from the ranking under ``exclude_history``."""
        banned = torch.zeros(len(interaction), self.n_items, dtype=torch.bool)
        for row, (user, history) in enumerate(zip(interaction[self.USER_ID].tolist(), self._histories(interaction))):
            banned[row, self.train_items.get(user, [])] = True
            banned[row, history] = True
        banned[:, 0] = False  # the padding item is no item
        return banned.to(self.device)

    def full_sort_predict(self, interaction):
        """``[B, n_items]``: beam log-probabilities of the top ``beams`` items, -inf elsewhere."""
        histories = self._histories(interaction)
        users = interaction[self.USER_ID].tolist()
        banned = self.earlier_items(interaction) if self.exclude_history else None
        scores = torch.full((len(histories), self.n_items), -math.inf, device=self.device)
        for start in range(0, len(histories), self.generation_batch_size):
            chunk = slice(start, start + self.generation_batch_size)
            items, log_probs = self.beam_items(users[chunk], histories[chunk],
                                               banned[chunk] if banned is not None else None)
            rows = torch.arange(len(items), device=self.device).unsqueeze(1).expand_as(items) + start
            valid = (items > 0) & torch.isfinite(log_probs)
            scores.index_put_((rows[valid], items[valid].to(self.device)), log_probs[valid].to(self.device))
        return scores

    def predict(self, interaction):
        """Scores of the given items, read from each row's full ranking (-inf outside its beams)."""
        return self.full_sort_predict(interaction)[torch.arange(len(interaction), device=self.device),
                                                   interaction[self.ITEM_ID]]
