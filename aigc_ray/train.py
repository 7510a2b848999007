"""Distributed fine-tuning: `train_loop_per_worker` runs on every Ray Train worker (DDP);
`run_train(cfg)` builds the data, fits a `TorchTrainer`, exports `final/` and the loss curve.

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
from aigc_ray.errors import ConfigError, DataError, UserError, user_error
from aigc_ray.metrics import (
    METRIC_KEYS,
    Follower,
    append_jsonl,
    plot_loss_curve,
    read_jsonl,
    truncate_after,
)
from aigc_ray.run_folder import CheckpointFolder, RunFolder
from aigc_ray.sharding import (
    gradient_sync,
    is_sharded,
    load_full_model_state,
    load_sharded,
    lockstep,
    save_sharded,
    shard_model,
    state_bytes,
)
from aigc_ray.step_profile import StepProfiler
from aigc_ray.trackers import check_trackers, open_trackers

log = logging.getLogger(__name__)


# ── pieces the loop uses (module level so tests can import them) ────────────────────────────


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


def decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def transformer_blocks(model, setting: str = "train.freeze_layers=0"):
    """The model's list of transformer blocks, found by shape so any HF causal LM works;
    `setting` is what the error tells a user to set instead."""
    import torch

    depth = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            return module
    raise UserError(f"{setting.partition('=')[0]} does not support {type(model).__name__}: its "
                    f"{depth} transformer blocks were not found; set {setting}")


def freeze_bottom(model, num_layers: int) -> None:
    """Freeze the embeddings and the bottom `num_layers` blocks (tied heads freeze with them)."""
    blocks = transformer_blocks(model)
    if num_layers > len(blocks):
        raise UserError(f"train.freeze_layers is {num_layers} but the model has "
                         f"{len(blocks)} blocks")
    frozen = [model.get_input_embeddings(), *list(blocks)[:num_layers]]
    position = getattr(getattr(model, "transformer", None), "wpe", None)  # GPT-2 style
    if position is not None:
        frozen.append(position)
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)


def add_lora(model, cfg: Config, adapter_dir: str | None = None):
    """Wrap the model with trainable LoRA adapters (new, or restored from `adapter_dir`)."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise UserError("train.lora.enabled needs peft: pip install 'aigc-ray[lora]'") from None
    if adapter_dir:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    lora = cfg.train.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                            lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules,
                                            task_type="CAUSAL_LM"))


def all_reduce_sum(*values, device=None) -> list[float]:
    """Sum numbers or 0-d tensors over all workers (a no-op with one) in one collective."""
    import torch
    import torch.distributed as dist

    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                          for v in values])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def export_model(model, tokenizer, folder: Path) -> None:
    """Save an HF folder (safetensors) that plain transformers loads; LoRA merged in."""
    import copy

    model = unwrap(model)
    if hasattr(model, "merge_and_unload"):  # peft: merge a copy, keep training the adapters
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def generate_samples(model, tokenizer, prompts: list[str], device, max_new_tokens: int = 40,
                     chat: bool = False, synced: bool = False):
    """Greedy replies to fixed prompts, for the log; with `chat`, each prompt is a user message
    rendered by the chat template. `synced`: every rank of a sharded model calls this, and each
    keeps stepping until all are done (each step gathers parameters from all of them)."""
    import torch

    from aigc_ray.chat import chat_ids

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


# ── feeding the GPU ─────────────────────────────────────────────────────────────────────────

# bf16 dense TFLOPS of one accelerator by the words of its CUDA name; the first match wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
               ("A10", 125.0))


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU named like `torch.cuda.get_device_name()`, if known. Names
    match word by word ('NVIDIA A100-SXM4-80GB' is an A100; 'NVIDIA L40' is not an L4)."""
    import re

    words = re.split(r"[^A-Za-z0-9]+", device_name.upper())
    for part, tflops in PEAK_TFLOPS:
        wanted = part.upper().split()
        if any(words[i:i + len(wanted)] == wanted for i in range(len(words))):
            return tflops
    return None


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token that the step actually computes, by the PaLM estimate's terms:

    - forward: 2 per matmul weight, and attention's 4 · width · context in every layer;
    - backward, input gradients: 2 per matmul weight and attention's 8 · width · context, from
      the head down to the lowest block that has something to train (below it nothing needs
      a gradient);
    - backward, weight gradients: 2 per trainable matmul weight.

    Full fine-tuning gives 6N + 12 · layers · width · context; frozen layers and LoRA (whose
    base weights need input gradients but no weight gradients) give less. Embedding lookups
    cost no matmul; a tied output head does, so it counts once."""
    import torch

    config = unwrap(model).config
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    head = unwrap(model).get_output_embeddings()
    tied = head is not None and any(head.weight is m.weight for m in embeddings)
    lookups = {id(m.weight) for m in embeddings} - ({id(head.weight)} if tied else set())
    matmul = [p for p in model.parameters() if id(p) not in lookups]  # a tied weight once
    layers = getattr(config, "num_hidden_layers", 0)
    width = getattr(config, "hidden_size", 0)
    try:
        blocks = list(transformer_blocks(model))
    except UserError:  # blocks not found: count a backward through all of them
        blocks = []
    trains = [any(p.requires_grad for p in block.parameters()) for block in blocks]
    below_trains = any(p.requires_grad for m in embeddings for p in m.parameters())
    lowest = 0 if below_trains or not blocks else (trains.index(True) if any(trains)
                                                    else len(blocks))
    skipped = {id(p) for block in blocks[:lowest] for p in block.parameters()}
    if lowest == len(blocks) and blocks and not any(p.requires_grad for p in matmul):
        skipped = {id(p) for p in matmul}  # nothing trains: no backward at all
    backward_params = sum(p.numel() for p in matmul if id(p) not in skipped)
    trainable = sum(p.numel() for p in matmul if p.requires_grad)
    backward_layers = layers - lowest if blocks else layers
    return (2 * sum(p.numel() for p in matmul) + 2 * backward_params + 2 * trainable
            + 4 * layers * width * seq_len + 8 * backward_layers * width * seq_len)


# Block columns the model's step reads; position_ids only where data.packing made them.
PASSED_COLUMNS = ("input_ids", "labels", "position_ids")


def batch_collator(pin: bool):
    """A Ray Data collate function that does a batch's CPU work in Ray's prefetch threads, off
    the training step: trim the padding, make long tensors, count tokens and targets (so the
    step never reads a device tensor), and pin the memory for a non-blocking copy to the GPU."""
    import numpy as np
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    from aigc_ray.data import IGNORE_INDEX
    from aigc_ray.loss import trimmed_length

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> dict:
            mask, labels = batch["attention_mask"], batch["labels"]
            lengths = mask.sum(axis=1)
            length = trimmed_length(lengths, mask.shape[1])
            counts = [int(lengths.sum()), int((labels[:, 1:length] != IGNORE_INDEX).sum())]
            out = {key: torch.from_numpy(np.ascontiguousarray(batch[key][:, :length],
                                                              dtype=np.int64))
                   for key in PASSED_COLUMNS if key in batch}
            out["counts"] = torch.tensor(counts, dtype=torch.int64)  # tokens, targets
            return {key: value.pin_memory() for key, value in out.items()} if pin else out

    return Collate()


def on_device(batch: dict, device) -> dict:
    """A collated batch on `device`, with `tokens` and `targets` as host ints. The copy is
    issued non-blocking from pinned memory, so it overlaps the running step."""
    tokens, targets = batch["counts"].tolist()  # a pinned host tensor: no device sync
    out = {key: batch[key].to(device, non_blocking=True)
           for key in (*PASSED_COLUMNS, "counts") if key in batch}
    return {**out, "tokens": tokens, "targets": targets}


def collated(shard, batch_size: int, device, prefetch_batches: int, drop_last: bool,
             shuffle_buffer: int = 0, shuffle_seed: int | None = None):
    """One pass over a dataset shard: collated host batches (pinned when `device` is a GPU);
    with `shuffle_buffer`, mixed through Ray Data's local shuffle buffer of that many blocks."""
    return shard.iter_torch_batches(batch_size=batch_size, device="cpu", drop_last=drop_last,
                                    collate_fn=batch_collator(device.type == "cuda"),
                                    prefetch_batches=prefetch_batches,
                                    local_shuffle_buffer_size=shuffle_buffer or None,
                                    local_shuffle_seed=shuffle_seed if shuffle_buffer else None)


def feed(shard, batch_size: int, device, prefetch_batches: int, drop_last: bool = False):
    """One pass over a dataset shard: its batches on `device` (see `on_device`)."""
    for batch in collated(shard, batch_size, device, prefetch_batches, drop_last):
        yield on_device(batch, device)


def loss_scale(micro: list[dict], world_size: int):
    """The factor that turns a micro-batch's loss sum into its share of the mean over every
    target token of the global batch: a device-side count (all-reduced when there are several
    workers), never read back on the host. DDP averages gradients over workers, hence ×N."""
    import torch

    global_targets = torch.stack([batch["counts"][1] for batch in micro]).sum()
    if world_size > 1:
        torch.distributed.all_reduce(global_targets)
    return world_size / global_targets.clamp(min=1)


# A streamed split mixes its blocks through a local buffer of this many optimizer steps' worth
# (at least MIN_SHUFFLE_BLOCKS): large enough to mix neighbouring documents, small enough that
# the first step does not wait long for it to fill.
SHUFFLE_BUFFER_STEPS = 16
MIN_SHUFFLE_BLOCKS = 1024


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed for one epoch of one rank, drawn from the run's seed: the same every run."""
    from aigc_ray.data import seeded_rng

    return int(seeded_rng(seed, epoch, rank).integers(2**31))


class CachedBlocks:
    """The cached training split as one worker reads it: every block of it, zero-copy from the
    object store, in an order drawn for each epoch.

    Each epoch is one permutation of the whole split, from `train.seed` and the epoch number
    (or the split's own order with `data.shuffle=false`), dealt out to the ranks in turn: rank r
    takes positions r, r + N, r + 2N, ... So the global batch at any step holds the same blocks
    whatever the number of workers, a run repeats exactly, and a resume skips exactly the
    batches its checkpoint consumed. Reading here instead of through a Ray Data split also
    costs no pipeline start per epoch, and nothing is handed out as it happens to be ready."""

    def __init__(self, refs: list, rank: int, world_size: int, seed: int, shuffle: bool):
        import numpy as np
        import ray

        from aigc_ray.data import block_columns

        tables = [block_columns(table) for table in ray.get(refs) if table.num_rows]
        self.tables = tables
        sizes = [len(table["input_ids"]) for table in tables]
        self.table_of = np.repeat(np.arange(len(tables)), sizes)
        self.row_of = np.concatenate([np.arange(size) for size in sizes]) if sizes else sizes
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle

    def order(self, epoch: int):
        """This rank's blocks for `epoch`, as indices into the split (equal shares: a remainder
        of fewer than world_size blocks is left out, as Ray's equal split does)."""
        import numpy as np

        from aigc_ray.data import seeded_rng

        rows = len(self.table_of)
        order = seeded_rng(self.seed, epoch).permutation(rows) if self.shuffle else np.arange(rows)
        return order[self.rank::self.world_size][: rows // self.world_size]

    def batches(self, epoch: int, batch_size: int, collate):
        """One epoch of collated host batches (full ones only)."""
        import numpy as np

        order = self.order(epoch)
        names = list(self.tables[0]) if self.tables else []
        for start in range(0, len(order) - batch_size + 1, batch_size):
            picked = order[start:start + batch_size]
            yield collate({name: np.stack([self.tables[self.table_of[i]][name][self.row_of[i]]
                                           for i in picked]) for name in names})


class EpochFeed:
    """The training split epoch after epoch, read by a background thread into a small queue:
    the next epoch starts while the loop still steps through the batches queued from the
    current one. `passes(epoch)` gives one epoch's collated host batches (a `CachedBlocks`
    permutation, or a pass over the worker's Ray Data shard); epochs count from `first_epoch`;
    `epochs` None: until `close()`."""

    END = object()  # marks the end of an epoch in the queue

    def __init__(self, passes, device, first_epoch: int, epochs: int | None, depth: int = 8):
        import queue
        import threading

        self.device, self.queue, self.stop = device, queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True, name="aigc-ray-feed",
                                       args=(passes, first_epoch, epochs))
        self.thread.start()

    def _produce(self, passes, first_epoch: int, epochs: int | None) -> None:
        import itertools

        numbers = (range(first_epoch, first_epoch + epochs) if epochs is not None
                   else itertools.count(first_epoch))
        try:
            for epoch in numbers:
                for batch in passes(epoch):
                    if not self._put(batch):
                        return  # closed mid-epoch: leaving the loop ends Ray's iteration
                if not self._put(self.END):
                    return
        except Exception as exc:  # a bad corpus row in strict mode, say: the loop raises it
            self._put(exc)

    def _put(self, item) -> bool:
        import queue

        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def epoch(self):
        """The next epoch's batches on the device; ends with the epoch."""
        while True:
            item = self.queue.get()
            if item is self.END:
                return
            if isinstance(item, Exception):
                raise item
            yield on_device(item, self.device)

    def close(self) -> None:
        self.stop.set()


def training_passes(loop_config: dict, cfg: Config, device, rank: int, world_size: int):
    """`passes(epoch)` for the `EpochFeed`: the cached split permuted per epoch, or this rank's
    Ray Data shard, mixed through a local buffer when `data.shuffle` is true (a global shuffle
    already happened in the dataset; see run_train)."""
    import ray.train

    batch_size = cfg.train.batch_size
    if loop_config["cached_blocks"] is not None:
        cached = CachedBlocks(loop_config["cached_blocks"], rank, world_size, cfg.train.seed,
                              cfg.data.shuffle is True)
        collate = batch_collator(device.type == "cuda")
        return lambda epoch: cached.batches(epoch, batch_size, collate)
    shard = ray.train.get_dataset_shard("train")
    buffer = (max(MIN_SHUFFLE_BLOCKS, SHUFFLE_BUFFER_STEPS * batch_size
                  * cfg.train.grad_accum_steps) if cfg.data.shuffle is True else 0)
    return lambda epoch: collated(shard, batch_size, device, cfg.train.prefetch_batches, True,
                                  buffer, epoch_seed(cfg.train.seed, epoch, rank))


class WaitClock:
    """Seconds the loop spent waiting for its next batch while the device had nothing to do,
    as a share of the interval. On a GPU the host runs ahead of the kernels it queued: only the
    part of a wait after the previous step's kernels finished cost the GPU anything, and the
    GPU's own clock says how long that was (an event recorded when the batch arrives, timed
    against the step's end; no sync while the step still runs). On a CPU the host is the
    device: the whole wait counts."""

    def __init__(self, device):
        self.on_gpu = device.type == "cuda"
        self.step_done = None
        self.waited, self.started = 0.0, time.perf_counter()

    def mark_step(self) -> None:
        """Call after queuing a step's work: the next wait is measured against its end."""
        if self.on_gpu:
            import torch

            self.step_done = torch.cuda.Event(enable_timing=True)
            self.step_done.record()

    def next(self, batches):
        start = time.perf_counter()
        batch = next(batches, None)  # None: the epoch ended
        self.waited += self.idle_part(time.perf_counter() - start)
        return batch

    def idle_part(self, wait_s: float) -> float:
        """Of a wait that just ended, the seconds the device was idle."""
        if self.step_done is None:
            return wait_s
        if not self.step_done.query():  # the step still runs: the wait cost the GPU nothing
            return 0.0
        import torch

        now = torch.cuda.Event(enable_timing=True)
        now.record()
        now.synchronize()  # the GPU is idle: this returns at once
        return min(wait_s, self.step_done.elapsed_time(now) / 1000)

    def share(self) -> tuple[float, float]:
        """(data_wait share, seconds) of the interval since the last call; starts a new one."""
        now = time.perf_counter()
        seconds = now - self.started
        share = self.waited / seconds if seconds > 0 else 0.0
        self.waited, self.started = 0.0, now
        return share, seconds

    def pause(self) -> None:
        """Restart the interval (evaluation and checkpoints are not training time)."""
        self.waited, self.started = 0.0, time.perf_counter()


def compiled(model, device) -> tuple[object, str | None]:
    """(`torch.compile`d model, None), or (the model, a warning) where this platform cannot
    compile: tried on a one-line function first, so a missing compiler fails in seconds."""
    import torch

    try:
        probe = torch.compile(lambda x: x * 2 + 1)
        probe(torch.ones(4, device=device))
    except Exception as exc:  # no C++ compiler, no triton, an unsupported Python
        return model, (f"[aigc-ray] warning: train.compile is true but torch.compile fails "
                       f"here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                       "training without it")
    return torch.compile(model), None


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


# ── the worker loop ─────────────────────────────────────────────────────────────────────────


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: set up → loop → evaluate → report/checkpoint.

    Rank 0 writes the run folder's `metrics.jsonl`, `samples.jsonl` and checkpoints; every rank
    notes its start in `workers/rank-N.jsonl`; the driver prints from those files.
    """
    import ray.train
    import ray.train.torch
    import torch

    from aigc_ray.loss import check_packed_attention, token_loss_sum
    from aigc_ray.model import load_model
    from aigc_ray.tokenizer import IGNORE_INDEX, load_tokenizer

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


# ── the driver ──────────────────────────────────────────────────────────────────────────────


@dataclass
class TrainSummary:
    run_dir: Path
    final_dir: Path
    steps: int
    total_steps: int
    val_perplexity_before: float | None
    val_perplexity_after: float | None  # of the exported model (the best checkpoint)
    samples: list[dict]
    start_model: str  # the folder or hub id training started from (the built-in one's folder)
    # eval.json: final/ against the starting model, once `evaluate_after_training` has run
    evaluation: dict | None = None

    def line(self) -> str:
        steps = f"{self.steps} steps"
        if self.steps < self.total_steps:
            steps += f" (stopped early; {self.total_steps} planned)"
        if self.val_perplexity_before is None or self.val_perplexity_after is None:
            return f"trained {steps}; final model in {self.final_dir}"
        return (f"val_perplexity {self.val_perplexity_before:.2f} before training → "
                f"{self.val_perplexity_after:.2f} after {steps}; "
                f"final model in {self.final_dir}")


def count_steps(cfg: Config, blocks: int | None, world_size: int) -> tuple[int, bool]:
    """(total optimizer steps, whether epochs bound the run); `blocks` in the training split,
    when a pass counted them (always when epochs bound the run)."""
    if blocks is not None:
        steps_per_epoch = blocks // world_size // cfg.train.batch_size // cfg.train.grad_accum_steps
        if steps_per_epoch < 1:
            raise DataError(too_few_blocks(cfg, blocks, world_size))
    if cfg.train.max_steps:
        return cfg.train.max_steps, False
    return steps_per_epoch * cfg.train.epochs, True


TOO_FEW_BLOCKS = "the training split has"


def too_few_blocks(cfg: Config, blocks: int | None, world_size: int) -> str:
    count = f"{blocks} blocks: too few" if blocks is not None else "too few blocks"
    return (f"{TOO_FEW_BLOCKS} {count} for one step of {world_size} "
            f"worker(s) × train.batch_size {cfg.train.batch_size} × train.grad_accum_steps "
            f"{cfg.train.grad_accum_steps}; lower train.batch_size or add data")


def exact_validation_config():
    """Ray Train's `DataConfig`, except that validation is split unevenly and training batches
    come in the split's own order.

    Training shards must be equal (every rank takes the same number of steps, or DDP hangs), so
    Ray drops up to N-1 rows there. Validation sums losses and tokens over all ranks instead, so
    its shards may differ in size and no validation row is dropped. Ray collates prefetched
    batches in several threads and, unless asked to preserve order, yields them as they finish:
    epochs would differ and a mid-epoch resume would skip other batches than it used. (Ray Train
    replaces each dataset's execution options with these, so this is the place to ask.)
    """
    from ray.train import DataConfig

    in_order = DataConfig.default_ingest_options()
    in_order.preserve_order = True

    class ExactValidation(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            val = datasets.get("val")
            rest = {name: ds for name, ds in datasets.items() if name != "val"}
            output = super().configure(rest, world_size, worker_handles, worker_node_ids,
                                       **kwargs)
            if val is not None:
                for shard, split in zip(output, val.streaming_split(world_size, equal=False)):
                    shard["val"] = split
            return output

    return ExactValidation(execution_options={"train": in_order})


def strategy_note(cfg: Config) -> str | None:
    """What the chosen strategy cannot do with these settings (said, not refused)."""
    if is_sharded(cfg) and cfg.scaling.num_workers == 1:
        return ("[aigc-ray] note: scaling.strategy fsdp with 1 worker shards nothing (the one "
                "worker holds the whole model and optimizer state, as with ddp); raise "
                "scaling.num_workers to split them")
    return None


def resource_warning(cfg: Config, cluster: dict) -> str | None:
    """A warning when the cluster (as it is now) cannot hold the workers and the data pipeline
    together: Ray Train then waits for an autoscaler, which on a fixed cluster means forever."""
    need_cpus = (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
                 + (1 + cfg.data.tokenizer_actors) * cfg.data.cpus_per_task)
    need_gpus = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0
    have_cpus, have_gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if need_cpus <= have_cpus and need_gpus <= have_gpus:
        return None
    return (f"[aigc-ray] warning: {cfg.scaling.num_workers} worker(s) × "
            f"scaling.cpus_per_worker {cfg.scaling.cpus_per_worker} plus the data pipeline "
            f"({1 + cfg.data.tokenizer_actors} × data.cpus_per_task {cfg.data.cpus_per_task}) "
            f"need {need_cpus:g} CPUs{f' and {need_gpus:g} GPUs' if need_gpus else ''}; the "
            f"cluster has {have_cpus:g}{f' and {have_gpus:g}' if need_gpus else ''} now. Training "
            "waits until an autoscaler adds them; on a fixed cluster lower "
            "scaling.num_workers or scaling.cpus_per_worker")


def export_checkpoint(checkpoint_dir: str, folder: Path) -> None:
    """Copy a training checkpoint as a plain HF folder (no optimizer state, no adapters). The
    shards of an fsdp checkpoint are gathered here, once, into whole weights."""
    if folder.exists():
        shutil.rmtree(folder)
    source = CheckpointFolder(Path(checkpoint_dir))
    shutil.copytree(source.path, folder, ignore=shutil.ignore_patterns(
        source.training_state.name, source.adapter.name, source.sharded.name))
    if source.sharded.is_dir():
        model = gathered_model(source)
        model.save_pretrained(folder, safe_serialization=True)


def gathered_model(checkpoint: CheckpointFolder):
    """The whole model of an fsdp checkpoint, in this process (LoRA merged in): built from the
    checkpoint's own config.json, filled from its shards."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = Config.model_validate(yaml.safe_load(checkpoint.config.read_text()))
    trust = cfg.model.trust_remote_code
    config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust,
                                             dtype=getattr(config, "dtype", None))
    if cfg.train.lora.enabled:
        model = add_lora(model, cfg)
    load_full_model_state(model, checkpoint.sharded)
    return model.merge_and_unload() if cfg.train.lora.enabled else model


def run_train(cfg: Config, callbacks: list | None = None, follow: bool = True,
              start_from: str | None = None) -> TrainSummary:
    """Fit a `TorchTrainer` from the config; resumes when `run.name` already has checkpoints.

    `callbacks` are Ray Train `UserCallback`s (Tune passes its report forwarder); `follow`
    prints the run's progress lines on this console; `start_from` is a checkpoint folder to
    start from when the run has none of its own (Tune's PBT: the trial it exploits).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aigc_ray.cluster import start_ray
    from aigc_ray.config import redacted_dump, to_yaml
    from aigc_ray.data import (
        build_datasets,
        check_config,
        corpus_source,
        create_stats,
        training_split,
    )
    from aigc_ray.model import check_model_path, resolve_model_path

    check_model_path(cfg)  # fail before Ray starts
    check_trackers(cfg)
    files = check_config(cfg)  # files exist
    start_ray(ray_logs=cfg.run.ray_logs)
    import ray

    for warning in (strategy_note(cfg), resource_warning(cfg, ray.cluster_resources())):
        if warning:
            print(warning, flush=True)
    run_dir = cfg.run.dir
    run = RunFolder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run.config.write_text(to_yaml(cfg))
    model_path = resolve_model_path(cfg)
    check_model_settings(cfg, model_path)
    stats = create_stats()
    source = corpus_source(cfg, files)  # a `datasets` corpus: put in the object store once
    datasets = build_datasets(cfg, model_path, stats=stats, files=source)
    if "val" in datasets:
        # Read at every evaluation: keep the small validation split in the object store once.
        datasets["val"] = datasets["val"].materialize()
    train_split = training_split(cfg, datasets["train"], files,
                                 ray.cluster_resources().get("object_store_memory", 0),
                                 cfg.scaling.num_workers)
    print(f"[aigc-ray] data: {train_split.note}", flush=True)
    train_dataset, cached_blocks = training_input(cfg, train_split)
    datasets.pop("train")  # workers read a cached split themselves (`CachedBlocks`)
    if train_dataset is not None:
        datasets["train"] = train_dataset
    try:
        total_steps, epochs_bound = count_steps(cfg, train_split.rows, cfg.scaling.num_workers)
    except DataError as exc:
        raise DataError(f"{exc}{skipped_rows_note(stats)}") from None
    sample_prompts = (cfg.train.sample_prompts if cfg.train.sample_prompts is not None
                      else validation_prompts(cfg, source))

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        # Workers never serve: the API key stays out of Ray (its dashboard shows these).
        train_loop_config={"config": redacted_dump(cfg), "model_path": model_path,
                           "run_dir": str(run_dir), "total_steps": total_steps,
                           "epochs_bound": epochs_bound, "has_val": "val" in datasets,
                           "cached_blocks": cached_blocks, "sample_prompts": sample_prompts,
                           "start_from": start_from},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers,
                                     use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.scaling.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=str(run_dir.parent), callbacks=callbacks,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_loss" if "val" in datasets else "step",
                checkpoint_score_order="min" if "val" in datasets else "max"),
        ),
        datasets=datasets,
        dataset_config=exact_validation_config(),
    )
    try:
        with Follower(run_dir, total_steps) if follow else contextlib.nullcontext():
            result = trainer.fit()
    except Exception as exc:  # Ray Train raises what failed the run
        message = user_error(exc)
        if message and message.startswith(TOO_FEW_BLOCKS):  # a streamed split found empty
            raise DataError(f"{message}{skipped_rows_note(stats)}") from None
        raise
    if result.error:
        raise result.error

    write_data_record(run.data_record, train_split, stats, shuffle_note(cfg, train_split))
    final_dir = run.final
    export_checkpoint(_best_checkpoint(result, "val" in datasets).path, final_dir)

    rows = read_jsonl(run.metrics)
    plot_loss_curve(rows, run.loss_curve)
    if trackers := open_trackers(cfg, run_dir):
        trackers.files(run.loss_curve)
        trackers.close()
    before = [r["val_perplexity"] for r in rows if r["step"] == 0 and r["val_perplexity"]]
    after = [r["val_perplexity"] for r in rows if r["step"] > 0 and r["val_perplexity"]]
    return TrainSummary(
        run_dir=run_dir, final_dir=final_dir, steps=max((r["step"] for r in rows), default=0),
        total_steps=total_steps, val_perplexity_before=before[0] if before else None,
        val_perplexity_after=min(after, default=None),
        samples=_last_samples(run.samples), start_model=model_path,
    )


def check_model_settings(cfg: Config, model_path: str) -> None:
    """Settings that need the model's config (not its weights): checked before any worker."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    depth = getattr(config, "num_hidden_layers", None)
    if depth is not None and cfg.train.freeze_layers > depth:
        raise ConfigError(f"train.freeze_layers is {cfg.train.freeze_layers} but the model has "
                          f"{depth} blocks; set it to at most {depth}")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and cfg.data.block_size > positions:
        raise ConfigError(f"data.block_size is {cfg.data.block_size} but the model takes at most "
                          f"{positions} positions; set data.block_size to at most {positions}")


def training_input(cfg: Config, split) -> tuple[object, list | None]:
    """(the Dataset Ray Train splits among the workers, or None; the cached blocks every worker
    reads itself, or None). A cached split is read whole by each worker (`CachedBlocks`) unless
    `data.shuffle=global` asks Ray Data for a full random shuffle each epoch."""
    from ray.data import RandomSeedConfig

    if cfg.data.shuffle == "global":
        return split.dataset.random_shuffle(seed=RandomSeedConfig(
            cfg.train.seed % 2**31, reseed_after_execution=True)), None
    if split.blocks is not None:
        return None, split.blocks
    return split.dataset, None


def shuffle_note(cfg: Config, split) -> str:
    """What `data.shuffle` did to this run's training order, in words (data.json)."""
    if cfg.data.shuffle == "global":
        return "global: a Ray Data random_shuffle of the whole split every epoch"
    if cfg.data.shuffle is False:
        return "none: file order"
    if split.blocks is not None:
        return f"every epoch a permutation of the cached blocks drawn from seed {cfg.train.seed}"
    return ("every epoch the files in a new order and the blocks mixed through a local buffer "
            f"(seed {cfg.train.seed})")


def skipped_rows_note(stats) -> str:
    """'; N rows were skipped (reason n, ...)' from the pipeline's counts, or ''."""
    import ray

    from aigc_ray.data import SKIP_REASONS

    totals = ray.get(stats.totals.remote())
    skipped = {reason: int(totals.get(f"skipped.{reason}", 0)) for reason in SKIP_REASONS}
    if not sum(skipped.values()):
        return ""
    detail = ", ".join(f"{reason} {n:,}" for reason, n in skipped.items() if n)
    return (f"; {sum(skipped.values()):,} rows were skipped ({detail}): `aigc-ray data` "
            "counts them, data.strict=true names the first")


SAMPLE_PROMPTS = 2  # drawn from the validation split when train.sample_prompts is not given


def validation_prompts(cfg: Config, files: list) -> list[str]:
    """Prompts for the samples at each evaluation, from the run's own validation split (the
    training split when there is none): the user's data, never the sample corpus's questions.
    A conversation gives its first user message; a pair its prompt; text its first words."""
    import json

    from aigc_ray.data import MESSAGES_COLUMN, read_corpus

    split = "val" if cfg.data.val_fraction > 0 else "train"
    rows = read_corpus(cfg, split, files=files).take(SAMPLE_PROMPTS)
    prompts = []
    for row in rows:
        if cfg.data.chat:
            users = [m["content"] for m in json.loads(row[MESSAGES_COLUMN])
                     if m["role"] == "user"]
            prompt = users[0] if users else ""
        elif cfg.data.supervised:
            prompt = row[cfg.data.prompt_field]
        else:
            prompt = " ".join(row[cfg.data.text_field].split()[:8])
        if prompt.strip():
            prompts.append(prompt)
    return prompts


def write_data_record(path: Path, split, stats, shuffle: str) -> None:
    """`data.json`: how the training split was fed (cached or streamed) and in what order, how
    many passes the tokenizers made over each split, and the pipeline's counts (documents,
    skipped rows)."""
    import json

    import ray

    record = {"training_split": "cached" if split.cached_bytes is not None else "streamed",
              "cached_bytes": split.cached_bytes, "train_blocks": split.rows,
              "shuffle": shuffle, "block_order_hash": split.order_hash,
              "tokenize_passes": {name: ray.get(stats.passes.remote(f"tokenize:{name}:"))
                                  for name in ("train", "val")},
              "counts": ray.get(stats.totals.remote())}
    ray.kill(stats)
    path.write_text(json.dumps(record, indent=2) + "\n")


def _best_checkpoint(result, has_val: bool):
    if has_val and result.best_checkpoints:
        return min(result.best_checkpoints, key=lambda pair: pair[1].get("val_loss", math.inf))[0]
    return result.checkpoint


def _last_samples(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    last = max((r["step"] for r in rows), default=None)
    return [r for r in rows if r["step"] == last]
