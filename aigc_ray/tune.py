"""Hyperparameter search: `run_tune(cfg)` runs Ray Tune trials that are each a whole
`aigc-ray train` run (a `TorchTrainer` with its own DDP workers), lets ASHA stop the losers
between evaluations (or PBT move the worse trials onto the better ones' checkpoints), and
exports the best trial's model to `best/`.

The run folder `{run.output_dir}/{run.name}/` is Tune's experiment folder; each trial trains in
`trials/<trial id>/` (the same run folder `aigc-ray train` writes), so a resumed search also
resumes its unfinished trials from their last checkpoints.

Under PBT a trial also hands Tune a checkpoint at every perturbation interval: the Train
controller passes each report to the trial through a queue (`report_to_trial`), and the trial
reports it with `tune.report(checkpoint=...)`, which copies it into Tune's trial folder. A trial
that Tune restarts from another trial's checkpoint (an exploit) starts a new Train run in its
own folder from that checkpoint, so its steps and metrics continue from the donor's step.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aigc_ray.config import Config, pbt_mutations, redacted_dump, set_key, to_yaml
from aigc_ray.data.files import GLOB_CHARS
from aigc_ray.data.pipeline import pipeline_cpus
from aigc_ray.errors import ConfigError, user_error
from aigc_ray.run_folder import RunFolder

TRIAL_DRIVER_CPUS = 0.01
NO_STEP_LIMIT = 10**9  # ASHA needs a max_t; epoch-bound runs end on their own before it
PBT_STAGING = "pbt_staging"  # in a trial folder: hard-linked copies waiting for Tune to take them
STAGED_KEY = "_staged_checkpoint"  # the staged folder, from the Train controller to the trial
DONOR_KEY, DONOR_STEP_KEY = "pbt_donor", "pbt_donor_step"  # on a trial's first report after an exploit


def check_tune_config(cfg: Config, resume: bool) -> None:
    """What can be checked before Ray starts: the search space (by the schema), the search
    algorithm's package, and whether the run folder holds a search to resume."""
    from ray.tune import Tuner

    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty; name the keys to search, e.g. "
                          "tune.search_space: {train.lr: {loguniform: [1.0e-4, 3.0e-3]}}")
    kinds = {next(iter(spec)) for spec in cfg.tune.search_space.values()}
    if cfg.tune.search_alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search_alg optuna needs optuna: pip install "
                              "'aigc-ray[optuna]' (or use tune.search_alg=random)") from None
        if "grid" in kinds:
            raise ConfigError("tune.search_alg optuna cannot search a grid; use choice instead "
                              "of grid, or tune.search_alg=random")
    exists = Tuner.can_restore(str(cfg.run.dir))
    if resume and not exists:
        raise ConfigError(f"--resume: {cfg.run.dir} holds no search to resume")
    if not resume and exists:
        raise ConfigError(f"{cfg.run.dir} already holds a search; add --resume to continue "
                          "it, or set another run.name")


def param_space(cfg: Config) -> dict:
    """{dotted key: Tune domain} from `tune.search_space`."""
    from ray import tune

    makers = {
        "loguniform": lambda low, high: tune.loguniform(low, high),
        "uniform": lambda low, high: tune.uniform(low, high),
        "randint": lambda low, high: tune.randint(low, high + 1),  # [low, high], both included
        "choice": lambda *values: tune.choice(list(values)),
        "grid": lambda *values: tune.grid_search(list(values)),
    }
    return {key: makers[kind](*args) for key, spec in cfg.tune.search_space.items()
            for kind, args in spec.items()}


def absolute_paths(cfg: Config) -> dict:
    """The config as a dict with local data paths made absolute: Tune runs each trial in its
    own working directory. The API key is redacted: trials train, they never serve."""
    import os

    raw = redacted_dump(cfg)
    raw["data"]["path"] = [
        os.path.abspath(os.path.expanduser(path))
        if "://" not in path and (Path(path).expanduser().exists() or GLOB_CHARS & set(path))
        else path for path in cfg.data.paths]
    return raw


def trial_config(base: dict, params: dict) -> Config:
    """The base config with one trial's sampled values patched in."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        set_key(raw, key.split("."), value)
    return Config.model_validate(raw)


def train_trial(params: dict, base: dict, model_path: str | None, trials_dir: str,
                pbt_every: int | None = None) -> None:
    """One Tune trial: a whole `aigc-ray train` run whose reports Tune sees (under PBT, with a
    checkpoint every `pbt_every` steps)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from aigc_ray.train.driver import run_train

    raw = copy.deepcopy(base)
    if model_path:  # built once by the driver, shared by every trial
        raw["model"]["name_or_path"] = model_path
    trial_id = tune.get_context().get_trial_id()
    # Trackers: each trial is its own run, grouped under the search's name, and MLflow's default
    # store stays the one beside the search's folder rather than one in its trials folder.
    run = raw["run"]  # the search's, made the trial's
    root = Path(run["output_dir"]).expanduser().resolve()
    run.update(output_dir=trials_dir, name=trial_id,
               experiment=run.get("experiment") or run["name"],
               mlflow_uri=run.get("mlflow_uri") or f"sqlite:///{root}/mlflow.db")
    raw["eval"]["after_training"] = False  # trials compare by val_loss; generation would slow them
    cfg = trial_config(raw, params)
    if not pbt_every:
        run_train(cfg, callbacks=[TuneReportCallback()], follow=False)
        return
    checkpoint = tune.get_checkpoint()
    # Tune's trial folders are named by trial id: a checkpoint from another's is an exploit.
    donor = Path(checkpoint.path).parent.name if checkpoint else None
    if donor == trial_id:
        donor = None  # its own (a pause or a resumed search): Train resumes its own run
    elif donor:
        start_new_train_run(cfg.run.dir)
    run_reporting_checkpoints(cfg, pbt_every, donor, checkpoint.path if donor else None)


def start_new_train_run(run_dir: Path) -> None:
    """Forget the Train run in `run_dir` (its checkpoints stay, for `best/`): the trial now
    continues another trial's line."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    (run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).unlink(missing_ok=True)


def run_reporting_checkpoints(cfg: Config, every: int, donor: str | None,
                              start_from: str | None) -> None:
    """`run_train` in a thread while this trial reports each evaluation to Tune, with the
    checkpoint at every `every` steps (Tune copies it; PBT exploits copy Tune's)."""
    from ray import tune
    from ray.util.queue import Queue

    from aigc_ray.train.driver import run_train

    staging = cfg.run.dir / PBT_STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a trial Tune stopped mid-report
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            run_train(cfg, callbacks=[report_to_trial(reports, every, str(staging))],
                      follow=False, start_from=start_from)
        except BaseException as exc:  # raised again in the trial's thread
            failure.append(exc)
        finally:
            reports.put(None)

    thread = threading.Thread(target=fit, name="aigc-ray-trial", daemon=True)
    thread.start()
    staged = None
    while (row := reports.get()) is not None:
        if staged:  # Tune has copied it
            shutil.rmtree(staged, ignore_errors=True)
        staged = row.pop(STAGED_KEY, None)
        if donor:  # the first report since continuing from the donor's checkpoint
            row[DONOR_KEY], row[DONOR_STEP_KEY] = donor, start_step(cfg.run.dir)
            donor = None
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(staged) if staged else None)
    thread.join()
    shutil.rmtree(staging, ignore_errors=True)  # Tune has copied the last one
    if failure:
        raise failure[0]


def start_step(run_dir: Path) -> int | None:
    """The step rank 0 last started from (the donor checkpoint's, after an exploit)."""
    from aigc_ray.train.metrics import worker_starts

    starts = [row for row in worker_starts(run_dir) if row["rank"] == 0]
    return starts[-1]["start_step"] if starts else None


def report_to_trial(queue, every: int, staging: str):
    """A Ray Train callback (it runs in the Train controller) that hands every report to the
    Tune trial through `queue`, with a hard-linked copy of the checkpoint at every `every`
    steps: the copy survives Train deleting the original before Tune has copied it."""
    from ray.train import UserCallback

    from aigc_ray.train.metrics import PREEMPTED_KEY

    class ReportToTrial(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            row = dict(metrics[0])
            if row.get(PREEMPTED_KEY):  # a checkpoint for the restart, never evaluated
                return
            if checkpoint:
                row["checkpoint_path"] = checkpoint.path  # as Ray's TuneReportCallback has it
                if row.get("step", 0) % every == 0:
                    row[STAGED_KEY] = linked_copy(checkpoint.path,
                                                  Path(staging) / f"step-{row['step']}")
            queue.put(row)  # waits while the trial has not taken the one before

    return ReportToTrial()


def linked_copy(source: str, target: Path) -> str:
    """A copy of a checkpoint folder made of hard links (a full copy where links fail)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(src, dst)

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, copy_function=link)
    return str(target)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def pbt_interval(cfg: Config) -> int | None:
    """Steps between PBT perturbations (None when the scheduler is not PBT)."""
    if cfg.tune.scheduler != "pbt":
        return None
    return cfg.tune.pbt.perturbation_interval or cfg.train.eval_every


class KeepInBounds:
    """PBT's explore step, finished: a multiplied number stays inside its declared bounds."""

    def __init__(self, bounds: dict[str, tuple]):
        self.bounds = bounds

    def __call__(self, config: dict) -> dict:
        for key, (low, high) in self.bounds.items():
            if key in config:
                config[key] = type(config[key])(min(max(config[key], low), high))
        return config


def scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    if cfg.tune.scheduler == "pbt":
        pbt, space = cfg.tune.pbt, param_space(cfg)
        keys = pbt_mutations(cfg.tune)
        specs = {key: next(iter(cfg.tune.search_space[key].items())) for key in keys}
        return PopulationBasedTraining(
            time_attr="step", perturbation_interval=pbt_interval(cfg),
            quantile_fraction=pbt.quantile_fraction,
            resample_probability=pbt.resample_probability,
            perturbation_factors=tuple(pbt.perturbation_factors), synch=pbt.synch,
            # choice and grid: a list (PBT resamples or moves to a neighbour); numbers: the
            # distribution (PBT resamples or multiplies)
            hyperparam_mutations={key: list(args) if kind in ("choice", "grid") else space[key]
                                  for key, (kind, args) in specs.items()},
            custom_explore_fn=KeepInBounds({key: tuple(args) for key, (kind, args)
                                            in specs.items() if kind not in ("choice", "grid")}))
    return ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps or NO_STEP_LIMIT,
                         grace_period=cfg.tune.asha.grace_period or cfg.train.eval_every,
                         reduction_factor=cfg.tune.asha.reduction_factor)


def search_alg(cfg: Config, max_concurrent: int):
    """The sampler, holding at most `max_concurrent` trials at once."""
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.tune.seed), max_concurrent=max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=max_concurrent)


def concurrent_trials(cfg: Config) -> int:
    """`tune.max_concurrent_trials`, or as many trials as the cluster's CPUs and GPUs fit:
    each trial needs its workers plus a read task and its tokenizer actors."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    per_trial = (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
                 + pipeline_cpus(cfg.data) + TRIAL_DRIVER_CPUS)
    # Keep one read task's CPUs free: a trial whose workers started but whose data pipeline
    # cannot get a CPU waits forever, and so do the trials queued behind it.
    fit = int((resources.get("CPU", 1) - cfg.data.cpus_per_task) // per_trial)
    if cfg.scaling.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0)
                           // (cfg.scaling.num_workers * cfg.scaling.gpus_per_worker)))
    return max(1, fit)


def trials_at_once(cfg: Config) -> int:
    """How many trials run at once: as many as fit, or under PBT the whole population (PBT
    compares trials that train side by side; one waiting for a slot is never compared)."""
    fit = concurrent_trials(cfg)
    if cfg.tune.scheduler != "pbt":
        return fit
    population = planned_trials(cfg)
    if population > fit:
        raise ConfigError(
            f"tune.scheduler pbt trains its {population} trials at once but only {fit} fit "
            f"({'tune.max_concurrent_trials' if cfg.tune.max_concurrent_trials else 'the cluster'}"
            f"); lower tune.num_samples, or scaling.cpus_per_worker and data.cpus_per_task, "
            f"or use a larger cluster")
    return population


def progress_callback():
    """A Tune callback printing one line per evaluation and per finished trial."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get(DONOR_KEY):
                print(f"[aigc-ray] trial {trial.trial_id} exploits {result[DONOR_KEY]}: continues "
                      f"from its step {result.get(DONOR_STEP_KEY)} with "
                      f"{format_params(trial.config)}", flush=True)
            if result.get("val_loss") is not None:
                print(f"[aigc-ray] trial {trial.trial_id} step {result['step']} | val_loss "
                      f"{result['val_loss']:.4f} | {format_params(trial.config)}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            step = (trial.last_result or {}).get("step", 0)
            print(f"[aigc-ray] trial {trial.trial_id} ended at step {step}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[aigc-ray] trial {trial.trial_id} failed: see {trial.path}", flush=True)

    return TrialLines()


def show(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_params(params: dict) -> str:
    return ", ".join(f"{key}={show(value)}" for key, value in params.items())


@dataclass
class TrialRow:
    trial: str
    params: dict
    best: float | None  # of tune.metric over the trial's evaluations
    steps: int
    stopped_early: bool  # ended before its planned steps (by the scheduler, or by patience)
    status: str
    best_checkpoint: str | None
    error: str | None = None  # the first line of a failed trial's error
    # PBT: (donor trial, the donor's step this trial continued from), oldest first
    exploits: list[tuple[str, int | None]] = field(default_factory=list)

    def exploited(self) -> str:
        return ", ".join(f"{donor}@{step}" for donor, step in self.exploits) or "-"


@dataclass
class TuneSummary:
    run_dir: Path
    metric: str
    rows: list[TrialRow]
    best: TrialRow | None
    unfinished: int = 0  # trials left running or pending when the search was interrupted
    pbt: bool = False  # the table shows which trials each one exploited

    def table(self) -> str:
        keys = list(self.rows[0].params) if self.rows else []
        header = ["trial", *keys, f"best {self.metric}", "steps", "stopped early", "status",
                  *(["exploited (trial@step)"] if self.pbt else [])]
        lines = [[row.trial, *(show(row.params.get(k)) for k in keys),
                  "-" if row.best is None else f"{row.best:.4f}", str(row.steps),
                  "yes" if row.stopped_early else "no", row.status,
                  *([row.exploited()] if self.pbt else [])] for row in self.rows]
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
        return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths))
                         for line in [header, *lines])

    def line(self) -> str:
        if self.best is None:
            errors = [row.error for row in self.rows if row.error]
            return "no trial reported a result" + (f"; first error: {errors[0]}" if errors else "")
        run = RunFolder(self.run_dir)
        return (f"best trial {self.best.trial}: {self.metric} {self.best.best:.4f} with "
                f"{format_params(self.best.params)}; model in {run.best}, "
                f"config in {run.best_config}")


def planned_trials(cfg: Config) -> int:
    """How many trials the search runs: every grid point, `num_samples` times (once when the
    space is all grid)."""
    grid = [len(spec["grid"]) for spec in cfg.tune.search_space.values() if "grid" in spec]
    only_grid = len(grid) == len(cfg.tune.search_space)
    return math.prod(grid) * (1 if only_grid else cfg.tune.num_samples)


def unfinished_trials(results) -> int:
    """Trials neither finished nor failed: Tune returns normally after Ctrl-C, and only its
    trial list (not the public ResultGrid) says which trials were cut off. A trial cut off
    before its first report may not be in that list, and has no history (nor config) in the
    grid: it counts too."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    cut = sum(trial.status not in ("TERMINATED", "ERROR") for trial in trials)
    never_reported = sum(result.error is None and (result.config is None
                                                   or result.metrics_dataframe is None)
                         for result in results)
    return max(cut, never_reported)


def remove_tune_checkpoints(results) -> None:
    """Tune's copies of PBT checkpoints, once the search is over: nothing restarts from them,
    and `best/` comes from the trials' own checkpoints (Train's, in `trials/`)."""
    for result in results:
        for checkpoint in Path(result.path).glob("checkpoint_*"):
            shutil.rmtree(checkpoint, ignore_errors=True)


def best_of(cfg: Config, items: list, score):
    """The item whose `score(item)` is best by `tune.mode` (None for no items)."""
    sign = 1 if cfg.tune.mode == "min" else -1
    return min(items, key=lambda item: sign * score(item)) if items else None


def summarize(cfg: Config, results, run: RunFolder) -> list[TrialRow]:
    """One row per trial from Tune's results (a trial's whole history, resumed runs included)."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        records = [] if history is None else history.to_dict("records")
        scored = [r for r in records if _number(r.get(cfg.tune.metric))]
        best = best_of(cfg, scored, lambda r: r[cfg.tune.metric])
        steps = int(max((r.get("step", 0) for r in records), default=0))
        trial = Path(result.path).name
        status = "error" if result.error else "done"
        if cfg.train.max_steps:
            stopped = status == "done" and steps < cfg.train.max_steps
        else:  # epoch-bound: a trial the scheduler stopped never exported its final/
            stopped = status == "done" and not run.trial(trial).final.exists()
        exploits = [(r[DONOR_KEY], int(r[DONOR_STEP_KEY]) if _number(r.get(DONOR_STEP_KEY))
                     else None) for r in records if isinstance(r.get(DONOR_KEY), str)]
        rows.append(TrialRow(trial=trial, params=dict(result.config), best=best and best[
            cfg.tune.metric], steps=steps, stopped_early=stopped, status=status,
            best_checkpoint=best.get("checkpoint_path") if best else None,
            error=_first_line(result.error), exploits=exploits))
    return sorted(rows, key=lambda row: row.trial)


def _first_line(error) -> str | None:
    """The message a user needs from a trial's error (Ray wraps it in tracebacks)."""
    if error is None:
        return None
    lines = [line for line in str(error).splitlines() if line.strip()]
    return user_error(error) or (lines[-1] if lines else type(error).__name__)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def write_results(summary: TuneSummary) -> None:
    keys = list(summary.rows[0].params) if summary.rows else []
    with RunFolder(summary.run_dir).results.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *keys, f"best_{summary.metric}", "steps", "stopped_early",
                         "status", *(["exploited"] if summary.pbt else [])])
        for row in summary.rows:
            writer.writerow([row.trial, *(row.params.get(k) for k in keys), row.best, row.steps,
                             row.stopped_early, row.status,
                             *([row.exploited()] if summary.pbt else [])])


def export_best(cfg: Config, summary: TuneSummary) -> None:
    """`best/` (the best evaluation's checkpoint as a plain HF folder) and `best_config.yaml`."""
    from aigc_ray.train.export import export_checkpoint

    best, run = summary.best, RunFolder(summary.run_dir)
    checkpoint = best.best_checkpoint
    if not checkpoint or not Path(checkpoint).exists():  # pruned: the trial's exported model
        checkpoint = str(run.trial(best.trial).final)
    export_checkpoint(checkpoint, run.best)
    best_cfg = trial_config(cfg.model_dump(), best.params)
    # Its own run name: training it again must not write into this search's folder.
    best_cfg.run.name = f"{cfg.run.name}-best"
    header = (f"# The best trial ({best.trial}) of `aigc-ray tune` run {cfg.run.name}: "
              f"{summary.metric} {best.best:.4f}.\n# Train it again: aigc-ray train "
              f"{run.best_config}\n")
    run.best_config.write_text(header + to_yaml(best_cfg))


def run_tune(cfg: Config, resume: bool = False) -> TuneSummary:
    """Search `tune.search_space`; every trial is a distributed training run."""
    from ray import tune

    from aigc_ray.cluster import start_ray
    from aigc_ray.model import resolve_model_path
    from aigc_ray.train.driver import preflight
    from aigc_ray.train.metrics import plot_trial_curves

    preflight(cfg)  # the checks `aigc-ray train` makes before Ray starts
    check_tune_config(cfg, resume)
    start_ray(ray_logs=cfg.run.ray_logs)
    run_dir = cfg.run.dir
    run = RunFolder(run_dir)
    run.trials.mkdir(parents=True, exist_ok=True)
    searches_model = any(key.startswith("model.") for key in cfg.tune.search_space)
    model_path = None if searches_model else resolve_model_path(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=absolute_paths(cfg), model_path=model_path,
                             trials_dir=str(run.trials), pbt_every=pbt_interval(cfg)),
        # The trial only drives its TorchTrainer, whose workers hold the CPUs and GPUs (Tune
        # refuses an empty request, so a token share).
        {"CPU": TRIAL_DRIVER_CPUS})
    if resume:
        tuner = tune.Tuner.restore(str(run_dir), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        space = param_space(cfg)
        only_grid = all("grid" in spec for spec in cfg.tune.search_space.values())
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=scheduler(cfg),
                search_alg=search_alg(cfg, trials_at_once(cfg)),
                # Repeating a grid point repeats the same seeded run: one of each is enough.
                num_samples=1 if only_grid else cfg.tune.num_samples,
                trial_dirname_creator=_trial_dirname,
                # A trial's thread runs its TorchTrainer: only a new actor ends it for sure.
                reuse_actors=False),
            run_config=tune.RunConfig(
                name=cfg.run.name, storage_path=str(run_dir.parent), verbose=0,
                # Tune keeps every checkpoint a trial hands it (PBT's): a donor's must outlive
                # the restart of the trial that copies it, however late that comes (a search
                # that kept 4 lost one on a busy machine); they go when the search ends.
                callbacks=[progress_callback()]),
        )
    results = tuner.fit()
    unfinished = unfinished_trials(results) + max(0, planned_trials(cfg) - len(results))
    if unfinished:  # Ctrl-C: Tune saved the search state; --resume picks it up
        return TuneSummary(run_dir=run_dir, metric=cfg.tune.metric, rows=[], best=None,
                           unfinished=unfinished)

    if cfg.tune.scheduler == "pbt":
        remove_tune_checkpoints(results)
    rows = summarize(cfg, results, run)
    summary = TuneSummary(run_dir=run_dir, metric=cfg.tune.metric, rows=rows,
                          best=best_of(cfg, [r for r in rows if r.best is not None],
                                       lambda r: r.best), pbt=cfg.tune.scheduler == "pbt")
    write_results(summary)
    plot_trial_curves({row.trial: run.trial(row.trial).path for row in rows},
                      summary.best.trial if summary.best else None,
                      {row.trial for row in rows if row.stopped_early}, run.tune_curves,
                      exploits={row.trial: row.exploits for row in rows if row.exploits})
    if summary.best:
        export_best(cfg, summary)
    return summary

