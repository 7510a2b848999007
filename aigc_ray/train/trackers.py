"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, through their own libraries.

Rank 0 of a training run opens the trackers `run.trackers` names, logs the resolved config as
parameters, then every `metrics.jsonl` row and every round of sample replies as it writes them,
and at the end the best validation loss. The driver then adds the loss curve and, after the
evaluation that ends `aigc-ray train`, its metrics and `eval.json`. Each tracker's run id is kept
in the run folder (`trackers.json`), so a resumed run, and the driver's additions, log to the
same run. `aigc-ray tune` trials are training runs too: each logs as its own run, grouped under
the search's name.

- tensorboard: event files in `{run folder}/tensorboard` (tensorboardX, which Ray Tune installs).
- mlflow: `run.mlflow_uri`, by default a SQLite store beside the runs (`{output_dir}/mlflow.db`,
  artifacts in `{output_dir}/mlartifacts`); a folder holds such a store too (see config.Run);
  `pip install 'aigc-ray[mlflow]'`.

The API key (serve.api_key) is in no tracker's parameters: they hold <redacted> in its place.
- wandb: offline (files under the run folder, `wandb sync` uploads them) unless WANDB_API_KEY or
  WANDB_MODE is set; `pip install 'aigc-ray[wandb]'`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from aigc_ray.config import Config, redacted_dump
from aigc_ray.errors import ConfigError

TRACKERS_FILE = "trackers.json"
EXTRAS = {"tensorboard": ("tensorboardX", "aigc-ray[tensorboard]"),
          "mlflow": ("mlflow", "aigc-ray[mlflow]"), "wandb": ("wandb", "aigc-ray[wandb]")}


def check_trackers(cfg: Config) -> None:
    """Each tracker's library is installed: checked before Ray starts."""
    import importlib.util

    for name in cfg.run.trackers:
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"run.trackers lists {name}, but {module} is not installed: "
                              f"pip install '{extra}', or remove {name} from run.trackers")
    if "mlflow" in cfg.run.trackers and (local := mlflow_store(cfg)[1]):
        try:  # SQLite cannot create the folder its file goes in
            local.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"run.mlflow_uri: cannot create {local} ({exc.strerror}); name a "
                              "folder you can write") from None


def mlflow_store(cfg: Config) -> tuple[str, Path | None]:
    """(MLflow tracking URI, the folder of its SQLite file when the store is local). Artifacts
    go beside a local store (`mlartifacts/`): MLflow's default is the worker's working folder."""
    root = Path(cfg.run.output_dir).expanduser().resolve()
    uri = cfg.run.mlflow_uri or f"sqlite:///{root}/mlflow.db"
    if not uri.startswith("sqlite:///"):
        return uri, None
    return uri, Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as dotted keys → strings, the API key redacted: every tracker's
    parameters."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            out[prefix] = json.dumps(value) if not isinstance(value, str) else value

    walk("", redacted_dump(cfg, mode="json"))
    return out


def experiment_of(cfg: Config) -> str:
    return cfg.run.experiment or "aigc-ray"


class TensorBoard:
    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None, step: int):
        from tensorboardX import SummaryWriter

        # A resumed run drops what it logged after its checkpoint, as metrics.jsonl does.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)
        self.id = run_id or "tensorboard"

    def params(self, params: dict[str, str]) -> None:
        table = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def text(self, step: int, name: str, text: str) -> None:
        self.writer.add_text(name, text, step)

    def file(self, path: Path) -> None:
        if path.suffix == ".png":
            import matplotlib.pyplot as plt

            self.writer.add_image(path.stem, plt.imread(path)[..., :3], dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None, step: int):
        from mlflow.tracking import MlflowClient

        uri, local = mlflow_store(cfg)
        if local:
            local.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            name = experiment_of(cfg)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                name, artifact_location=(local / "mlartifacts" / name).as_uri() if local else None)
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        self.id = run_id

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.id, params=items[start:start + 100])

    def metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(key, value, now, step)
                                                for key, value in values.items()])

    def text(self, step: int, name: str, text: str) -> None:
        self.client.log_text(self.id, text, f"{name}/step_{step:07d}.txt")

    def file(self, path: Path) -> None:
        self.client.log_artifact(self.id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.id)


class Wandb:
    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None, step: int):
        import wandb

        offline = "WANDB_API_KEY" not in os.environ and "WANDB_MODE" not in os.environ
        # W&B records the command line in its metadata; a serving key given there (visible in
        # `ps` already) must not be written too, so then no metadata is collected.
        key = cfg.serve.api_key
        argv_holds_key = bool(key) and any(key in arg for arg in sys.argv)
        self.run = wandb.init(project=experiment_of(cfg), name=run_dir.name,
                              group=cfg.run.experiment, id=run_id, resume="allow",
                              dir=str(run_dir), mode="offline" if offline else None,
                              settings=wandb.Settings(silent=True, console="off",
                                                      x_disable_meta=argv_holds_key))
        self.id = self.run.id

    def params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def text(self, step: int, name: str, text: str) -> None:
        import wandb

        self.run.log({name: wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def file(self, path: Path) -> None:
        import wandb

        if path.suffix == ".png":
            self.run.log({path.stem: wandb.Image(str(path))})
        else:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb}


class Trackers:
    """The trackers `run.trackers` names, for one run folder (see the module docstring)."""

    def __init__(self, cfg: Config, run_dir: Path, step: int = 0):
        ids_file = run_dir / TRACKERS_FILE
        ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
        self.backends = [BACKENDS[name](cfg, run_dir, ids.get(name), step)
                         for name in cfg.run.trackers]
        ids_file.write_text(json.dumps({name: backend.id for name, backend
                                        in zip(cfg.run.trackers, self.backends)}, indent=2) + "\n")
        if not ids:  # a new run: its parameters once
            params = flat_params(cfg)
            for backend in self.backends:
                backend.params(params)

    def metrics(self, row: dict) -> None:
        """A `metrics.jsonl` row: its numbers at its step."""
        values = {key: float(value) for key, value in row.items()
                  if key != "step" and isinstance(value, (int, float))}
        for backend in self.backends:
            backend.metrics(int(row["step"]), values)

    def samples(self, step: int, samples: list[dict]) -> None:
        text = "\n\n".join(f"prompt: {s['prompt']}\nreply:  {s['reply']}" for s in samples)
        for backend in self.backends:
            backend.text(step, "samples", text)

    def files(self, *paths: Path) -> None:
        for path in paths:
            if path.exists():
                for backend in self.backends:
                    backend.file(path)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def open_trackers(cfg: Config, run_dir: Path, step: int = 0) -> Trackers | None:
    """The run's trackers, or None when `run.trackers` is empty."""
    return Trackers(cfg, run_dir, step) if cfg.run.trackers else None
