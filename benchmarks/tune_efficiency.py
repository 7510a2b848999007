"""ASHA against FIFO over the same sampled configurations, in the same run.

Both searches use the same search space and sampler seed, so they draw the same trials; FIFO
trains every trial to the end, ASHA stops the worse ones at each evaluation. Printed side by
side: the training steps each spent (summed over trials), the best validation loss each found,
and the ratio of steps.

    .venv/bin/python benchmarks/tune_efficiency.py [--samples 6] [--steps 60] [--eval-every 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # 2 cores: threads only contend


def search(scheduler: str, args, corpus: dict, tmp: str) -> tuple[int, float, float, int]:
    """(steps trained over all trials, best val_loss, seconds, trials stopped early)."""
    from aigc_ray.config import load_config
    from aigc_ray.tune import run_tune

    cfg = load_config("tiny_tune", [
        f"data.path={corpus['jsonl']}", f"run.output_dir={tmp}/runs", f"run.name={scheduler}",
        f"tune.scheduler={scheduler}", f"tune.num_samples={args.samples}",
        f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}",
        f"train.log_every={args.eval_every}", "train.sample_prompts=[]"])
    start = time.perf_counter()
    summary = run_tune(cfg)
    seconds = time.perf_counter() - start
    return (sum(row.steps for row in summary.rows), summary.best.best, seconds,
            sum(row.stopped_early for row in summary.rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6, help="trials per search (6)")
    parser.add_argument("--steps", type=int, default=60, help="train.max_steps per trial (60)")
    parser.add_argument("--eval-every", type=int, default=10, help="train.eval_every (10)")
    parser.add_argument("--pairs", type=int, default=4000, help="sample corpus size (4000)")
    args = parser.parse_args()

    from aigc_ray.cluster import start_ray
    from aigc_ray.sample_data import write_sample_corpus

    start_ray()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_sample_corpus(Path(tmp) / "corpus", num_pairs=args.pairs)
        fifo = search("fifo", args, corpus, tmp)
        asha = search("asha", args, corpus, tmp)

    print(f"search       tiny_tune space (train.lr loguniform, train.warmup_steps randint), "
          f"{args.samples} trials, {args.steps} steps each, evaluation every "
          f"{args.eval_every} steps, same sampler seed")
    for name, (steps, best, seconds, stopped) in (("fifo", fifo), ("asha", asha)):
        print(f"{name:<12} {steps:>5} steps trained, best val_loss {best:.4f}, {stopped} trial(s) "
              f"stopped early, {seconds:.0f} s")
    print(f"ratio        asha/fifo steps = {asha[0] / fifo[0]:.2f}; best val_loss asha - fifo = "
          f"{asha[1] - fifo[1]:+.4f}")


if __name__ == "__main__":
    main()
