"""The OpenAI wire format: request bodies, their checks, response and stream-chunk shapes, errors.

No Ray and no FastAPI routes here: the ingress deployment (`aigc_ray.serve.ingress`) calls
these.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from aigc_ray.decode.request import GenerationRequest, TokenLogprob

# Stop strings per request. OpenAI allows 4, vLLM any number; lm-evaluation-harness sends a
# task's `until` list plus the EOS text, often 5 or more. Each costs a search per step.
MAX_STOP_STRINGS = 16
MAX_CHOICES = 64  # prompts x n in one request; more belongs in batch generation
MAX_LOGPROBS = 20  # top alternatives per token: OpenAI's chat limit, vLLM's default max_logprobs
# Levels of arrays and objects a body may nest. OpenAI's requests go about 6 deep (messages[].
# content[].image_url.url); deeper is an attack on the parser, not a request.
MAX_NESTING = 32

# Which body fields a request may carry. A field is honoured (declared on the request models
# below), describes the caller without changing the output (IGNORED), or is refused with a 400
# naming it: never dropped silently, because a client that asked for JSON, tools or a bias and
# got plain text would not know. A field that is null, an empty list or an empty object counts
# as not sent (SDKs send explicit nulls and empty defaults), and so do the values in NO_OP, which
# ask for exactly what we do anyway. The official openai client sends only what its caller set.
IGNORED = {"user", "metadata"}
NO_OP = {
    "response_format": [{"type": "text"}],
    "tool_choice": ["none"],
    "function_call": ["none"],
    "best_of": [1],
    "suffix": [""],
    "store": [False],
    "modalities": [["text"]],
    "service_tier": ["auto", "default"],
    "stream_options.include_obfuscation": [False, True],  # only pads chunks; harmless
}
# OpenAI fields we know and do not implement; the error says so rather than "unknown".
UNSUPPORTED = {
    "response_format": "constrained decoding (JSON mode, JSON schema) is not implemented; "
                       "only type 'text' is served",
    "tools": "tool calling is not implemented", "tool_choice": "tool calling is not implemented",
    "parallel_tool_calls": "tool calling is not implemented",
    "functions": "function calling is not implemented",
    "function_call": "function calling is not implemented",
    "logit_bias": "logit_bias is not implemented",
    "best_of": "best_of above 1 is not implemented; use n",
    "suffix": "suffix (insertion) is not implemented",
    "store": "stored completions are not implemented",
    "audio": "audio output is not implemented", "modalities": "only text output is served",
    "prediction": "predicted outputs are not implemented",
    "reasoning_effort": "this is not a reasoning model",
    "web_search_options": "web search is not implemented",
    "service_tier": "service tiers are not implemented",
}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error",
             422: "invalid_request_error", 503: "overloaded_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def _not_sent(value) -> bool:
    return value is None or value == [] or value == {}


def _no_op(name: str, value) -> bool:
    # Type and value: `true` is not the 1 of best_of, nor `0` the false of store.
    return any(type(value) is type(v) and value == v for v in NO_OP.get(name, ()))


def check_fields(data: dict, schema: type[BaseModel], where: str = "",
                 unknown: str = "it is not a field this endpoint knows") -> dict:
    """The body (or a nested object at `where`) without the fields that change nothing
    (IGNORED, NO_OP, not sent); a 400 naming the first field we would otherwise drop."""
    kept = {}
    for name, value in data.items():
        key = f"{where}{name}"
        if name in schema.model_fields:
            if value is not None:  # null: the default, as OpenAI reads it
                kept[name] = value
        elif _not_sent(value) or (not where and name in IGNORED) or _no_op(key, value):
            continue
        elif key in UNSUPPORTED:
            raise ApiError(400, f"{key} is not supported: {UNSUPPORTED[key]}; remove it",
                           param=key, code="unsupported_parameter")
        else:
            raise ApiError(400, f"{key} is not supported: {unknown}; remove it", param=key,
                           code="unknown_parameter")
    return kept


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    # Every field is declared: `check_fields` has refused or removed any other by now.
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name chat clients send
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False  # extension: each choice also carries its token ids
    # vLLM's sampling extensions, same names and meanings.
    top_k: int = 0  # 0 or -1: off
    min_tokens: int = 0
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    # OpenAI's.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def top_logprobs_asked(self) -> int | None:
        """None: no logprobs; n: each token's logprob and the n likeliest alternatives."""
        return None


class CompletionRequest(Sampling):
    # Text, texts, token ids, or lists of token ids (as OpenAI's and vLLM's completions take:
    # lm-evaluation-harness scores with token ids, so token boundaries stay exactly its own).
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: int | None = None  # OpenAI completions: the n likeliest per token (0: only its own)
    echo: bool = False  # the prompt comes back in front of the completion (max_tokens 0: alone)

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list: of texts or of token-id lists."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    @property
    def indexed(self) -> bool:
        """Whether the prompt is a list of prompts (errors then name prompt[i])."""
        return bool(isinstance(self.prompt, list) and self.prompt
                    and isinstance(self.prompt[0], (str, list)))

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones pass check_messages
            return "".join(part.get("text", "") for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False  # OpenAI chat: each token's logprob...
    top_logprobs: int | None = None  # ...and the n likeliest alternatives

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def check_messages(messages):
    """The messages without fields that change nothing; fields or content parts the template
    would never see get a 400 naming them."""
    if not isinstance(messages, list):
        return messages  # the schema's own error (422) names it
    kept = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            kept.append(message)
            continue
        message = check_fields(message, ChatMessage, where=f"messages[{i}].", unknown=(
            "the chat template is given each message's role and content only"))
        kept.append(message)
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}] is a {kind!r} part; this model "
                                    "reads text parts only", param=f"messages[{i}].content",
                               code="unsupported_parameter")
    return kept


def _child(where: str, key) -> str:
    return f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key


def check_values(data) -> None:
    """A 400 naming the first value that no field can hold, wherever it is: a number that is
    not finite (Python's JSON parser reads NaN, Infinity and 1e999, and one such value in a
    sampling field once failed every request batched with it), text that is not Unicode (a
    lone surrogate such as "\\ud800", which the tokenizer cannot take), or nesting deeper
    than MAX_NESTING. A loop, not recursion: the body is the attacker's."""
    stack = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ApiError(400, f"{where or 'the body'} must be a finite number, got "
                                f"{json.dumps(value)}", param=where or None, code="invalid_value")
        if isinstance(value, str):
            _check_text(value, where)
            continue
        if depth >= MAX_NESTING and isinstance(value, (dict, list)):
            shown = where if len(where) <= 60 else where[:60] + "..."
            raise ApiError(400, f"the request body nests deeper than {MAX_NESTING} levels (at "
                                f"{shown})", param=where.split("[")[0].split(".")[0],
                           code="invalid_value")
        if isinstance(value, dict):
            for key in value:
                _check_text(key, where)
            children = list(value.items())
        elif isinstance(value, list):
            children = list(enumerate(value))
        else:
            continue
        # Reversed onto the stack: the first bad value in the body is the one reported.
        stack += [(item, _child(where, key), depth + 1) for key, item in reversed(children)]


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{where or 'a key'} is not valid Unicode text (a lone surrogate, "
                            f"{text[exc.start]!r}, at character {exc.start})",
                       param=where or None, code="invalid_value") from None


def parse_body(raw: bytes, schema: type[BaseModel]):
    """JSON bytes → a validated request; 422 naming the first malformed field, 400 naming the
    first value no field can hold (`check_values`) or the first field this server does not
    implement (`check_fields`)."""
    try:
        data = json.loads(raw)
    except RecursionError:  # the parser's own recursion, for bodies nested thousands deep
        raise ApiError(400, f"the request body nests deeper than {MAX_NESTING} levels",
                       code="invalid_value") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the request body must be a JSON object")
    check_values(data)
    data = check_fields(data, schema)
    if isinstance(data.get("stream_options"), dict):
        data["stream_options"] = check_fields(data["stream_options"], StreamOptions,
                                              where="stream_options.")
    if schema is ChatRequest and "messages" in data:
        data["messages"] = check_messages(data["messages"])
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        raise ApiError(422, f"{where}: {error['msg']}", param=where) from None


def check_sampling(req: Sampling, default_max_tokens: int, max_tokens_limit: int) -> int:
    """Range checks a user can fix (400); returns the max_tokens to use."""
    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    scoring = max_tokens == 0 and getattr(req, "echo", False)  # the prompt's logprobs alone
    if not (1 <= max_tokens <= max_tokens_limit or scoring):
        raise ApiError(400, f"max_tokens must be between 1 and {max_tokens_limit}, got "
                            f"{max_tokens}" + (" (0 only with echo: true, to score the prompt)"
                                               if max_tokens == 0 else ""), param="max_tokens")
    if not 0 <= req.temperature <= 2:
        raise ApiError(400, f"temperature must be between 0 and 2, got {req.temperature}",
                       param="temperature")
    if not 0 < req.top_p <= 1:
        raise ApiError(400, f"top_p must be > 0 and <= 1, got {req.top_p}", param="top_p")
    if not 1 <= req.n <= MAX_CHOICES:
        raise ApiError(400, f"n must be between 1 and {MAX_CHOICES}, got {req.n}", param="n")
    stops = stop_list(req.stop)
    if len(stops) > MAX_STOP_STRINGS or any(s == "" for s in stops):
        raise ApiError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings",
                       param="stop")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(req, name) <= 2:
            raise ApiError(400, f"{name} must be between -2 and 2, got {getattr(req, name)}",
                           param=name)
    if not req.repetition_penalty > 0:
        raise ApiError(400, f"repetition_penalty must be > 0 (1: off), got "
                            f"{req.repetition_penalty}", param="repetition_penalty")
    if req.top_k < -1:
        raise ApiError(400, f"top_k must be -1 or 0 (off) or a positive count, got {req.top_k}",
                       param="top_k")
    if not 0 <= req.min_tokens <= max_tokens:
        raise ApiError(400, f"min_tokens must be between 0 and max_tokens ({max_tokens}), got "
                            f"{req.min_tokens}", param="min_tokens")
    check_logprobs(req)
    return max_tokens


def check_logprobs(req: Sampling) -> None:
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        name, asked = "top_logprobs", req.top_logprobs or 0
    else:
        name, asked = "logprobs", req.top_logprobs_asked() or 0
    if not 0 <= asked <= MAX_LOGPROBS:
        raise ApiError(400, f"{name} must be between 0 and {MAX_LOGPROBS}, got {asked}",
                       param=name)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_token_ids(ids: list[int], vocab_size: int, index: int | None = None) -> None:
    """400 when a token-id prompt holds an id the model's embedding cannot take."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        which = "prompt" if index is None else f"prompt[{index}]"
        raise ApiError(400, f"{which} holds token id {bad}, outside the model's vocabulary (0 to "
                            f"{vocab_size - 1})", param="prompt", code="invalid_value")


def check_prompt_fits(prompt_tokens: int, max_tokens: int, context_length: int,
                      index: int | None = None) -> None:
    """400 when a prompt is empty or prompt + max_tokens exceeds the model's context."""
    which = "prompt" if index is None else f"prompt[{index}]"
    if prompt_tokens == 0:
        raise ApiError(400, f"{which} is empty; send at least one token", param="prompt")
    if prompt_tokens + max_tokens > context_length:
        raise ApiError(400, f"{which} has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                            f"{prompt_tokens + max_tokens} is more than the model's context of "
                            f"{context_length} tokens; shorten the prompt or lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")


def generation_requests(prompt_ids: list[list[int]], req: Sampling, max_tokens: int,
                        arrival_time: float) -> list[GenerationRequest]:
    """One GenerationRequest per choice, in OpenAI's order (prompt-major, then n)."""
    out = []
    asked = req.top_logprobs_asked()
    # Echo: the prompt's logprobs too; max_tokens 0 (scoring) always computes them, as the
    # decoder asks (the response still shows them only when `logprobs` asked).
    prompt_logprobs = None if not getattr(req, "echo", False) else (
        asked if asked is not None or max_tokens > 0 else 0)
    for ids in prompt_ids:
        for j in range(req.n):
            # n choices of one seeded request must differ from each other yet repeat run to run.
            seed = None if req.seed is None else req.seed + j
            out.append(GenerationRequest(
                prompt_ids=ids, max_tokens=max_tokens, temperature=req.temperature,
                top_p=req.top_p, stop=stop_list(req.stop), seed=seed, arrival_time=arrival_time,
                top_k=max(0, req.top_k), presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos, logprobs=asked, prompt_logprobs=prompt_logprobs))
    return out


# ---------------------------------------------------------------------------------------------
# Logprobs in OpenAI's two shapes. The replica sends token ids and numbers; the text is made here.


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character → byte: printable bytes stand for
    themselves, the rest for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable},
            **{chr(256 + i): b for i, b in enumerate(others)}}


class TokenStrings:
    """How logprobs show tokens, as OpenAI does: a token's text, or `bytes:\\xe2\\x80` when it
    holds only part of a character; `bytes` are the token's own UTF-8 bytes (byte-level BPE
    tokens map back exactly; SentencePiece pieces through their byte and space markers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        probe = tokenizer.convert_ids_to_tokens(tokenizer(" a", add_special_tokens=False)
                                                ["input_ids"])
        self.byte_level = any(p.startswith("\u0120") for p in probe)  # Ġ: GPT-2's space
        self.byte_of = _byte_level_alphabet() if self.byte_level else {}
        self.cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        """(the token as shown, its bytes)."""
        if token_id not in self.cache:
            self.cache[token_id] = self._make(token_id)
        return self.cache[token_id]

    def _make(self, token_id: int) -> tuple[str, bytes]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self.special or piece is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            return text, text.encode()
        if self.byte_level and all(c in self.byte_of for c in piece):
            raw = bytes(self.byte_of[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            raw = bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        else:
            raw = piece.replace("\u2581", " ").encode()  # SentencePiece's space marker
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:  # part of a character
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    def text_bytes(self, token_id: int) -> bytes:
        """What the token adds to the completion's text (special tokens add nothing)."""
        return b"" if token_id in self.special else self(token_id)[1]


def completion_logprobs(strings: TokenStrings, entries: list[tuple], offset: int) -> dict:
    """OpenAI completions' `logprobs` of (entry, token id) pairs: tokens, token_logprobs,
    top_logprobs, text_offset (the character where each token starts in the choice's text,
    counting from `offset`)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    so_far = b""
    for entry, token_id in entries:
        out["tokens"].append(strings(token_id)[0])
        # A token that starts inside a character points at that character.
        out["text_offset"].append(offset + len(so_far.decode("utf-8", errors="ignore")))
        so_far += strings.text_bytes(token_id)
        if entry is None:  # the prompt's first token: nothing came before it
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry.logprob)
        out["top_logprobs"].append({strings(t)[0]: lp for t, lp in entry.top})
    return out


def chat_logprobs(strings: TokenStrings, entries: list[TokenLogprob]) -> dict:
    """OpenAI chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def one(token_id: int, logprob: float) -> dict:
        text, raw = strings(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(e.token_id, e.logprob),
                         "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries],
            "refusal": None}


def prompt_entries(prompt_ids: list[int], prompt_logprobs) -> list[tuple]:
    """(entry, token id) pairs for an echoed prompt; entries None where not computed."""
    lps = prompt_logprobs or [None] * len(prompt_ids)
    return list(zip(lps, prompt_ids))


def choice_logprobs(strings: TokenStrings, logprobs: list[TokenLogprob] | None, prompt_logprobs,
                    chat: bool, echo_ids: list[int] | None = None, offset: int = 0
                    ) -> dict | None:
    """A choice's (or stream chunk's) `logprobs` object, or None when none were asked for;
    `echo_ids`: the echoed prompt, whose tokens come first (completions)."""
    if logprobs is None:
        return None
    if chat:
        return chat_logprobs(strings, logprobs)
    pairs = [] if echo_ids is None else prompt_entries(echo_ids, prompt_logprobs)
    pairs += [(e, e.token_id) for e in logprobs]
    return completion_logprobs(strings, pairs, offset)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(model: str, results: list[dict], prompt_tokens: int, chat: bool,
                        with_token_ids: bool, strings: TokenStrings | None = None,
                        echo: list[tuple[str, list[int]]] | None = None) -> dict:
    """The non-streaming body for /v1/completions or /v1/chat/completions. `echo`: per choice,
    the prompt's (text, ids) to put in front of its completion."""
    choices = []
    for index, result in enumerate(results):
        echo_text, echo_ids = echo[index] if echo else ("", None)
        logprobs = choice_logprobs(strings, result.get("logprobs"),
                                   result.get("prompt_logprobs"), chat, echo_ids)
        if chat:
            choice: dict[str, Any] = {"index": index, "message": {"role": "assistant",
                                                                 "content": result["text"]},
                                      "logprobs": logprobs,
                                      "finish_reason": result["finish_reason"]}
        else:
            choice = {"index": index, "text": echo_text + result["text"], "logprobs": logprobs,
                      "finish_reason": result["finish_reason"]}
        if with_token_ids:
            choice["token_ids"] = result["token_ids"]
        choices.append(choice)
    completion_tokens = sum(r["completion_tokens"] for r in results)
    return {"id": new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(response_id: str, model: str, index: int, text: str | None,
                 finish_reason: str | None, chat: bool, first: bool = False,
                 logprobs: dict | None = None) -> dict:
    """One server-sent event's data for a streamed choice."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs,
                  "finish_reason": finish_reason}
    return {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(response_id: str, model: str, prompt_tokens: int, completion_tokens: int,
                chat: bool) -> dict:
    """The last chunk when `stream_options.include_usage` is set: no choices, only usage."""
    return {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict | str) -> bytes:
    """A server-sent event line pair."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
