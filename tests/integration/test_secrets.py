"""The serving API key is never written to disk: one short `aigc-ray train` with the key on its
command line (the worst case: that is where W&B looks too) and every tracker on (conftest's
tracked_train_run, shared with test_eval and test_trackers), then its final/ served with the
key given again through a key file. The served API asks for the key, and no file
under the output folder (run folder, checkpoints, final/, the trackers' files and the MLflow
store) holds the key's bytes."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from aigc_ray.config import REDACTED
from aigc_ray.errors import ConfigError
from aigc_ray.run_folder import CheckpointFolder, RunFolder
from aigc_ray.serve import build_app, load_serve_config

pytestmark = pytest.mark.slow

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files_holding(folder: Path, needle: bytes) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if path.is_file() and needle in path.read_bytes())


def test_serving_a_run_trained_with_a_key_asks_for_it_and_no_file_holds_it(tracked_train_run,
                                                                           tmp_path):
    from ray import serve

    out, key = tracked_train_run["out"], tracked_train_run["key"]
    final = RunFolder(tracked_train_run["dir"]).final
    # The saved config says a key was set, without the key: serving it asks for the key again
    # rather than serving without one.
    assert f"api_key: {REDACTED}" in CheckpointFolder(final).config.read_text()
    with pytest.raises(ConfigError, match="AIGC_RAY_API_KEY=KEY or serve.api_key_file=FILE"):
        build_app(*load_serve_config(str(final)))

    key_file = tmp_path / "api_key"  # outside the output folder
    key_file.write_text(key + "\n")  # as `echo KEY > FILE` writes it
    port = free_port()
    path, cfg = load_serve_config(str(final), [
        f"serve.api_key_file={key_file}", f"serve.port={port}", "serve.app_name=keyed",
        "serve.route_prefix=/keyed", "serve.cpus_per_replica=0.5"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(path, cfg), name="keyed", route_prefix="/keyed")
        url = f"http://127.0.0.1:{port}/keyed/v1/completions"
        body = {"prompt": "Customer: Where is my order?\nAgent:", "max_tokens": 4,
                "temperature": 0}
        without = httpx.post(url, json=body, timeout=60)
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
        right = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"},
                           timeout=60)
    finally:
        serve.shutdown()
    assert without.status_code == 401 and without.json()["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401
    assert right.status_code == 200 and right.json()["choices"][0]["text"]

    # Every writer had its chance: config.yaml of the run, each checkpoint and final/, the
    # trackers (TensorBoard events, the MLflow store and its artifacts, W&B's offline files).
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert "mlflow.db" in written and any(p.startswith("tracked/tensorboard/") for p in written)
    assert any(p.startswith("tracked/wandb/") for p in written)
    assert "tracked/eval.json" in written
    assert files_holding(out, key.encode()) == []
