"""The text around a user message in a model's chat format, so that prompts can be assembled from token pieces.

Prompts with soft-token slots cannot go through ``apply_chat_template(tokenize=True)`` whole: the slots are no
text. :func:`chat_frame` renders the template once around a sentinel and returns the text before and after the
new message's content; a caller tokenizes ``before + text``, its slots and ``text + after`` piece by piece, the
same way in training and at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

SENTINEL = "\u2063RECBOLE_LLM_MESSAGE\u2063"


def chat_frame(tokenizer, turns: Sequence[dict] = ()) -> tuple[str, str]:
    """``(before, after)``: the conversation ``turns`` (``{"role", "content"}`` dicts, oldest first) and a new user
    message, rendered by the tokenizer's chat template with the assistant's generation prompt; a tokenizer without
    a template gets a plain ``User: ...`` / ``Assistant:`` form."""
    messages = [*turns, {"role": "user", "content": SENTINEL}]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        rendered = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    before, found, after = rendered.partition(SENTINEL)
    if not found:
        raise ValueError("the tokenizer's chat template dropped the user message; pass a template that renders it")
    return before, after
