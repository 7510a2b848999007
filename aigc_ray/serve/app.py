"""The Serve application: an `OpenAIIngress` bound to autoscaled `GenerationReplica`s.

    HTTP ─► OpenAIIngress (FastAPI: auth, body checks, tokenize, SSE; `aigc_ray.serve.ingress`)
                │  DeploymentHandle: max_queued_requests waits here, then 503
                ▼
            GenerationReplica × autoscaled (model + batched decode; `aigc_ray.serve.replica`)

`run_serve` deploys from the CLI, `app_builder` serves `serve run` and `serve deploy` configs,
`write_serve_config` writes such a config file (`aigc-ray serve --build`).
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from ray import serve

from aigc_ray.checkpoint import checkpoint_config
from aigc_ray.config import API_KEY_ENV, Config
from aigc_ray.errors import ConfigError
from aigc_ray.run_folder import BEST_DIR, FINAL_DIR
from aigc_ray.serve.ingress import INGRESS_MAX_ONGOING, OpenAIIngress, key_digest
from aigc_ray.serve.replica import GenerationReplica

# Keys a served checkpoint may override; the rest of its config describes how it was trained.
SERVE_KEYS = ("serve", "model.trust_remote_code")
GENERIC_FOLDER_NAMES = (FINAL_DIR, BEST_DIR)  # named after their run instead: tiny-cpu/final


# ---------------------------------------------------------------------------------------------
# Config: the checkpoint's own config.yaml (when it has one) is the base, serve.* overrides win.


def load_serve_config(checkpoint: str, overrides: list[str] | None = None,
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
    """The Serve application (the ingress bound to autoscaled GenerationReplicas) for a model
    folder.

    The API key (serve.api_key, serve.api_key_file or AIGC_RAY_API_KEY where this runs; see
    Serve.resolve_api_key) reaches no deployment: their arguments, config and runtime env show
    on the dashboard and through the jobs API, so the ingress is given only the key's SHA-256
    and compares digests."""
    s = cfg.serve
    key = s.resolve_api_key()
    section = s.model_dump() | {"api_key": None}
    path = Path(checkpoint)
    cuda = s.device == "cuda"
    actor = {"num_cpus": s.cpus_per_replica, **({"num_gpus": s.gpus_per_replica} if cuda else {})}
    scaling = s.autoscaling
    replicas = GenerationReplica.options(
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
    ).bind(str(path), section, cfg.model.trust_remote_code)
    return OpenAIIngress.options(
        num_replicas=s.ingress_replicas, max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
    ).bind(replicas, str(path), section, model_name_for(path, cfg),
           cfg.model.trust_remote_code, None if key is None else key_digest(key))


def app_builder(args: dict):
    """Builds the app for `serve run aigc_ray.serve:app_builder checkpoint=PATH serve.k=v ...`
    and for the `applications[].args` of a Serve config file (`checkpoint`, `serve`, `model`)."""
    args = dict(args)
    checkpoint = args.pop("checkpoint", None)
    if not checkpoint:
        raise ConfigError("app_builder needs checkpoint=PATH (a Hugging Face model folder)")
    dotted = [f"{k}={v}" for k, v in args.items() if "." in k]
    nested = {k: v for k, v in args.items() if "." not in k}
    path, cfg = load_serve_config(str(checkpoint), dotted, nested)
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
                   "environment instead\n# (the deployments receive only its SHA-256).\n")
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

    key = cfg.serve.resolve_api_key()
    body = json.dumps({"prompt": prompt, "max_tokens": cfg.serve.default_max_tokens,
                       "temperature": 0}).encode()
    request = urllib.request.Request(
        api_url(cfg) + "/v1/completions", data=body, method="POST",
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def run_serve(path: Path, cfg: Config, once: str | None = None) -> dict | None:
    """Deploy and serve until Ctrl-C or SIGTERM; with `once`, answer that one prompt over HTTP
    and stop. The app is deleted on the way out, and Serve shut down when this call started it."""

    from aigc_ray.cluster import start_ray

    start_ray()
    own_serve = not serve_is_running()  # someone else's Serve is left running
    try:
        deploy(path, cfg)
        name = model_name_for(path, cfg)
        if once is not None:
            return ask_once(cfg, once)
        print(f"serving {name!r} at {api_url(cfg)}/v1 (OpenAI base URL); Ctrl-C stops",
              flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (the CLI turns one into the other)
        if once is not None:
            raise  # the prompt went unanswered
        print("stopping", flush=True)  # serving ends this way, even while still deploying
        return None
    finally:
        serve.delete(cfg.serve.app_name)  # waits until its replicas are gone
        if own_serve:
            shut_down_serve()


def serve_is_running() -> bool:
    """Whether Serve's controller already runs on the connected cluster (then it is someone
    else's, and is left running)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def shut_down_serve(timeout_s: float = 30.0) -> None:
    """`serve.shutdown()` without the line Ray prints after it on success, "(raylet) Task
    ServeController.graceful_shutdown failed ... killed by ray.kill": `serve.shutdown` waits on a
    call the controller never answers (it ends by killing itself), and Ray reports that call as
    failed. Here the controller is asked to shut down without waiting on it, and we wait until it
    is gone instead; past timeout_s, `serve.shutdown()` as before."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve.context import _disconnect, _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    client.shutdown_cached_handles()  # their long polls would fail with the controller too
    ray.get(client._controller.graceful_shutdown.remote(wait=False))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:  # no such actor: the controller has shut Serve down and exited
            _disconnect()
            return
        time.sleep(0.1)
    serve.shutdown()
