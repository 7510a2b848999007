"""Tokens per second of our data pipeline against the plain `datasets` way, in the same run.

Ours: `build_datasets` (Ray Data: read → validate and split → clean, tokenize and pack in a
tokenizer actor) then `iter_batches` over train and validation, as training workers pull them.
Baseline: `datasets.Dataset.from_json` (or `from_text`) → `map(tokenize, batched=True)` →
`map(group_texts, batched=True)` (the run_clm recipe: concatenate, cut into blocks, drop the
remainder) → iterate batches. Both use the built-in tiny tokenizer on the same sample corpus.
Ray start-up and building the tokenizer are timed apart: they are paid once per job.

    .venv/bin/python benchmarks/data_throughput.py [--pairs 20000] [--mode sft|text]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # 2 cores: threads only contend


def ours(cfg, tokenizer_path: str, batch_size: int) -> tuple[int, float, float]:
    """(real tokens delivered, seconds, seconds to the first batch) for one pass over train
    and validation."""
    from aigc_ray.data.pipeline import build_datasets

    start = time.perf_counter()
    tokens, first_batch = 0, None
    for dataset in build_datasets(cfg, tokenizer_path).values():
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            first_batch = first_batch or time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
    return tokens, time.perf_counter() - start, first_batch


def baseline(cfg, corpus: dict, tokenizer_path: str, batch_size: int,
             cache_dir: str) -> tuple[int, float]:
    """(tokens tokenized, seconds): the usual `datasets` recipe, single process, no cache reuse."""
    import datasets

    from aigc_ray.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    block = cfg.data.block_size
    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_path)
    if cfg.data.supervised:
        raw = datasets.Dataset.from_json(corpus["jsonl"], cache_dir=cache_dir)
        prompt, completion = cfg.data.prompt_field, cfg.data.completion_field

        def texts(batch):
            return [p + c for p, c in zip(batch[prompt], batch[completion], strict=True)]
    else:
        raw = datasets.Dataset.from_text(corpus["text"], cache_dir=cache_dir)

        def texts(batch):
            return [t for t in batch["text"] if t.strip()]

    def tokenize(batch):
        ids = tokenizer(texts(batch))["input_ids"]
        return {"input_ids": [row + [tokenizer.eos_token_id] for row in ids]}

    def group_texts(batch):
        stream = [token for row in batch["input_ids"] for token in row]
        usable = len(stream) // block * block
        blocks = [stream[i: i + block] for i in range(0, usable, block)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names,
                        load_from_cache_file=False)
    tokens = sum(len(row) for row in tokenized["input_ids"])
    grouped = tokenized.map(group_texts, batched=True, load_from_cache_file=False)
    for _ in grouped.with_format("numpy").iter(batch_size=batch_size):
        pass
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000, help="sample corpus size (20000)")
    parser.add_argument("--mode", choices=["sft", "text"], default="sft",
                        help="sft: prompt/completion pairs (tiny_cpu); text: packed causal-LM "
                        "text (tiny_text)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per iterated batch")
    args = parser.parse_args()

    from aigc_ray.cluster import start_ray
    from aigc_ray.config import load_config
    from aigc_ray.data.sample import write_sample_corpus
    from aigc_ray.model import resolve_model_path

    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_sample_corpus(Path(tmp) / "corpus", num_pairs=args.pairs)
        name, path = ("tiny_cpu", corpus["jsonl"]) if args.mode == "sft" else ("tiny_text",
                                                                                corpus["text"])
        cfg = load_config(name, [f"data.path={path}", f"run.output_dir={tmp}/runs"])

        start = time.perf_counter()
        start_ray()
        ray_start = time.perf_counter() - start
        start = time.perf_counter()
        tokenizer_path = resolve_model_path(cfg)
        tokenizer_build = time.perf_counter() - start

        ours_tokens, ours_s, first_batch_s = ours(cfg, tokenizer_path, args.batch_size)
        base_tokens, base_s = baseline(cfg, corpus, tokenizer_path, args.batch_size,
                                       f"{tmp}/hf_cache")

    ours_rate, base_rate = ours_tokens / ours_s, base_tokens / base_s
    print(f"corpus       {args.pairs:,} pairs, mode {args.mode} ({name}), block_size "
          f"{cfg.data.block_size}, {os.cpu_count()} CPUs, {cfg.data.tokenizer_actors} "
          f"tokenizer actor(s)")
    print(f"ray start    {ray_start:.1f} s (once per job, not counted below)")
    print(f"tokenizer    {tokenizer_build:.1f} s to build the built-in tokenizer and model "
          "(once per corpus, not counted below)")
    print(f"ours         {ours_tokens:,} tokens in {ours_s:.1f} s = {ours_rate:,.0f} tokens/s "
          "(Ray Data: read, split, tokenize, pack, iter_batches over train+val; first batch "
          f"after {first_batch_s:.1f} s)")
    print(f"baseline     {base_tokens:,} tokens in {base_s:.1f} s = {base_rate:,.0f} tokens/s "
          "(datasets: from_json/from_text, map tokenize, map group_texts, iterate)")
    print(f"ratio        ours/baseline = {ours_rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
