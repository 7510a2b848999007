"""Conversations: read them in the formats users have, render them with the model's chat
template, and label the turns the loss should learn.

One function turns messages into token ids (`chat_ids`), and training, `aigc-ray serve`'s chat
endpoint, `aigc-ray generate` and `aigc-ray eval` all call it, so the model is served exactly
as it was trained. Formats:

- openai:   {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
- sharegpt: {"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}
- alpaca:   {"instruction": "...", "input": "...", "output": "...", "system": "..."}

`data.chat_fields` renames any of those keys (e.g. {messages: dialog, role: speaker}).
"""

from __future__ import annotations

from aigc_ray.config import CHAT_FIELDS
from aigc_ray.tokenizer import IGNORE_INDEX, clean

ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
              "gpt": "assistant", "chatgpt": "assistant", "model": "assistant"}
CHAT_SKIP_REASONS = ("unknown_role", "no_assistant_turn", "conversation_too_long",
                     "template_mismatch")


def fields_of(chat_format: str, overrides: dict[str, str]) -> dict[str, str]:
    """The keys `chat_format` reads, with the user's renames applied."""
    fields = dict(CHAT_FIELDS[chat_format])
    fields.update({k: v for k, v in overrides.items() if k in fields})
    return fields


def detect_format(record: dict, overrides: dict[str, str]) -> str | None:
    """Which chat format a row is in, by the keys it has; None when none fits."""
    for chat_format in CHAT_FIELDS:
        fields = fields_of(chat_format, overrides)
        key = fields["instruction" if chat_format == "alpaca" else "messages"]
        if key in record:
            return chat_format
    return None


def _text(value) -> str | None:
    """A message's text: a string, or OpenAI content parts whose text parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    return None


def conversation(record: dict, chat_format: str, overrides: dict[str, str]) -> list | str:
    """The messages of a row as [{"role", "content"}], or a skip reason string.

    Roles become system/user/assistant; turns after the last assistant turn teach nothing and
    are dropped.
    """
    fields = fields_of(chat_format, overrides)
    if chat_format == "alpaca":
        texts = {}
        for name in ("instruction", "input", "output", "system"):
            value = record.get(fields[name])
            if value is None and name in ("input", "system"):
                continue
            if value is None:
                return "missing_field"
            if not isinstance(value, str):
                return "wrong_type"
            texts[name] = value
        if not texts["instruction"].strip() or not texts["output"].strip():
            return "empty_text"
        user = texts["instruction"]
        if texts.get("input", "").strip():
            user += "\n\n" + texts["input"]
        messages = [{"role": "system", "content": texts["system"]}] if texts.get("system") else []
        return messages + [{"role": "user", "content": user},
                           {"role": "assistant", "content": texts["output"]}]
    turns = record.get(fields["messages"])
    if turns is None:
        return "missing_field"
    messages = messages_of(turns, fields)
    if isinstance(messages, str):
        return messages
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return "no_assistant_turn" if last is None else messages[: last + 1]


def messages_of(turns, fields: dict[str, str] = CHAT_FIELDS["openai"]) -> list | str:
    """A list of turns as [{"role": system|user|assistant, "content"}], or a skip reason."""
    if not isinstance(turns, list):
        return "wrong_type"
    if not turns:
        return "empty_text"
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or fields["role"] not in turn or fields["content"] not in turn:
            return "wrong_type" if not isinstance(turn, dict) else "missing_field"
        role, content = turn[fields["role"]], _text(turn[fields["content"]])
        if not isinstance(role, str) or content is None:
            return "wrong_type"
        if role.lower() not in ROLE_NAMES:
            return "unknown_role"
        if not content.strip():
            return "empty_text"
        messages.append({"role": ROLE_NAMES[role.lower()], "content": content})
    return messages


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template, their text cleaned as
    the data pipeline cleans documents. Special tokens that appear inside message text are
    encoded as plain text, so a user cannot forge a turn."""
    messages = [{**m, "content": clean(m["content"])} for m in messages]
    return list(tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt,
        sanitize_control_tokens=True))


def labelled_conversation(tokenizer, messages: list[dict], train_on: str,
                          block_size: int) -> tuple[list[int], list[int], bool] | str:
    """(input ids, labels, whether it was cut) for one conversation, or a skip reason.

    Labels are -100 except on the turns the loss learns (`train_on`): every assistant reply
    with the tokens the template closes it with, only the last reply, or everything. Each
    reply's span comes from rendering the conversation up to it, so it holds for any template
    that renders a conversation's start the same way however it continues; one that does not
    is skipped as `template_mismatch`. A conversation longer than `block_size` is cut after
    the last reply that fits (never inside a turn); if none fits it is skipped.
    """
    ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
    spans = []  # [start, end) of each assistant reply in `ids`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = ids if i == len(messages) - 1 else chat_ids(tokenizer, messages[: i + 1], False)
        if ids[: len(before)] != before or ids[: len(through)] != through:
            return "template_mismatch"
        spans.append((len(before), len(through)))
    cut = len(ids) > block_size
    if cut:
        spans = [span for span in spans if span[1] <= block_size]
        if not spans:
            return "conversation_too_long"
        ids = ids[: spans[-1][1]]
    if train_on == "all":
        return ids, list(ids), cut
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans[-1:] if train_on == "last_assistant" else spans:
        labels[start:end] = ids[start:end]
    return ids, labels, cut
