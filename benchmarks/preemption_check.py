"""What asking for Ray Train's preemption notice costs the training loop.

    .venv/bin/python benchmarks/preemption_check.py [--workers 2] [--asks 200] [--cpus 2]

Every worker of a real `TorchTrainer` (gloo) asks `ray.train.get_preemption_info()` `--asks`
times, as the loop does at a step boundary, and times each ask; as the plain baseline it times
the same number of `torch.distributed.all_reduce` calls of one number over the same process
group (what the loop's own agreement on a number costs). The loop asks about once every
`PREEMPTION_CHECK_S` seconds of training (aigc_ray.train.loop), so the share of training time
the asks take is their mean latency over that interval. Prints both latencies, their ratio and
that share; writes benchmarks/results/preemption_check.json.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = Path(__file__).parent / "results" / "preemption_check.json"


def timed_asks(config: dict) -> None:
    """One worker: `asks` preemption asks, then `asks` one-number all-reduces, timed; rank 0
    writes its times to `out`."""
    import json
    import time
    from pathlib import Path

    import ray.train
    import torch
    import torch.distributed as dist

    def times(call) -> list[float]:
        out = []
        for _ in range(config["asks"]):
            start = time.perf_counter()
            call()
            out.append(time.perf_counter() - start)
        return out

    one = torch.zeros(1)
    times(ray.train.get_preemption_info)  # warm both paths up
    ask = times(ray.train.get_preemption_info)
    reduce = times(lambda: dist.all_reduce(one))
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps({"ask": ask, "all_reduce": reduce}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--asks", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aigc_ray.train.loop import PREEMPTION_CHECK_S

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        out = Path(storage) / "times.json"
        TorchTrainer(
            timed_asks, train_loop_config={"asks": args.asks, "out": str(out)},
            scaling_config=ScalingConfig(num_workers=args.workers,
                                         resources_per_worker={"CPU": args.cpus / args.workers}),
            run_config=RunConfig(name="preemption-check", storage_path=storage)).fit()
        measured = json.loads(out.read_text())
    ray.shutdown()
    ask_ms = 1000 * statistics.mean(measured["ask"])
    reduce_ms = 1000 * statistics.mean(measured["all_reduce"])
    share = ask_ms / 1000 / PREEMPTION_CHECK_S
    figures = {"workers": args.workers, "asks": args.asks, "ask_ms": ask_ms,
               "ask_p50_ms": 1000 * statistics.median(measured["ask"]),
               "all_reduce_ms": reduce_ms, "ratio": ask_ms / reduce_ms,
               "check_every_s": PREEMPTION_CHECK_S, "share_of_training": share,
               "cpus": args.cpus, "command": " ".join([sys.executable, *sys.argv])}
    print(f"get_preemption_info: {ask_ms:.2f} ms an ask (median "
          f"{figures['ask_p50_ms']:.2f}); one-number all_reduce: {reduce_ms:.3f} ms; ratio "
          f"{figures['ratio']:.1f}x")
    print(f"asked every {PREEMPTION_CHECK_S:g} s of training: {100 * share:.2f}% of its time")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
