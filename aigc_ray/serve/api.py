"""The OpenAI wire format: request bodies, their checks, response and stream-chunk shapes, errors.

No Ray and no FastAPI routes here: the ingress deployment (`aigc_ray.serve.ingress`) calls
these.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from aigc_ray.decode import GenerationRequest

MAX_STOP_STRINGS = 4  # as OpenAI allows
MAX_CHOICES = 64  # prompts x n in one request; more belongs in batch generation


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 503: "overloaded_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    # Clients send fields we do not act on (user, logit_bias, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")

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


class CompletionRequest(Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(part.get("text", "") for part in self.content
                           if part.get("type") == "text")
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[ChatMessage]


def parse_body(raw: bytes, schema: type[BaseModel]):
    """JSON bytes → a validated request, or a 422 ApiError naming the first bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the request body must be a JSON object")
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
    if not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(400, f"max_tokens must be between 1 and {max_tokens_limit}, got "
                            f"{max_tokens}", param="max_tokens")
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
    return max_tokens


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_prompt_fits(prompt_tokens: int, max_tokens: int, context_length: int,
                      index: int | None = None) -> None:
    """400 when a prompt is empty or prompt + max_tokens exceeds the model's context."""
    which = "prompt" if index is None else f"prompt[{index}]"
    if prompt_tokens == 0:
        raise ApiError(400, f"{which} is empty; send at least one token of text", param="prompt")
    if prompt_tokens + max_tokens > context_length:
        raise ApiError(400, f"{which} has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                            f"{prompt_tokens + max_tokens} is more than the model's context of "
                            f"{context_length} tokens; shorten the prompt or lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")


def generation_requests(prompt_ids: list[list[int]], req: Sampling, max_tokens: int,
                        arrival_time: float) -> list[GenerationRequest]:
    """One GenerationRequest per choice, in OpenAI's order (prompt-major, then n)."""
    out = []
    for ids in prompt_ids:
        for j in range(req.n):
            # n choices of one seeded request must differ from each other yet repeat run to run.
            seed = None if req.seed is None else req.seed + j
            out.append(GenerationRequest(prompt_ids=ids, max_tokens=max_tokens,
                                         temperature=req.temperature, top_p=req.top_p,
                                         stop=stop_list(req.stop), seed=seed,
                                         arrival_time=arrival_time))
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(model: str, results: list[dict], prompt_tokens: int, chat: bool,
                        with_token_ids: bool) -> dict:
    """The non-streaming body for /v1/completions or /v1/chat/completions."""
    choices = []
    for index, result in enumerate(results):
        if chat:
            choice: dict[str, Any] = {"index": index, "message": {"role": "assistant",
                                                                 "content": result["text"]},
                                      "logprobs": None, "finish_reason": result["finish_reason"]}
        else:
            choice = {"index": index, "text": result["text"], "logprobs": None,
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
                 finish_reason: str | None, chat: bool, first: bool = False) -> dict:
    """One server-sent event's data for a streamed choice."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None,
                                  "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None,
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
