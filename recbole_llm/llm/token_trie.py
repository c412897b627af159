"""Constrained decoding to a catalogue: a prefix trie of token sequences as tensors, and the beam-search constraint.

Every item is a token sequence ending in an end token (EOS): SemConv's fixed-length code tokens, ILM's and any
text method's variable-length titles. With the end token appended no item's sequence is a prefix of another's
("Heat" and "Heat (1995)" both stay reachable), and a beam that has written a whole item can only end.

The trie is stored as sorted edges: node ids are given level by level (the root is 0), each edge ``parent
--token--> child`` is keyed ``parent * V + token`` and the keys are sorted, so the children of a node are one
contiguous run (``first_edge[node] .. first_edge[node + 1]``) and stepping many beams is one ``searchsorted``.
Memory is a few integers per edge (about one edge per item token), whatever the vocabulary size: a 49k-token
vocabulary costs nothing per node, and SemConv's 256 codes per level cost no dense table.

:class:`TrieConstrainedLogitsProcessor` applies it inside beam search (ours or transformers' ``generate``): after
the prompt, only tokens that continue some item's sequence are allowed; a beam that finished its item (or left
the trie, which the constraint never lets happen) may only write EOS. transformers' ``PrefixConstrainedLogitsProcessor``
computes the same mask with a Python call per beam and step; :func:`reference_allowed_tokens_fn` feeds it the
same catalogue for the tests and the decoding benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor


class TokenTrie:
    """Prefix trie of the catalogue's token sequences; row i of ``sequences`` is item i (returned as index i)."""

    def __init__(self, sequences: Sequence[Sequence[int]], end_token: int):
        rows = [list(map(int, seq)) + [int(end_token)] for seq in sequences]
        if not rows:
            raise ValueError("the catalogue is empty: a trie needs at least one item")
        if any(len(row) < 2 for row in rows):
            raise ValueError("every item needs at least one token before the end token")
        if any(token < 0 for row in rows for token in row):
            raise ValueError("token ids must be >= 0")
        self.end_token = int(end_token)
        self.max_length = max(map(len, rows))  # tokens of the longest item, end token included
        self.vocab_bound = max(max(row) for row in rows) + 1
        padded = torch.full((len(rows), self.max_length), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = torch.tensor(row)
        if len(torch.unique(padded, dim=0)) != len(rows):
            raise ValueError("two items share a token sequence: make them distinct (a code collision, or two "
                             "identical titles) before building the trie")

        parents, tokens, children = [], [], []
        self.item_nodes = torch.full_like(padded, -1)  # [N, max_length]: node after each of an item's tokens
        node_of = torch.zeros(len(rows), dtype=torch.long)  # every item starts at the root
        n_nodes = 1
        for depth in range(self.max_length):
            alive = padded[:, depth] >= 0
            pairs = torch.stack([node_of[alive], padded[alive, depth]], dim=1)
            unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
            child = n_nodes + inverse
            parents.append(unique[:, 0])
            tokens.append(unique[:, 1])
            children.append(n_nodes + torch.arange(len(unique)))
            node_of = node_of.clone()
            node_of[alive] = child
            self.item_nodes[alive, depth] = child
            n_nodes += len(unique)
        self.n_nodes = n_nodes
        parent, token, child = torch.cat(parents), torch.cat(tokens), torch.cat(children)
        keys = parent * self.vocab_bound + token
        order = torch.argsort(keys)
        self.edge_keys, self.edge_tokens, self.edge_children = keys[order], token[order], child[order]
        self.first_edge = torch.searchsorted(parent[order], torch.arange(n_nodes + 1))  # [n_nodes + 1]
        self.end_nodes = node_of  # [N]: the node after item i's end token
        self.item_of_node = torch.full((n_nodes,), -1, dtype=torch.long)
        self.item_of_node[node_of] = torch.arange(len(rows))
        self.n_items = len(rows)

    def to(self, device) -> "TokenTrie":
        for name in ("item_nodes", "edge_keys", "edge_tokens", "edge_children", "first_edge", "end_nodes",
                     "item_of_node"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # ------------------------------------------------------------------------------------------------ walking
    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The node each of ``nodes [B]`` reaches by ``tokens [B]``; -1 where no item continues that way. An item's
        end node stays put on a further end token (finished beams are padded with EOS)."""
        valid = (nodes >= 0) & (tokens >= 0) & (tokens < self.vocab_bound)
        keys = nodes.clamp(min=0) * self.vocab_bound + tokens.clamp(0, self.vocab_bound - 1)
        index = torch.searchsorted(self.edge_keys, keys).clamp(max=len(self.edge_keys) - 1)
        found = valid & (self.edge_keys[index] == keys)
        finished = (nodes >= 0) & (self.item_of_node[nodes.clamp(min=0)] >= 0) & (tokens == self.end_token)
        return torch.where(found, self.edge_children[index], torch.where(finished, nodes, -1))

    def walk(self, generated: torch.Tensor) -> torch.Tensor:
        """Nodes reached from the root by the token rows ``generated [B, t]`` (-1 where a row left the trie)."""
        nodes = torch.zeros(len(generated), dtype=torch.long, device=generated.device)
        for column in generated.unbind(1):
            nodes = self.step(nodes, column)
        return nodes

    def allowed(self, nodes: torch.Tensor, vocab_size: int, open_nodes: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, vocab_size]`` bool: the tokens that continue an item from each of ``nodes [B]`` (none from -1 or
        an end node). With ``open_nodes [B, n_nodes]`` (:meth:`open_nodes`) only tokens towards an item that is
        not banned for that row."""
        safe = nodes.clamp(min=0)
        counts = torch.where(nodes >= 0, self.first_edge[safe + 1] - self.first_edge[safe], 0)
        rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), counts)
        starts = torch.repeat_interleave(self.first_edge[safe], counts)
        offsets = torch.arange(len(rows), device=nodes.device) - torch.repeat_interleave(counts.cumsum(0) - counts,
                                                                                         counts)
        edges = starts + offsets
        keep = torch.ones_like(rows, dtype=torch.bool)
        if open_nodes is not None:
            keep = open_nodes[rows, self.edge_children[edges]]
        mask = torch.zeros(len(nodes), vocab_size, dtype=torch.bool, device=nodes.device)
        mask[rows[keep], self.edge_tokens[edges[keep]]] = True
        return mask

    def open_nodes(self, banned: torch.Tensor) -> torch.Tensor:
        """``[R, n_nodes]`` bool: the nodes under which some item is not banned in that row, for ``banned [R, N]``
        (True: row r may not produce item i). One scatter over every (item, node) pair, no loop over rows."""
        present = self.item_nodes >= 0
        items = torch.arange(self.n_items, device=banned.device).unsqueeze(1).expand_as(self.item_nodes)[present]
        counts = torch.zeros(len(banned), self.n_nodes, dtype=torch.int32, device=banned.device)
        counts.index_add_(1, self.item_nodes[present], (~banned).to(torch.int32)[:, items])
        return counts > 0

    def items(self, generated: torch.Tensor) -> torch.Tensor:
        """Item index written by each token row ``generated [B, t]`` (with or without its end token, padded with
        EOS after it); -1 for a row that writes no whole item."""
        nodes = self.walk(generated)
        ended = self.step(nodes, torch.full_like(nodes, self.end_token))  # a row without its end token yet
        nodes = torch.where((nodes >= 0) & (self.item_of_node[nodes.clamp(min=0)] >= 0), nodes, ended)
        return torch.where(nodes >= 0, self.item_of_node[nodes.clamp(min=0)], -1)

    def sequences(self) -> list[tuple[int, ...]]:
        """Every token sequence the trie admits, end token included (for tests and inspection: walks the edges)."""
        paths = {0: ()}
        out = []
        frontier = [0]
        while frontier:
            following = []
            for node in frontier:
                for edge in range(int(self.first_edge[node]), int(self.first_edge[node + 1])):
                    child = int(self.edge_children[edge])
                    paths[child] = paths[node] + (int(self.edge_tokens[edge]),)
                    (out if int(self.item_of_node[child]) >= 0 else following).append(child)
            frontier = following
        return [paths[node] for node in out]


class TrieConstrainedLogitsProcessor(LogitsProcessor):
    """Allow only continuations of catalogue items after a prompt of ``prompt_length`` tokens, then EOS.

    With ``banned [prompts, N]`` (a user's history under ``exclude_history``) only tokens towards the other items,
    so every beam ends on an item the ranking keeps; the beams of prompt b are rows ``b*K .. b*K+K-1``. Scores of
    disallowed tokens become -inf (added, as transformers' own constraint processors do).
    """

    def __init__(self, trie: TokenTrie, prompt_length: int, eos_token_id: int, banned: torch.Tensor | None = None):
        self.trie, self.prompt_length, self.eos_token_id = trie, prompt_length, eos_token_id
        self.open_nodes = trie.open_nodes(banned) if banned is not None else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        nodes = self.trie.walk(input_ids[:, self.prompt_length:])
        open_nodes = None
        if self.open_nodes is not None:
            open_nodes = self.open_nodes.repeat_interleave(len(input_ids) // len(self.open_nodes), 0)
        allowed = self.trie.allowed(nodes, scores.shape[-1], open_nodes)
        dead = ~allowed.any(1)  # a finished item (or a prefix no item has): only EOS
        allowed[dead, self.eos_token_id] = True
        return scores.masked_fill(~allowed, float("-inf"))


def reference_allowed_tokens_fn(sequences: Sequence[Sequence[int]], prompt_length: int, eos_token_id: int):
    """The slow reference: a ``prefix_allowed_tokens_fn`` for transformers' ``PrefixConstrainedLogitsProcessor``
    over a dict trie of the same catalogue (each sequence followed by EOS), called once per beam and step."""
    children: dict[tuple, set] = {}
    for sequence in sequences:
        full = tuple(sequence) + (eos_token_id,)
        for depth in range(len(full)):
            children.setdefault(full[:depth], set()).add(full[depth])

    def allowed(batch_id: int, sentence: torch.Tensor) -> list[int]:
        generated = tuple(int(t) for t in sentence[prompt_length:])
        return sorted(children.get(generated, set())) or [eos_token_id]

    return allowed
