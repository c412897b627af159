"""A prefix trie of item codes as lookup tables, and the beam-search constraint built on it.

The trie of codes ``[N, L]`` (values < C) is stored level by level: the states of level l are the distinct
prefixes of length l (level 0 has one state, the root), and ``transitions[l]`` is a ``[states_l, C]`` table of the
child state each code leads to, -1 where no item continues. Walking t generated codes is t gathers for all
beams at once, and the codes allowed next are ``transitions[t][state] >= 0``: no Python loop over beams or items.
Memory is ``sum_l states_l * C`` integers (for 1,682 items, 4 x 256 codes: about 3 MB).

:class:`TrieConstrainedLogitsProcessor` applies it inside transformers' ``generate``: after a prompt, only the
tokens of codes that continue some item's code are allowed, and once a full code is written only EOS (a code
that matches no item can never be produced). transformers' ``PrefixConstrainedLogitsProcessor`` computes the same
mask with a Python call per beam; the tests use it as the reference.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class CodeTrie:
    """Prefix trie of the catalogue's codes (row i of ``codes`` is item i's code)."""

    def __init__(self, codes: torch.Tensor, codebook_size: int):
        codes = codes.long().cpu()
        if codes.ndim != 2 or len(codes) == 0:
            raise ValueError("codes must be a non-empty [items, levels] tensor")
        if int(codes.min()) < 0 or int(codes.max()) >= codebook_size:
            raise ValueError(f"codes must lie in [0, {codebook_size})")
        if len(torch.unique(codes, dim=0)) != len(codes):
            raise ValueError("two items share a code: resolve collisions before building the trie")
        self.levels, self.codebook_size = codes.shape[1], codebook_size
        self.transitions: list[torch.Tensor] = []
        self.item_states: list[torch.Tensor] = []  # [levels] x [N]: the state of each item's prefix of length l + 1
        parent = torch.zeros(len(codes), dtype=torch.long)  # every item starts at the root
        n_states = 1
        for level in range(self.levels):
            _, child = torch.unique(codes[:, : level + 1], dim=0, return_inverse=True)
            table = torch.full((n_states, codebook_size), -1, dtype=torch.long)
            table[parent, codes[:, level]] = child
            self.transitions.append(table)
            self.item_states.append(child)
            parent, n_states = child, int(child.max()) + 1
        # leaves are the full codes; leaf state -> item
        self.item_of_leaf = torch.full((n_states,), -1, dtype=torch.long)
        self.item_of_leaf[parent] = torch.arange(len(codes))

    def to(self, device) -> "CodeTrie":
        self.transitions = [t.to(device) for t in self.transitions]
        self.item_states = [t.to(device) for t in self.item_states]
        self.item_of_leaf = self.item_of_leaf.to(device)
        return self

    def walk(self, prefixes: torch.Tensor) -> torch.Tensor:
        """States reached by code prefixes ``[B, t]`` (t < L: internal states; t = L: leaf states); -1 if invalid."""
        state = torch.zeros(len(prefixes), dtype=torch.long, device=prefixes.device)
        for level in range(prefixes.shape[1]):
            codes = prefixes[:, level]
            valid = (state >= 0) & (codes >= 0) & (codes < self.codebook_size)
            step = self.transitions[level][state.clamp(min=0), codes.clamp(0, self.codebook_size - 1)]
            state = torch.where(valid, step, -1)
        return state

    def allowed(self, prefixes: torch.Tensor, open_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``[B, C]`` bool: codes that may follow each prefix ``[B, t]`` (t < L); none after an invalid prefix.

        With ``open_states`` (:meth:`open_states` of per-row banned items, one row per prefix) a code is allowed
        only if some item that is not banned for that row continues it."""
        state = self.walk(prefixes)
        child = self.transitions[prefixes.shape[1]][state.clamp(min=0)]
        allowed = (child >= 0) & (state >= 0).unsqueeze(1)
        if open_states is not None:
            allowed &= open_states[prefixes.shape[1]].gather(1, child.clamp(min=0))
        return allowed

    def open_states(self, banned: torch.Tensor) -> list[torch.Tensor]:
        """Per level, ``[R, states]`` bool: the states (prefixes) under which some item is not banned in that row,
        for ``banned [R, N]`` (True: the row may not produce item i). One scatter per level, no loop over rows."""
        allowed_items = (~banned).to(torch.int32)
        out = []
        for states in self.item_states:
            n_states = int(states.max()) + 1
            counts = torch.zeros(len(banned), n_states, dtype=torch.int32, device=banned.device)
            counts.index_add_(1, states, allowed_items)
            out.append(counts > 0)
        return out

    def items(self, codes: torch.Tensor) -> torch.Tensor:
        """Item index of each full code ``[B, L]``; -1 for a code no item has."""
        state = self.walk(codes)
        return torch.where(state >= 0, self.item_of_leaf[state.clamp(min=0)], -1)

    def codes(self) -> list[tuple[int, ...]]:
        """Every code the trie admits (for tests and inspection; walks the tables)."""
        paths = [()]
        states = torch.zeros(1, dtype=torch.long)
        for table in self.transitions:
            rows, codes = (table[states] >= 0).nonzero(as_tuple=True)
            paths = [paths[r] + (c,) for r, c in zip(rows.tolist(), codes.tolist())]
            states = table[states][rows, codes]
        return paths


class TrieConstrainedLogitsProcessor(LogitsProcessor):
    """Allow only continuations of catalogue codes after a prompt of ``prompt_length`` tokens, then EOS; with
    ``banned`` items per prompt (a user's history under ``exclude_history``), only codes of the other items, so
    every beam ends on an item the ranking keeps.

    ``level_tokens [L, C]``: the token id of code k at level l; ``code_of_token [V]``: the code index a token stands
    for at its level (-1 for other tokens). Scores of disallowed tokens become -inf (added, as transformers' own
    constraint processors do).
    """

    def __init__(self, trie: CodeTrie, level_tokens: torch.Tensor, code_of_token: torch.Tensor, prompt_length: int,
                 eos_token_id: int, banned: torch.Tensor | None = None):
        self.trie, self.level_tokens, self.code_of_token = trie, level_tokens, code_of_token
        self.prompt_length, self.eos_token_id = prompt_length, eos_token_id
        # per prompt, the items it may not produce ([prompts, N] bool; the beams of prompt b are rows b*K .. b*K+K-1)
        self.open_states = trie.open_states(banned) if banned is not None else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        mask = torch.full_like(scores, float("-inf"))
        if step >= self.trie.levels:
            mask[:, self.eos_token_id] = 0.0
            return scores + mask
        prefixes = self.code_of_token[input_ids[:, self.prompt_length:]]
        open_states = None
        if self.open_states is not None:
            beams = len(input_ids) // len(self.open_states[0])
            open_states = [states.repeat_interleave(beams, 0) for states in self.open_states]
        allowed = self.trie.allowed(prefixes, open_states)
        columns = self.level_tokens[step].unsqueeze(0).expand_as(allowed)
        mask.scatter_(1, columns, torch.where(allowed, 0.0, float("-inf")).to(mask.dtype))
        # a beam whose prefix left the trie (impossible under this processor) may only end
        dead = ~allowed.any(1)
        mask[dead, self.eos_token_id] = 0.0
        return scores + mask


def reference_allowed_tokens_fn(codes: list[tuple[int, ...]], level_tokens: torch.Tensor, prompt_length: int,
                                eos_token_id: int):
    """The slow reference: a ``prefix_allowed_tokens_fn`` for transformers' ``PrefixConstrainedLogitsProcessor``
    over a dict trie, called once per beam and step (tests and the decoding benchmark compare against it)."""
    children: dict[tuple, set] = {}
    for code in codes:
        for depth in range(len(code)):
            children.setdefault(tuple(code[:depth]), set()).add(code[depth])
    code_of = {int(token): k for level in level_tokens.tolist() for k, token in enumerate(level)}
    levels = len(level_tokens)

    def allowed(batch_id: int, sentence: torch.Tensor) -> list[int]:
        generated = [code_of.get(int(t), -1) for t in sentence[prompt_length:]]
        if len(generated) >= levels:
            return [eos_token_id]
        following = children.get(tuple(generated), set())
        return [int(level_tokens[len(generated), k]) for k in sorted(following)] or [eos_token_id]

    return allowed
