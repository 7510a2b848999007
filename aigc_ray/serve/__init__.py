"""Serve a checkpoint with Ray Serve behind an OpenAI-compatible HTTP API.

Split the way Ray's LLM serving splits it:

    api       the OpenAI wire format: request/response schema, checks, errors (no Ray)
    ingress   the FastAPI ingress deployment: auth, body checks, tokenize, SSE
    replica   the Generator deployment: the model and its continuous batching loop
    app       the application: build_app / app_builder, deploy, the Serve config file, run_serve

`aigc_ray.serve:app_builder` is the import path that `serve run`, `serve deploy` configs and the
KubeRay RayService name, so the public names are re-exported here.
"""

from aigc_ray.serve.app import (
    api_url,
    app_builder,
    build_app,
    deploy,
    load_serve_config,
    model_name_for,
    run_serve,
    write_serve_config,
)

# The old name, kept while the CLI still imports it; use `load_serve_config`.
serve_config = load_serve_config

__all__ = ["api_url", "app_builder", "build_app", "deploy", "load_serve_config",
           "model_name_for", "run_serve", "serve_config", "write_serve_config"]
