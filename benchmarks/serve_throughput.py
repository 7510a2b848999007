"""Serving throughput and latency: our Ray Serve app against a plain FastAPI + `generate` server.

Same checkpoint, same machine, same run, same greedy requests (so both produce the same tokens):

    .venv/bin/python benchmarks/serve_throughput.py [--checkpoint DIR] [--max-tokens 32] [--mixed]
        [--static] [--fixed-length]

The baseline is one uvicorn process whose endpoint calls `model.generate` per request (FastAPI
runs sync endpoints on its thread pool, so concurrent requests overlap as well as the GIL lets
them). Ours is `aigc_ray.serve` with a fixed replica count (autoscaling delays would otherwise
be what is measured). Each level sends requests from `concurrency` clients in parallel; the
ratios are ours / baseline (requests per second: higher is better; latency: lower is better).
`--mixed` gives requests different lengths (max_tokens × 0.25, 0.5, 1, 2 in turn), as real
traffic has; `--static` also measures ours with `serve.continuous_batching=false` (a request
waits for the running batch to finish), so continuous batching is measured against it in the
same run. `--fixed-length` holds every completion to its max_tokens (`min_tokens` = `max_tokens`
for ours, `min_new_tokens` for the baseline: both mask EOS the same way, so the greedy tokens
still agree), so an early end of text cannot flatter either side.

GPU mode (`--gpu`, the default when CUDA is present; it also runs on CPU, to check it):

    python3 benchmarks/serve_throughput.py --gpu [--shape gpt2] [--max-tokens 128]
        [--graphs both|on|off]

The GPT-2-124M shape (random weights, `common.build`), one replica on one GPU
(`serve.max_batch_size=64`), requests of exactly `--max-tokens` tokens (`ignore_eos`, greedy)
from 1, 16 and 64 clients, streamed and whole; per level: output tokens/s, and streamed, time to
first token and time per output token (p50), against Hugging Face `generate` with a static
batch of the same size and length on the same GPU in the same run. `--graphs both` serves
twice, with `serve.cuda_graphs` on and off. Issue 16's targets: ≥ 8x `generate` at 64, ≤ 5 ms
per output token at 1.
"""

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import build_checkpoint, prompts

LEVELS = {1: 16, 8: 64, 32: 160}  # concurrency → requests measured
MIXED = (0.25, 0.5, 1, 2)  # --mixed: request i asks for max_tokens × MIXED[i % 4]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the baseline server: run as `serve_throughput.py --baseline-server PORT CHECKPOINT` -------


def baseline_server(port: int, checkpoint: str) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    app = FastAPI()

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:
        ids = tokenizer(body["prompt"], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=body["max_tokens"], do_sample=False,
                                 min_new_tokens=body.get("min_tokens") or None,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        return {"choices": [{"text": tokenizer.decode(new, skip_special_tokens=True)}],
                "usage": {"completion_tokens": int(new.shape[0])}}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- the load generator --------------------------------------------------------------------------


async def measure(url: str, texts: list[str], concurrency: int, total: int,
                  lengths: list[int], fixed: bool = False) -> dict:
    """Send `total` greedy completions from `concurrency` clients (request i asks for
    lengths[i % len(lengths)] tokens, all of them with `fixed`); throughput and latency."""
    import httpx

    latencies, tokens, failures = [], 0, 0
    queue = list(range(total))

    async def client(http):
        nonlocal tokens, failures
        while queue:
            i = queue.pop()
            start = time.perf_counter()
            length = lengths[i % len(lengths)]
            response = await http.post(url + "/v1/completions", json={
                "prompt": texts[i % len(texts)], "max_tokens": length, "temperature": 0,
                **({"min_tokens": length} if fixed else {})})
            latencies.append(time.perf_counter() - start)
            if response.status_code == 200:
                tokens += response.json()["usage"]["completion_tokens"]
            else:
                failures += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        for i in range(min(4, total)):  # warm up: first calls pay for lazy initialization
            await http.post(url + "/v1/completions", json={
                "prompt": texts[i], "max_tokens": lengths[0], "temperature": 0})
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"requests_per_second": total / wall, "tokens_per_second": tokens / wall,
            "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "failures": failures}


def run_levels(name: str, url: str, texts: list[str], lengths: list[int],
               fixed: bool = False) -> dict:
    results = {}
    for concurrency, total in LEVELS.items():
        results[concurrency] = asyncio.run(measure(url, texts, concurrency, total, lengths,
                                                   fixed))
        r = results[concurrency]
        print(f"  {name:<10} c={concurrency:<3} {r['requests_per_second']:7.1f} req/s "
              f"{r['tokens_per_second']:8.0f} tok/s  p50 {r['p50_s'] * 1000:7.1f} ms  "
              f"p99 {r['p99_s'] * 1000:7.1f} ms  failures {r['failures']}", flush=True)
    return results


def wait_healthy(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy")


def run_baseline(checkpoint: str, texts: list[str], lengths: list[int],
                 fixed: bool = False) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--baseline-server", str(port),
                               checkpoint])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        return run_levels("baseline", url, texts, lengths, fixed)
    finally:
        server.terminate()  # the server this function started, by its handle
        server.wait(timeout=30)


def run_ours(checkpoint: str, texts: list[str], lengths: list[int], replicas: int,
             label: str, overrides: list[str], fixed: bool = False) -> dict:
    from ray import serve

    from aigc_ray.serve import deploy, load_serve_config

    port = free_port()
    path, cfg = load_serve_config(checkpoint, [
        f"serve.port={port}", f"serve.app_name={label}", *overrides,
        f"serve.autoscaling.min_replicas={replicas}", f"serve.autoscaling.max_replicas={replicas}",
        "serve.max_batch_size=32", "serve.max_ongoing_requests=64",
        "serve.cpus_per_replica=1"])  # the default: one torch thread per replica
    deploy(path, cfg)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        return run_levels(label, url, texts, lengths, fixed)
    finally:
        serve.delete(label)
        serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="HF model folder (default: the built-in tiny model)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=1,
                        help="model replicas for our app (1: the same cores as the baseline)")
    parser.add_argument("--mixed", action="store_true",
                        help="requests of different lengths: max_tokens x 0.25, 0.5, 1, 2")
    parser.add_argument("--fixed-length", action="store_true",
                        help="every completion exactly max_tokens long (min_tokens)")
    parser.add_argument("--static", action="store_true",
                        help="also measure ours with serve.continuous_batching=false")
    parser.add_argument("--gpu", action="store_true", default=None,
                        help="the GPU protocol (default when CUDA is present; see above)")
    parser.add_argument("--shape", choices=["tiny", "gpt2"], default="gpt2",
                        help="--gpu: the model shape (common.SHAPES)")
    parser.add_argument("--graphs", choices=["both", "on", "off"], default="both",
                        help="--gpu: serve.cuda_graphs settings to measure")
    parser.add_argument("--out", help="--gpu: write the figures as JSON here")
    parser.add_argument("--baseline-server", nargs=2, metavar=("PORT", "CHECKPOINT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        baseline_server(int(args.baseline_server[0]), args.baseline_server[1])
        return
    if args.gpu is None:
        import torch

        args.gpu = torch.cuda.is_available()
    if args.gpu:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if "--max-tokens" not in sys.argv:
            args.max_tokens = 128
        gpu_mode(args)
        return

    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or build_checkpoint(Path(tmp))
        texts = prompts(64)
        lengths = ([max(1, round(args.max_tokens * m)) for m in MIXED] if args.mixed
                   else [args.max_tokens])
        print(f"checkpoint {checkpoint}, {os.cpu_count()} CPUs, max_tokens {lengths}, "
              f"greedy; concurrency: requests = {LEVELS}", flush=True)
        baseline = run_baseline(checkpoint, texts, lengths, args.fixed_length)
        # A cluster of its own (address="local"), never whichever one is already running here.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False)
        try:
            variants = {"ours": []}
            if args.static:
                variants["ours-static"] = ["serve.continuous_batching=false"]
            ours = {label: run_ours(checkpoint, texts, lengths, args.replicas, label, overrides,
                                    args.fixed_length)
                    for label, overrides in variants.items()}
        finally:
            ray.shutdown()

    print("\nratios (ours / baseline): throughput higher is better, latency lower is better")
    for name, results in ours.items():
        print_ratios(name, results, baseline)
    if "ours-static" in ours:
        print("\ncontinuous / static batching (both ours)")
        print_ratios("ours", ours["ours"], ours["ours-static"])


# --- GPU mode: fixed-length streams against static-batch generate ------------------------------

GPU_LEVELS = {1: 8, 16: 64, 64: 256}  # concurrency → requests measured


async def measure_streams(url: str, texts: list[str], concurrency: int, total: int,
                          max_tokens: int, stream: bool = True) -> dict:
    """`total` completions of exactly `max_tokens` tokens from `concurrency` clients: output
    tokens/s and, streamed, per request the time to its first token and per token after it
    (`stream` false: whole responses, tokens/s only)."""
    import httpx

    ttfts, tpots, tokens, failures = [], [], 0, 0
    queue = list(range(total))

    async def one(http, i: int) -> None:
        nonlocal tokens, failures
        start = time.perf_counter()
        first = usage = None
        body = {"prompt": texts[i % len(texts)], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        async with http.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                failures += 1
                return
            if not stream:
                usage = json.loads(await response.aread())["usage"]
            async for line in response.aiter_lines() if stream else _nothing():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter()
        end = time.perf_counter()
        count = usage["completion_tokens"] if usage else 0
        if count != max_tokens or (stream and first is None):
            failures += 1
            return
        tokens += count
        if stream:
            ttfts.append(first - start)
            tpots.append((end - first) / max(1, count - 1))

    async def client(http):
        while queue:
            await one(http, queue.pop())

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(one(http, i) for i in range(min(4, total))))  # warm up
        tokens, ttfts, tpots, failures = 0, [], [], 0
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"tokens_per_second": tokens / wall, "failures": failures,
            "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else None,
            "tpot_p50_ms": 1000 * statistics.median(tpots) if tpots else None}


async def _nothing():
    return
    yield


def gpu_mode(args) -> None:
    import ray
    import torch
    from common import checkpoint_and_baselines

    with tempfile.TemporaryDirectory() as tmp:
        device, checkpoint, texts, baselines = checkpoint_and_baselines(
            args.shape, Path(tmp) / "model", max(GPU_LEVELS), GPU_LEVELS, args.max_tokens)
        results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "shape": args.shape, "max_tokens": args.max_tokens, "levels": {}}
        for level, rate in baselines.items():
            results["levels"][level] = {"generate": {"tokens_per_second": rate}}
            print(f"  generate  batch {level:<3} {rate:10,.0f} tok/s", flush=True)
        graphs = {"both": ["on", "off"], "on": ["on"], "off": ["off"]}[args.graphs]
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False)
        try:
            for setting in graphs:
                label = f"graphs-{setting}"
                run_gpu_server(checkpoint, texts, args.max_tokens, label, device,
                               setting == "on", results)
        finally:
            ray.shutdown()
    print(f"\n{results['device']}, {args.shape} shape, streams of exactly {args.max_tokens} "
          "tokens (ignore_eos, greedy), one replica; ratio: ours / static-batch generate")
    print(f"{'clients':>8}{'serving':>20}{'tok/s':>10}{'ratio':>8}{'TTFT ms':>10}"
          f"{'ms/token':>10}{'failures':>10}")
    for level, row in results["levels"].items():
        for label in (f"graphs-{g} {m}" for g in graphs for m in ("stream", "whole")):
            r = row[label]
            ttft, tpot = ((f"{r['ttft_p50_ms']:.1f}", f"{r['tpot_p50_ms']:.2f}")
                          if r["ttft_p50_ms"] is not None else ("-", "-"))
            print(f"{level:>8}{label:>20}{r['tokens_per_second']:>10,.0f}{r['ratio']:>8.2f}"
                  f"{ttft:>10}{tpot:>10}{r['failures']:>10}")
    print("targets: ratio >= 8 at 64 clients; <= 5 ms per output token at 1 client")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def run_gpu_server(checkpoint: str, texts: list[str], max_tokens: int, label: str,
                   device: str, graphs: bool, results: dict) -> None:
    """Serve `checkpoint` on one replica and measure every level into `results`."""
    from ray import serve

    from aigc_ray.serve import deploy, load_serve_config

    port = free_port()
    path, cfg = load_serve_config(checkpoint, [
        f"serve.port={port}", f"serve.app_name={label}", f"serve.device={device}",
        f"serve.cuda_graphs={str(graphs).lower()}", "serve.max_batch_size=64",
        "serve.max_ongoing_requests=128", "serve.max_queued_requests=-1",
        "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=1"])
    start = time.perf_counter()
    deploy(path, cfg)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        print(f"  {label}: replica up in {time.perf_counter() - start:.1f} s", flush=True)
        for level, total in GPU_LEVELS.items():
            for mode in ("stream", "whole"):
                r = asyncio.run(measure_streams(url, texts, level, total, max_tokens,
                                                stream=mode == "stream"))
                row = results["levels"][level]
                r["ratio"] = r["tokens_per_second"] / row["generate"]["tokens_per_second"]
                row[f"{label} {mode}"] = r
                print(f"  {label} {mode} c={level:<3} {r['tokens_per_second']:10,.0f} tok/s  "
                      f"x{r['ratio']:.2f}  TTFT {r['ttft_p50_ms'] or 0:.1f} ms  "
                      f"{r['tpot_p50_ms'] or 0:.2f} ms/token  failures {r['failures']}",
                      flush=True)
    finally:
        serve.delete(label)
        serve.shutdown()


def print_ratios(name: str, results: dict, reference: dict) -> None:
    """One line per concurrency level: throughput, p50 and p99 of `results` / `reference`."""
    for concurrency in LEVELS:
        o, r = results[concurrency], reference[concurrency]
        print(f"  {name:<11} c={concurrency:<3} throughput "
              f"x{o['requests_per_second'] / r['requests_per_second']:5.2f}  "
              f"p50 x{o['p50_s'] / r['p50_s']:5.2f}  p99 x{o['p99_s'] / r['p99_s']:5.2f}")

if __name__ == "__main__":
    main()
