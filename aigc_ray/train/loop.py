"""The training loop that runs on every Ray Train worker (DDP or FSDP2).

The loss is the mean over every target token of the global batch (all workers, all
accumulation micro-steps), so 1 worker and N workers follow the same curve for the same global
batch, however many completion tokens each sequence holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aigc_ray.config import Config
from aigc_ray.errors import DataError
from aigc_ray.run_folder import CheckpointFolder, RunFolder
from aigc_ray.train.export import export_model
from aigc_ray.train.feed import EpochFeed, WaitClock, feed, too_few_blocks, training_passes
from aigc_ray.train.metrics import (
    METRIC_KEYS,
    append_jsonl,
    flops_per_token,
    peak_tflops,
    truncate_after,
)
from aigc_ray.train.prepare import (
    add_lora,
    compiled,
    decay_groups,
    freeze_bottom,
    transformer_blocks,
    unwrap,
)
from aigc_ray.train.profile import StepProfiler
from aigc_ray.train.sharding import (
    gradient_sync,
    is_sharded,
    load_sharded,
    lockstep,
    save_sharded,
    shard_model,
    state_bytes,
)
from aigc_ray.train.trackers import open_trackers

log = logging.getLogger(__name__)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
              min_ratio: float) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then the decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def all_reduce_sum(*values, device=None) -> list[float]:
    """Sum numbers or 0-d tensors over all workers (a no-op with one) in one collective."""
    import torch
    import torch.distributed as dist

    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                          for v in values])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def generate_samples(model, tokenizer, prompts: list[str], device, max_new_tokens: int = 40,
                     chat: bool = False, synced: bool = False):
    """Greedy replies to fixed prompts, for the log; with `chat`, each prompt is a user message
    rendered by the chat template. `synced`: every rank of a sharded model calls this, and each
    keeps stepping until all are done (each step gathers parameters from all of them)."""
    import torch

    from aigc_ray.data.chat import chat_ids

    model = unwrap(model)
    was_training = model.training
    model.eval()
    replies = []
    with torch.no_grad():
        for prompt in prompts:
            ids = (chat_ids(tokenizer, [{"role": "user", "content": prompt}], True) if chat
                   else tokenizer(prompt)["input_ids"])
            ids = torch.tensor([ids], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
            replies.append(tokenizer.decode(out[0, ids.shape[1]:],
                                            skip_special_tokens=True).strip())
    model.train(was_training)
    return replies


def loss_scale(micro: list[dict], world_size: int):
    """The factor that turns a micro-batch's loss sum into its share of the mean over every
    target token of the global batch: a device-side count (all-reduced when there are several
    workers), never read back on the host. DDP averages gradients over workers, hence ×N."""
    import torch

    global_targets = torch.stack([batch["counts"][1] for batch in micro]).sum()
    if world_size > 1:
        torch.distributed.all_reduce(global_targets)
    return world_size / global_targets.clamp(min=1)


@dataclass
class LoopState:
    """Where the loop is: saved in every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # of this worker's shard, consumed by finished steps
    best_val_loss: float = math.inf
    evals_without_gain: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, state[field.name])

    def note_eval(self, val_loss: float) -> None:
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        self.evals_without_gain = 0 if improved else self.evals_without_gain + 1


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: set up → loop → evaluate → report/checkpoint.

    Rank 0 writes the run folder's `metrics.jsonl`, `samples.jsonl` and checkpoints; every rank
    notes its start in `workers/rank-N.jsonl`; the driver prints from those files.
    """
    import ray.train
    import ray.train.torch
    import torch

    from aigc_ray.model import load_model
    from aigc_ray.tokenizer import IGNORE_INDEX, load_tokenizer
    from aigc_ray.train.loss import check_packed_attention, token_loss_sum

    # 1. Set up: config, device, model (from the latest checkpoint when resuming), optimizer.
    cfg = Config.model_validate(loop_config["config"])
    run_dir, model_path = Path(loop_config["run_dir"]), loop_config["model_path"]
    run = RunFolder(run_dir)
    total_steps, sample_prompts = loop_config["total_steps"], loop_config["sample_prompts"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    use_bf16 = cfg.train.mixed_precision == "bf16" or (
        cfg.train.mixed_precision == "auto" and device.type == "cuda")

    sharded = is_sharded(cfg)
    checkpoint = ray.train.get_checkpoint()  # this run's own, after a failure or a rerun
    if checkpoint is None and loop_config.get("start_from"):  # Tune's PBT: another trial's
        checkpoint = ray.train.Checkpoint.from_directory(loop_config["start_from"])
    restoring = contextlib.ExitStack()  # holds a downloaded checkpoint until it is loaded
    saved, restore_dir = None, None
    if checkpoint:  # read in place when local; a remote one is downloaded once per node
        restore_dir = Path(restoring.enter_context(checkpoint.as_directory()))
        saved = torch.load(CheckpointFolder(restore_dir).training_state, weights_only=True)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    lora = cfg.train.lora.enabled
    # Full fine-tuning with ddp resumes from the checkpoint's own weights; LoRA from the base
    # model plus the saved adapters; fsdp from the base model, then its shards (below).
    model = load_model(restore_dir if restore_dir and not lora and not sharded else model_path,
                       cfg.model.trust_remote_code)
    if cfg.train.freeze_layers:
        freeze_bottom(model, cfg.train.freeze_layers)
    if lora:
        model = add_lora(model, cfg, str(CheckpointFolder(restore_dir).adapter)
                         if restore_dir and not sharded else None)
    if cfg.train.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    flops = flops_per_token(model, cfg.data.block_size)  # of the whole model, before sharding
    # `model` stays the module itself (sharded in place with fsdp): evaluation, samples and
    # checkpoints use it; `step_model` is what the training step calls.
    if sharded:
        shard_model(model, transformer_blocks(model, "scaling.strategy=ddp"), device, use_bf16,
                    cfg.scaling.cpu_offload)
    else:
        model.to(device)
    if cfg.data.packing:
        check_packed_attention(model, device)
    step_model, warning = model, None
    if cfg.train.compile:
        step_model, warning = compiled(model, device)
    if not sharded:
        step_model = ray.train.torch.prepare_model(step_model)  # DDP when world_size > 1
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=(0.9, 0.95),
                                  fused=device.type == "cuda" and not cfg.scaling.cpu_offload)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps, cfg.train.warmup_steps, cfg.train.lr_schedule, cfg.train.min_lr_ratio))

    state = LoopState()
    if saved:
        if sharded:
            load_sharded(model, optimizer, CheckpointFolder(restore_dir).sharded)
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        # The config's learning rate and weight decay, not the checkpoint's: Tune's PBT continues
        # a trial from another's checkpoint with perturbed values (a plain resume changes nothing).
        scheduler.base_lrs = [cfg.train.lr] * len(optimizer.param_groups)
        for group, fresh in zip(optimizer.param_groups,
                                decay_groups(model, cfg.train.weight_decay)):
            group.update(weight_decay=fresh["weight_decay"], initial_lr=cfg.train.lr,
                         lr=cfg.train.lr * lr_factor(
                             scheduler.last_epoch, total_steps, cfg.train.warmup_steps,
                             cfg.train.lr_schedule, cfg.train.min_lr_ratio))
        state.load_state_dict(saved.get("loop", saved))  # runs saved before LoopState: flat keys
        torch.set_rng_state(saved["rng"])
    restoring.close()
    if rank == 0:  # keep what the checkpoint had seen; a fresh start keeps nothing
        for path in (run.metrics, run.samples):
            truncate_after(path, state.step if saved else -1)
    note_start(run_dir, rank, world_size, device, state.step, total_steps,
               global_batch=cfg.train.batch_size * cfg.train.grad_accum_steps * world_size,
               strategy=cfg.scaling.strategy)
    if warning and rank == 0:
        note_console(run_dir, state.step, warning)

    trackers = open_trackers(cfg, run_dir, state.step) if rank == 0 else None
    val_shard = ray.train.get_dataset_shard("val") if loop_config["has_val"] else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    peak = cfg.scaling.peak_tflops or (
        peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)

    def filler_batch() -> dict:  # one short row without targets
        ids = torch.zeros((1, 8), dtype=torch.long, device=device)
        return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}

    def evaluate() -> dict | None:
        if val_shard is None:
            return None
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        batches = itertools.islice(feed(val_shard, cfg.train.batch_size, device, 1),
                                   cfg.train.eval_batches)
        # fsdp: every rank runs as many forwards as the largest shard needs (fillers count 0).
        batches = (lockstep(list(batches), filler_batch, device) if sharded
                   else ((batch, True) for batch in batches))
        with torch.no_grad(), autocast:
            for batch, real in batches:
                batch_loss, batch_tokens = token_loss_sum(model, batch)
                if real:
                    loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
        model.train()
        loss_sum, tokens = all_reduce_sum(loss_sum, tokens, device=device)
        val_loss = loss_sum / max(tokens, 1)
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))}

    def save_and_report(metrics: dict) -> None:
        """Rank 0 writes the checkpoint (ddp), or every rank its own shard of it (fsdp); Ray
        Train gathers what each rank reports into one checkpoint folder."""
        if rank != 0 and not sharded:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="aigc-ray-ckpt-") as folder:
            out = CheckpointFolder(Path(folder))
            if sharded:
                save_sharded(model, optimizer, out.sharded)
            if rank == 0:
                if sharded:  # the model's config and tokenizer, for the export of final/
                    unwrap(model).config.save_pretrained(out.path)
                    tokenizer.save_pretrained(out.path)
                else:
                    export_model(model, tokenizer, out.path)
                    if lora:
                        model.save_pretrained(out.adapter)
                torch.save({"scheduler": scheduler.state_dict(), "loop": state.state_dict(),
                            "rng": torch.get_rng_state(),
                            **({} if sharded else {"optimizer": optimizer.state_dict()})},
                           out.training_state)
                shutil.copy(run.config, out.config)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def write_metrics(row: dict) -> None:
        if rank == 0:
            append_jsonl(run.metrics, {key: row.get(key) for key in METRIC_KEYS})
        if trackers:
            trackers.metrics(row)

    # 2. The perplexity before training, so the end of the run can say how much it gained.
    if state.step == 0:
        before = evaluate()
        if before:
            write_metrics({"step": 0, "epoch": 0, "lr": 0.0, **before})

    # 3. The loop: accumulate micro-batches, normalize by the global target-token count, step.
    #    Nothing in a step reads a device tensor: counts come from the host side of the batch,
    #    the loss sum stays on the device until a logging interval ends.
    model.train()
    interval_loss = torch.zeros((), dtype=torch.float64, device=device)
    interval_targets = interval_tokens = 0
    clock = WaitClock(device)
    finished, measured = state.step >= total_steps, False
    epochs = EpochFeed(training_passes(loop_config, cfg, device, rank, world_size), device,
                       state.epoch,
                       cfg.train.epochs - state.epoch if loop_config["epochs_bound"] else None)
    profiler = StepProfiler(run.profile, rank, device, cfg.train.profile_from,
                            cfg.train.profile_steps) if cfg.train.profile_steps else None
    try:
        while not finished:
            batches = epochs.epoch()
            for _ in range(state.batches_in_epoch):  # resuming mid-epoch: skip what was consumed
                next(batches, None)
            while not finished:
                if profiler:
                    profiler.before(state.step)
                micro = []
                for _ in range(cfg.train.grad_accum_steps):
                    batch = clock.next(batches)
                    if batch is None:
                        break
                    micro.append(batch)
                if len(micro) < cfg.train.grad_accum_steps:
                    break  # the epoch ended
                scale = loss_scale(micro, world_size)
                for position, micro_batch in enumerate(micro):
                    last = position == len(micro) - 1
                    with gradient_sync(step_model, model if sharded else None, last,
                                       world_size):
                        with autocast:
                            loss_sum, _ = token_loss_sum(step_model, micro_batch)
                        (loss_sum * scale).backward()
                    interval_loss += loss_sum.detach()
                    interval_targets += micro_batch["targets"]
                    interval_tokens += micro_batch["tokens"]
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                if not measured:  # what this rank holds, once its optimizer state exists
                    note_memory(run_dir, rank, state.step + 1, state_bytes(model, optimizer))
                    measured = True
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                clock.mark_step()
                state.step += 1
                state.batches_in_epoch += len(micro)
                if profiler and profiler.after(state.step) and rank == 0:
                    note_console(run_dir, state.step, profiler.console_line())

                evaluating = state.step % cfg.train.eval_every == 0 or state.step == total_steps
                if evaluating or state.step % cfg.train.log_every == 0:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # the interval ends when its steps have run
                    share, seconds = clock.share()
                    loss_all, targets_all, seen_all, waited = all_reduce_sum(
                        interval_loss, interval_targets, interval_tokens, share,
                        device=device)
                    data_wait, rate = waited / world_size, seen_all / max(seconds, 1e-9)
                    row = {"step": state.step, "epoch": state.epoch,
                           "loss": loss_all / max(targets_all, 1), "lr": scheduler.get_last_lr()[0],
                           "tokens_per_second": rate, "data_wait": data_wait,
                           "mfu": flops * rate / (peak * 1e12 * world_size) if peak else None}
                    interval_loss.zero_()
                    interval_targets = interval_tokens = 0
                    if evaluating:
                        row.update(evaluate() or {})
                        if "val_loss" in row:
                            state.note_eval(row["val_loss"])
                        if sample_prompts and (rank == 0 or sharded):
                            replies = generate_samples(model, tokenizer, sample_prompts,
                                                       device, chat=cfg.data.chat,
                                                       synced=sharded and world_size > 1)
                        if sample_prompts and rank == 0:
                            samples = [{"step": state.step, "prompt": prompt, "reply": reply}
                                       for prompt, reply in zip(sample_prompts, replies)]
                            for sample in samples:
                                append_jsonl(run.samples, sample)
                            if trackers:
                                trackers.samples(state.step, samples)
                    write_metrics(row)
                    if evaluating:
                        save_and_report(row)
                    clock.pause()  # evaluation time is not training time
                patience = cfg.train.early_stopping_patience
                finished = state.step >= total_steps or bool(
                    patience and state.evals_without_gain >= patience)
            if not finished:
                if state.batches_in_epoch == 0:  # a whole epoch without one step: it never will
                    raise DataError(too_few_blocks(cfg, None, world_size))
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                finished = loop_config["epochs_bound"] and state.epoch >= cfg.train.epochs
        if trackers and math.isfinite(state.best_val_loss):
            trackers.metrics({"step": state.step, "best_val_loss": state.best_val_loss})
    finally:
        epochs.close()  # a run that ends mid-epoch stops the reader thread
        # A window the run cut short is written now; one it never reached is said so.
        if profiler and (profiler.close(state.step) or not profiler.summary) and rank == 0:
            note_console(run_dir, state.step, profiler.console_line())
        if trackers:
            trackers.close()


def note_start(run_dir: Path, rank: int, world_size: int, device, start_step: int,
               total_steps: int, global_batch: int, strategy: str = "ddp") -> None:
    """Append this worker's start to `workers/rank-N.jsonl`: where each rank ran, as which
    process, and from which step (a restart after a failure shows up as a second line)."""
    import socket

    import ray
    import torch
    import torch.distributed as dist

    node_id = ray.get_runtime_context().get_node_id()
    nodes = [node_id] * world_size
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(nodes, node_id)
    append_jsonl(RunFolder(run_dir).worker_log(rank), {
        "rank": rank, "pid": os.getpid(), "node_id": node_id, "host": socket.gethostname(),
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "start_step": start_step, "world_size": world_size, "num_nodes": len(set(nodes)),
        "total_steps": total_steps, "global_batch": global_batch, "strategy": strategy,
        "time": time.time()})


def note_console(run_dir: Path, step: int, line: str) -> None:
    """A line for the driver's console (see `metrics.worker_notes`), from rank 0."""
    append_jsonl(RunFolder(run_dir).worker_log(0),
                 {"rank": 0, "note": line, "at_step": step, "time": time.time()})


def note_memory(run_dir: Path, rank: int, step: int, held: dict) -> None:
    """Append what this rank holds after its first optimizer step (parameters, gradients,
    optimizer state, peak memory; see `sharding.state_bytes`) to `workers/rank-N.jsonl`."""
    append_jsonl(RunFolder(run_dir).worker_log(rank),
                 {"rank": rank, "memory_at_step": step, **held, "time": time.time()})
