"""ASHA (and with --scheduler pbt, Population Based Training) against FIFO on the same budget.

FIFO and ASHA use the same search space and sampler seed, so they draw the same trials; FIFO
trains every trial to the end, ASHA stops the worse ones at each evaluation. PBT trains a
population of --population trials side by side for the same total steps as FIFO
(samples x steps / population each), the worse quarter continuing from the better ones'
checkpoints with perturbed values at every evaluation. Printed side by side: the training
steps each spent (summed over trials), the best validation loss each found, the seconds, and
the trials stopped early (ASHA) or the exploits (PBT).

    .venv/bin/python benchmarks/tune_efficiency.py [--samples 6] [--steps 60] [--eval-every 10]
                                                   [--scheduler asha|pbt] [--population 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # 2 cores: threads only contend


def search(scheduler: str, args, corpus: dict, tmp: str) -> tuple[int, float, float, int]:
    """(steps trained over all trials, best val_loss, seconds, trials stopped early or, for
    PBT, exploits)."""
    from aigc_ray.config import load_config
    from aigc_ray.tune import run_tune

    samples, steps, extra = args.samples, args.steps, []
    if scheduler == "pbt":  # the same step budget, spent by a population trained side by side
        samples, steps = args.population, args.samples * args.steps // args.population
        # two trials in 2 CPUs: a quarter CPU per worker (one torch thread either way)
        extra = [f"scaling.cpus_per_worker={args.pbt_cpus_per_worker}"]
    cfg = load_config("tiny_tune", [
        f"data.path={corpus['jsonl']}", f"run.output_dir={tmp}/runs", f"run.name={scheduler}",
        f"tune.scheduler={scheduler}", f"tune.num_samples={samples}",
        f"train.max_steps={steps}", f"train.eval_every={args.eval_every}",
        f"train.log_every={args.eval_every}", "train.sample_prompts=[]", *extra])
    start = time.perf_counter()
    summary = run_tune(cfg)
    seconds = time.perf_counter() - start
    events = (sum(len(row.exploits) for row in summary.rows) if scheduler == "pbt"
              else sum(row.stopped_early for row in summary.rows))
    return sum(row.steps for row in summary.rows), summary.best.best, seconds, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6, help="trials per search (6)")
    parser.add_argument("--steps", type=int, default=60, help="train.max_steps per trial (60)")
    parser.add_argument("--eval-every", type=int, default=10, help="train.eval_every (10)")
    parser.add_argument("--pairs", type=int, default=4000, help="sample corpus size (4000)")
    parser.add_argument("--scheduler", choices=["asha", "pbt"], default="asha",
                        help="compare FIFO with ASHA (default), or with ASHA and PBT")
    parser.add_argument("--population", type=int, default=2,
                        help="PBT trials, trained at once (2: what 2 CPUs fit)")
    parser.add_argument("--pbt-cpus-per-worker", type=float, default=0.25,
                        help="scaling.cpus_per_worker for PBT, so the population fits (0.25)")
    args = parser.parse_args()

    from aigc_ray.cluster import start_ray
    from aigc_ray.data.sample import write_sample_corpus

    start_ray()
    schedulers = ["fifo", "asha", *(["pbt"] if args.scheduler == "pbt" else [])]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_sample_corpus(Path(tmp) / "corpus", num_pairs=args.pairs)
        results = {name: search(name, args, corpus, tmp) for name in schedulers}

    print(f"search       tiny_tune space (train.lr loguniform, train.warmup_steps randint), "
          f"{args.samples} trials, {args.steps} steps each, evaluation every "
          f"{args.eval_every} steps, same sampler seed")
    if "pbt" in results:
        print(f"pbt          {args.population} trials side by side, "
              f"{args.samples * args.steps // args.population} steps each (the same step budget)")
    for name, (steps, best, seconds, events) in results.items():
        what = "exploit(s)" if name == "pbt" else "trial(s) stopped early"
        print(f"{name:<12} {steps:>5} steps trained, best val_loss {best:.4f}, {events} {what}, "
              f"{seconds:.0f} s")
    fifo = results["fifo"]
    for name in schedulers[1:]:
        steps, best = results[name][:2]
        print(f"ratio        {name}/fifo steps = {steps / fifo[0]:.2f}; best val_loss {name} - "
              f"fifo = {best - fifo[1]:+.4f}")


if __name__ == "__main__":
    main()
