"""Conversational recommendation with a trained ILM: a Python API and a terminal command.

ILM keeps its LLM frozen, so it still converses like the LLM it was built on; items and users enter a message as
soft tokens, and a recommendation request is answered with catalogue items by beam search constrained to their
titles, beside the free-text reply::

    from recbole_llm import load_model
    from recbole_llm.chat import chat

    config, model, *_ = load_model("saved/ILM-ml-100k-<fingerprint>/best", with_data=False)
    reply = chat(model, "Can you recommend a movie for me?", user="196")
    reply.text     # the LLM's own answer
    reply.items    # [(item token, title), ...]: the next items for user 196 (constrained decoding)
    reply = chat(model, "What is {item} about?", items=[reply.items[0][0]], history=reply.history)

In a message, ``{user}`` is the user's soft tokens, ``{history}`` those of the user's last training items and each
``{item}`` those of the next token of ``items``. ``history`` carries earlier turns (the chat template renders them;
their slots as the items' titles). A terminal conversation::

    python -m recbole_llm.chat saved/ILM-ml-100k-<fingerprint>/best --user 196
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass, field

import torch

from recbole_llm.errors import UsageError
from recbole_llm.llm.chat_format import chat_frame
from recbole_llm.llm.generation import sample_continuations
from recbole_llm.model.ilm import SlotBatch

RECOMMENDATION_REQUEST = re.compile(r"\b(recommend|suggest)", re.IGNORECASE)


@dataclass
class ChatReply:
    text: str
    items: list[tuple[str, str]] = field(default_factory=list)  # (item token, title), best first
    history: list[dict] = field(default_factory=list)  # the conversation so far, for the next call


def _internal_id(tokens: list[str], token, what: str) -> int:
    lookup = {str(t): i for i, t in enumerate(tokens)}
    if str(token) not in lookup or lookup[str(token)] == 0:
        raise UsageError(f"{what} {token!r} is not in the model's dataset ({len(tokens) - 1} {what}s, e.g. "
                         f"{', '.join(map(str, tokens[1:4]))}); pass a {what} id of its .inter file.")
    return lookup[str(token)]


@torch.no_grad()
def chat(model, message: str, *, user=None, items=(), history: list[dict] | None = None, k: int = 5,
         max_new_tokens: int = 96, recommend: bool | None = None) -> ChatReply:
    """Answer ``message`` (see the module docstring); ``recommend`` forces or skips the item list (default: when the
    message asks to recommend or suggest and a user is given)."""
    if not hasattr(model, "slot_embeddings"):
        raise UsageError(f"{type(model).__name__} does not converse: chat needs an ILM checkpoint.")
    history = list(history or [])
    user_id = _internal_id(model.user_tokens, user, "user") if user is not None else None
    item_ids = [_internal_id(model.item_tokens, item, "item") for item in items]
    needs = set(re.findall(r"\{(user|item|history)\}", message))
    if needs & {"user", "history"} and user_id is None:
        raise UsageError("the message has a {user} or {history} slot: pass user=...")
    if message.count("{item}") != len(item_ids):
        raise UsageError(f"the message has {message.count('{item}')} {{item}} slots and {len(item_ids)} items: "
                         "pass one item per slot")
    model.eval()
    turns = [{"role": t["role"], "content": t["content"]} for t in history]
    known = model.user_history(user_id) if user_id is not None else []
    prompt = model.render(model._split(message, chat_frame(model.tokenizer, turns)), user=user_id, items=item_ids,
                          history=known[-model.max_history_items:])
    batch = SlotBatch.build([prompt], model.pad, model.device, left=True)
    samples = sample_continuations(model.llm, batch.ids, batch.mask, num_samples=1, temperature=0.0,
                                   max_new_tokens=max_new_tokens, eos_token_id=model.eos,
                                   inputs_embeds=model.input_embeddings(batch))
    length = int(samples.lengths[0, 0])
    text = model.tokenizer.decode(samples.tokens[0, 0, :length], skip_special_tokens=True).strip()

    ranked = []
    wants_items = recommend if recommend is not None else bool(RECOMMENDATION_REQUEST.search(message))
    if wants_items and user_id is not None:
        found, _ = model.generate_titles([model.sequential_prompt(user_id, known)], beams=max(k, 1))
        ranked = [(str(model.item_tokens[i]), model.titles[i]) for i in found[0].tolist() if i > 0][:k]

    def spoken(content: str) -> str:  # the turn as text, its slots named
        names = iter(model.titles[i] for i in item_ids)
        content = re.sub(r"\{item\}", lambda _: next(names), content)
        return content.replace("{user}", f"user {user}").replace("{history}", "my recent items")

    answer = text + ("\n" + "\n".join(f"{n}. {title}" for n, (_, title) in enumerate(ranked, 1)) if ranked else "")
    history = history + [{"role": "user", "content": spoken(message)}, {"role": "assistant", "content": answer}]
    return ChatReply(text, ranked, history)


def main(argv=None) -> int:
    """``python -m recbole_llm.chat CHECKPOINT [--user USER] [--k 5]``: a conversation in the terminal."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m recbole_llm.chat", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="an ILM checkpoint directory, e.g. saved/ILM-ml-100k-<fingerprint>/best")
    parser.add_argument("--user", help="the user you speak as (an id of the dataset's .inter file)")
    parser.add_argument("--k", type=int, default=5, help="items listed for a recommendation request")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    try:
        from recbole_llm.quick_start import load_model

        _, model, *_ = load_model(args.checkpoint, with_data=False)
        if args.user is not None:
            _internal_id(model.user_tokens, args.user, "user")
        if not hasattr(model, "slot_embeddings"):
            raise UsageError(f"{args.checkpoint} holds a {type(model).__name__}; chat needs an ILM checkpoint.")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("Type a message ({user}, {history} are your soft tokens; 'quit' ends).", file=sys.stderr)
    history: list[dict] = []
    for line in sys.stdin:
        message = line.strip()
        if message.lower() in ("quit", "exit"):
            break
        if not message:
            continue
        try:
            reply = chat(model, message, user=args.user, history=history, k=args.k,
                         max_new_tokens=args.max_new_tokens)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        history = reply.history
        print(reply.text)
        for rank, (token, title) in enumerate(reply.items, 1):
            print(f"  {rank}. {title} (item {token})")
    return 0


class _CallableModule(types.ModuleType):
    """``recbole_llm.chat(model, message, ...)`` calls :func:`chat`, while ``python -m recbole_llm.chat`` stays this
    module's command."""

    def __call__(self, *args, **kwargs) -> ChatReply:
        return chat(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    raise SystemExit(main())
