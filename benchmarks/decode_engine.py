"""The decode engine alone against Hugging Face `generate` with a static batch, same run.

No Ray and no HTTP: what serving replicas and `aigc-ray generate` actors run per step. For each
batch size, B requests of the same prompt length decode exactly `--max-tokens` tokens each
(`ignore_eos`, greedy) through each engine: `padded` (`BatchDecoder`, a left-padded cache that
grows a column a step) and `slots` (`decode.graphs.SlotDecoder`: fixed slots of a preallocated
cache, the step replayed as a CUDA graph on a GPU, eager on CPU), and optionally `hf-cb`
(transformers' own continuous batching, `model.generate_batch` with a persistent manager, warmed
up first: paged cache, its own CUDA graphs; tokens/s only). The baseline is one
`model.generate` call on the same B prompts, `min_new_tokens = max_new_tokens` (the same length).
Reported: output tokens/s of each and its ratio to the baseline, time to first token (the
prefill step) and time per output token after it, and the slots' capture time. CUDA when
present (bf16), else CPU (fp32, 1 torch thread).

    .venv/bin/python benchmarks/decode_engine.py [--shape tiny|gpt2] [--batch-sizes 1,16,64]
        [--engines padded,slots,hf-cb] [--max-tokens 128] [--refill 256] [--out results.json]

`--shape gpt2` is the GPT-2-124M shape of issue 16 (12 layers × 768, vocab 8192, random
weights: untrained weights cost the same to run); `tiny` is the built-in model (2 × 64).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from common import (  # noqa: E402  (after the environment is set)
    SHAPES,
    build,
    same_length_prompts,
    static_generate,
    sync,
)


def ours(model, tokenizer, ids: list[list[int]], max_tokens: int, device: str,
         step=None) -> dict:
    """One engine's run: the padded `BatchDecoder`, or a `SlotDecoder` over `step`."""
    from aigc_ray.decode.graphs import new_decoder
    from aigc_ray.decode.request import GenerationRequest

    requests = [GenerationRequest(prompt, max_tokens, temperature=0, ignore_eos=True)
                for prompt in ids]
    sync(device)
    start = time.perf_counter()
    decoder = new_decoder(model, tokenizer, step, requests)
    produced = sum(len(chunk.token_ids) for chunk in decoder.step().values())
    first = time.perf_counter() - start
    while not decoder.done:
        produced += sum(len(chunk.token_ids) for chunk in decoder.step().values())
    sync(device)
    seconds = time.perf_counter() - start
    assert produced == len(ids) * max_tokens, produced
    return {"tokens_per_second": produced / seconds, "ttft_ms": 1000 * first,
            "ms_per_output_token": 1000 * (seconds - first) / max(1, max_tokens - 1)}


def hf_continuous_batching(model, tokenizer, ids: list[list[int]], max_tokens: int,
                           device: str) -> dict:
    """transformers' continuous batching on the same requests (EOS off: the same length)."""
    import logging

    from transformers import GenerationConfig

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=tokenizer.pad_token_id)
    sync(device)
    start = time.perf_counter()
    out = model.generate_batch(ids, generation_config=config, persistent_manager=True)
    sync(device)
    seconds = time.perf_counter() - start
    produced = sum(len(o.generated_tokens) for o in out.values())
    assert produced == len(ids) * max_tokens, produced
    return {"tokens_per_second": produced / seconds, "ttft_ms": None,
            "ms_per_output_token": None}


def refill(model, tokenizer, ids: list[list[int]], batch: int, max_tokens: int, device: str,
           step=None) -> dict:
    """Batch generation's two ways through requests of different lengths (each asks for a
    seeded random 1/8..1 of `max_tokens`): `batch` at a time, each run to its end, or all handed
    to one decoder that keeps `batch` rows decoding and starts a waiting one as a row finishes."""
    import random

    from aigc_ray.decode.engine import decode_all
    from aigc_ray.decode.graphs import new_decoder
    from aigc_ray.decode.request import GenerationRequest

    draw = random.Random(0)
    lengths = [draw.randint(max(1, max_tokens // 8), max_tokens) for _ in ids]
    out = {}
    for mode in ("batches", "refill"):
        requests = [GenerationRequest(prompt, n, temperature=0, ignore_eos=True)
                    for prompt, n in zip(ids, lengths)]
        sync(device)
        start = time.perf_counter()
        if mode == "batches":
            for at in range(0, len(requests), batch):
                decode_all(model, tokenizer, requests[at:at + batch],
                           new_decoder(model, tokenizer, step))
        else:
            decode_all(model, tokenizer, requests, new_decoder(model, tokenizer, step,
                                                               max_rows=batch))
        sync(device)
        out[mode] = sum(lengths) / (time.perf_counter() - start)
    out["ratio"] = out["refill"] / out["batches"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--engines", default="padded,slots",
                        help="comma-separated: padded (BatchDecoder), slots (SlotDecoder), "
                        "hf-cb (transformers' generate_batch)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per side")
    parser.add_argument("--refill", type=int, default=0, metavar="N",
                        help="also: N requests of different lengths, batches of the largest "
                        "batch size run to their end vs refilled as rows finish")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    from aigc_ray.decode.graphs import StaticStep

    model, tokenizer = build(args.shape, device)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    engines = args.engines.split(",")
    ids = same_length_prompts(tokenizer, max(sizes))
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "shape": args.shape, "max_tokens": args.max_tokens, "rows": []}
    steps = {"padded": None}
    if "slots" in engines:  # one cache and one set of graphs for every batch size, as a replica
        start = time.perf_counter()
        steps["slots"] = StaticStep(model, tokenizer, slots=max(sizes))
        results["slots"] = {"capture_s": time.perf_counter() - start,
                            "graphs": len(steps["slots"].graphs),
                            "graph_error": steps["slots"].graph_error,
                            "cache_bytes": steps["slots"].cache_bytes}
        print(json.dumps(results["slots"]), flush=True)
    def run(engine: str, batch: list[list[int]], max_tokens: int) -> dict:
        if engine == "hf-cb":
            return hf_continuous_batching(model, tokenizer, batch, max_tokens, device)
        return ours(model, tokenizer, batch, max_tokens, device, steps[engine])

    for engine in engines:  # warm-up: kernels, allocator (hf-cb: its manager, sized for 64)
        if engine == "hf-cb":
            start = time.perf_counter()
            run(engine, ids[:max(sizes)], args.max_tokens)
            results["hf-cb"] = {"start_s": time.perf_counter() - start}
        run(engine, ids[:2], 4)
    static_generate(model, tokenizer, ids[:2], 4, device)
    for size in sizes:
        row = {"batch": size}
        row["generate"] = max((static_generate(model, tokenizer, ids[:size], args.max_tokens,
                                               device) for _ in range(args.repeats)),
                              key=lambda r: r["tokens_per_second"])
        for engine in engines:
            row[engine] = max((run(engine, ids[:size], args.max_tokens)
                               for _ in range(args.repeats)), key=lambda r: r["tokens_per_second"])
            row[engine]["ratio"] = (row[engine]["tokens_per_second"]
                                    / row["generate"]["tokens_per_second"])
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{results['device']}, {args.shape} shape, {args.max_tokens} output tokens per "
          "request (ignore_eos, greedy), best of", args.repeats)
    print(f"{'batch':>6}{'engine':>8}{'tok/s':>12}{'generate tok/s':>16}{'ratio':>8}"
          f"{'TTFT ms':>10}{'ms/token':>10}")
    for row in results["rows"]:
        for engine in engines:
            mine = row[engine]
            ttft, tpot = ((f"{mine['ttft_ms']:.1f}", f"{mine['ms_per_output_token']:.2f}")
                          if mine["ttft_ms"] is not None else ("-", "-"))
            print(f"{row['batch']:>6}{engine:>8}{mine['tokens_per_second']:>12,.0f}"
                  f"{row['generate']['tokens_per_second']:>16,.0f}{mine['ratio']:>8.2f}"
                  f"{ttft:>10}{tpot:>10}")
    if args.refill:
        refill_ids = same_length_prompts(tokenizer, args.refill)
        results["refill"] = {engine: refill(model, tokenizer, refill_ids, max(sizes),
                                            args.max_tokens, device, steps[engine])
                             for engine in engines if engine != "hf-cb"}
        print(f"\n{args.refill} requests of {args.max_tokens // 8}..{args.max_tokens} tokens, "
              f"{max(sizes)} rows at a time: tokens/s")
        for engine, row in results["refill"].items():
            print(f"{engine:>8}  batches run to their end {row['batches']:>10,.0f}   refilled "
                  f"{row['refill']:>10,.0f}   ratio {row['ratio']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
