"""The data pipeline as the commands see it: the train and validation datasets from a config,
`aigc-ray data`'s checks and statistics, and the CPUs the pipeline takes from a cluster.
"""

from __future__ import annotations

from aigc_ray.config import Config, Data
from aigc_ray.data.files import resolve_files
from aigc_ray.data.pack import tokenize
from aigc_ray.data.read import SKIP_REASONS, corpus_source, create_stats, read_corpus
from aigc_ray.errors import ConfigError, DataError
from aigc_ray.tokenizer import tokenizer_spec


def pipeline_cpus(data: Data, tokenizing: bool = True, writing: bool = False) -> float:
    """CPUs a command's Ray Data pipeline holds while it runs: one read task, the tokenizer
    actors when it tokenizes (training, tune's trials), a write task when it writes (batch
    generation). Each takes `data.cpus_per_task`. Train, tune and generate size their resource
    checks by this one count."""
    tasks = 1 + (data.tokenizer_actors if tokenizing else 0) + (1 if writing else 0)
    return tasks * data.cpus_per_task


def build_datasets(cfg: Config, tokenizer_path: str, stats=None, files=None) -> dict:
    """{'train': Dataset, 'val': Dataset} of packed blocks, ready for `get_dataset_shard`.

    Each has columns `input_ids`, `attention_mask`, `labels` ([block_size] int arrays).
    The validation Dataset is absent when `data.val_fraction` is 0.
    """

    files = files if files is not None else resolve_files(cfg.data)  # listed once per run
    splits = ["train", "val"] if cfg.data.val_fraction > 0 else ["train"]
    tokenizer = tokenizer_spec(tokenizer_path, cfg.model.trust_remote_code)  # once for both
    files = corpus_source(cfg, files)  # an hf dataset: put once for both splits
    return {split: tokenize(read_corpus(cfg, split, stats, files), cfg, tokenizer, split, stats)
            for split in splits}


def check_config(cfg: Config) -> list[str]:
    """Checks that need the filesystem but not Ray; raises ConfigError before Ray starts."""
    try:
        return resolve_files(cfg.data)
    except DataError as exc:
        raise ConfigError(str(exc)) from None


def corpus_statistics(cfg: Config, tokenizer_path: str) -> dict:
    """Run the whole pipeline once, streaming, and return its counts (nothing is kept)."""
    import ray

    stats = create_stats()
    for dataset in build_datasets(cfg, tokenizer_path, stats).values():
        for _ in dataset.iter_batches(batch_size=1024, batch_format="numpy"):
            pass
    totals = ray.get(stats.totals.remote())
    ray.kill(stats)
    return totals


def format_statistics(cfg: Config, totals: dict, files: list[str]) -> str:
    """A small table a user reads before spending a GPU hour on a corpus."""
    def get(name: str, split: str = "") -> int:
        return int(totals.get(f"{name}.{split}" if split else name, 0))

    data = cfg.data
    if data.chat:
        found = ", ".join(f"{name} {get(f'chat_format.{name}'):,}"
                          for name in ("openai", "sharegpt", "alpaca")
                          if get(f"chat_format.{name}"))
        mode = f"conversations ({found or 'none read'}), loss on {data.train_on.replace('_', ' ')}"
    else:
        mode = "prompt/completion" if data.supervised else "causal-LM text"
    mode += ", packed" if data.packing else ""
    lines = [f"corpus      {len(files)} file(s), {data.format}, {mode}, "
             f"block_size {data.block_size}"]
    for split in ("train", "val"):
        tokens, blocks, padding = get("tokens", split), get("blocks", split), get("padding", split)
        slots = blocks * data.block_size
        line = (f"{split:<11} {get('documents', split):,} documents, {tokens:,} tokens, "
                f"{blocks:,} blocks, {_share(padding, slots)} padding")
        other = "unpacked" if data.packing else "packed"
        if totals.get(f"padding_{other}.{split}") is not None:  # examples, not a joined stream
            other_padding = get(f"padding_{other}", split)
            line += f" ({_share(other_padding, other_padding + tokens)} {other})"
        if data.supervised or data.chat:
            target = "reply" if data.chat else "completion"
            line += (f", {get('target_tokens', split):,} {target} tokens, "
                     f"{get('truncated', split):,} {'cut' if data.chat else 'truncated'}")
        lines.append(line)
    skipped = {reason: get(f"skipped.{reason}") for reason in SKIP_REASONS}
    detail = ", ".join(f"{reason} {n:,}" for reason, n in skipped.items() if n) or "none"
    lines.append(f"skipped     {sum(skipped.values()):,} rows ({detail})")
    return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole if whole else 0:.0f}%"
