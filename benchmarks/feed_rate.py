"""Tokens per second the training data path can feed one worker, with no model and no GPU.

Ours: the datasets exactly as `run_train` builds them (`build_datasets` → `training_split`:
tokenized once and cached in the object store, or streamed and tokenized again each epoch),
a real `TorchTrainer` whose workers run the training loop's data side epoch after epoch:
`EpochFeed(training_passes(...))` (for a cached split every block read from the object store
and permuted per epoch, as `data.shuffle` does by default; for a streamed one the worker's Ray
Data shard read by a background thread epoch after epoch; the collate class that trims the
padding, counts tokens and targets), the grad-accum grouping, the per-step
target-count sum and the logging interval's bookkeeping, with the model step replaced by a no-op. Each worker records
per epoch: tokens delivered, seconds, the wait for every batch, and the gap at the epoch
boundary (last batch of epoch k → first batch of epoch k+1). A third run per corpus paces the
loop like a GPU (a sleep of tokens / --gpu-pace per micro-batch) to show the stall a GPU sees:
the reader thread starts the next epoch's stream while the loop still works through the batches
it queued from the current one.
Baseline: the same blocks as numpy arrays in one process, sliced into batches and put through
the same collate class and bookkeeping: the cost floor of the work itself, without Ray.

Steady rate: tokens of epochs 2..N over their wall time, boundaries included. Boundary stall:
the boundary gap minus the mean gap between batches inside an epoch, as ms and as a share of a
steady epoch. data_wait: the share of epochs 2..N the loop spent waiting for batches. A GPU
running GPT-2-124M on an H100 takes about 600k tokens/s per worker.

    .venv/bin/python benchmarks/feed_rate.py [--epochs 6] [--pairs 4000] [--large-factor 10]
        [--batch-size 8] [--block-size 1024] [--workers 1] [--gpu-pace 600000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # 2 cores: threads only contend

GPU_TOKENS_PER_SECOND = 600_000  # GPT-2-124M training on one H100, for scale
LOG_EVERY = 10  # steps per logging interval: the loop's clock read and all-reduce


def feed_loop(loop_config: dict) -> None:
    """A Ray Train worker: the training loop of `aigc_ray.train.train_loop_per_worker` with
    the model step taken out; per-epoch timings go to `<out>/rank-N.json`."""
    import ray.train
    import ray.train.torch

    from aigc_ray.config import Config
    from aigc_ray.train.feed import EpochFeed, training_passes
    from aigc_ray.train.loop import all_reduce_sum, loss_scale

    # 1. Set up: the same shard and device as the real loop. Waits are timed here, as the loop's
    #    WaitClock times them on a CPU (two clock reads around next()).
    cfg = Config.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    pace = loop_config["pace"]  # tokens per second of the stand-in model step; 0: no-op
    interval_targets = interval_tokens = step = 0
    interval_start, interval_waited = time.perf_counter(), 0.0
    epochs = []

    # 2. Epochs: the real loop's grouping and bookkeeping, timing every batch's arrival.
    passes = training_passes(loop_config["cached_blocks"], cfg, device, rank, world_size)
    source = EpochFeed(passes, device, 0, cfg.train.epochs)
    for _ in range(cfg.train.epochs):
        batches = source.epoch()
        start = time.perf_counter()
        arrivals, waits, tokens, targets, end_wait = [], [], 0, 0, 0.0
        while True:
            micro = []
            for _ in range(cfg.train.grad_accum_steps):
                asked = time.perf_counter()
                batch = next(batches, None)  # None: the epoch ended
                got = time.perf_counter()
                interval_waited += got - asked
                if batch is None:
                    end_wait = got - asked
                    break
                arrivals.append(got)
                waits.append(got - asked)
                micro.append(batch)
            if len(micro) < cfg.train.grad_accum_steps:
                break  # the epoch ended
            loss_scale(micro, world_size)  # the step would multiply its loss by this
            for micro_batch in micro:
                interval_targets += micro_batch["targets"]
                interval_tokens += micro_batch["tokens"]
                tokens += micro_batch["tokens"]
                targets += micro_batch["targets"]
            if pace:  # a stand-in for the model's steps
                time.sleep(sum(b["tokens"] for b in micro) / pace)
            step += 1
            if step % LOG_EVERY == 0:
                now = time.perf_counter()
                share = interval_waited / (now - interval_start)
                all_reduce_sum(interval_targets, interval_tokens, share, device=device)
                interval_targets = interval_tokens = 0
                interval_start, interval_waited = now, 0.0
        epochs.append({"start": start, "end": time.perf_counter(), "arrivals": arrivals,
                       "waits": waits, "end_wait": end_wait, "tokens": tokens,
                       "targets": targets})

    source.close()

    # 3. Report: a file per rank (the driver reads them after fit()).
    Path(loop_config["out"], f"rank-{rank}.json").write_text(json.dumps(epochs))


def summarize(epochs: list[dict]) -> dict:
    """Steady rate, boundary stalls and first-epoch numbers from one worker's epoch records."""
    steady = epochs[1:]
    seconds = steady[-1]["end"] - steady[0]["start"]
    gaps = [later - earlier for epoch in steady
            for earlier, later in zip(epoch["arrivals"], epoch["arrivals"][1:])]
    mean_gap = statistics.fmean(gaps)
    boundaries = [following["arrivals"][0] - previous["arrivals"][-1]
                  for previous, following in zip(epochs, epochs[1:])]
    stalls = [gap - mean_gap for gap in boundaries]
    epoch_seconds = statistics.fmean(e["end"] - e["start"] for e in steady)
    return {
        "rate": sum(e["tokens"] for e in steady) / seconds,
        "epoch_seconds": epoch_seconds,
        "batches": len(steady[0]["arrivals"]),
        "mean_gap": mean_gap,
        "stall": statistics.fmean(stalls),
        "stall_max": max(stalls),
        "end_wait": statistics.fmean(e["end_wait"] for e in epochs[:-1]),
        "first_wait": statistics.fmean(e["waits"][0] for e in steady),
        "first_epoch": epochs[0]["end"] - epochs[0]["start"],
        "wait_share": sum(sum(e["waits"]) for e in steady) / seconds,
    }


def run_feed(cfg, model_path: str, files: list[str], workers: int, pace: float,
             storage: Path, name: str) -> tuple[dict, str, float, object]:
    """(per-rank summaries merged, the split's note, seconds to prepare the split, the split)
    for one TorchTrainer run that only feeds."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aigc_ray.data.cache import training_split
    from aigc_ray.data.pipeline import build_datasets
    from aigc_ray.train.driver import exact_validation_config, training_input

    start = time.perf_counter()
    datasets = build_datasets(cfg, model_path, files=files)
    split = training_split(cfg, datasets["train"], files,
                           ray.cluster_resources().get("object_store_memory", 0), workers)
    train, cached_blocks = training_input(cfg, split)
    prepare = time.perf_counter() - start
    out = storage / name
    out.mkdir(parents=True)
    trainer = TorchTrainer(
        feed_loop,
        train_loop_config={"config": cfg.model_dump(), "out": str(out), "pace": pace,
                           "cached_blocks": cached_blocks},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
        datasets={"train": train} if train is not None else {},
        dataset_config=exact_validation_config(),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    ranks = [summarize(json.loads(path.read_text())) for path in sorted(out.glob("rank-*.json"))]
    merged = {key: statistics.fmean(r[key] for r in ranks) for key in ranks[0]}
    merged["stall_max"] = max(r["stall_max"] for r in ranks)
    return merged, split.note, prepare, split


def block_arrays(dataset) -> dict:
    """The training blocks of a cached split as whole numpy arrays, in one process."""
    import numpy as np

    parts = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def baseline(arrays: dict, cfg, epochs: int) -> dict:
    """Steady tokens/s of slicing the arrays into batches through the same collate class and
    the same per-step bookkeeping, one process, no Ray."""
    import torch

    from aigc_ray.train.feed import batch_collator

    collate = batch_collator(pin=False)
    batch_size, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    rows = len(arrays["input_ids"]) // (batch_size * accum) * (batch_size * accum)
    timings = []
    for _ in range(epochs):
        start, tokens = time.perf_counter(), 0
        for group in range(0, rows, batch_size * accum):
            micro = []
            for row in range(group, group + batch_size * accum, batch_size):
                batch = collate({key: value[row: row + batch_size]
                                 for key, value in arrays.items()})
                batch["tokens"], batch["targets"] = batch["counts"].tolist()
                micro.append(batch)
            global_targets = torch.stack([b["counts"][1] for b in micro]).sum()
            global_targets.clamp(min=1)
            tokens += sum(b["tokens"] for b in micro)
        timings.append((tokens, time.perf_counter() - start))
    steady = timings[1:]
    return {"rate": sum(t for t, _ in steady) / sum(s for _, s in steady),
            "epoch_seconds": statistics.fmean(s for _, s in steady)}


def start_local_ray(num_cpus: int) -> None:
    """A private local cluster (never one someone else started), set up as `start_ray` does."""
    import ray
    from ray.data import DataContext
    from transformers.utils import logging as hf_logging

    ray.init(address="local", num_cpus=num_cpus, object_store_memory=2**30,
             logging_level=logging.WARNING, configure_logging=True, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    DataContext.get_current().enable_progress_bars = False


MODES = (  # name, data.cache_max_bytes, paced like a GPU
    ("cached", "null", False),
    ("streamed", "0", False),
    ("cached@GPU", "null", True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (6: 5 boundaries)")
    parser.add_argument("--pairs", type=int, default=4000, help="small corpus size (4000)")
    parser.add_argument("--large-factor", type=int, default=10,
                        help="the large corpus is this many times the small one (10)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (8)")
    parser.add_argument("--block-size", type=int, default=1024,
                        help="tokens per block (1024, the GPU shape)")
    parser.add_argument("--workers", type=int, default=1, help="training workers (1)")
    parser.add_argument("--gpu-pace", type=float, default=GPU_TOKENS_PER_SECOND,
                        help="tokens/s of the GPU stand-in for the paced runs (600000; 0: none)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (2)")
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be at least 3 (epoch 1 warms up; the rest are measured)")

    from aigc_ray.config import load_config
    from aigc_ray.data.sample import write_sample_corpus
    from aigc_ray.model import resolve_model_path

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    start_local_ray(args.cpus)
    ray_start = time.perf_counter() - start
    rows, baselines = [], {}
    modes = [mode for mode in MODES if args.gpu_pace or not mode[2]]
    with tempfile.TemporaryDirectory(prefix="aigc-ray-feed-") as tmp:
        corpora = {"small": args.pairs, "large": args.pairs * args.large_factor}
        model_path = None
        for corpus, pairs in corpora.items():
            paths = write_sample_corpus(Path(tmp) / corpus, num_pairs=pairs)
            for mode, budget, paced in modes:
                cfg = load_config("tiny_text", [
                    f"data.path={paths['text']}", f"data.block_size={args.block_size}",
                    f"data.cache_max_bytes={budget}", f"run.output_dir={tmp}/runs",
                    f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}",
                    "train.max_steps=null", f"scaling.num_workers={args.workers}"])
                # One tokenizer for both corpora: the built-in one, trained on the small corpus.
                model_path = model_path or resolve_model_path(cfg)
                summary, note, prepare, split = run_feed(
                    cfg, model_path, [paths["text"]], args.workers,
                    args.gpu_pace if paced else 0, Path(tmp) / "train",
                    f"{corpus}-{mode.replace('@', '-')}")
                if mode == "cached" and split.cached_bytes is not None:
                    baselines[corpus] = baseline(block_arrays(split.dataset), cfg, args.epochs)
                rows.append({"corpus": corpus, "pairs": pairs, "mode": mode, "note": note,
                             "prepare": prepare, **summary})
                del split
    elapsed = time.perf_counter() - start

    print(f"setup        tiny_text on the sample corpus, block_size {args.block_size}, batch "
          f"{args.batch_size} per worker ({args.batch_size * args.block_size:,} tokens at most), "
          f"{args.workers} worker(s) × {cfg.scaling.cpus_per_worker} CPU, prefetch "
          f"{cfg.train.prefetch_batches} batches, {args.epochs} epochs ({args.epochs - 1} "
          f"boundaries), model step: a no-op; @GPU: a sleep at {args.gpu_pace:,.0f} tokens/s")
    print(f"machine      {os.cpu_count()} CPUs, Ray with {args.cpus}; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (above {os.cpu_count()}: "
          "other work shared these cores)")
    print(f"ray start    {ray_start:.1f} s (once per job, not counted below); the whole "
          f"benchmark {elapsed:.0f} s")
    for row in rows:
        if row["mode"] != "cached@GPU":
            print(f"data         {row['corpus']} {row['mode']}: {row['note']}")
    print()
    header = (f"{'corpus':<16} {'mode':<10} {'tokens/s/worker':>15} {'vs GPU':>7} "
              f"{'stall ms':>9} {'% epoch':>8} {'max ms':>7} {'data_wait':>9} {'ms/batch':>8} "
              f"{'epoch s':>8} {'batches':>7} {'epoch 1 s':>9} {'prepare s':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        corpus = f"{row['corpus']} ({row['pairs']:,})"
        vs_gpu = ("paced" if row["mode"] == "cached@GPU"
                  else f"{row['rate'] / GPU_TOKENS_PER_SECOND:.1f}x")
        print(f"{corpus:<16} {row['mode']:<10} {row['rate']:>15,.0f} {vs_gpu:>7} "
              f"{1e3 * row['stall']:>9.1f} {100 * row['stall'] / row['epoch_seconds']:>7.2f}% "
              f"{1e3 * row['stall_max']:>7.1f} {100 * row['wait_share']:>8.1f}% "
              f"{1e3 * row['mean_gap']:>8.2f} {row['epoch_seconds']:>8.2f} {row['batches']:>7.0f} "
              f"{row['first_epoch']:>9.2f} {row['prepare']:>9.1f}")
    print()
    for row in rows:
        print(f"boundary     {row['corpus']} {row['mode']}: the epoch's end (next() → None) "
              f"{1e3 * row['end_wait']:.1f} ms + the next epoch's first batch "
              f"{1e3 * row['first_wait']:.1f} ms")
    for corpus, base in baselines.items():
        cached = next(r for r in rows if r["corpus"] == corpus and r["mode"] == "cached")
        print(f"baseline     {corpus}: {base['rate']:,.0f} tokens/s (numpy slices → the same "
              f"collate and bookkeeping, one process, no Ray; {base['epoch_seconds']:.3f} s an "
              "epoch)")
        print(f"ratio        {corpus} cached / baseline = {cached['rate'] / base['rate']:.3f}")
    print("target       cached ≥ 2,000,000 tokens/s per worker; boundary stall < 1% of an epoch")


if __name__ == "__main__":
    main()
