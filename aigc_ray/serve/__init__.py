"""Serve a checkpoint with Ray Serve behind an OpenAI-compatible HTTP API.

Split the way Ray's LLM serving splits it:

    api       the OpenAI wire format: request/response schema, checks, errors (no Ray, no torch)
    ingress   the FastAPI ingress deployment: auth, body checks, tokenize, SSE (no torch)
    replica   the `GenerationReplica` deployment: the model and its continuous batching loop
    app       the application: build_app / app_builder, deploy, the Serve config file, run_serve

`aigc_ray.serve:app_builder` is the import path that `serve run`, `serve deploy` configs and the
KubeRay RayService name, so the public names are handed on here; they are imported when first
used, so importing the wire format (`serve.api`) loads neither the replica nor torch.
"""

from __future__ import annotations

from aigc_ray import hand_on

_HOMES = {name: "app" for name in ("api_url", "app_builder", "build_app", "deploy",
                                   "load_serve_config", "model_name_for", "run_serve",
                                   "write_serve_config")}

__all__ = sorted(_HOMES)

__getattr__ = hand_on(__name__, _HOMES)
