"""Batch generation throughput: `aigc-ray generate` against a plain loop calling `generate`.

Same checkpoint, same prompts, same greedy settings (so both produce the same tokens), same run:

    .venv/bin/python benchmarks/generate_throughput.py [--checkpoint DIR] [--prompts 256]
        [--max-tokens 32] [--concurrency 2] [--batch-size 16]

The baseline is the loop a user writes first: one process, the model loaded once, then
`model.generate` for one prompt at a time (torch using every core). Ours is `run_generate`:
Ray Data reads the prompts file, `--concurrency` model actors (0.75 CPU and 1 torch thread each)
decode `--batch-size` prompts together, Ray Data writes parquet. Our time includes starting the
actors and loading the model in each, and writing the files; Ray's own start-up is shown apart.
The ratio is ours / baseline in completions per second (higher is better).
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_throughput import build_checkpoint, prompts  # noqa: E402  (the same model and prompts)


def baseline(checkpoint: str, texts: list[str], max_tokens: int) -> tuple[float, list[str]]:
    """(seconds, completions) of a plain generate loop, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    started = time.perf_counter()
    completions = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            completions.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                                skip_special_tokens=True))
    return time.perf_counter() - started, completions


def ours(checkpoint: str, texts: list[str], args, folder: Path) -> tuple[float, list[str]]:
    """(seconds, completions in input order) of `run_generate` over a JSONL file of the prompts."""
    import pyarrow.dataset as pads

    from aigc_ray.checkpoint import checkpoint_config
    from aigc_ray.generate import GENERATE_KEYS, run_generate

    source = folder / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n"
                              for i, t in enumerate(texts)))
    path, cfg = checkpoint_config(checkpoint, [
        f"generate.max_tokens={args.max_tokens}", f"generate.concurrency={args.concurrency}",
        f"generate.batch_size={args.batch_size}",
        # Each actor keeps one torch thread; 0.75 leaves a CPU share to reading and writing.
        f"generate.cpus_per_actor={args.cpus_per_actor}"], GENERATE_KEYS, "generate")
    started = time.perf_counter()
    summary = run_generate(str(path), str(source), str(folder / "out"), cfg)
    seconds = time.perf_counter() - started
    rows = pads.dataset(str(folder / "out"), format="parquet").to_table().to_pylist()
    by_id = {int(row["id"]): row["completion"] for row in rows}
    assert summary.written_rows == len(texts), summary.line()
    return seconds, [by_id[i] for i in range(len(texts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="an HF model folder (default: the built-in tiny "
                        "model of the default config, untrained)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2, help="our model actors")
    parser.add_argument("--batch-size", type=int, default=16, help="our prompts per batch")
    parser.add_argument("--cpus-per-actor", type=float, default=0.75)
    args = parser.parse_args()

    import ray

    from aigc_ray.cluster import start_ray

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = args.checkpoint or build_checkpoint(folder)
        texts = prompts(args.prompts)
        base_s, base_out = baseline(checkpoint, texts, args.max_tokens)

        t0 = time.perf_counter()
        start_ray()
        ray_start_s = time.perf_counter() - t0
        logging.getLogger("ray").setLevel(logging.ERROR)
        our_s, our_out = ours(checkpoint, texts, args, folder)
        ray.shutdown()

    same = sum(a == b for a, b in zip(base_out, our_out))
    base_rate, our_rate = len(texts) / base_s, len(texts) / our_s
    print(f"\n{len(texts)} prompts, {args.max_tokens} greedy tokens at most, {os.cpu_count()} "
          f"cores; ours: {args.concurrency} actor(s) × batch {args.batch_size}")
    print(f"baseline generate loop : {base_rate:8.2f} completions/s ({base_s:.1f} s)")
    print(f"aigc-ray generate      : {our_rate:8.2f} completions/s ({our_s:.1f} s, actor start "
          f"and writing included; Ray start {ray_start_s:.1f} s not included)")
    print(f"ratio ours/baseline    : {our_rate / base_rate:8.2f}x")
    print(f"identical completions  : {same}/{len(texts)}")


if __name__ == "__main__":
    main()
