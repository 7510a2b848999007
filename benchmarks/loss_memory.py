"""Peak memory and tokens per second of a training step, train.loss_impl plain against chunked.

Issue 29: on a Qwen2.5-0.5B-shaped model (random weights, no download) at 8 × 2,048 tokens on a
GPU, chunked should take >= 8 GB less peak GPU memory than plain at >= 1.0x its tokens per
second. `fused` (liger-kernel) is not implemented yet, so it is not measured here.

Each impl runs in a process of its own (this script again, with --one). A step: forward and
backward through `token_loss_sum` (each row's first quarter is a prompt, labelled -100), AdamW,
zero_grad; one warm-up step, then --steps timed ones. GPU: bf16 autocast, fp32 parameters, peak =
max_memory_allocated over the timed steps. CPU: fp32, peak = the process's maximum RSS. "Step
memory" is the peak less the memory held once the model and optimizer are built: what the step
adds (gradients, AdamW state, activations, logits).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

QWEN = {"vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768,
        "rope_theta": 1e6}
SHAPES = {
    "qwen0.5b": {**QWEN, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                 "num_attention_heads": 14, "num_key_value_heads": 2},
    "qwen-small": {**QWEN, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2},
}
IMPLS = ("plain", "chunked")
GIB = 2**30


def rss() -> int:
    """This process's resident memory now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(args) -> dict:
    """Measure one impl in this process."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from aigc_ray.tokenizer import IGNORE_INDEX
    from aigc_ray.train.loss import token_loss_sum, use_chunked_loss

    cuda = args.device == "cuda"
    chunked = args.one == "chunked"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[args.shape])).train()
    if chunked:
        use_chunked_loss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(SHAPES[args.shape]["vocab_size"], (args.batch, args.length),
                        generator=torch.Generator().manual_seed(1)).to(args.device)
    labels = ids.clone()
    labels[:, :args.length // 4] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda
                else contextlib.nullcontext)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    baseline = torch.cuda.memory_allocated() if cuda else rss()

    def step() -> float:
        with autocast():
            loss, tokens = token_loss_sum(model, batch, chunked=chunked)
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss / tokens)

    first_loss = step()  # warm-up; also builds AdamW's state
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"peak_bytes": peak, "baseline_bytes": baseline, "step_bytes": peak - baseline,
            "tokens_per_second": args.batch * args.length * args.steps / seconds,
            "seconds": seconds, "first_loss": first_loss,
            "machine": {"device": torch.cuda.get_device_name() if cuda else platform.machine(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="model shape (GPU: qwen0.5b, CPU: qwen-small)")
    parser.add_argument("--batch", type=int, help="rows per step (GPU 8, CPU 4)")
    parser.add_argument("--length", type=int, help="tokens per row (GPU 2048, CPU 512)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after 1 warm-up (3)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--out", help="figures (default benchmarks/results/loss_memory_<device>.json)")
    parser.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)), flush=True)
        return
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.shape = args.shape or ("qwen0.5b" if gpu else "qwen-small")
    args.batch = args.batch or (8 if gpu else 4)
    args.length = args.length or (2048 if gpu else 512)
    print(f"{args.shape} on {args.device}, {args.batch} x {args.length} tokens, {args.steps} timed "
          f"steps, {'bf16 autocast' if gpu else 'fp32'}; fused (liger-kernel) is not implemented "
          "yet and not measured", flush=True)

    runs, failed = {}, {}
    for impl in IMPLS:  # one process each, so each peak is that impl's alone
        done = subprocess.run([sys.executable, __file__, "--one", impl, "--shape", args.shape,
                               "--device", args.device, "--batch", str(args.batch), "--length",
                               str(args.length), "--steps", str(args.steps)],
                              capture_output=True, text=True)
        if done.returncode == 0:
            runs[impl] = json.loads(done.stdout.strip().splitlines()[-1])
        else:  # out of memory, say: the other impl's figures are still worth having
            failed[impl] = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{impl} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")

    print(f"\n{'impl':<9}{'peak GiB':>10}{'step GiB':>10}{'tokens/s':>11}")
    for impl, r in runs.items():
        print(f"{impl:<9}{r['peak_bytes'] / GIB:>10.2f}{r['step_bytes'] / GIB:>10.2f}"
              f"{r['tokens_per_second']:>11.0f}")
    figures: dict = {}
    if not failed:
        plain, chunked = runs["plain"], runs["chunked"]
        tolerance = 1e-3 if gpu else 1e-5
        difference = abs(chunked["first_loss"] - plain["first_loss"]) / abs(plain["first_loss"])
        saved = (plain["peak_bytes"] - chunked["peak_bytes"]) / GIB
        ratio = chunked["tokens_per_second"] / plain["tokens_per_second"]
        figures = {"first_loss_relative_difference": difference,
                   "losses_agree": difference <= tolerance, "peak_saved_gib": round(saved, 3),
                   "tokens_per_second_ratio": round(ratio, 3)}
        print(f"first-step loss: plain {plain['first_loss']:.6f}, chunked "
              f"{chunked['first_loss']:.6f} (relative difference {difference:.1e}, "
              f"{'within' if figures['losses_agree'] else 'OVER'} {tolerance:g})")
        print(f"peak memory saved: {saved:.2f} GiB = {saved * GIB / 1e9:.2f} GB "
              f"(goal >= 8 GB on the GPU shape)")
        print(f"tokens/s chunked vs plain: {ratio:.2f}x (goal >= 1.0x)")
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} on {os.cpu_count()} CPUs at the end")

    out = Path(args.out or Path(__file__).parent / "results" / f"loss_memory_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = next(iter(runs.values()), {}).get("machine", {})
    out.write_text(json.dumps({
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "machine": {**machine, "platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average": [round(x, 2) for x in load]},
        "shape": args.shape, "config": SHAPES[args.shape], "device": args.device,
        "batch": args.batch, "length": args.length, "steps": args.steps,
        "dtype": "bf16 autocast, fp32 parameters" if gpu else "fp32",
        "memory": "cuda max_memory_allocated over the timed steps" if gpu else "max RSS",
        "runs": {impl: {k: v for k, v in r.items() if k != "machine"} for impl, r in runs.items()},
        "failed": failed, **figures, "fused": "not implemented yet (liger-kernel); not measured",
    }, indent=2) + "\n")
    print(f"wrote {out}")
    if failed or not figures["losses_agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
