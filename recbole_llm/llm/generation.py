"""Decoding several continuations per prompt from one shared prefill: temperature sampling and beam search.

``generate(num_return_sequences=N)`` and ``generate(num_beams=N)`` copy each prompt N times *before* the prefill,
so the prompt is encoded N times. Here the prompt batch is encoded once, its KV cache is repeated N times along
the batch, and only the new tokens are computed per sample or beam. The loops are explicit (no
``generation_config.json`` can change them) and return each sequence's log-probability under the model, which
CALRec's and SemConv's rankings need.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class Samples:
    tokens: torch.Tensor  # [B, N, T] generated ids; positions after EOS hold EOS
    lengths: torch.Tensor  # [B, N] generated tokens up to and including EOS
    log_probs: torch.Tensor  # [B, N] sum of log P(token | prefix) under the model (temperature 1)


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every sequence right-aligned (padding on the left), for generation."""
    return pad_sequences(sequences, pad_id, left=True, device=device)


def pad_sequences(sequences, pad_id: int, *, left: bool = False, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token lists padded to one width, on the right unless ``left``."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, span] = torch.tensor(seq)
            mask[row, span] = 1
    return ids.to(device), mask.to(device)


def row_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (say the run's seed and an item's key): stable across processes and batches."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` with every token outside the smallest set of probability mass >= ``top_p`` set to -inf (the
    most likely token always stays), as transformers' ``TopPLogitsWarper``."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, mass_before >= top_p)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample_continuations(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    eos_token_id: int,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    seeds: list[int] | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> Samples:
    """Draw ``num_samples`` continuations of each left-padded prompt in ``input_ids [B, L]``.

    ``temperature <= 0`` means greedy decoding (all samples then coincide). Sampling is Gumbel-max over the
    temperature-scaled logits (restricted to the ``top_p`` nucleus; EOS barred before ``min_new_tokens``), which
    draws exactly from that distribution. Prompt b draws its noise from its own generator seeded with
    ``seeds[b]`` (else the global torch generator), so what one prompt samples never depends on which other
    prompts share its batch, nor on how many batches ran before it. ``inputs_embeds``: the prompts' input
    embeddings, when soft tokens replace some of them.
    """
    batch = input_ids.shape[0]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    prompt = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
    out = model(**prompt, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(num_samples)
    logits = out.logits[:, -1].float().repeat_interleave(num_samples, 0)
    mask = attention_mask.repeat_interleave(num_samples, 0)
    position = position_ids[:, -1:].repeat_interleave(num_samples, 0)

    rows = batch * num_samples
    generators = None
    if seeds is not None:
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    lengths = torch.zeros(rows, dtype=torch.long, device=input_ids.device)
    log_probs = torch.zeros(rows, device=input_ids.device)
    generated = []
    for step in range(max_new_tokens):
        step_log_probs = torch.log_softmax(logits, dim=-1)
        scaled = logits / temperature if temperature > 0 else logits
        if step < min_new_tokens:
            scaled = scaled.index_fill(-1, torch.tensor([eos_token_id], device=scaled.device), float("-inf"))
        if temperature > 0:
            if top_p < 1.0:
                scaled = _nucleus(scaled, top_p)
            if generators is None:
                uniform = torch.rand(scaled.shape)
            else:
                uniform = torch.cat([torch.rand((num_samples, scaled.shape[-1]), generator=g) for g in generators])
            gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1 - 1e-7)))
            token = (scaled + gumbel.to(scaled.device)).argmax(-1)
        else:
            token = scaled.argmax(-1)
        token = torch.where(finished, torch.full_like(token, eos_token_id), token)
        log_probs += torch.where(finished, 0.0, step_log_probs.gather(1, token[:, None]).squeeze(1))
        lengths += (~finished).long()
        generated.append(token)
        finished |= token == eos_token_id
        if bool(finished.all()) or step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                    use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1].float()
    tokens = torch.stack(generated, dim=1).view(batch, num_samples, -1)
    return Samples(tokens, lengths.view(batch, num_samples), log_probs.view(batch, num_samples))


@dataclass
class Beams:
    tokens: torch.Tensor  # [B, K, T] the K best continuations of each prompt, best first
    scores: torch.Tensor  # [B, K] their log-probabilities (sum over tokens; -inf for a beam with no valid path)


@torch.no_grad()
def beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    logits_processor=None,
    eos_token_id: int | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> Beams:
    """Beam search of up to ``max_new_tokens`` tokens after each left-padded prompt, from one shared prefill.

    Standard beam search (keep the ``num_beams`` best partial sequences of each prompt at every step, scored by
    the sum of log-softmax over the whole vocabulary); ``logits_processor`` (a transformers ``LogitsProcessor``,
    called with the prompt plus the tokens so far, as ``generate`` calls it) may set scores to -inf to constrain
    the search. For fixed-length outputs it returns what ``generate(num_beams=K, num_return_sequences=K,
    length_penalty=0)`` returns (a test checks it), computing the prompt once instead of K times.

    Variable-length outputs (``eos_token_id``): a beam that wrote EOS is finished; it keeps its score and is padded
    with EOS while the others go on (each finished sequence scores its own log-probability, no length penalty),
    and the search stops once every beam is finished. A finished beam leaves the model's batch (its cache rows are
    dropped), so a short title costs its own steps only, not those of the longest title beside it.
    ``inputs_embeds [B, L, H]``: the prompt's input embeddings (soft tokens written over placeholder positions of
    ``input_ids``, which the processors still see).
    """
    batch, width = input_ids.shape
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    prompt = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
    out = model(**prompt, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    cache = out.cache
    step_scores = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
    beams = min(num_beams, step_scores.shape[-1])
    if logits_processor is not None:  # called on B*K rows, as generate calls it (processors may rely on that)
        expanded = logits_processor(input_ids.repeat_interleave(beams, 0), step_scores.repeat_interleave(beams, 0))
        step_scores = expanded.view(batch, beams, -1)[:, 0]
    scores, token = step_scores.topk(beams, dim=-1)  # [B, K]: K different first tokens
    cache.batch_repeat_interleave(beams)
    running = torch.cat([input_ids.repeat_interleave(beams, 0), token.reshape(-1, 1)], dim=1)
    mask = attention_mask.repeat_interleave(beams, 0)
    position = position_ids[:, -1:].repeat_interleave(beams, 0)
    offsets = (torch.arange(batch, device=input_ids.device) * beams).unsqueeze(1)
    rows = batch * beams
    live = _unfinished(running, eos_token_id)  # the rows the cache holds, in row order
    if len(live) < rows:
        cache.reorder_cache(live)
    for _ in range(max_new_tokens - 1):
        if len(live) == 0:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=running[live, -1:], attention_mask=mask[live], position_ids=position[live],
                    cache=cache, use_cache=True)
        cache = out.cache
        live_scores = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [live, V]
        vocab = live_scores.shape[-1]
        step_scores = live_scores.new_zeros((rows, vocab))  # finished rows: overwritten below
        step_scores[live] = live_scores
        if logits_processor is not None:
            step_scores = logits_processor(running, step_scores)
        finished = torch.ones(rows, dtype=torch.bool, device=running.device)
        finished[live] = False
        if bool(finished.any()):  # a finished beam continues with EOS at no cost, and only with EOS
            padding = torch.full_like(live_scores[0], float("-inf"))
            padding[eos_token_id] = 0.0
            step_scores = torch.where(finished.unsqueeze(1), padding, step_scores)
        candidates = (scores.reshape(-1, 1) + step_scores).view(batch, beams * vocab)
        scores, flat = candidates.topk(beams, dim=-1)  # [B, K]
        origin = (offsets + torch.div(flat, vocab, rounding_mode="floor")).reshape(-1)
        running = torch.cat([running[origin], (flat % vocab).reshape(-1, 1)], dim=1)
        cache_row = torch.full((rows,), -1, dtype=torch.long, device=running.device)
        cache_row[live] = torch.arange(len(live), device=running.device)
        live = _unfinished(running, eos_token_id)
        cache.reorder_cache(cache_row[origin[live]])
    return Beams(running[:, width:].view(batch, beams, -1), scores)


def _unfinished(running: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Indices of the rows whose last token is not EOS (every row without an EOS)."""
    if eos_token_id is None:
        return torch.arange(len(running), device=running.device)
    return (running[:, -1] != eos_token_id).nonzero().squeeze(1)
