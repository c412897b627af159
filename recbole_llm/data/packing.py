"""Every next-item target of a user in one causal pass: overlapping windows over the user's item sequence.

A generative recommender trained on "every prefix -> next item" examples pays for the prefix again with each
target: O(n^2) tokens for a user with n items. Under a causal mask, one pass over ``head + item_1 + ... + item_n``
already predicts every item from everything before it, so the loss on each item's tokens in that pass equals the
per-prefix example's loss (same tokens, same positions). Long sequences are cut into windows of ``window`` items
that overlap by ``context`` items, so a target near a window's start still reads at least ``context`` earlier
items; each target is trained exactly once per pass over the windows, at about ``window / (window - context)``
item costs per target.

These functions work on token lists and know nothing of any method: SemConv packs 4-token codes; a text method
(CALRec's item texts) can pack its items the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    start: int  # first item of the window
    end: int  # one past its last item
    first_target: int  # first item whose tokens carry loss (earlier ones are context only)


def sequence_windows(length: int, window: int, context: int, first: int = 1) -> list[Window]:
    """Windows over items ``0 .. length-1`` in which every item from position ``first`` (>= 1) on is a target
    exactly once.

    Each window starts ``context`` items before its first target, the first window at least one item before it
    (item 0 has no history, so it is never a target; with ``first`` 1 the first window starts at item 0).
    """
    if not 0 <= context < window:
        raise ValueError(f"window context ({context}) must be >= 0 and below the window size ({window})")
    windows = []
    first_target = max(first, 1)
    start = min(max(first_target - context, 0), first_target - 1)
    while first_target < length:
        end = min(start + window, length)
        windows.append(Window(start, end, first_target))
        first_target = end
        start = end - context
    return windows


def pack_window(head: Sequence[int], items: Sequence[Sequence[int]], window: Window) -> tuple[list[int], list[int]]:
    """``(tokens, targets)`` of one window: ``head`` then the items' tokens; ``targets[i]`` is 1 where token ``i``
    is predicted with loss (the tokens of items ``first_target .. end-1``)."""
    tokens, targets = list(head), [0] * len(head)
    for position in range(window.start, window.end):
        tokens += items[position]
        targets += [int(position >= window.first_target)] * len(items[position])
    return tokens, targets


def prefix_example(head: Sequence[int], items: Sequence[Sequence[int]], target: int) -> tuple[list[int], list[int]]:
    """The per-prefix example of item ``target`` (history = every earlier item): what a packed window replaces."""
    return pack_window(head, items, Window(0, target + 1, target))
