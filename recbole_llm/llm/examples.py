"""Training examples for LLM recommenders: prompt + response token lists, batched, with loss on the response.

A method builds ``(tokens, targets)`` pairs (``targets`` 1 on the response tokens that carry loss), an epoch of
them becomes :class:`ExampleBatches` (length-bucketed to save padding), and :func:`response_token_losses` runs the
LM head only on the positions that predict a response token. :class:`recbole_llm.trainer.LLMTrainer` trains any
model that exposes ``epoch_batches(train_dataset, epoch)`` and ``batch_loss(batch)`` on such batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from recbole_llm.llm.generation import pad_sequences
from recbole_llm.llm.new_tokens import head_rows
from recbole_llm.llm.pooling import decoder_and_head


@dataclass
class TokenBatch:
    """Right-padded examples; ``targets`` marks the tokens predicted with loss."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def build(cls, examples: list[tuple[list[int], list[int]]], pad: int, device=None) -> "TokenBatch":
        ids, mask = pad_sequences([tokens for tokens, _ in examples], pad, device=device)
        targets, _ = pad_sequences([t for _, t in examples], 0, device=device)
        return cls(ids, mask, targets)

    def to(self, device):
        return TokenBatch(self.ids.to(device), self.mask.to(device), self.targets.to(device))


def example(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    """One training example: loss on the ``response`` tokens only."""
    return prompt + response, [0] * len(prompt) + [1] * len(response)


class ExampleBatches:
    """One epoch of examples as batches (a list-like for the trainer), lengths bucketed to save padding.

    An example is a tuple whose first element is its token list; ``build(examples, pad)`` makes a batch of them
    (:meth:`TokenBatch.build` for ``(tokens, targets)`` pairs)."""

    def __init__(self, examples: list[tuple], batch_size: int, pad: int, seed: int, build=TokenBatch.build):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(examples))
        bucket = batch_size * 32
        batches = []
        for start in range(0, len(order), bucket):
            chunk = sorted(order[start: start + bucket], key=lambda i: len(examples[i][0]))
            batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
        self.batches = [batches[i] for i in rng.permutation(len(batches))]
        self.examples, self.pad, self.build = examples, pad, build
        self.counts: dict[str, int] = {}

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for rows in self.batches:
            yield self.build([self.examples[i] for i in rows], self.pad)


def predicted_positions(batch) -> int:
    """How many positions of a batch (with ``targets``) go through the LM head in :func:`response_token_losses`."""
    return int(batch.targets[:, 1:].sum())


def response_token_losses(llm, batch: TokenBatch, inputs_embeds: torch.Tensor | None = None,
                          rows: range | None = None) -> torch.Tensor:
    """Cross-entropy of every response token (flattened, in order); the LM head runs on those positions only.
    ``inputs_embeds``: the batch's input embeddings, when soft tokens replace some of ``batch.ids``. ``rows``: a
    block of the vocabulary (SemConv's code tokens): a target inside it is scored by a softmax over the block's rows
    only, as constrained decoding chooses among them; every other target over the whole vocabulary."""
    decoder, lm_head = decoder_and_head(llm)
    prompt = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch.ids}
    hidden = decoder(**prompt, attention_mask=batch.mask).last_hidden_state
    predicts = batch.targets[:, 1:].bool()  # position t predicts token t + 1
    hidden, targets = hidden[:, :-1][predicts], batch.ids[:, 1:][predicts]
    if rows is None:
        return F.cross_entropy(at_least_fp32(lm_head(hidden)), targets, reduction="none")
    inside = (targets >= rows.start) & (targets < rows.stop)
    losses = hidden.new_zeros(len(targets), dtype=torch.promote_types(hidden.dtype, torch.float32))
    if not inside.all():
        losses[~inside] = F.cross_entropy(at_least_fp32(lm_head(hidden[~inside])), targets[~inside], reduction="none")
    if inside.any():
        block = F.linear(hidden[inside], head_rows(lm_head, rows).to(hidden.dtype))
        losses[inside] = F.cross_entropy(at_least_fp32(block), targets[inside] - rows.start, reduction="none")
    return losses


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits for a softmax: bf16 / fp16 ones in fp32, fp64 ones (exactness tests) kept."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
