"""Serve a checkpoint with Ray Serve behind an OpenAI-compatible HTTP API.

Two deployments make one application:

    HTTP ─► OpenAIIngress (FastAPI: auth, body checks, tokenize, SSE)
                │  DeploymentHandle: max_queued_requests waits here, then 503
                ▼
            Generator × autoscaled replicas (model + batched decode, `aigc_ray.serve_replica`)

The ingress is light and runs on 0 CPUs; the replicas hold the cores and scale with load.
`run_serve` deploys from the CLI, `app_builder` serves `serve run` and `serve deploy` configs.
"""

# No `from __future__ import annotations` here: Serve ships the ingress class to replicas by
# value, and FastAPI must still see `Request` as a class, not a string it cannot resolve there.
import asyncio
import hmac
import os
import time
from pathlib import Path

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc_ray.checkpoint import checkpoint_config
from aigc_ray.config import Config, ConfigError
from aigc_ray.serve_api import (
    MAX_CHOICES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    check_prompt_fits,
    check_sampling,
    completion_response,
    generation_requests,
    new_id,
    parse_body,
    sse,
    stream_chunk,
    usage_chunk,
)
from aigc_ray.serve_replica import Generator

API_KEY_ENV = "AIGC_RAY_API_KEY"
# Requests the ingress holds at once: it only awaits replicas, so far more than they batch.
INGRESS_MAX_ONGOING = 1000
# Keys a served checkpoint may override; the rest of its config describes how it was trained.
SERVE_KEYS = ("serve", "model.trust_remote_code")
GENERIC_FOLDER_NAMES = ("final", "best")  # named after their run instead: tiny-cpu/final

api = FastAPI(title="aigc-ray", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods answer in the same error shape as everything else.
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    return JSONResponse(error.body(), status_code=exc.status_code)


def overloaded(retry_after_s: int) -> ApiError:
    return ApiError(503, "the server is at capacity; retry after the Retry-After seconds",
                    code="overloaded", headers={"Retry-After": str(retry_after_s)})


def context_length(model_config, tokenizer) -> int:
    """Tokens the model attends over: its position table, else the tokenizer's stated limit."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048


@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    """The HTTP face: checks and tokenizes requests, fans choices out to `Generator` replicas."""

    def __init__(self, generator, checkpoint: str, serve_config: dict, model_name: str,
                 trust_remote_code: bool = False):
        from transformers import AutoConfig

        from aigc_ray.config import Serve
        from aigc_ray.model import load_tokenizer

        self.cfg = Serve.model_validate(serve_config)
        self.generator = generator
        self.model_name = model_name
        self.tokenizer = load_tokenizer(checkpoint, trust_remote_code)
        self.context_length = context_length(
            AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code),
            self.tokenizer)
        self.api_key = self.cfg.api_key or os.environ.get(API_KEY_ENV) or None

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Ready only when a replica generates a token through its batch loop."""
        async def ready():
            return await self.generator.ready.remote()

        try:
            info = await asyncio.wait_for(ready(), timeout=self.cfg.health_check_timeout_s)
        except Exception as exc:
            raise ApiError(503, f"no model replica can generate yet ({type(exc).__name__})",
                           headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
        return {"status": "ok", "model": self.model_name, "replica_pid": info["pid"]}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "aigc-ray",
            "max_model_len": self.context_length}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        req = parse_body(await self._read_body(request), CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list; send a string or a list of strings",
                           param="prompt")
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        indexed = not isinstance(req.prompt, str)
        return await self._generate(req, ids, chat=False, indexed=indexed)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        if not self.tokenizer.chat_template:
            raise ApiError(404, f"model {self.model_name!r} has no chat template in its tokenizer;"
                                " use /v1/completions", code="chat_template_missing")
        req = parse_body(await self._read_body(request), ChatRequest)
        if not req.messages:
            raise ApiError(400, "messages is empty; send at least one message", param="messages")
        text = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.text()} for m in req.messages],
            tokenize=False, add_generation_prompt=True)
        # The template already wrote any special tokens the model expects.
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        return await self._generate(req, ids, chat=True, indexed=False)

    async def _generate(self, req, prompt_ids: list[list[int]], chat: bool, indexed: bool):
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
            return await self._stream(work, prompt_tokens, chat, include_usage)
        results = await self._all(self._complete_one(w) for w in work)
        return completion_response(self.model_name, results, prompt_tokens, chat,
                                   req.return_token_ids)

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

    async def _complete_one(self, work):
        return await self._retry_once(lambda: self.generator.complete.remote(work))

    async def _first_chunk(self, work):
        """Open a stream and read its first chunk, so overload still becomes a 503 status."""
        async def open_stream():
            stream = self.generator.options(stream=True).stream.remote(work)
            return stream, await stream.__anext__()

        return await self._retry_once(open_stream)

    async def _stream(self, work, prompt_tokens: int, chat: bool, include_usage: bool):
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
            try:
                while open_choices:
                    index, item = await queue.get()
                    if item is None:
                        open_choices -= 1
                    elif isinstance(item, Exception):
                        error = ApiError(500, f"generation failed: {type(item).__name__}")
                        yield sse(error.body())
                    else:
                        if item.finish_reason is not None:
                            completion_tokens += item.completion_tokens
                        yield sse(stream_chunk(response_id, self.model_name, index, item.text,
                                               item.finish_reason, chat,
                                               first=index not in started))
                        started.add(index)
                if include_usage:
                    yield sse(usage_chunk(response_id, self.model_name, prompt_tokens,
                                          completion_tokens, chat))
                yield sse("[DONE]")
            finally:
                for task in pumps:
                    task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        sent = request.headers.get("authorization", "")
        token = sent[7:] if sent.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
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


# ---------------------------------------------------------------------------------------------
# Config: the checkpoint's own config.yaml (when it has one) is the base, serve.* overrides win.


def serve_config(checkpoint: str, overrides: list[str] | None = None,
                 extra: dict | None = None) -> tuple[Path, Config]:
    """(model folder, Config) for serving: the folder's config.yaml serve section (if any),
    then `extra` sections, then `serve.key=value` overrides. Raises a one-line ConfigError."""
    return checkpoint_config(checkpoint, overrides, SERVE_KEYS, "serving a checkpoint", extra)


def model_name_for(path: Path, cfg: Config) -> str:
    """The model id clients send: serve.model_name, else the folder (run/final for final/)."""
    if cfg.serve.model_name:
        return cfg.serve.model_name
    if path.name in GENERIC_FOLDER_NAMES or path.name.startswith("checkpoint"):
        return f"{path.parent.name}/{path.name}"
    return path.name


def build_app(checkpoint: str | Path, cfg: Config):
    """The Serve application (ingress bound to an autoscaled Generator) for a model folder."""
    s = cfg.serve
    path = Path(checkpoint)
    cuda = s.device == "cuda"
    actor = {"num_cpus": s.cpus_per_replica, **({"num_gpus": s.gpus_per_replica} if cuda else {})}
    scaling = s.autoscaling
    generator = Generator.options(
        autoscaling_config={
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "initial_replicas": scaling.initial_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s},
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options=actor,
        health_check_period_s=s.health_check_period_s,
        health_check_timeout_s=s.health_check_timeout_s,
    ).bind(str(path), s.model_dump(), cfg.model.trust_remote_code)
    env = {API_KEY_ENV: os.environ[API_KEY_ENV]} if os.environ.get(API_KEY_ENV) else {}
    ingress_actor = {"num_cpus": 0, **({"runtime_env": {"env_vars": env}} if env else {})}
    return OpenAIIngress.options(
        num_replicas=s.ingress_replicas, max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options=ingress_actor,
    ).bind(generator, str(path), s.model_dump(), model_name_for(path, cfg),
           cfg.model.trust_remote_code)


def app_builder(args: dict):
    """Builds the app for `serve run aigc_ray.serve:app_builder checkpoint=PATH serve.k=v ...`
    and for the `applications[].args` of a Serve config file (`checkpoint`, `serve`, `model`)."""
    args = dict(args)
    checkpoint = args.pop("checkpoint", None)
    if not checkpoint:
        raise ConfigError("app_builder needs checkpoint=PATH (a Hugging Face model folder)")
    dotted = [f"{k}={v}" for k, v in args.items() if "." in k]
    nested = {k: v for k, v in args.items() if "." not in k}
    path, cfg = serve_config(str(checkpoint), dotted, nested)
    return build_app(path, cfg)


def write_serve_config(path: Path, cfg: Config, out: str | Path) -> Path:
    """Write a Ray Serve config file (for `serve deploy` and a KubeRay RayService)."""
    s = cfg.serve.model_dump()
    secret = s.pop("api_key") is not None
    args = {"checkpoint": str(path), "serve": s,
            "model": {"trust_remote_code": cfg.model.trust_remote_code}}
    document = {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [{"name": cfg.serve.app_name, "route_prefix": cfg.serve.route_prefix,
                          "import_path": "aigc_ray.serve:app_builder", "args": args}],
    }
    header = (
        "# Ray Serve config written by `aigc-ray serve CHECKPOINT --build`.\n"
        "# Deploy: serve deploy THIS_FILE (the cluster in RAY_ADDRESS), or paste `applications`\n"
        "# into a KubeRay RayService's serveConfigV2. The checkpoint path must be readable on\n"
        "# every node and aigc-ray installed in the image; use host 0.0.0.0 outside a laptop.\n"
    )
    if secret:
        header += (f"# serve.api_key is not written here: set {API_KEY_ENV} in the cluster's "
                   "environment instead.\n")
    out = Path(out)
    out.write_text(header + yaml.safe_dump(document, sort_keys=False))
    return out


# ---------------------------------------------------------------------------------------------
# Running it from the CLI.


def api_url(cfg: Config) -> str:
    """Where clients reach the API (`.../v1` is the OpenAI base URL)."""
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"


def deploy(path: Path, cfg: Config):
    """Start Serve on the current Ray cluster (HTTP on serve.host:port) and run the app;
    returns when every replica is up."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    return serve.run(build_app(path, cfg), name=cfg.serve.app_name,
                     route_prefix=cfg.serve.route_prefix)


def ask_once(cfg: Config, prompt: str, timeout_s: float = 120.0) -> dict:
    """One real HTTP completion request against the running app; the response body."""
    import json
    import urllib.request

    key = cfg.serve.api_key or os.environ.get(API_KEY_ENV)
    body = json.dumps({"prompt": prompt, "max_tokens": cfg.serve.default_max_tokens,
                       "temperature": 0}).encode()
    request = urllib.request.Request(
        api_url(cfg) + "/v1/completions", data=body, method="POST",
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def run_serve(path: Path, cfg: Config, once: str | None = None) -> dict | None:
    """Deploy and serve until Ctrl-C; with `once`, answer that one prompt over HTTP and stop.
    The app is deleted on the way out, and Serve shut down when this call started it."""
    import ray

    from aigc_ray.cluster import start_ray

    start_ray()
    try:  # Serve already running on this cluster belongs to someone else: leave it running
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        own_serve = False
    except ValueError:
        own_serve = True
    try:
        deploy(path, cfg)
        name = model_name_for(path, cfg)
        if once is not None:
            return ask_once(cfg, once)
        print(f"serving {name!r} at {api_url(cfg)}/v1 (OpenAI base URL); Ctrl-C stops",
              flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping", flush=True)
        return None
    finally:
        serve.delete(cfg.serve.app_name)
        if own_serve:
            serve.shutdown()
