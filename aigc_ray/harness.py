"""Public benchmarks through the served endpoint: EleutherAI's lm-evaluation-harness, whose
`local-completions` model scores any OpenAI-compatible server, run against our own.

The harness sends token-id prompts (its own tokenization, so token boundaries are exactly what
its Hugging Face backend scores) with `echo`, `logprobs` and `max_tokens` 1, and reads each
prompt token's logprob and whether it was the likeliest; generation tasks send prompts with
`stop` strings. Several prompts go in each request (`eval.harness_batch_size`) and several
requests are in flight (`eval.harness_concurrency`); the replica's continuous batching puts them
in one forward pass (benchmarks/harness_concurrency.py measures both).

`aigc-ray eval CHECKPOINT --harness TASKS` serves the checkpoint (and its baseline) on the local
Ray cluster for the run, or scores a server already running (`--url`). lm-eval is an optional
extra (`pip install 'aigc-ray[harness]'`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aigc_ray.config import Config
from aigc_ray.errors import ConfigError

INSTALL_HINT = "pip install 'aigc-ray[harness]'"
HARNESS_APP = "aigc-ray-harness"  # the Serve app (and route) a checkpoint is served under


@dataclass
class Harness:
    """What `--harness TASKS [--limit N] [--url URL]` asks for."""

    tasks: list  # lm-eval task names and task configs (dicts read from YAML files)
    limit: float | None = None  # documents per task (a fraction below 1); None: all
    url: str | None = None  # a running server for the model side; None: serve it here
    labels: tuple[str, ...] = ()  # TASKS as the user wrote them, for the report


def lm_eval_module():
    """lm_eval, or a one-line ConfigError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"--harness needs lm-evaluation-harness, which is not installed: "
                          f"{INSTALL_HINT}") from None
    return lm_eval


def harness_spec(tasks: str, limit: float | None, url: str | None) -> Harness:
    """TASKS (comma-separated task or group names, task YAML files, or folders of YAML files)
    checked and read; a one-line ConfigError naming the first that is none of these. Runs before
    Ray starts."""
    lm_eval_module()
    labels = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if not labels:
        raise ConfigError("--harness needs at least one task: a name lm-eval knows (e.g. "
                          "arc_easy) or a task YAML file")
    if limit is not None and not limit > 0:
        raise ConfigError(f"--limit must be a count of documents (or a fraction below 1) above "
                          f"0, got {limit}")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must be the server's base URL, e.g. http://host:8000, got "
                          f"{url!r}")
    resolved, names = [], []
    for label in labels:
        path = Path(label).expanduser()
        if label.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise ConfigError(f"harness task file {label} does not exist")
            resolved.append(task_config(path))
        elif path.is_dir():
            files = sorted(path.glob("*.yaml"))
            if not files:
                raise ConfigError(f"harness task folder {label} holds no .yaml task files")
            resolved += [task_config(f) for f in files]
        else:
            names.append(label)
    if names:  # indexing lm-eval's own tasks takes seconds: only when one is named
        from lm_eval.tasks import TaskManager

        manager = TaskManager()
        for name in names:
            if not manager.match_tasks([name]):
                raise ConfigError(f"harness task {name!r} is neither a task lm-eval knows (`lm_eval"
                                  f" ls tasks` lists them) nor a task YAML file or folder")
        resolved += names
    if limit is not None and limit >= 1:
        limit = int(limit)  # a count (lm-eval reads a float below 1 as a fraction)
    return Harness(tasks=resolved, limit=limit, url=url.rstrip("/") if url else None,
                   labels=labels)


def task_config(path: Path) -> dict:
    """A task YAML as lm-eval reads it (`include:` and `!function` resolved), with local data
    files named relative to the YAML's folder made absolute (lm-eval would read them relative
    to wherever it runs)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(str(path), resolve_func=True)
    except Exception as exc:
        raise ConfigError(f"harness task file {path} cannot be read: "
                          f"{str(exc).splitlines()[0][:200]}") from None
    if not isinstance(config, dict) or "task" not in config:
        raise ConfigError(f"harness task file {path} has no `task:` name; see the README's "
                          "'Evaluating on benchmarks' for a local task")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        config["dataset_kwargs"]["data_files"] = _beside(files, path.parent)
    return config


def _beside(files, folder: Path):
    """data_files (a path, a list of them, or split → either) with relative paths that exist
    in `folder` made absolute."""
    if isinstance(files, dict):
        return {split: _beside(f, folder) for split, f in files.items()}
    if isinstance(files, list):
        return [_beside(f, folder) for f in files]
    if isinstance(files, str) and not Path(files).is_absolute() and (folder / files).exists():
        return str((folder / files).resolve())
    return files


def server_info(url: str, api_key: str | None = None, timeout_s: float = 30.0) -> dict:
    """The first model a server lists at /v1/models: its `id` and `max_model_len`."""
    request = urllib.request.Request(
        f"{url}/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            models = json.loads(response.read())["data"]
    except Exception as exc:
        raise ConfigError(f"cannot list the models at {url}/v1/models ({exc}); is an OpenAI-"
                          "compatible server running there?") from None
    if not models:
        raise ConfigError(f"{url}/v1/models lists no model")
    return models[0]


def run_harness(url: str, tokenizer: str, harness: Harness, concurrency: int,
                api_key: str | None = None, log_samples: bool = False,
                batch_size: int = 1) -> dict:
    """lm-eval's tasks scored through the completions API at `url` (prompts tokenized with
    `tokenizer`, a model folder or hub id). Returns lm-eval's own result dict (with
    "samples" when `log_samples`) plus "seconds"."""
    lm_eval = lm_eval_module()
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    class Client(LocalCompletionsAPI):
        """local-completions with our API key (it reads only OPENAI_API_KEY otherwise), and
        rolling log-likelihoods scored concurrently."""

        @property
        def api_key(self):
            return api_key or ""

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """lm-eval's own windows (the same utilities, the same sizes), but every window
            of every document in one call, so `num_concurrent` applies: lm-eval's API model
            sends one document's windows at a time, and a perplexity task went no faster with
            8 requests in flight than with 1."""
            from lm_eval import utils

            windows, owner = [], []
            for index, (text,) in enumerate(request.args for request in requests):
                for window in utils.get_rolling_token_windows(
                        token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length - 1, context_len=1):
                    windows.append((None, *utils.make_disjoint_window(window)))
                    owner.append(index)
            totals = [0.0] * len(requests)
            for index, (loglikelihood, _) in zip(owner, self._loglikelihood_tokens(
                    windows, disable_tqdm=True)):
                totals[index] += loglikelihood
            for request, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

    info = server_info(url, api_key)
    client = Client(
        base_url=f"{url}/v1/completions", model=info["id"], tokenizer=tokenizer,
        tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=concurrency,
        # The model's context: lm-eval truncates prompts (and rolling windows) to fit it.
        max_length=info.get("max_model_len") or 2048, max_retries=3, timeout=600,
        batch_size=batch_size)
    started = time.perf_counter()
    print(f"[aigc-ray] lm-evaluation-harness: {', '.join(harness.labels)} on {info['id']} at "
          f"{url}, {batch_size} prompts per request, {concurrency} requests in flight",
          flush=True)
    manager = TaskManager(include_defaults=any(isinstance(t, str) for t in harness.tasks))
    # Its progress bars go (a rolling task draws one per document); its warnings stay.
    with contextlib.redirect_stderr(_WithoutBars(sys.stderr)):
        out = lm_eval.simple_evaluate(model=client, tasks=copy.deepcopy(list(harness.tasks)),
                                      limit=harness.limit, task_manager=manager,
                                      log_samples=log_samples)
    out["seconds"] = time.perf_counter() - started
    return out


class _WithoutBars(io.TextIOBase):
    """A text stream that passes lines on to `stream` and drops progress bars: tqdm's redraws
    (a carriage return, or the cursor moves of stacked bars) and the newline ending a bar."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if "\r" not in text and "\x1b[" not in text and text != "\n":
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def scores(out: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results: the default filter's metrics by their
    plain name (`acc`, `acc_stderr`), another filter's as `metric,filter`; the document count
    as `samples`. Stderrs lm-eval cannot compute ("N/A") are left out."""
    table = {}
    for task, results in out["results"].items():
        row = {}
        for key, value in results.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, kind = key.split(",", 1)
            row[metric if kind == "none" else key] = value
        if task in out.get("n-samples", {}):
            row["samples"] = out["n-samples"][task].get("effective")
        table[task] = row
    return table


@contextmanager
def serve_running() -> Iterator[int]:
    """Serve on the current Ray cluster for as long as the block lasts; yields its HTTP port.
    Serve already running (someone else's) is used and left running; otherwise it is started
    on a free local port and shut down after."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from aigc_ray.serve.app import serve_is_running, shut_down_serve

    own_serve = not serve_is_running()
    if own_serve:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        yield _get_global_client().http_config.port
    finally:
        if own_serve:
            shut_down_serve()


@contextmanager
def served(checkpoint: str, cfg: Config, port: int, name: str = HARNESS_APP) -> Iterator[str]:
    """`checkpoint` served through the same app `aigc-ray serve` runs, on the running Serve
    (`serve_running`), as app `name` under /`name`, for as long as the block lasts; yields its
    base URL."""
    from ray import serve

    from aigc_ray.serve.app import build_app

    try:
        serve.run(build_app(checkpoint, cfg), name=name, route_prefix=f"/{name}")
        yield f"http://127.0.0.1:{port}/{name}"
    finally:
        serve.delete(name)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def harness_scores(models: dict[str, str], cfg: Config, harness: Harness) -> dict:
    """{name: {'tasks': `scores`, 'seconds', 'batch_size', 'concurrency', 'url'}} for each of
    `models` (name → model folder or hub id) on the harness tasks, one after the other. The
    one named "model" is scored through `harness.url` when given; the others are served here,
    each for its run."""
    batch = cfg.eval.harness_batch_size
    concurrency = cfg.eval.harness_concurrency or max(1, math.ceil(
        2 * cfg.serve.max_batch_size / batch))
    key = cfg.serve.resolve_api_key()
    results, port = {}, None
    with contextlib.ExitStack() as stack:  # Serve, started once for all the models served here
        for name, model in models.items():
            url = harness.url if name == "model" else None
            if url is None:
                if port is None:
                    port = stack.enter_context(serve_running())
                with served(model, cfg, port) as local:
                    out = run_harness(local, model, harness, concurrency, key, batch_size=batch)
            else:
                out = run_harness(url, model, harness, concurrency, key, batch_size=batch)
            results[name] = {"tasks": scores(out), "seconds": round(out["seconds"], 1),
                             "batch_size": batch, "concurrency": concurrency, "url": url}
    return results
