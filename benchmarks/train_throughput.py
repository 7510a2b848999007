"""Training tokens per second of `aigc-ray train` against a plain PyTorch loop, in the same run.

Ours: `run_train` (Ray Data streaming the corpus into Ray Train V2 workers, DDP over gloo),
1 worker, then 2 workers. Its rate is the one `metrics.jsonl` reports: real (non-padding) tokens
of the global batch per second of training, the first logging interval (pipeline and worker
warm-up) left out, evaluation time left out.
Baseline: one process, no Ray: the same model, corpus blocks (tokenized and packed by the same
code), batch, AdamW and schedule, the same loss, the same torch thread count, timed over the
same steps after the same warm-up.
Set-up (Ray start, worker group, data pipeline start) is shown apart: it is paid once per run.

    .venv/bin/python benchmarks/train_throughput.py [--steps 200] [--pairs 4000] [--size default]

GPU mode (`--gpu`, the default when CUDA is present): the GPT-2-124M shape (12 layers × 768,
vocab 8192, 92M parameters), bf16, block 1024, batch 32, 1 worker, on a small text corpus
(~1.1 MB: about 10 steps an epoch, so many epoch boundaries) and a large one (20× that: one
epoch), each against the best plain loop we could write: every block already on the GPU, the
same model, loss, fused AdamW, schedule and clipping, with the same torch.compile setting.

    python3 benchmarks/train_throughput.py --gpu [--steps 150] [--compile both|on|off] [--out DIR]
                                               [--profile]

`--profile` adds `train.profile_steps` to ours and the same profiler to the plain loop, over the
same 5 steps, and prints each run's `gpu_busy`: where ours falls short of plain, the traces
(ours: the run folder's `profile/`, plain: `DIR/profile-plain-*`) show what the GPU waited for.

Strategy mode (`--strategy fsdp`): `scaling.strategy=fsdp` against ddp, same config, same
workers (`--workers`, default 2; on GPUs one per visible GPU), in the same run: tokens/s and what
each rank holds after its first step (parameters, gradients, optimizer state, peak process
memory, and peak GPU memory on GPUs), from the run folders' `workers/rank-N.jsonl`.

    .venv/bin/python benchmarks/train_throughput.py --strategy fsdp [--size small] [--steps 100]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # 2 cores: threads only contend

SIZES = {  # model.builtin settings; "default" is the shipped tiny_cpu model
    "default": {},
    "small": {"n_layer": 6, "n_embd": 384, "n_head": 6},
}


def corpus_blocks(cfg, model_dir: str) -> list[dict]:
    """Every training block of the corpus, tokenized and packed by our own `TokenizeAndPack`."""
    from aigc_ray.data.pack import TokenizeAndPack
    from aigc_ray.data.read import ROW_COLUMN, document_text, split_of
    from aigc_ray.tokenizer import tokenizer_spec

    pack = TokenizeAndPack(tokenizer_spec(model_dir), cfg.data.model_dump(), "train")
    prompts, completions = [], []
    with open(cfg.data.paths[0], encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if split_of(document_text(row, cfg.data), cfg.data.val_fraction) == "train":
                prompts.append(row[cfg.data.prompt_field])
                completions.append(row[cfg.data.completion_field])
    out = pack({cfg.data.prompt_field: prompts, cfg.data.completion_field: completions,
                ROW_COLUMN: [str(i) for i in range(len(prompts))]})
    return [{key: out[key][i] for key in out} for i in range(len(out["input_ids"]))]


def baseline(cfg, model_dir: str, blocks: list[dict], steps: int, warmup: int,
             threads: int) -> float:
    """Tokens per second of a plain single-process loop over the same blocks."""
    import numpy as np
    import torch

    from aigc_ray.model import load_model
    from aigc_ray.train.loop import lr_factor
    from aigc_ray.train.loss import token_loss_sum, trim_padding
    from aigc_ray.train.prepare import decay_groups

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    model = load_model(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=(0.9, 0.95))
    total = warmup + steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total, cfg.train.warmup_steps, cfg.train.lr_schedule, cfg.train.min_lr_ratio))
    rows = itertools.cycle(blocks)
    tokens, start = 0, time.perf_counter()
    for step in range(total):
        if step == warmup:
            tokens, start = 0, time.perf_counter()
        chunk = [next(rows) for _ in range(cfg.train.batch_size)]
        batch = trim_padding({key: torch.from_numpy(np.stack([row[key] for row in chunk]))
                              for key in chunk[0]})
        loss_sum, targets = token_loss_sum(model, batch)
        (loss_sum / targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def ours(cfg) -> tuple[float, float, int]:
    """(tokens per second after the first interval, wall seconds of the run, torch threads)."""
    from aigc_ray.train.driver import run_train
    from aigc_ray.train.metrics import read_jsonl, worker_starts

    start = time.perf_counter()
    summary = run_train(cfg)
    wall = time.perf_counter() - start
    rates = [row["tokens_per_second"] for row in read_jsonl(summary.run_dir / "metrics.jsonl")
             if row["loss"] is not None][1:]
    # Each rate covers the same number of steps (about the same tokens): the harmonic mean is
    # total tokens over total time.
    threads = worker_starts(summary.run_dir)[0]["torch_threads"]
    return statistics.harmonic_mean(rates), wall, threads


# ── GPU mode ────────────────────────────────────────────────────────────────────────────────

GPT2_SHAPE = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 8192}
SMALL_PAIRS = 4700  # ~1.1 MB of text: ~10 steps of 32 × 1024 tokens an epoch


def text_blocks(cfg, model_dir: str) -> list[dict]:
    """Every training block of a text corpus, packed by our own `TokenizeAndPack`."""
    from aigc_ray.data.pack import TokenizeAndPack
    from aigc_ray.data.read import ROW_COLUMN, split_of
    from aigc_ray.tokenizer import tokenizer_spec

    pack = TokenizeAndPack(tokenizer_spec(model_dir), cfg.data.model_dump(), "train")
    with open(cfg.data.paths[0], encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f
                 if split_of(line.rstrip("\n"), cfg.data.val_fraction) == "train"]
    out = pack({cfg.data.text_field: lines, ROW_COLUMN: [str(i) for i in range(len(lines))]})
    return [{key: out[key][i] for key in out} for i in range(len(out["input_ids"]))]


def plain_gpu_loop(cfg, model_dir: str, blocks: list[dict], steps: int, warmup: int,
                   compile_model: bool, device: str = "cuda", profile_dir: Path | None = None
                   ) -> dict:
    """The best plain loop: blocks preloaded on the GPU, bf16 autocast, fused AdamW, the same
    loss/schedule/clipping as ours; timed between CUDA syncs after `warmup` steps. With
    `profile_dir`, the same `StepProfiler` as `train.profile_steps` over the steps `ours`
    profiles (see `profile_settings`)."""
    import numpy as np
    import torch

    from aigc_ray.model import load_model
    from aigc_ray.train.loop import lr_factor
    from aigc_ray.train.loss import token_loss_sum
    from aigc_ray.train.metrics import flops_per_token, peak_tflops
    from aigc_ray.train.prepare import decay_groups
    from aigc_ray.train.profile import StepProfiler

    device = torch.device(device)
    profiler = StepProfiler(profile_dir, 0, device, cfg.train.profile_from,
                            cfg.train.profile_steps) if profile_dir else None
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    torch.manual_seed(cfg.train.seed)
    model = load_model(model_dir).to(device)
    model.train()
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=(0.9, 0.95), fused=on_gpu)
    total = warmup + steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total, cfg.train.warmup_steps, cfg.train.lr_schedule, cfg.train.min_lr_ratio))
    ids = torch.from_numpy(np.stack([b["input_ids"] for b in blocks])).long().to(device)
    labels = torch.from_numpy(np.stack([b["labels"] for b in blocks])).long().to(device)
    # Real (non-padding) tokens of each step, as ours counts them: the tail block of each
    # tokenizer batch is part padding.
    real = np.stack([b["attention_mask"] for b in blocks]).sum(axis=1)
    batch_size, tokens = cfg.train.batch_size, 0
    start = time.perf_counter()
    for step in range(total):
        if step == warmup:
            sync()
            start, tokens = time.perf_counter(), 0
        if profiler:
            profiler.before(step)
        tokens += int(real[np.arange(step * batch_size, (step + 1) * batch_size) % len(ids)].sum())
        rows = torch.arange(step * batch_size, (step + 1) * batch_size, device=device) % len(ids)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss_sum, targets = token_loss_sum(step_model, {"input_ids": ids[rows],
                                                            "labels": labels[rows]})
        (loss_sum / targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if profiler:
            profiler.after(step + 1)
    if profiler:
        profiler.close(total)  # a window the run cut short
    sync()
    rate = tokens / (time.perf_counter() - start)
    peak = peak_tflops(torch.cuda.get_device_name()) if on_gpu else None
    flops = flops_per_token(model, cfg.data.block_size)
    del model, step_model, optimizer, ids, labels
    if on_gpu:
        torch.cuda.empty_cache()
    return {"tokens_per_second": rate, "mfu": flops * rate / (peak * 1e12) if peak else None,
            "data_wait": 0.0, **({"profile": profiler.summary} if profiler else {})}


def ours_gpu(cfg, keep: Path | None = None) -> dict:
    """`run_train` on one GPU worker: steady rates from metrics.jsonl (first interval left out:
    start-up and compilation), the harmonic mean over intervals, and the run's wall time. A
    profile (`--profile`) is copied to `keep`: the run folder is temporary."""
    from aigc_ray.train.driver import run_train
    from aigc_ray.train.metrics import read_jsonl

    start = time.perf_counter()
    summary = run_train(cfg, follow=False)
    wall = time.perf_counter() - start
    rows = [row for row in read_jsonl(summary.run_dir / "metrics.jsonl")
            if row["loss"] is not None][1:]
    data = json.loads((summary.run_dir / "data.json").read_text())
    return {"tokens_per_second": statistics.harmonic_mean([r["tokens_per_second"] for r in rows]),
            "mfu": statistics.mean([r["mfu"] for r in rows]) if rows[0]["mfu"] else None,
            "data_wait": statistics.mean([r["data_wait"] for r in rows]),
            "intervals": [round(r["tokens_per_second"]) for r in rows], "wall_s": wall,
            "training_split": data["training_split"], "epochs": rows[-1]["epoch"] + 1,
            **profile_of(summary.run_dir, keep)}


def profile_of(run_dir: Path, keep: Path | None) -> dict:
    """Rank 0's profile line, where the run was profiled (`--profile`), its folder kept."""
    table = run_dir / "profile" / "rank-0.txt"
    if not table.exists():
        return {}
    if keep:
        shutil.copytree(run_dir / "profile", keep, dirs_exist_ok=True)
    return {"profile": table.read_text().splitlines()[0]}


def profile_settings(steps: int, log_every: int) -> list[str]:
    """`--profile`: 5 steps in the last logging interval, past start-up and compilation."""
    return ["train.profile_steps=5", f"train.profile_from={max(1, steps - log_every + 1)}"]


def gpu_main(args) -> None:
    import torch

    from aigc_ray.cluster import start_ray
    from aigc_ray.config import load_config
    from aigc_ray.data.sample import write_sample_corpus
    from aigc_ray.model import resolve_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(), "steps": args.steps, "runs": {}}
    log_every = max(1, args.steps // 6)
    with tempfile.TemporaryDirectory() as tmp:
        small = write_sample_corpus(Path(tmp) / "small", num_pairs=SMALL_PAIRS)["text"]
        large = write_sample_corpus(Path(tmp) / "large", num_pairs=20 * SMALL_PAIRS)["text"]
        cpus = max(2, (os.cpu_count() or 8) // 2)

        def config(corpus: str, name: str, compile_model: bool, model: str = "builtin:tiny"):
            return load_config("tiny_text", [
                f"model.name_or_path={model}",
                *[f"model.builtin.{key}={value}" for key, value in GPT2_SHAPE.items()],
                f"data.path={corpus}", "data.block_size=1024", "data.val_fraction=0.02",
                f"data.tokenizer_actors={max(1, cpus // 2)}", "train.batch_size=32",
                f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                f"train.log_every={log_every}", "train.lr=6e-4", "train.warmup_steps=10",
                f"train.compile={str(compile_model).lower()}", "train.sample_prompts=[]",
                "eval.after_training=false", "scaling.num_workers=1", "scaling.use_gpu=true",
                f"scaling.cpus_per_worker={cpus}", f"run.output_dir={tmp}/runs", f"run.name={name}",
                *(profile_settings(args.steps, log_every) if args.profile else [])])

        def record(key: str, measure, *measure_args) -> None:
            # One failed run (a compiler missing on this machine, say) must not lose the rest.
            try:
                results["runs"][key] = measure(*measure_args)
            except Exception as exc:
                results.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"[:500]
            print(key, results["runs"].get(key) or results["errors"][key], flush=True)
            (out / "train_gpu.json").write_text(json.dumps(results, indent=2))

        start_ray()
        model_dir = resolve_model_path(config(small, "model", False))  # one tokenizer, one init
        blocks = text_blocks(config(small, "blocks", False, model_dir), model_dir)
        results["small_corpus_blocks"] = len(blocks)
        for compile_model in {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]:
            tag = "compile" if compile_model else "eager"
            for corpus_name, corpus in (("small", small), ("large", large)):
                if compile_model and corpus_name == "large" and not args.large_compile:
                    continue
                key = f"ours {tag} {corpus_name}"
                record(key, ours_gpu, config(corpus, key.replace(" ", "-"), compile_model,
                                             model_dir), out / f"profile-{key.replace(' ', '-')}")
            record(f"plain {tag}", plain_gpu_loop, config(small, "plain", compile_model, model_dir),
                   model_dir, blocks, args.steps - log_every, log_every, compile_model, "cuda",
                   out / f"profile-plain-{tag}" if args.profile else None)

    runs = results["runs"]
    print(f"\n{results['device']}: GPT-2-124M shape (92M parameters), bf16, block 1024, batch 32, "
          f"1 worker, {args.steps} steps; small corpus {results['small_corpus_blocks']} blocks "
          "(~10 steps an epoch), large 20× (one epoch)")
    print(f"{'run':<22}{'tokens/s':>12}{'MFU':>8}{'data_wait':>11}  ratio to plain, same compile")
    for key, run in runs.items():
        plain = runs.get(f"plain {key.split()[1]}")
        ratio = f"{run['tokens_per_second'] / plain['tokens_per_second']:.3f}" if plain else ""
        mfu = f"{100 * run['mfu']:.1f}%" if run.get("mfu") else "n/a"
        print(f"{key:<22}{run['tokens_per_second']:>12,.0f}{mfu:>8}"
              f"{100 * run['data_wait']:>10.1f}%  {ratio if not key.startswith('plain') else ''}")
    for key, run in runs.items():
        if run.get("profile"):
            print(f"profile {key}: {run['profile']}")
    (out / "train_gpu.json").write_text(json.dumps(results, indent=2))


MEMORY_KEYS = ("parameter_bytes", "gradient_bytes", "optimizer_bytes", "peak_process_bytes",
               "peak_gpu_bytes")


def strategy_main(args) -> None:
    """FSDP against DDP on the same workers: tokens/s and the bytes each rank holds."""
    import torch

    from aigc_ray.cluster import start_ray
    from aigc_ray.config import load_config
    from aigc_ray.data.sample import write_sample_corpus
    from aigc_ray.train.metrics import worker_memory

    gpus = torch.cuda.device_count() if args.gpu else 0
    workers = args.workers or gpus or 2  # on GPUs one worker per GPU
    log_every = max(1, args.steps // 5)
    size = [f"model.builtin.{key}={value}" for key, value in SIZES[args.size].items()]
    results: dict = {"device": torch.cuda.get_device_name() if gpus else "cpu",
                     "workers": workers, "steps": args.steps, "size": args.size, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_sample_corpus(Path(tmp) / "corpus", num_pairs=args.pairs)
        start_ray()
        for strategy in ("ddp", args.strategy):
            cfg = load_config("tiny_cpu", [
                f"data.path={corpus['jsonl']}", f"run.output_dir={tmp}/runs",
                f"run.name={strategy}", f"train.max_steps={args.steps}",
                f"train.eval_every={args.steps}", f"train.log_every={log_every}",
                "train.sample_prompts=[]", "eval.after_training=false",
                f"scaling.num_workers={workers}", f"scaling.strategy={strategy}",
                *(["scaling.use_gpu=true"] if gpus else []), *size])
            rate, wall, _ = ours(cfg)
            held = worker_memory(cfg.run.dir)
            results["runs"][strategy] = {
                "tokens_per_second": rate, "wall_s": wall,
                **{key: statistics.mean(row[key] for row in held)
                   for key in MEMORY_KEYS if key in held[0]}}
            print(strategy, results["runs"][strategy], flush=True)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(results, indent=2) + "\n")
    ddp, other = results["runs"]["ddp"], results["runs"][args.strategy]
    print(f"\n{workers} workers on {results['device']}, model size {args.size}, {args.steps} steps; "
          "bytes are per rank (mean over ranks), after the first optimizer step")
    print(f"{'':<22}{'ddp':>14}{args.strategy:>14}{'ratio':>9}")
    for key in ("tokens_per_second", *MEMORY_KEYS):
        if key in ddp:
            scale = 1 if key == "tokens_per_second" else 2 ** 20
            unit = "" if key == "tokens_per_second" else " MiB"
            print(f"{key:<22}{ddp[key] / scale:>10,.1f}{unit:<4}{other[key] / scale:>10,.1f}"
                  f"{unit:<4}{other[key] / ddp[key]:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (200)")
    parser.add_argument("--pairs", type=int, default=4000, help="sample corpus size (4000)")
    parser.add_argument("--size", choices=sorted(SIZES), default="default",
                        help="built-in model size: default (tiny_cpu's) or small (~11M)")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="GPU mode (default: on when CUDA is present)")
    parser.add_argument("--compile", choices=("both", "on", "off"), default="both",
                        help="GPU mode: torch.compile setting(s) to measure (both)")
    parser.add_argument("--large-compile", action="store_true",
                        help="GPU mode: also measure the large corpus with compile")
    parser.add_argument("--out", default="runs/bench", help="GPU mode: where train_gpu.json goes")
    parser.add_argument("--profile", action="store_true",
                        help="GPU mode: profile 5 steps of the last interval of every run, ours "
                             "(train.profile_steps) and plain alike, and print their gpu_busy "
                             "(the profiled interval runs slower: compare gpu_busy, not rates)")
    parser.add_argument("--strategy", choices=("fsdp",), default=None,
                        help="strategy mode: this scaling.strategy against ddp, same workers")
    parser.add_argument("--workers", type=int, default=None,
                        help="strategy mode: workers (default 2; on GPUs one per GPU)")
    parser.add_argument("--out-json", default=None, help="strategy mode: write the figures here")
    args = parser.parse_args()
    if args.gpu is None:
        import torch

        args.gpu = torch.cuda.is_available()
    if args.strategy:
        return strategy_main(args)
    if args.gpu:
        if args.steps == 200:
            args.steps = 150
        return gpu_main(args)

    from aigc_ray.cluster import start_ray
    from aigc_ray.config import load_config
    from aigc_ray.data.sample import write_sample_corpus
    from aigc_ray.model import resolve_model_path

    log_every = 20
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_sample_corpus(Path(tmp) / "corpus", num_pairs=args.pairs)
        size = [f"model.builtin.{key}={value}" for key, value in SIZES[args.size].items()]

        def config(workers: int):
            # One evaluation, at the end; batch 8 per worker as in tiny_cpu; no generation
            # report after training (the whole-run wall time is training's own).
            return load_config("tiny_cpu", [
                f"data.path={corpus['jsonl']}", f"run.output_dir={tmp}/runs",
                f"run.name=w{workers}", f"train.max_steps={args.steps}",
                f"train.eval_every={args.steps}", f"train.log_every={log_every}",
                "train.sample_prompts=[]", "eval.after_training=false",
                f"scaling.num_workers={workers}", *size])

        start = time.perf_counter()
        start_ray()
        ray_start = time.perf_counter() - start
        cfg = config(1)
        model_dir = resolve_model_path(cfg)

        one_rate, one_wall, threads = ours(cfg)
        two_rate, two_wall, _ = ours(config(2))
        blocks = corpus_blocks(cfg, model_dir)
        base_rate = baseline(cfg, model_dir, blocks, args.steps - log_every, log_every,
                             threads)
        from transformers import AutoConfig

        model_cfg = AutoConfig.from_pretrained(model_dir)

    params = f"{model_cfg.n_layer} layers × {model_cfg.n_embd} wide"
    print(f"setup        built-in model ({params}), {args.pairs:,} pairs, block_size "
          f"{cfg.data.block_size}, batch {cfg.train.batch_size} per worker, {args.steps} steps, "
          f"{os.cpu_count()} CPUs, {threads} torch thread(s) per worker and in the baseline")
    print(f"ray start    {ray_start:.1f} s (once per job, not counted below)")
    print(f"ours 1×      {one_rate:,.0f} tokens/s   (whole run {one_wall:.1f} s wall: worker "
          "group, data pipeline, evaluations and export included)")
    print(f"baseline     {base_rate:,.0f} tokens/s   (plain PyTorch loop, one process, no Ray)")
    print(f"ours 2×      {two_rate:,.0f} tokens/s   (whole run {two_wall:.1f} s wall; "
          f"global batch {2 * cfg.train.batch_size})")
    print(f"ratio        ours 1 worker / baseline = {one_rate / base_rate:.3f}")
    print(f"ratio        ours 2 workers / 1 worker = {two_rate / one_rate:.2f} "
          f"(on {os.cpu_count()} cores, data pipeline included)")


if __name__ == "__main__":
    main()
