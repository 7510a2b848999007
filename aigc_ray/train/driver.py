"""`run_train(cfg)`: the driver side of training. It checks the config and the model before
Ray starts any worker, builds the data, fits a `TorchTrainer`, follows the run's progress and
exports `final/` with the loss curve.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

from aigc_ray.config import Config
from aigc_ray.data.pipeline import pipeline_cpus
from aigc_ray.errors import ConfigError, DataError, user_error
from aigc_ray.run_folder import RunFolder
from aigc_ray.tokenizer import context_length
from aigc_ray.train.export import export_checkpoint
from aigc_ray.train.feed import TOO_FEW_BLOCKS, count_steps
from aigc_ray.train.loop import LoopConfig, train_loop_per_worker
from aigc_ray.train.metrics import (
    Follower,
    plot_loss_curve,
    read_jsonl,
)
from aigc_ray.train.sharding import (
    is_sharded,
)
from aigc_ray.train.trackers import check_trackers, open_trackers


@dataclass
class TrainSummary:
    run_dir: Path
    final_dir: Path
    steps: int
    total_steps: int
    val_perplexity_before: float | None
    val_perplexity_after: float | None  # of the exported model (the best checkpoint)
    samples: list[dict]
    start_model: str  # the folder or hub id training started from (the built-in one's folder)
    # eval.json: final/ against the starting model, once `evaluate_after_training` has run
    evaluation: dict | None = None

    def line(self) -> str:
        steps = f"{self.steps} steps"
        if self.steps < self.total_steps:
            steps += f" (stopped early; {self.total_steps} planned)"
        if self.val_perplexity_before is None or self.val_perplexity_after is None:
            return f"trained {steps}; final model in {self.final_dir}"
        return (f"val_perplexity {self.val_perplexity_before:.2f} before training → "
                f"{self.val_perplexity_after:.2f} after {steps}; "
                f"final model in {self.final_dir}")


def exact_validation_config():
    """Ray Train's `DataConfig`, except that validation is split unevenly and training batches
    come in the split's own order.

    Training shards must be equal (every rank takes the same number of steps, or DDP hangs), so
    Ray drops up to N-1 rows there. Validation sums losses and tokens over all ranks instead, so
    its shards may differ in size and no validation row is dropped. Ray collates prefetched
    batches in several threads and, unless asked to preserve order, yields them as they finish:
    epochs would differ and a mid-epoch resume would skip other batches than it used. (Ray Train
    replaces each dataset's execution options with these, so this is the place to ask.)
    """
    from ray.train import DataConfig

    in_order = DataConfig.default_ingest_options()
    in_order.preserve_order = True

    class ExactValidation(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            val = datasets.get("val")
            rest = {name: ds for name, ds in datasets.items() if name != "val"}
            output = super().configure(rest, world_size, worker_handles, worker_node_ids,
                                       **kwargs)
            if val is not None:
                for shard, split in zip(output, val.streaming_split(world_size, equal=False)):
                    shard["val"] = split
            return output

    return ExactValidation(execution_options={"train": in_order})


def strategy_note(cfg: Config) -> str | None:
    """What the chosen strategy cannot do with these settings (said, not refused)."""
    if is_sharded(cfg) and cfg.scaling.num_workers == 1:
        return ("[aigc-ray] note: scaling.strategy fsdp with 1 worker shards nothing (the one "
                "worker holds the whole model and optimizer state, as with ddp); raise "
                "scaling.num_workers to split them")
    return None


def training_resource_warning(cfg: Config, cluster: dict) -> str | None:
    """A warning when the cluster (as it is now) cannot hold the workers and the data pipeline
    together: Ray Train then waits for an autoscaler, which on a fixed cluster means forever.
    Elastic runs start with scaling.min_workers."""
    scaling = cfg.scaling
    workers, key = ((scaling.min_workers, "scaling.min_workers") if scaling.elastic
                    else (scaling.num_workers, "scaling.num_workers"))
    need_cpus = workers * scaling.cpus_per_worker + pipeline_cpus(cfg.data)
    need_gpus = workers * scaling.gpus_per_worker if scaling.use_gpu else 0
    have_cpus, have_gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if need_cpus <= have_cpus and need_gpus <= have_gpus:
        return None
    return (f"[aigc-ray] warning: {workers} worker(s) × "
            f"scaling.cpus_per_worker {cfg.scaling.cpus_per_worker} plus the data pipeline "
            f"({1 + cfg.data.tokenizer_actors} × data.cpus_per_task {cfg.data.cpus_per_task}) "
            f"need {need_cpus:g} CPUs{f' and {need_gpus:g} GPUs' if need_gpus else ''}; the "
            f"cluster has {have_cpus:g}{f' and {have_gpus:g}' if need_gpus else ''} now. Training "
            f"waits until an autoscaler adds them; on a fixed cluster lower {key} or "
            "scaling.cpus_per_worker")


def torch_trainer(cfg: Config, loop: LoopConfig, datasets: dict, callbacks: list | None):
    """The `TorchTrainer` of a run: its workers, their resources, failures, checkpoints kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.as_train_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=((scaling.min_workers, scaling.num_workers) if scaling.elastic
                         else scaling.num_workers),
            elastic_resize_monitor_interval_s=scaling.elastic_check_s,
            use_gpu=scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=str(loop.run_dir.parent), callbacks=callbacks,
            # Preemptions have their own budget: they never use up max_failures.
            failure_config=FailureConfig(max_failures=scaling.max_failures,
                                         max_preemption_failures=scaling.max_preemptions),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_loss" if "val" in datasets else "step",
                checkpoint_score_order="min" if "val" in datasets else "max"),
        ),
        datasets=datasets,
        dataset_config=exact_validation_config(),
    )


def finish_run(cfg: Config, run: RunFolder, final_dir: Path, total_steps: int,
               model_path: str) -> TrainSummary:
    """After the export: the loss curve (also to the trackers) and the run's summary."""
    rows = read_jsonl(run.metrics)
    plot_loss_curve(rows, run.loss_curve)
    if trackers := open_trackers(cfg, run.path):
        trackers.files(run.loss_curve)
        trackers.close()
    before = [r["val_perplexity"] for r in rows if r["step"] == 0 and r.get("val_perplexity")]
    after = [r["val_perplexity"] for r in rows if r["step"] > 0 and r.get("val_perplexity")]
    return TrainSummary(
        run_dir=run.path, final_dir=final_dir, steps=max((r["step"] for r in rows), default=0),
        total_steps=total_steps, val_perplexity_before=before[0] if before else None,
        val_perplexity_after=min(after, default=None),
        samples=_last_samples(run.samples), start_model=model_path,
    )


def run_train(cfg: Config, callbacks: list | None = None, follow: bool = True,
              start_from: str | None = None) -> TrainSummary:
    """Fit a `TorchTrainer` from the config; resumes when `run.name` already has checkpoints.

    `callbacks` are Ray Train `UserCallback`s (Tune passes its report forwarder); `follow`
    prints the run's progress lines on this console; `start_from` is a checkpoint folder to
    start from when the run has none of its own (Tune's PBT: the trial it exploits).
    """
    from aigc_ray.cluster import start_ray
    from aigc_ray.config import redacted_dump, to_yaml
    from aigc_ray.data.cache import training_split
    from aigc_ray.data.pipeline import build_datasets
    from aigc_ray.data.read import corpus_source, create_stats
    from aigc_ray.model import resolve_model_path

    files = preflight(cfg)
    start_ray(ray_logs=cfg.run.ray_logs)
    import ray

    for warning in (strategy_note(cfg), training_resource_warning(cfg, ray.cluster_resources())):
        if warning:
            print(warning, flush=True)
    run_dir = cfg.run.dir
    run = RunFolder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run.config.write_text(to_yaml(cfg))
    model_path = resolve_model_path(cfg)
    check_model_settings(cfg, model_path)
    stats = create_stats()
    source = corpus_source(cfg, files)  # a `datasets` corpus: put in the object store once
    datasets = build_datasets(cfg, model_path, stats=stats, files=source)
    if "val" in datasets:
        # Read at every evaluation: keep the small validation split in the object store once.
        datasets["val"] = datasets["val"].materialize()
    train_split = training_split(cfg, datasets["train"], files,
                                 ray.cluster_resources().get("object_store_memory", 0),
                                 cfg.scaling.num_workers)
    print(f"[aigc-ray] data: {train_split.note}", flush=True)
    train_dataset, cached_blocks = training_input(cfg, train_split)
    datasets.pop("train")  # workers read a cached split themselves (`CachedBlocks`)
    if train_dataset is not None:
        datasets["train"] = train_dataset
    try:
        total_steps, epochs_bound = count_steps(cfg, train_split.rows, cfg.scaling.num_workers)
    except DataError as exc:
        raise DataError(f"{exc}{skipped_rows_note(stats)}") from None
    sample_prompts = (cfg.train.sample_prompts if cfg.train.sample_prompts is not None
                      else validation_prompts(cfg, source))

    loop = LoopConfig(
        # Workers never serve: the API key stays out of Ray (its dashboard shows these).
        config=Config.model_validate(redacted_dump(cfg)), model_path=model_path,
        run_dir=run_dir, total_steps=total_steps, epochs_bound=epochs_bound,
        has_val="val" in datasets, cached_blocks=cached_blocks, sample_prompts=sample_prompts,
        start_from=start_from)
    trainer = torch_trainer(cfg, loop, datasets, callbacks)
    try:
        with Follower(run_dir, total_steps) if follow else contextlib.nullcontext():
            result = trainer.fit()
    except Exception as exc:  # Ray Train raises what failed the run
        message = user_error(exc)
        if message and message.startswith(TOO_FEW_BLOCKS):  # a streamed split found empty
            raise DataError(f"{message}{skipped_rows_note(stats)}") from None
        raise
    if result.error:
        raise result.error

    write_data_record(run.data_record, train_split, stats, shuffle_note(cfg, train_split))
    final_dir = run.final
    export_checkpoint(_best_checkpoint(result, "val" in datasets).path, final_dir)

    return finish_run(cfg, run, final_dir, total_steps, model_path)


def preflight(cfg: Config) -> list[str]:
    """Everything `aigc-ray train` and `aigc-ray tune` can check before Ray starts: the model's
    config loads, each tracker's library is installed, the data files exist (returned). A check
    added here applies to both; those that need the resolved model (the built-in one is built
    with Ray) are in `check_model_settings`, which every run makes."""
    from aigc_ray.data.pipeline import check_config
    from aigc_ray.model import check_model_path

    check_model_path(cfg)
    check_trackers(cfg)
    return check_config(cfg)


def check_model_settings(cfg: Config, model_path: str) -> None:
    """Settings that need the model's config (not its weights): checked before any worker."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    depth = getattr(config, "num_hidden_layers", None)
    if depth is not None and cfg.train.freeze_layers > depth:
        raise ConfigError(f"train.freeze_layers is {cfg.train.freeze_layers} but the model has "
                          f"{depth} blocks; set it to at most {depth}")
    positions = context_length(config)
    if positions is not None and cfg.data.block_size > positions:
        raise ConfigError(f"data.block_size is {cfg.data.block_size} but the model takes at most "
                          f"{positions} positions; set data.block_size to at most {positions}")


def training_input(cfg: Config, split) -> tuple[object, list | None]:
    """(the Dataset Ray Train splits among the workers, or None; the cached blocks every worker
    reads itself, or None). A cached split is read whole by each worker (`CachedBlocks`) unless
    `data.shuffle=global` asks Ray Data for a full random shuffle each epoch."""
    from ray.data import RandomSeedConfig

    if cfg.data.shuffle == "global":
        return split.dataset.random_shuffle(seed=RandomSeedConfig(
            cfg.train.seed % 2**31, reseed_after_execution=True)), None
    if split.blocks is not None:
        return None, split.blocks
    return split.dataset, None


def shuffle_note(cfg: Config, split) -> str:
    """What `data.shuffle` did to this run's training order, in words (data.json)."""
    if cfg.data.shuffle == "global":
        return "global: a Ray Data random_shuffle of the whole split every epoch"
    if cfg.data.shuffle is False:
        return "none: file order"
    if split.blocks is not None:
        return f"every epoch a permutation of the cached blocks drawn from seed {cfg.train.seed}"
    return ("every epoch the files in a new order and the blocks mixed through a local buffer "
            f"(seed {cfg.train.seed})")


def skipped_rows_note(stats) -> str:
    """'; N rows were skipped (reason n, ...)' from the pipeline's counts, or ''."""
    import ray

    from aigc_ray.data.read import SKIP_REASONS

    totals = ray.get(stats.totals.remote())
    skipped = {reason: int(totals.get(f"skipped.{reason}", 0)) for reason in SKIP_REASONS}
    if not sum(skipped.values()):
        return ""
    detail = ", ".join(f"{reason} {n:,}" for reason, n in skipped.items() if n)
    return (f"; {sum(skipped.values()):,} rows were skipped ({detail}): `aigc-ray data` "
            "counts them, data.strict=true names the first")


SAMPLE_PROMPTS = 2  # drawn from the validation split when train.sample_prompts is not given


def validation_prompts(cfg: Config, files: list) -> list[str]:
    """Prompts for the samples at each evaluation, from the run's own validation split (the
    training split when there is none): the user's data, never the sample corpus's questions.
    A conversation gives its first user message; a pair its prompt; text its first words."""
    import json

    from aigc_ray.data.read import MESSAGES_COLUMN, read_corpus

    split = "val" if cfg.data.val_fraction > 0 else "train"
    rows = read_corpus(cfg, split, files=files).take(SAMPLE_PROMPTS)
    prompts = []
    for row in rows:
        if cfg.data.chat:
            users = [m["content"] for m in json.loads(row[MESSAGES_COLUMN])
                     if m["role"] == "user"]
            prompt = users[0] if users else ""
        elif cfg.data.supervised:
            prompt = row[cfg.data.prompt_field]
        else:
            prompt = " ".join(row[cfg.data.text_field].split()[:8])
        if prompt.strip():
            prompts.append(prompt)
    return prompts


def write_data_record(path: Path, split, stats, shuffle: str) -> None:
    """`data.json`: how the training split was fed (cached or streamed) and in what order, how
    many passes the tokenizers made over each split, and the pipeline's counts (documents,
    skipped rows)."""
    import json

    import ray

    record = {"training_split": "cached" if split.cached_bytes is not None else "streamed",
              "cached_bytes": split.cached_bytes, "train_blocks": split.rows,
              "shuffle": shuffle, "block_order_hash": split.order_hash}
    try:
        record.update({"tokenize_passes": {name: ray.get(stats.passes.remote(
            f"tokenize:{name}:")) for name in ("train", "val")},
            "counts": ray.get(stats.totals.remote())})
        ray.kill(stats)
    except ray.exceptions.RayActorError:  # its node is gone: the model is not lost for that
        record.update({"tokenize_passes": None, "counts": None})
        print("[aigc-ray] data.json has no pipeline counts: the node that kept them is gone",
              flush=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def _best_checkpoint(result, has_val: bool):
    if has_val and result.best_checkpoints:
        return min(result.best_checkpoints, key=lambda pair: pair[1].get("val_loss", math.inf))[0]
    return result.checkpoint


def _last_samples(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    last = max((r["step"] for r in rows), default=None)
    return [r for r in rows if r["step"] == last]
