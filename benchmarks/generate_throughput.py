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

GPU mode (`--gpu`, the default when CUDA is present; it also runs on CPU, to check it):

    python3 benchmarks/generate_throughput.py --gpu [--shape gpt2] [--max-tokens 128]

The GPT-2-124M shape (random weights, `common.build`), one model actor on one GPU,
`generate.batch_size` 1, 16 and 64 over `--batches` batches each, every completion exactly
`--max-tokens` tokens (`ignore_eos`, greedy). Per batch size: tokens/s while decoding (the
run's completion tokens over the time its actor spent in the decode engine, `decode_seconds`
in the run's summary), and over the whole run (actor start, model load, CUDA-graph capture,
reading and writing included), against Hugging Face `generate` with a static batch of the same
size and length on the same device in the same run.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from common import build_checkpoint, prompts  # the serving benchmark's model and prompts


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


def gpu_run(checkpoint: str, texts: list[str], batch: int, max_tokens: int, device: str,
            folder: Path):
    """`run_generate`'s summary over `texts`: one actor, `batch` rows, fixed length."""
    from aigc_ray.checkpoint import checkpoint_config
    from aigc_ray.generate import GENERATE_KEYS, run_generate

    source = folder / f"prompts-{batch}.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n"
                              for i, t in enumerate(texts)))
    path, cfg = checkpoint_config(checkpoint, [
        f"generate.max_tokens={max_tokens}", "generate.ignore_eos=true", "generate.concurrency=1",
        f"generate.batch_size={batch}", f"generate.device={device}",
        "generate.cuda_graphs=true"], GENERATE_KEYS, "generate")  # off by default until tested
    summary = run_generate(str(path), str(source), str(folder / source.stem), cfg)
    assert summary.written_rows == len(texts), summary.line()
    assert summary.completion_tokens == len(texts) * max_tokens, summary.line()
    return summary


def gpu_mode(args) -> None:
    import torch
    from common import checkpoint_and_baselines

    from aigc_ray.cluster import start_ray

    sizes = (1, 16, 64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        device, checkpoint, texts, baselines = checkpoint_and_baselines(
            args.shape, folder / "model", max(sizes) * args.batches, sizes, args.max_tokens)
        rows = {batch: {"generate": rate} for batch, rate in baselines.items()}
        start_ray()
        logging.getLogger("ray").setLevel(logging.ERROR)
        for batch in sizes:
            summary = gpu_run(checkpoint, texts[:batch * args.batches], batch, args.max_tokens,
                              device, folder)
            decoding = summary.completion_tokens / summary.decode_seconds
            rows[batch].update(decoding=decoding, wall=summary.completion_tokens / summary.seconds,
                               ratio=decoding / rows[batch]["generate"])
            print(json.dumps({"batch": batch, **rows[batch]}), flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{name}, {args.shape} shape, {args.batches} batches of completions of exactly "
          f"{args.max_tokens} tokens (ignore_eos, greedy), one actor; ratio: decoding / generate")
    print(f"{'batch':>6}{'decoding tok/s':>16}{'run tok/s':>11}{'generate tok/s':>16}{'ratio':>8}")
    for batch, row in rows.items():
        print(f"{batch:>6}{row['decoding']:>16,.0f}{row['wall']:>11,.0f}"
              f"{row['generate']:>16,.0f}{row['ratio']:>8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="an HF model folder (default: the built-in tiny "
                        "model of the default config, untrained)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2, help="our model actors")
    parser.add_argument("--batch-size", type=int, default=16, help="our prompts per batch")
    parser.add_argument("--cpus-per-actor", type=float, default=0.75)
    parser.add_argument("--gpu", action="store_true", default=None,
                        help="the GPU protocol (default when CUDA is present; see above)")
    parser.add_argument("--shape", choices=["tiny", "gpt2"], default="gpt2",
                        help="--gpu: the model shape (common.SHAPES)")
    parser.add_argument("--batches", type=int, default=4, help="--gpu: batches per batch size")
    parser.add_argument("--out", help="--gpu: write the figures as JSON here")
    args = parser.parse_args()
    if args.gpu is None:
        import torch

        args.gpu = torch.cuda.is_available()
    if args.gpu:
        if "--max-tokens" not in sys.argv:
            args.max_tokens = 128
        gpu_mode(args)
        return

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
