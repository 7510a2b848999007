"""Training tokens per second of `aigc-ray train` against a plain PyTorch loop, in the same run.

Ours: `run_train` (Ray Data streaming the corpus into Ray Train V2 workers, DDP over gloo),
1 worker, then 2 workers. Its rate is the one `metrics.jsonl` reports: real (non-padding) tokens
of the global batch per second of training, the first logging interval (pipeline and worker
warm-up) left out, evaluation time left out.
Baseline: one process, no Ray: the same model, corpus blocks (tokenized and packed by the same
code), batch, AdamW and schedule, the same loss, the same torch thread count, timed over the
same steps after the same warm-up.
Set-up (Ray start, worker group, data pipeline start) is shown apart: it is paid once per run.

    .venv/bin/python benchmarks/train_throughput.py [--steps 200] [--pairs 4000] [--size default]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # 2 cores: threads only contend

SIZES = {  # model.builtin settings; "default" is the shipped tiny_cpu model
    "default": {},
    "small": {"n_layer": 6, "n_embd": 384, "n_head": 6},
}


def corpus_blocks(cfg, model_dir: str) -> list[dict]:
    """Every training block of the corpus, tokenized and packed by our own `TokenizeAndPack`."""
    from aigc_ray.data import ROW_COLUMN, TokenizeAndPack, document_text, split_of, tokenizer_spec

    pack = TokenizeAndPack(tokenizer_spec(model_dir), cfg.data.model_dump(), "train")
    prompts, completions = [], []
    with open(cfg.data.paths[0], encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if split_of(document_text(row, cfg.data), cfg.data.val_fraction) == "train":
                prompts.append(row[cfg.data.prompt_field])
                completions.append(row[cfg.data.completion_field])
    out = pack({cfg.data.prompt_field: prompts, cfg.data.completion_field: completions,
                ROW_COLUMN: [str(i) for i in range(len(prompts))]})
    return [{key: out[key][i] for key in out} for i in range(len(out["input_ids"]))]


def baseline(cfg, model_dir: str, blocks: list[dict], steps: int, warmup: int,
             threads: int) -> float:
    """Tokens per second of a plain single-process loop over the same blocks."""
    import numpy as np
    import torch

    from aigc_ray.model import load_model
    from aigc_ray.train import decay_groups, lr_factor, token_loss_sum, trim_padding

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    model = load_model(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=(0.9, 0.95))
    total = warmup + steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total, cfg.train.warmup_steps, cfg.train.lr_schedule, cfg.train.min_lr_ratio))
    rows = itertools.cycle(blocks)
    tokens, start = 0, time.perf_counter()
    for step in range(total):
        if step == warmup:
            tokens, start = 0, time.perf_counter()
        chunk = [next(rows) for _ in range(cfg.train.batch_size)]
        batch = trim_padding({key: torch.from_numpy(np.stack([row[key] for row in chunk]))
                              for key in chunk[0]})
        loss_sum, targets = token_loss_sum(model, batch)
        (loss_sum / targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def ours(cfg) -> tuple[float, float, int]:
    """(tokens per second after the first interval, wall seconds of the run, torch threads)."""
    from aigc_ray.metrics import read_jsonl, worker_starts
    from aigc_ray.train import run_train

    start = time.perf_counter()
    summary = run_train(cfg)
    wall = time.perf_counter() - start
    rates = [row["tokens_per_second"] for row in read_jsonl(summary.run_dir / "metrics.jsonl")
             if row["loss"] is not None][1:]
    # Each rate covers the same number of steps (about the same tokens): the harmonic mean is
    # total tokens over total time.
    threads = worker_starts(summary.run_dir)[0]["torch_threads"]
    return statistics.harmonic_mean(rates), wall, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (200)")
    parser.add_argument("--pairs", type=int, default=4000, help="sample corpus size (4000)")
    parser.add_argument("--size", choices=sorted(SIZES), default="default",
                        help="built-in model size: default (tiny_cpu's) or small (~11M)")
    args = parser.parse_args()

    from aigc_ray.cluster import start_ray
    from aigc_ray.config import load_config
    from aigc_ray.model import resolve_model_path
    from aigc_ray.sample_data import write_sample_corpus

    log_every = 20
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_sample_corpus(Path(tmp) / "corpus", num_pairs=args.pairs)
        size = [f"model.builtin.{key}={value}" for key, value in SIZES[args.size].items()]

        def config(workers: int):
            # One evaluation, at the end; batch 8 per worker as in tiny_cpu; no generation
            # report after training (the whole-run wall time is training's own).
            return load_config("tiny_cpu", [
                f"data.path={corpus['jsonl']}", f"run.output_dir={tmp}/runs",
                f"run.name=w{workers}", f"train.max_steps={args.steps}",
                f"train.eval_every={args.steps}", f"train.log_every={log_every}",
                "train.sample_prompts=[]", "eval.after_training=false",
                f"scaling.num_workers={workers}", *size])

        start = time.perf_counter()
        start_ray()
        ray_start = time.perf_counter() - start
        cfg = config(1)
        model_dir = resolve_model_path(cfg)

        one_rate, one_wall, threads = ours(cfg)
        two_rate, two_wall, _ = ours(config(2))
        blocks = corpus_blocks(cfg, model_dir)
        base_rate = baseline(cfg, model_dir, blocks, args.steps - log_every, log_every,
                             threads)
        from transformers import AutoConfig

        model_cfg = AutoConfig.from_pretrained(model_dir)

    params = f"{model_cfg.n_layer} layers × {model_cfg.n_embd} wide"
    print(f"setup        built-in model ({params}), {args.pairs:,} pairs, block_size "
          f"{cfg.data.block_size}, batch {cfg.train.batch_size} per worker, {args.steps} steps, "
          f"{os.cpu_count()} CPUs, {threads} torch thread(s) per worker and in the baseline")
    print(f"ray start    {ray_start:.1f} s (once per job, not counted below)")
    print(f"ours 1×      {one_rate:,.0f} tokens/s   (whole run {one_wall:.1f} s wall: worker "
          "group, data pipeline, evaluations and export included)")
    print(f"baseline     {base_rate:,.0f} tokens/s   (plain PyTorch loop, one process, no Ray)")
    print(f"ours 2×      {two_rate:,.0f} tokens/s   (whole run {two_wall:.1f} s wall; "
          f"global batch {2 * cfg.train.batch_size})")
    print(f"ratio        ours 1 worker / baseline = {one_rate / base_rate:.3f}")
    print(f"ratio        ours 2 workers / 1 worker = {two_rate / one_rate:.2f} "
          f"(on {os.cpu_count()} cores, data pipeline included)")


if __name__ == "__main__":
    main()
