"""lm-evaluation-harness through our served model: prompts per request and requests in flight
against wall time.

The same tasks, the same checkpoint, the same Serve replica, scored once per setting
(BATCHxCONCURRENCY: lm-eval's `batch_size`, prompts per HTTP request, and `num_concurrent`):

    .venv/bin/python benchmarks/harness_concurrency.py [--limit 100] [--runs 1x1,1x8,8x1,8x4]
        [--max-batch-size 16] [--cpus 2] [--tasks choice,text,reply]

The built-in tiny model (`common.build_checkpoint`) is served on a local Ray cluster through the
app `aigc-ray eval --harness` uses (`aigc_ray.harness.served`), and lm-eval's local-completions
scores the sample corpus's tasks: `choice` (multiple choice: one loglikelihood request per
answer), `text` (rolling loglikelihood: one request per window of a document) and `reply`
(greedy generation up to stop strings). With several prompts in flight the replica's continuous
batching scores them in one forward pass. Goal: num_concurrent 8 at least 3x faster than 1
(lm-eval's default of one prompt per request), scores equal either way. Prints a table and the
ratios, and writes the figures to benchmarks/results/harness_concurrency.json.
"""

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path

# Before lm_eval or datasets is imported anywhere: the task data are local files.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import build_checkpoint  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "harness_concurrency.json"
WARMUP_LIMIT = 4  # documents per task: the first calls pay for lazy initialization


def request_count(out: dict) -> int:
    """lm-eval's requests: the arguments of every logged sample (an answer of a multiple-choice
    document, or a document of a rolling task: one window each when it fits the context)."""
    return sum(len(sample["arguments"]) for samples in out["samples"].values()
               for sample in samples)


def differences(reference: dict, other: dict) -> list[str]:
    """`task.metric a != b` for each score that differs by more than 1e-6 relative (a rolling
    log-likelihood sums windows batched with different neighbours: ~1e-10 apart)."""
    found = []
    for task in sorted(set(reference) | set(other)):
        a, b = reference.get(task, {}), other.get(task, {})
        for metric in sorted(set(a) | set(b)):
            x, y = a.get(metric), b.get(metric)
            if x is None or y is None or not math.isclose(x, y, rel_tol=1e-6):
                found.append(f"{task}.{metric} {x!r} != {y!r}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    parser.add_argument("--runs", default="1x1,1x8,8x1,8x4",
                        help="BATCHxCONCURRENCY, comma-separated: lm-eval's batch_size (prompts "
                        "per HTTP request) and num_concurrent (requests in flight)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="serve.max_batch_size")
    parser.add_argument("--cpus", type=int, default=2, help="Ray num_cpus")
    parser.add_argument("--tasks", default="choice,text,reply",
                        help="sample tasks, comma-separated: choice, text, reply")
    args = parser.parse_args()
    settings = [tuple(int(n) for n in run.split("x")) for run in args.runs.split(",")]
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]

    import ray

    from aigc_ray.cluster import start_ray
    from aigc_ray.data.sample import write_sample_corpus
    from aigc_ray.evaluate import load_eval_config
    from aigc_ray.harness import harness_spec, run_harness, scores, serve_running, served

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(Path(tmp) / "model")
        tasks = write_sample_corpus(Path(tmp) / "tasks", num_pairs=10)["harness"]
        files = ",".join(tasks[name] for name in names)
        path, cfg = load_eval_config(checkpoint, [f"serve.max_batch_size={args.max_batch_size}"])
        warmup = harness_spec(files, WARMUP_LIMIT, None)
        harness = harness_spec(files, args.limit, None)
        print(f"{os.cpu_count()} CPUs, Ray num_cpus {args.cpus}, serve.max_batch_size "
              f"{cfg.serve.max_batch_size}, batch_wait_timeout_s {cfg.serve.batch_wait_timeout_s}"
              f", tasks {names}, {args.limit} documents each", flush=True)
        start_ray(num_cpus=args.cpus)
        runs = {}
        try:
            with serve_running() as port, served(str(path), cfg, port) as url:
                run_harness(url, str(path), warmup, 8)
                for batch, concurrency in settings:
                    out = run_harness(url, str(path), harness, concurrency, log_samples=True,
                                      batch_size=batch)
                    runs[f"{batch}x{concurrency}"] = {
                        "batch_size": batch, "concurrency": concurrency,
                        "seconds": out["seconds"], "requests": request_count(out),
                        "scores": scores(out)}
                    print(f"  {batch} per request x {concurrency} in flight: "
                          f"{out['seconds']:.1f} s", flush=True)
        finally:
            ray.shutdown()

    base = next(iter(runs.values()))
    print(f"\n{'prompts/request':>16}{'in flight':>10}{'seconds':>9}{'requests':>10}{'req/s':>8}"
          f"{'speedup':>9}")
    for r in runs.values():
        r["requests_per_second"] = r["requests"] / r["seconds"]
        r["speedup"] = base["seconds"] / r["seconds"]
        print(f"{r['batch_size']:>16}{r['concurrency']:>10}{r['seconds']:>9.1f}{r['requests']:>10}"
              f"{r['requests_per_second']:>8.1f}{r['speedup']:>8.2f}x")
    mismatches = {name: differences(base["scores"], r["scores"]) for name, r in runs.items()}
    equal = not any(mismatches.values())
    print("scores equal across runs (1e-6 relative)" if equal else "scores DIFFER:")
    for name, found in mismatches.items():
        for line in found:
            print(f"  {name}: {line}")
    ratios = {}
    if "1x1" in runs and "1x8" in runs:
        ratios["concurrency_8_vs_1"] = runs["1x1"]["seconds"] / runs["1x8"]["seconds"]
        print(f"num_concurrent 8 vs 1 (one prompt per request, lm-eval's default): "
              f"{ratios['concurrency_8_vs_1']:.2f}x (goal >= 3x)")
    if "1x1" in runs and "8x4" in runs:
        ratios["defaults_vs_lm_eval"] = runs["1x1"]["seconds"] / runs["8x4"]["seconds"]
        print(f"aigc-ray eval --harness's defaults (8 per request, 4 in flight) vs lm-eval's "
              f"(1, 1): {ratios['defaults_vs_lm_eval']:.2f}x")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "cpus": os.cpu_count(), "ray_num_cpus": args.cpus, "tasks": names, "limit": args.limit,
        "max_batch_size": cfg.serve.max_batch_size,
        "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
        "runs": {name: {k: round(v, 2) if isinstance(v, float) else v
                        for k, v in r.items() if k != "scores"} for name, r in runs.items()},
        "scores": base["scores"], "scores_equal": equal,
        "ratios": {k: round(v, 2) for k, v in ratios.items()},
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
