"""The HTTP face of the Serve app: a FastAPI ingress deployment that checks the API key and the
request body, tokenizes, fans the choices out to the `GenerationReplica` deployment
(`aigc_ray.serve.replica`) and streams their chunks back as server-sent events.

It is light and runs on 0 CPUs; the replicas hold the cores and scale with load. Between the two
a DeploymentHandle queues up to `serve.max_queued_requests`; past that a request gets a 503.

Every error it sends, a bug's 500 included, is in OpenAI's shape (`ApiError.body`): clients
parse the body of every failed request, and a plain-text 500 broke them.
"""

# No `from __future__ import annotations` here: Serve ships the ingress class to replicas by
# value, and FastAPI must still see `Request` as a class, not a string it cannot resolve there.
import asyncio
import hashlib
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc_ray.data.chat import chat_ids
from aigc_ray.decode.request import RequestError, RowFailed
from aigc_ray.serve.api import (
    MAX_CHOICES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    TokenStrings,
    check_prompt_fits,
    check_sampling,
    check_token_ids,
    choice_logprobs,
    completion_response,
    generation_requests,
    new_id,
    parse_body,
    sse,
    stream_chunk,
    usage_chunk,
)
from aigc_ray.tokenizer import context_length

# Requests the ingress holds at once: it only awaits replicas, so far more than they batch.
INGRESS_MAX_ONGOING = 1000
# The context assumed for a model that states none (no position table, no tokenizer limit):
# clients must still be told a max_model_len, and a prompt must be checked against something.
ASSUMED_CONTEXT_LENGTH = 2048

fastapi_app = FastAPI(title="aigc-ray", docs_url=None, redoc_url=None, openapi_url=None)
logger = logging.getLogger("ray.serve")


@fastapi_app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods answer in the same error shape as everything else.
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    return JSONResponse(error.body(), status_code=exc.status_code)


@fastapi_app.exception_handler(Exception)
async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug: the client learns its kind and where to look, not the traceback (that goes to
    # the ingress's log, where Serve keeps it).
    logger.exception("unhandled error serving %s %s", request.method, request.url.path)
    error = ApiError(500, f"internal error ({type(exc).__name__}); the server's log has the "
                          "details", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


def replica_error(exc: BaseException) -> ApiError:
    """What a replica raised, as the caller's error: the decoder's refusal is a 400 naming
    it, a failure of this request alone or of its batch a 500 naming the cause."""
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    lines = str(cause).strip().splitlines()
    text = lines[0][:200] if lines else type(cause).__name__
    if isinstance(cause, RequestError):
        return ApiError(400, text, code="invalid_value")
    if isinstance(cause, RowFailed):
        return ApiError(500, f"generation failed for this request: {text}",
                        code="generation_failed")
    return ApiError(500, f"generation failed: {type(cause).__name__}: {text}",
                    code="generation_failed")


def key_digest(key: str) -> str:
    """What the ingress holds instead of the API key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def overloaded(retry_after_s: int) -> ApiError:
    return ApiError(503, "the server is at capacity; retry after the Retry-After seconds",
                    code="overloaded", headers={"Retry-After": str(retry_after_s)})


@serve.deployment(name="OpenAIIngress")
@serve.ingress(fastapi_app)
class OpenAIIngress:
    """The HTTP face: checks and tokenizes requests, fans choices out to `GenerationReplica`s."""

    def __init__(self, replicas, checkpoint: str, serve_section: dict, model_name: str,
                 trust_remote_code: bool = False, api_key_sha256: str | None = None):
        from transformers import AutoConfig

        from aigc_ray.config import Serve
        from aigc_ray.tokenizer import load_tokenizer

        self.cfg = Serve.model_validate(serve_section)
        self.replicas = replicas  # a DeploymentHandle to the GenerationReplica deployment
        self.model_name = model_name
        self.tokenizer = load_tokenizer(checkpoint, trust_remote_code)
        self.token_strings = TokenStrings(self.tokenizer)  # tokens as logprobs show them
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
        self.context_length = context_length(config, self.tokenizer) or ASSUMED_CONTEXT_LENGTH
        # Token-id prompts are checked against it here, so the error can name prompt[i].
        self.vocab_size = getattr(config, "vocab_size", None) or len(self.tokenizer)
        self.api_key_sha256 = api_key_sha256  # None: no key asked for (see build_app)

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict:
        """Ready when a replica's decode loop beats. Anyone may call this as often as they
        like, so it generates nothing: the replica answers from its loop's heartbeat
        (`GenerationReplica.health`), and nothing about the process (no pid) goes out."""
        async def health():
            return await self.replicas.health.remote()

        retry = {"Retry-After": str(self.cfg.retry_after_s)}
        try:
            info = await asyncio.wait_for(health(), timeout=self.cfg.health_check_timeout_s)
        except Exception as exc:
            raise ApiError(503, f"no model replica answered ({type(exc).__name__})",
                           headers=retry) from None
        if info["trouble"] is not None:
            raise ApiError(503, f"the model replica cannot serve: {info['trouble']}",
                           headers=retry)
        return {"status": "ok", "model": self.model_name}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "aigc-ray",
            "max_model_len": self.context_length}]}

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        req = parse_body(await self._read_body(request), CompletionRequest)
        if req.prompt == []:
            raise ApiError(400, "prompt is an empty list; send a string, a list of strings, "
                                "token ids or a list of token-id lists", param="prompt")
        prompts, indexed = req.prompts(), req.indexed
        if isinstance(prompts[0], str):
            ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        else:  # token ids, taken as they are: the caller's token boundaries are kept
            ids = prompts
            for index, prompt in enumerate(ids):
                check_token_ids(prompt, self.vocab_size, index if indexed else None)
            prompts = [self.tokenizer.decode(p, skip_special_tokens=True) if req.echo else ""
                       for p in ids]  # what echo shows; special tokens add no text
        echo = [(p, i) for p, i in zip(prompts, ids) for _ in range(req.n)] if req.echo else None
        return await self._generate(req, ids, chat=False, indexed=indexed, echo=echo)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        if not self.tokenizer.chat_template:
            raise ApiError(404, f"model {self.model_name!r} has no chat template in its tokenizer;"
                                " use /v1/completions", code="chat_template_missing")
        req = parse_body(await self._read_body(request), ChatRequest)
        if not req.messages:
            raise ApiError(400, "messages is empty; send at least one message", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:  # rendered as training rendered them
            ids = [chat_ids(self.tokenizer, messages, add_generation_prompt=True)]
        except Exception as exc:  # the template's own checks (roles must alternate, say)
            raise ApiError(400, f"the model's chat template refused these messages: "
                                f"{str(exc).splitlines()[0][:200]}", param="messages") from None
        return await self._generate(req, ids, chat=True, indexed=False)

    async def _generate(self, req, prompt_ids: list[list[int]], chat: bool, indexed: bool,
                        echo: list[tuple[str, list[int]]] | None = None):
        """`echo`: per choice, the prompt's (text, ids) to put in front of its completion."""
        arrival = time.time()
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")
        max_tokens = check_sampling(req, self.cfg.default_max_tokens, self.cfg.max_tokens)
        if len(prompt_ids) * req.n > MAX_CHOICES:
            raise ApiError(400, f"prompts x n is {len(prompt_ids) * req.n}; at most "
                                f"{MAX_CHOICES} choices per request", param="n")
        for index, ids in enumerate(prompt_ids):
            check_prompt_fits(len(ids), max_tokens, self.context_length,
                              index if indexed else None)
        work = generation_requests(prompt_ids, req, max_tokens, arrival)
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(work, prompt_tokens, chat, include_usage, echo)
        results = await self._retry_once(lambda: self.replicas.complete_all.remote(work))
        return completion_response(self.model_name, results, prompt_tokens, chat,
                                   req.return_token_ids, self.token_strings, echo)

    async def _all(self, coroutines):
        """Await every coroutine; on the first failure cancel the rest and raise it."""
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _retry_once(self, attempt):
        """Await `attempt()`: overload becomes a 503 at once; a replica that died mid-request is
        tried once more on another one (a completion, or a stream that sent nothing, is safe to
        redo)."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

        for tries in range(2):
            try:
                return await attempt()
            except BackPressureError:
                raise overloaded(self.cfg.retry_after_s) from None
            except (RayActorError, ReplicaUnavailableError):
                if tries == 1:
                    raise ApiError(503, "the model replica died twice while serving this request",
                                   headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
            except Exception as exc:  # raised in the replica: this request's (or batch's) error
                raise replica_error(exc) from None

    async def _first_chunk(self, work):
        """Open a stream and read its first chunk, so overload still becomes a 503 status."""
        async def open_stream():
            stream = self.replicas.options(stream=True).stream.remote(work)
            return stream, await stream.__anext__()

        return await self._retry_once(open_stream)

    async def _stream(self, work, prompt_tokens: int, chat: bool, include_usage: bool,
                      echo: list[tuple[str, list[int]]] | None):
        opened = await self._all(self._first_chunk(w) for w in work)
        response_id = new_id("chatcmpl" if chat else "cmpl")
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream, first):
            try:
                await queue.put((index, first))
                if first.finish_reason is None:
                    async for chunk in stream:
                        await queue.put((index, chunk))
            except Exception as exc:  # reported in the stream: the status line is already sent
                await queue.put((index, exc))
            await queue.put((index, None))

        async def events():
            pumps = [asyncio.ensure_future(pump(i, s, c)) for i, (s, c) in enumerate(opened)]
            open_choices, completion_tokens, started = len(pumps), 0, set()
            offsets = [0] * len(pumps)  # characters of each choice sent so far (text_offset)
            try:
                while open_choices:
                    index, item = await queue.get()
                    if item is None:
                        open_choices -= 1
                    elif isinstance(item, Exception):  # its choice ends; the others go on
                        yield sse(replica_error(item).body())
                    else:
                        if item.finish_reason is not None:
                            completion_tokens += item.completion_tokens
                        first = index not in started
                        echo_text, echo_ids = echo[index] if echo and first else ("", None)
                        logprobs = choice_logprobs(self.token_strings, item.logprobs,
                                                   item.prompt_logprobs, chat, echo_ids,
                                                   offsets[index])
                        text = echo_text + item.text
                        offsets[index] += len(text)
                        yield sse(stream_chunk(response_id, self.model_name, index, text,
                                               item.finish_reason, chat, first=first,
                                               logprobs=logprobs))
                        started.add(index)
                if include_usage:
                    yield sse(usage_chunk(response_id, self.model_name, prompt_tokens,
                                          completion_tokens, chat))
            except Exception as exc:  # the status line is sent: the error goes in the stream
                logger.exception("streaming a response failed")
                yield sse(ApiError(500, f"internal error ({type(exc).__name__}); the server's "
                                        "log has the details", code="internal_error").body())
            finally:
                for task in pumps:
                    task.cancel()
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _authorize(self, request: Request) -> None:
        if self.api_key_sha256 is None:
            return
        sent = request.headers.get("authorization", "")
        token = sent[7:] if sent.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(key_digest(token), self.api_key_sha256):
            raise ApiError(401, "missing or wrong API key; send the header "
                                "'Authorization: Bearer <key>'", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than {limit} bytes "
                                "(serve.max_body_bytes)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_big
        return bytes(body)
