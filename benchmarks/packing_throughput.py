"""Real (non-padding) training tokens per second with `data.packing` against without, in the
same run, on the sample support corpus: prompt/completion pairs (as tiny_cpu trains them) and
multi-turn conversations (as tiny_chat trains them).

Both sides: the same built-in tiny model from the same seed, blocks made by our own
`TokenizeAndPack` (unpacked: one example a row; packed: several, positions restarting), the
training loop's own collate (it trims every batch to its longest row, so unpacked batches
already skip most padding columns), loss, AdamW and batch size, the same number of steps after
the same warm-up, one process, no Ray; the two sides take their steps in turn, so a busy machine
slows both alike. The rate counts only real tokens, so it says how much
more of the corpus a second of training gets through.

    .venv/bin/python benchmarks/packing_throughput.py [--steps 40] [--batch 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # 2 cores: threads only contend

CORPORA = {  # name: (config, sample file)
    "pairs": ("tiny_cpu", "support.jsonl"),
    "chat": ("tiny_chat", "support_chat.jsonl"),
}


def blocks_of(cfg, model_dir: str, packing: bool) -> list[dict]:
    """Every training block of the corpus, made by `TokenizeAndPack` in this process."""
    from aigc_ray.data.pack import TokenizeAndPack
    from aigc_ray.data.read import ROW_COLUMN, document_text, row_columns, split_of, validate_record
    from aigc_ray.tokenizer import tokenizer_spec

    data = cfg.data.model_copy(update={"packing": packing})
    rows = []
    with open(data.paths[0], encoding="utf-8") as f:
        for line in f:
            row = validate_record(json.loads(line), data)
            if split_of(document_text(row, data), data.val_fraction) == "train":
                rows.append(row)
    pack = TokenizeAndPack(tokenizer_spec(model_dir), data.model_dump(), "train")
    batch = {name: [row[name] for row in rows] for name in row_columns(data)}
    out = pack({**batch, ROW_COLUMN: [str(i) for i in range(len(rows))]})
    return [{key: out[key][i] for key in out} for i in range(len(out["input_ids"]))]


class Side:
    """One side of the comparison: its own model (same seed), optimizer and blocks."""

    def __init__(self, cfg, model_dir: str, blocks: list[dict]):
        import torch

        from aigc_ray.model import load_model
        from aigc_ray.train.feed import batch_collator
        from aigc_ray.train.prepare import decay_groups

        torch.manual_seed(cfg.train.seed)
        self.cfg, self.model = cfg, load_model(model_dir)
        self.model.train()
        self.optimizer = torch.optim.AdamW(decay_groups(self.model, cfg.train.weight_decay),
                                           lr=cfg.train.lr, betas=(0.9, 0.95))
        self.collate, self.rows = batch_collator(pin=False), itertools.cycle(blocks)
        self.tokens = self.columns = 0
        self.seconds = 0.0

    def step(self, batch_size: int, timed: bool) -> None:
        import numpy as np
        import torch

        from aigc_ray.train.loss import token_loss_sum

        start = time.perf_counter()
        chunk = [next(self.rows) for _ in range(batch_size)]
        batch = self.collate({key: np.stack([row[key] for row in chunk]) for key in chunk[0]})
        loss_sum, targets = token_loss_sum(self.model, batch)
        (loss_sum / targets).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            self.seconds += time.perf_counter() - start
            self.tokens += int(batch["counts"][0])
            self.columns += batch["input_ids"].numel()

    def result(self, blocks: int) -> dict:
        return {"real_tokens_per_second": round(self.tokens / self.seconds),
                "padding_share": round(1 - self.tokens / self.columns, 3), "blocks": blocks}


def compare(cfg, model_dir: str, steps: int, warmup: int, batch_size: int) -> dict:
    """Both sides stepped in turn, so a busy machine slows them alike."""
    blocks = {name: blocks_of(cfg, model_dir, name == "packed") for name in ("unpacked", "packed")}
    sides = {name: Side(cfg, model_dir, rows) for name, rows in blocks.items()}
    for step in range(warmup + steps):
        for side in sides.values():
            side.step(batch_size, timed=step >= warmup)
    return {name: side.result(len(blocks[name])) for name, side in sides.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side (40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (5)")
    parser.add_argument("--batch", type=int, default=8, help="blocks per step (8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--sample", default="data/sample", help="sample corpus folder")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()

    import torch

    from aigc_ray.config import load_config
    from aigc_ray.data.read import document_text, validate_record
    from aigc_ray.data.sample import write_sample_corpus
    from aigc_ray.model import materialize_builtin

    torch.set_num_threads(args.threads)
    sample = Path(args.sample)
    if not (sample / "support_chat.jsonl").exists():
        write_sample_corpus(sample)
    results = {}
    with tempfile.TemporaryDirectory() as runs:
        for name, (config, file) in CORPORA.items():
            cfg = load_config(config, [f"data.path={sample / file}", f"run.output_dir={runs}"])
            with open(cfg.data.paths[0], encoding="utf-8") as f:
                texts = [document_text(validate_record(json.loads(line), cfg.data), cfg.data)
                         for _, line in zip(range(cfg.model.builtin.tokenizer_docs), f)]
            model_dir = str(materialize_builtin(cfg, texts))
            side = compare(cfg, model_dir, args.steps, args.warmup, args.batch)
            ratio = side["packed"]["real_tokens_per_second"] / side["unpacked"][
                "real_tokens_per_second"]
            results[name] = {**side, "ratio": round(ratio, 2),
                             "block_size": cfg.data.block_size}
            print(f"{name:<6} block {cfg.data.block_size}, batch {args.batch}, {args.steps} steps: "
                  f"unpacked {side['unpacked']['real_tokens_per_second']:,} real tokens/s "
                  f"({100 * side['unpacked']['padding_share']:.0f}% of trained columns padding)"
                  f", packed {side['packed']['real_tokens_per_second']:,} "
                  f"({100 * side['packed']['padding_share']:.0f}%); ratio {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
