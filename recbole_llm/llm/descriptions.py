"""Texts written by the LLM (RALLRec's item descriptions), batched, cached on disk and resumable.

Writing a description for every item is the slowest step before training (minutes on a GPU, tens of minutes on
a CPU), so it is never repeated and never lost: each finished batch is appended to ``<file>.partial`` (one JSON
line per text, flushed and synced), an interrupted run continues from the texts already written, and the file
gets its final name only when every text is in. The caller keys ``file`` by everything that shapes the texts
(:func:`generation_key`): the prompts themselves, the model, the precision it computes in and the decoding
settings, the batch size among them. Each text is sampled from its own generator, seeded by the decoding seed and
the text's key, and the batches are always the same ones (every prompt, sorted by length, cut in ``batch_size``
rows, whatever an earlier run wrote), so an interruption changes no text. The batch size is part of the key
because under reduced precision (bf16) a prompt's logits, and so what it samples, depend on the rows it is
computed with (measured on SmolLM2-135M under bf16 autocast: 5 of 24 texts of 32 tokens changed between batches
of 3 and of 8; none in fp32).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recbole_llm.locks import build_once
from recbole_llm.llm.generation import left_pad, row_seed, sample_continuations

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoding:
    """How the texts are sampled (RALLRec: temperature 0.8, top-p 0.9, at least 10 new tokens; METHODS.md §2.2),
    and how many prompts are computed together."""

    max_new_tokens: int = 160
    min_new_tokens: int = 10
    temperature: float = 0.8
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 8


def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """``user`` (and ``system``) in the tokenizer's chat template, ready for the assistant's turn; a tokenizer
    without a template gets ``system\\n\\nuser\\n``."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{system}\n\n" if system else "") + user + "\n"


def generation_key(model_id: str, prompts: list[str], decoding: Decoding) -> str:
    """Short hash of everything that shapes generated texts: the model (``model_id``: its content and the precision
    it computes in), every prompt, the decoding with its batch size and the recbole_llm version (the code that
    writes and cleans them)."""
    import recbole_llm

    payload = {"model": model_id, "decoding": asdict(decoding), "recbole_llm": recbole_llm.__version__}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for prompt in prompts:
        digest.update(b"\0" + prompt.encode())
    return digest.hexdigest()[:16]


def clean(text: str) -> str:
    """RALLRec's post-processing: no newlines, no double quotes, no quotes around the text, single spaces."""
    return " ".join(text.replace('"', " ").split()).strip("'")


def _read_partial(path: Path) -> dict[str, str]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the interruption: written again
                continue
            done[row["key"]] = row["text"]
    return done


def _read_complete(file: Path, keys: list[str]) -> list[str]:
    texts = {row["key"]: row["text"] for row in map(json.loads, file.read_text().splitlines())}
    return [texts[key] for key in keys]


def write_texts(llm, tokenizer, prompts: list[str], keys: list[str], file: Path, decoding: Decoding,
                progress: bool = True) -> list[str]:
    """The generated text of each prompt (in ``keys`` order), from ``file`` if it is complete, else generated,
    continuing from ``file.partial`` where an earlier run stopped. One process writes a file at a time
    (:func:`recbole_llm.locks.build_once`); another waits and reads what it wrote."""
    file = Path(file)
    build_once(file, file.is_file, lambda: _generate_into(llm, tokenizer, prompts, keys, file, decoding, progress),
               "item texts")
    return _read_complete(file, keys)


def text_batches(prompts: list[str], batch_size: int) -> list[list[int]]:
    """The batches every run computes (prompt indices): sorted by length (similar lengths per batch, less padding;
    ties in index order), cut in ``batch_size`` rows."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start: start + batch_size] for start in range(0, len(order), batch_size)]


def _generate_into(llm, tokenizer, prompts, keys, file: Path, decoding: Decoding, progress: bool) -> None:
    partial = file.with_name(file.name + ".partial")
    done = _read_partial(partial)
    # a batch an earlier run left incomplete (cut while it was written) is computed whole again, with its rows
    todo = [rows for rows in text_batches(prompts, decoding.batch_size) if any(keys[i] not in done for i in rows)]
    missing = sum(keys[i] not in done for rows in todo for i in rows)
    if done:
        logger.info("Resuming %s: %d of %d texts already written", partial, len(keys) - missing, len(keys))
    # minutes to hours on a CPU (an item's text is a sampled generation): say so even with progress bars off
    if todo:
        logger.info("Writing %d item texts of up to %d tokens into %s (batches of %d)", missing,
                    decoding.max_new_tokens, file, decoding.batch_size)
    file.parent.mkdir(parents=True, exist_ok=True)
    device = next(llm.parameters()).device
    was_training = llm.training
    llm.eval()
    try:
        with open(partial, "a") as out, torch.no_grad():
            for rows in tqdm(todo, desc="Writing texts", ncols=100, disable=not progress):
                ids, mask = left_pad(tokenizer([prompts[i] for i in rows], add_special_tokens=False).input_ids,
                                     tokenizer.pad_token_id, device)
                samples = sample_continuations(
                    llm, ids, mask, num_samples=1, temperature=decoding.temperature, top_p=decoding.top_p,
                    max_new_tokens=decoding.max_new_tokens,
                    min_new_tokens=min(decoding.min_new_tokens, decoding.max_new_tokens),
                    eos_token_id=tokenizer.eos_token_id, seeds=[row_seed(decoding.seed, keys[i]) for i in rows])
                for i, tokens, length in zip(rows, samples.tokens[:, 0], samples.lengths[:, 0].tolist()):
                    if keys[i] not in done:
                        done[keys[i]] = clean(tokenizer.decode(tokens[:length], skip_special_tokens=True))
                        out.write(json.dumps({"key": keys[i], "text": done[keys[i]]}) + "\n")
                out.flush()
                os.fsync(out.fileno())
    finally:
        llm.train(was_training)
    handle, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)  # a name of this process alone
    with os.fdopen(handle, "w") as out:
        out.write("".join(json.dumps({"key": key, "text": done[key]}) + "\n" for key in keys))
    os.replace(tmp, file)
    partial.unlink(missing_ok=True)
