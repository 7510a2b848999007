"""What several benchmarks share: the prompts, the checkpoints they measure and the static-batch
`generate` baseline they are measured against. The scripts run as `python benchmarks/X.py`, so
Python puts this folder first on the path and `from common import ...` finds this file. Nothing
here runs in a Ray worker (a worker would not find this module); aigc_ray, torch and transformers
are imported inside the functions, after each script has set its environment.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

# ── the prompts and the built-in tiny model: serving, batch generation ────────────────────────────


def prompts(count: int) -> list[str]:
    """`count` support questions from the sample corpus (seed 1; `build_checkpoint`'s corpus is
    seed 0), the same in every benchmark and every run."""
    from aigc_ray.data.sample import write_sample_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_sample_corpus(tmp, num_pairs=count, seed=1)
        with open(corpus["jsonl"], encoding="utf-8") as f:
            return [json.loads(line)["prompt"] for line in f]


def build_checkpoint(folder: Path) -> str:
    """The built-in tiny model of the default config (GPT-2 architecture, ~2.6M parameters),
    its tokenizer trained on the sample corpus; untrained weights cost the same to run."""
    from aigc_ray.config import load_config
    from aigc_ray.data.read import document_text
    from aigc_ray.data.sample import write_sample_corpus
    from aigc_ray.model import materialize_builtin

    corpus = write_sample_corpus(folder / "sample", num_pairs=2000)
    cfg = load_config("tiny_cpu", [f"data.path={corpus['jsonl']}", f"run.output_dir={folder}"])
    with open(corpus["jsonl"], encoding="utf-8") as f:
        texts = [document_text(json.loads(line), cfg.data) for line in f]
    return str(materialize_builtin(cfg, texts))


# ── random weights of a shape, and the static-batch generate baseline (GPU modes) ─────────────────

SHAPES = {"tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512},
          "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 8192}}


def build(shape: str, device: str):
    """(model in eval mode on `device`, tokenizer): random weights of `shape`, a byte-level BPE
    trained on the sample corpus."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from aigc_ray.tokenizer import build_tokenizer

    size = SHAPES[shape]
    tokenizer = build_tokenizer(prompts(2000), size["vocab_size"])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=max(size["vocab_size"], len(tokenizer)), n_positions=1024,
                        n_layer=size["n_layer"], n_embd=size["n_embd"], n_head=size["n_head"],
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval(), tokenizer


def save_checkpoint(shape: str, folder: Path) -> str:
    """`build`'s model and tokenizer as an HF folder (float32; serving picks bf16 on a GPU) for
    the benchmarks that load a checkpoint (serving, batch generation)."""
    model, tokenizer = build(shape, "cpu")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def checkpoint_and_baselines(shape: str, folder: Path, prompts_needed: int, sizes,
                             max_tokens: int) -> tuple[str, str, list[str], dict]:
    """What the serving and generation benchmarks' GPU modes share: (device, checkpoint folder
    of `shape`'s model, `prompts_needed` prompts as text, static-batch `generate` tokens/s per
    batch size, best of 2). On CPU, one torch thread, as a model replica or actor has. The
    model is freed before returning: the benchmark's own replica or actor loads its copy."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    checkpoint = save_checkpoint(shape, folder)
    model, tokenizer = build(shape, device)  # the same weights: the same seed
    ids = same_length_prompts(tokenizer, max(prompts_needed, max(sizes)))
    static_generate(model, tokenizer, ids[:2], 4, device)  # warm-up
    baselines = {size: max(static_generate(model, tokenizer, ids[:size], max_tokens, device)
                           ["tokens_per_second"] for _ in range(2)) for size in sizes}
    texts = [tokenizer.decode(prompt) for prompt in ids[:prompts_needed]]
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return device, checkpoint, texts, baselines


def same_length_prompts(tokenizer, count: int, length: int = 16) -> list[list[int]]:
    """`count` prompts cut to `length` tokens, so both sides decode the same shapes."""
    out = []
    for text in prompts(4 * count):
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == count:
            return out
    raise RuntimeError("not enough long prompts")


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def static_generate(model, tokenizer, ids: list[list[int]], max_tokens: int, device: str) -> dict:
    import torch

    batch = torch.tensor(ids, device=device)  # same length: no padding needed
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch),
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    sync(device)
    seconds = time.perf_counter() - start
    produced = (out.shape[1] - batch.shape[1]) * len(ids)
    return {"tokens_per_second": produced / seconds}
