"""The training loop that runs on every Ray Train worker (DDP or FSDP2): a `TrainingLoop`
(setup → train → cleanup) built from the driver's `LoopConfig` by `train_loop_per_worker`.

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
from aigc_ray.train.feed import (
    EpochFeed,
    WaitClock,
    accumulation,
    feed,
    global_batch,
    global_batch_note,
    too_few_blocks,
    training_passes,
)
from aigc_ray.train.metrics import (
    METRIC_KEYS,
    PREEMPTED_KEY,
    append_jsonl,
    flops_per_token,
    peak_tflops,
    restart_row,
    truncate_after,
)
from aigc_ray.train.prepare import (
    add_lora,
    compiled,
    decay_groups,
    freeze_bottom,
    mark_length_dynamic,
    transformer_blocks,
    unwrap,
)
from aigc_ray.train.profile import StepProfiler
from aigc_ray.train.sharding import (
    empty_model,
    gradient_sync,
    is_sharded,
    load_from_rank0,
    load_sharded,
    lockstep,
    reshard,
    save_sharded,
    shard_model,
    state_bytes,
)
from aigc_ray.train.trackers import open_trackers

log = logging.getLogger(__name__)

# Seconds of training between two asks for Ray Train's preemption notice. Each ask is a
# collective through a Ray actor (2.6 ms on 2 CPU cores, benchmarks/preemption_check.py): about
# once a second is prompt against a notice of 30-120 s and costs ~0.3% of training time. The
# first steps ask at every one, until a logging interval has timed them.
PREEMPTION_CHECK_S = 1.0


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
    # Of this epoch, by all workers' finished steps: a restart with another number of workers
    # (elastic) goes on from the same block.
    blocks_in_epoch: int = 0
    best_val_loss: float = math.inf
    evals_without_gain: int = 0
    world_size: int = 0  # the workers that saved it (0: saved before this was kept)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict, blocks_per_batch: int | None = None) -> None:
        """`blocks_per_batch`: for a checkpoint that counted this worker's batches instead
        (`batches_in_epoch`, before elastic runs), the blocks one of them held in all workers."""
        state = dict(state)
        if "blocks_in_epoch" not in state and blocks_per_batch:
            state["blocks_in_epoch"] = state.pop("batches_in_epoch") * blocks_per_batch
        for field in dataclasses.fields(self):
            setattr(self, field.name, state.get(field.name, field.default))

    def note_eval(self, val_loss: float) -> None:
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        self.evals_without_gain = 0 if improved else self.evals_without_gain + 1


@dataclass
class LoopConfig:
    """What the driver (`run_train`, for `aigc-ray train` and each Tune trial) hands every worker.

    Ray Train takes it as a plain dict (`as_train_loop_config`): Ray 2.60's run state declares
    `train_loop_config: Optional[Dict]` and turns anything else into a string, which then fails
    that declaration (`ray/train/v2/_internal/state/schema.py`, `RunSettings`).
    """

    config: Config  # redacted: workers never serve, and Ray's dashboard shows this
    model_path: str  # the folder or hub id to start from (the built-in model's folder)
    run_dir: Path
    total_steps: int
    epochs_bound: bool  # the run ends with train.epochs (else at train.max_steps)
    has_val: bool  # a "val" dataset shard exists
    cached_blocks: list | None  # the cached training split's object refs; None: a Ray Data shard
    sample_prompts: list[str]  # replied to at each evaluation, for the log
    start_from: str | None = None  # a checkpoint folder when the run has none (Tune's PBT)

    def as_train_loop_config(self) -> dict:
        # Shallow: the Config and the object refs travel as they are.
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


class TrainingLoop:
    """One Ray Train worker: `setup()` (model, optimizer, data), `train()` (evaluate the start,
    then step, evaluating and checkpointing every train.eval_every steps), `cleanup()`.

    Rank 0 writes the run folder's `metrics.jsonl`, `samples.jsonl` and checkpoints; every rank
    notes its start in `workers/rank-N.jsonl`; the driver prints from those files. `state` is
    what a checkpoint restores; the rest is rebuilt from the config on every start.
    """

    def __init__(self, loop: LoopConfig):
        self.loop, self.cfg = loop, loop.config
        self.run = RunFolder(loop.run_dir)
        self.state = LoopState()
        self.trackers = self.epochs = self.profiler = None  # for cleanup() after a failed setup

    def setup(self) -> None:
        """Device, model (from the latest checkpoint when resuming), optimizer, logs, data."""
        import ray.train
        import ray.train.torch
        import torch

        cfg = self.cfg
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.accumulation = accumulation(cfg, self.world_size)  # keeps the global batch
        self.device = device = ray.train.torch.get_device()
        torch.manual_seed(cfg.train.seed)
        use_bf16 = cfg.train.mixed_precision == "bf16" or (
            cfg.train.mixed_precision == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.peak = cfg.scaling.peak_tflops or (
            peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
        self.sharded = is_sharded(cfg)
        with contextlib.ExitStack() as restoring:  # holds a downloaded checkpoint until loaded
            restore_dir = self._checkpoint_dir(restoring)
            saved = (torch.load(CheckpointFolder(restore_dir).training_state, weights_only=True)
                     if restore_dir else None)
            warning = self._setup_model(restore_dir, use_bf16)
            self._setup_optimizer()
            if saved:
                self._restore(saved, restore_dir)
        self._setup_logs(bool(saved), warning)
        self._setup_data()

    def _checkpoint_dir(self, restoring: contextlib.ExitStack) -> Path | None:
        """The checkpoint to resume from: this run's own (after a failure or a rerun), else
        `start_from` (Tune's PBT: another trial's), read in place when local; a remote one is
        downloaded once per node."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.loop.start_from:
            checkpoint = ray.train.Checkpoint.from_directory(self.loop.start_from)
        return Path(restoring.enter_context(checkpoint.as_directory())) if checkpoint else None

    def _setup_model(self, restore_dir: Path | None, use_bf16: bool) -> str | None:
        """Tokenizer and model, frozen, adapted, sharded or wrapped as the config says; returns
        what compiling had to say."""
        import ray.train.torch

        from aigc_ray.model import load_model
        from aigc_ray.tokenizer import load_tokenizer
        from aigc_ray.train.loss import (
            check_chunked_loss,
            check_packed_attention,
            loss_impl_for,
            use_chunked_loss,
        )

        cfg, device, sharded = self.cfg, self.device, self.sharded
        self.tokenizer = load_tokenizer(self.loop.model_path, cfg.model.trust_remote_code)
        lora = cfg.train.lora.enabled
        # Full fine-tuning with ddp resumes from the checkpoint's own weights; LoRA from the base
        # model plus the saved adapters; fsdp from the base model, then its shards (`_restore`).
        # fsdp on several workers: rank 0 reads the weights; the others build the model's shape
        # on the meta device and receive their shards from it (`load_from_rank0`), so a node
        # holds one host copy of the weights, not one per rank.
        from_rank0 = sharded and self.world_size > 1
        self.read_weights = not from_rank0 or self.rank == 0
        if not self.read_weights:
            model = empty_model(self.loop.model_path, cfg.model.trust_remote_code)
        else:
            model = load_model(restore_dir if restore_dir and not lora and not sharded
                               else self.loop.model_path, cfg.model.trust_remote_code)
        if cfg.train.freeze_layers:
            freeze_bottom(model, cfg.train.freeze_layers)
        if lora:
            model = add_lora(model, cfg, str(CheckpointFolder(restore_dir).adapter)
                             if restore_dir and not sharded else None)
        if cfg.train.gradient_checkpointing:
            unwrap(model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.flops = flops_per_token(model, cfg.data.block_size)  # the whole model, unsharded
        vocabulary = model.get_output_embeddings().weight.shape[0]
        self.chunked_loss = loss_impl_for(cfg.train.loss_impl, vocabulary) == "chunked"
        if self.chunked_loss:
            use_chunked_loss(model)
        # `model` stays the module itself (sharded in place with fsdp): evaluation, samples and
        # checkpoints use it; `step_model` is what the training step calls.
        if sharded:
            # Rank 0's whole state (frozen layers and fresh LoRA adapters included), kept only
            # until the shards are out; the module itself is sharded in place.
            whole = model.state_dict() if from_rank0 and self.read_weights else None
            shard_model(model, transformer_blocks(model, "scaling.strategy=ddp"), device,
                        use_bf16, cfg.scaling.cpu_offload)
            if from_rank0:
                load_from_rank0(model, whole)
                del whole
        else:
            model.to(device)
        if cfg.data.packing:
            check_packed_attention(model, device)
        if self.chunked_loss:
            check_chunked_loss(model, device)
        if sharded and (cfg.data.packing or self.chunked_loss):
            reshard(model)  # the probes' forwards left the root's parameters gathered
        step_model, warning = model, None
        if cfg.train.compile:
            step_model, warning = compiled(model, device)
        if not sharded:
            step_model = ray.train.torch.prepare_model(step_model)  # DDP when world_size > 1
        self.model, self.step_model = model, step_model
        return warning

    def _setup_optimizer(self) -> None:
        """AdamW with weight decay on matrices only; warmup, then the configured decay."""
        import torch

        cfg, total_steps = self.cfg, self.loop.total_steps
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, cfg.train.weight_decay), lr=cfg.train.lr, betas=(0.9, 0.95),
            fused=self.device.type == "cuda" and not cfg.scaling.cpu_offload)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, total_steps, cfg.train.warmup_steps, cfg.train.lr_schedule,
            cfg.train.min_lr_ratio))

    def _restore(self, saved: dict, restore_dir: Path) -> None:
        """Optimizer, scheduler, loop state and RNG from `training_state.pt` (fsdp: the
        optimizer from the shards)."""
        import torch

        cfg, optimizer, scheduler = self.cfg, self.optimizer, self.scheduler
        if self.sharded:
            load_sharded(self.model, optimizer, CheckpointFolder(restore_dir).sharded)
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        # The config's learning rate and weight decay, not the checkpoint's: Tune's PBT continues
        # a trial from another's checkpoint with perturbed values (a plain resume changes nothing).
        scheduler.base_lrs = [cfg.train.lr] * len(optimizer.param_groups)
        for group, fresh in zip(optimizer.param_groups,
                                decay_groups(self.model, cfg.train.weight_decay)):
            group.update(weight_decay=fresh["weight_decay"], initial_lr=cfg.train.lr,
                         lr=cfg.train.lr * lr_factor(
                             scheduler.last_epoch, self.loop.total_steps, cfg.train.warmup_steps,
                             cfg.train.lr_schedule, cfg.train.min_lr_ratio))
        self.state.load_state_dict(  # runs before LoopState kept flat keys
            saved.get("loop", saved), blocks_per_batch=self.world_size * cfg.train.batch_size)
        torch.set_rng_state(saved["rng"])

    def _setup_logs(self, resumed: bool, warning: str | None) -> None:
        """Trim the run's logs to what the checkpoint had seen, note this worker's start, open
        the trackers (rank 0)."""
        cfg, state, run_dir = self.cfg, self.state, self.loop.run_dir
        restart = None
        if self.rank == 0:  # a fresh start keeps nothing
            if resumed and not self.loop.start_from:
                restart = restart_row(self.run, state.step, state.epoch, self.world_size,
                                      global_batch(cfg, self.world_size))
            for path in (self.run.metrics, self.run.samples):
                truncate_after(path, state.step if resumed else -1)
        note_start(run_dir, self.rank, self.world_size, self.device, state.step,
                   self.loop.total_steps, global_batch=global_batch(cfg, self.world_size),
                   strategy=cfg.scaling.strategy, read_weights=self.read_weights)
        if self.rank == 0:
            if restart:
                append_jsonl(self.run.metrics, restart)
            for line in (warning, global_batch_note(cfg, self.world_size),
                         self._position_note(resumed)):
                if line:
                    note_console(run_dir, state.step, line)
        self.trackers = open_trackers(cfg, run_dir, state.step) if self.rank == 0 else None

    def _position_note(self, resumed: bool) -> str | None:
        """A console line when a streamed split cannot go on from the exact block position
        (its shards depend on the number of workers, which changed since the checkpoint)."""
        saved = self.state.world_size
        if (not resumed or self.loop.cached_blocks is not None or not saved
                or saved == self.world_size or not self.state.blocks_in_epoch):
            return None
        return (f"[aigc-ray] the streamed training split was saved by {saved} workers and goes "
                f"on with {self.world_size}: each skips its share of the "
                f"{self.state.blocks_in_epoch} blocks consumed, so until this epoch ends a few "
                "blocks may be seen twice or not at all (a cached split keeps the exact "
                "position: see data.cache)")

    def _setup_data(self) -> None:
        """This worker's validation shard. The training feed starts in `train()`, after the
        evaluation of the starting model: its reader thread would compete with that."""
        import ray.train

        self.val_shard = ray.train.get_dataset_shard("val") if self.loop.has_val else None

    def _start_feed(self) -> None:
        """The training epochs (read ahead by a background thread), the clock that times the
        waits for them, and the profiler."""
        cfg, state = self.cfg, self.state
        self.clock = WaitClock(self.device)
        passes = training_passes(self.loop.cached_blocks, cfg, self.device, self.rank,
                                 self.world_size)
        self.epochs = EpochFeed(passes, self.device, state.epoch,
                                cfg.train.epochs - state.epoch if self.loop.epochs_bound else None,
                                start=state.blocks_in_epoch)
        self.profiler = StepProfiler(self.run.profile, self.rank, self.device,
                                     cfg.train.profile_from, cfg.train.profile_steps
                                     ) if cfg.train.profile_steps else None

    def train(self) -> None:
        """The perplexity before training (a fresh run), then epochs of steps until
        `total_steps`, the last epoch, or early stopping."""
        import torch

        cfg, state = self.cfg, self.state
        if state.step == 0:  # so the end of the run can say how much it gained
            before = self.evaluate()
            if before:
                self._write_metrics({"step": 0, "epoch": 0, "lr": 0.0, **before})
        self.model.train()
        self.interval_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.interval_targets = self.interval_tokens = 0
        self.measured = False  # this rank's memory, noted after its first optimizer step
        self.check_every, self.interval_from = 1, state.step  # see `_preemption_notice`
        self.saved_at = state.step if state.step else None  # the step of the latest checkpoint
        self._start_feed()
        finished = state.step >= self.loop.total_steps
        while not finished:
            finished = self._train_epoch(self.epochs.epoch())
            if not finished:
                if state.blocks_in_epoch == 0:  # a whole epoch without one step: it never will
                    raise DataError(too_few_blocks(cfg, None, self.world_size))
                state.epoch, state.blocks_in_epoch = state.epoch + 1, 0
                finished = self.loop.epochs_bound and state.epoch >= cfg.train.epochs

    def _train_epoch(self, batches) -> bool:
        """Steps through one epoch's batches; True when the run is finished, False when the
        epoch ended first. Nothing in a step reads a device tensor: counts come from the host
        side of the batch, the loss sum stays on the device until a logging interval ends."""
        state, train = self.state, self.cfg.train
        while True:
            if self.profiler:
                self.profiler.before(state.step)
            micro = self._next_micro_batches(batches)
            if micro is None:
                return False
            self._train_step(micro)
            evaluating = state.step % train.eval_every == 0 or state.step == self.loop.total_steps
            if evaluating or state.step % train.log_every == 0:
                self._end_interval(evaluating)
            patience = train.early_stopping_patience
            if state.step >= self.loop.total_steps or (
                    patience and state.evals_without_gain >= patience):
                return True
            notice = self._preemption_notice()
            if notice is not None:
                self._save_for_preemption(notice)

    def _next_micro_batches(self, batches) -> list[dict] | None:
        """The next `accumulation` batches (train.grad_accum_steps with all workers), or None
        when the epoch ends before them."""
        micro = []
        for _ in range(self.accumulation):
            batch = self.clock.next(batches)
            if batch is None:
                break
            micro.append(batch)
        return micro if len(micro) == self.accumulation else None

    def _train_step(self, micro: list[dict]) -> None:
        """One optimizer step: accumulate the micro-batches' gradients, normalized by the global
        target-token count (see `loss_scale`), clip, step."""
        import torch

        from aigc_ray.train.loss import token_loss_sum

        scale = loss_scale(micro, self.world_size)
        for position, micro_batch in enumerate(micro):
            last = position == len(micro) - 1
            if self.cfg.train.compile and not self.cfg.data.packing:
                mark_length_dynamic(micro_batch)
            with gradient_sync(self.step_model, self.model if self.sharded else None, last,
                               self.world_size):
                with self.autocast:
                    loss_sum, _ = token_loss_sum(self.step_model, micro_batch,
                                                 self.chunked_loss)
                (loss_sum * scale).backward()
            self.interval_loss += loss_sum.detach()
            self.interval_targets += micro_batch["targets"]
            self.interval_tokens += micro_batch["tokens"]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        state = self.state
        if not self.measured:  # what this rank holds, once its optimizer state exists
            note_memory(self.loop.run_dir, self.rank, state.step + 1,
                        state_bytes(self.model, self.optimizer))
            self.measured = True
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.clock.mark_step()
        state.step += 1
        state.blocks_in_epoch += len(micro) * self.cfg.train.batch_size * self.world_size
        if self.profiler and self.profiler.after(state.step) and self.rank == 0:
            note_console(self.loop.run_dir, state.step, self.profiler.console_line())

    def _end_interval(self, evaluating: bool) -> None:
        """A metrics row for the steps since the last one (loss, rate, data wait, MFU); when
        `evaluating`, with the validation loss, samples and a checkpoint."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the interval ends when its steps have run
        share, seconds = self.clock.share()
        loss_all, targets_all, seen_all, waited, seconds_all = all_reduce_sum(
            self.interval_loss, self.interval_targets, self.interval_tokens, share, seconds,
            device=self.device)
        world_size, state = self.world_size, self.state
        data_wait, rate = waited / world_size, seen_all / max(seconds, 1e-9)
        # The same on every rank (an all-reduced mean), as the preemption check needs.
        step_s = seconds_all / world_size / max(state.step - self.interval_from, 1)
        self.check_every = max(1, int(PREEMPTION_CHECK_S / max(step_s, 1e-6)))
        self.interval_from = state.step
        row = {"step": state.step, "epoch": state.epoch,
               "loss": loss_all / max(targets_all, 1), "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_second": rate, "data_wait": data_wait,
               "mfu": self.flops * rate / (self.peak * 1e12 * world_size) if self.peak else None}
        self.interval_loss.zero_()
        self.interval_targets = self.interval_tokens = 0
        if evaluating:
            row.update(self.evaluate() or {})
            if "val_loss" in row:
                state.note_eval(row["val_loss"])
            self._write_samples()
        self._write_metrics(row)
        if evaluating:
            if self.trackers and math.isfinite(state.best_val_loss):
                # At every evaluation, not only at the end: a trial Tune stops early has it too.
                self.trackers.metrics({"step": state.step, "best_val_loss": state.best_val_loss})
            self.save_checkpoint(row)
        self.clock.pause()  # evaluation time is not training time

    def evaluate(self) -> dict | None:
        """Loss and perplexity over up to train.eval_batches batches of every worker's
        validation shard (None without a validation split)."""
        import torch

        from aigc_ray.train.loss import token_loss_sum

        if self.val_shard is None:
            return None
        model, device = self.model, self.device
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        batches = itertools.islice(feed(self.val_shard, self.cfg.train.batch_size, device, 1),
                                   self.cfg.train.eval_batches)
        # fsdp: every rank runs as many forwards as the largest shard needs (fillers count 0).
        batches = (lockstep(list(batches), self._filler_batch, device) if self.sharded
                   else ((batch, True) for batch in batches))
        with torch.no_grad(), self.autocast:
            for batch, real in batches:
                batch_loss, batch_tokens = token_loss_sum(model, batch, self.chunked_loss)
                if real:
                    loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
        model.train()
        loss_sum, tokens = all_reduce_sum(loss_sum, tokens, device=device)
        val_loss = loss_sum / max(tokens, 1)
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))}

    def _preemption_notice(self):
        """Ray Train's `PreemptionInfo` when a node of this run is about to be reclaimed, else
        None. Asked every `check_every` steps, a number every rank derives from the same
        all-reduced step time: the ask is a collective, and every rank asks at the same steps."""
        import ray.train

        if self.state.step % self.check_every:
            return None
        return ray.train.get_preemption_info()

    def _save_for_preemption(self, notice) -> None:
        """A checkpoint at this step boundary (unless this step has one), then wait: when the
        node is reclaimed (at the notice's deadline) Ray Train restarts the workers from it, on
        the nodes left or new ones, and counts a preemption, not a failure. Training on meanwhile
        would be lost work: it would restart from this checkpoint all the same."""
        step, deadline_ms = self.state.step, notice.deadline_ms
        left = f"in {max(0.0, deadline_ms / 1000 - time.time()):.0f} s" if deadline_ms else "soon"
        if self.saved_at != step:
            self.save_checkpoint({"step": step, "epoch": self.state.epoch, PREEMPTED_KEY: True,
                                  **({"val_loss": math.inf} if self.loop.has_val else {})})
        if self.rank == 0:
            append_jsonl(self.run.worker_log(0), {
                "rank": 0, "preemption_checkpoint": step, "ranks": notice.preempted_ranks,
                "deadline_ms": deadline_ms, "time": time.time()})
            note_console(self.loop.run_dir, step, (
                f"[aigc-ray] preemption notice: worker(s) {notice.preempted_ranks} on a node "
                f"reclaimed {left}; checkpoint at step {step}, waiting for Ray Train to restart "
                "the workers from it"))
        # The controller restarts the group at the deadline (or 120 s after a notice without
        # one); should it never, fail as a real error rather than wait forever.
        give_up = (deadline_ms / 1000 if deadline_ms else time.time() + 120) + 600
        while time.time() < give_up:
            time.sleep(1)
        raise RuntimeError(f"a preemption notice at step {step} was never followed by a "
                           "restart of the workers")

    def _filler_batch(self) -> dict:
        """One short row without targets (see `lockstep`)."""
        import torch

        from aigc_ray.tokenizer import IGNORE_INDEX

        ids = torch.zeros((1, 8), dtype=torch.long, device=self.device)
        return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}

    def _write_samples(self) -> None:
        """Greedy replies to the sample prompts, into `samples.jsonl` and the trackers (rank 0;
        with fsdp every rank generates, since each step gathers parameters from all)."""
        prompts, rank, sharded = self.loop.sample_prompts, self.rank, self.sharded
        if not prompts or not (rank == 0 or sharded):
            return
        replies = generate_samples(self.model, self.tokenizer, prompts, self.device,
                                   chat=self.cfg.data.chat,
                                   synced=sharded and self.world_size > 1)
        if rank != 0:
            return
        samples = [{"step": self.state.step, "prompt": prompt, "reply": reply}
                   for prompt, reply in zip(prompts, replies)]
        for sample in samples:
            append_jsonl(self.run.samples, sample)
        if self.trackers:
            self.trackers.samples(self.state.step, samples)

    def _write_metrics(self, row: dict) -> None:
        if self.rank == 0:
            append_jsonl(self.run.metrics, {key: row.get(key) for key in METRIC_KEYS})
        if self.trackers:
            self.trackers.metrics(row)

    def save_checkpoint(self, metrics: dict) -> None:
        """Report `metrics` with a checkpoint: rank 0 writes it (ddp), or every rank its own
        shard of it (fsdp); Ray Train gathers what each rank reports into one folder."""
        import ray.train
        import torch

        model, optimizer, rank, sharded = self.model, self.optimizer, self.rank, self.sharded
        self.saved_at, self.state.world_size = self.state.step, self.world_size
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
                    self.tokenizer.save_pretrained(out.path)
                else:
                    export_model(model, self.tokenizer, out.path)
                    if self.cfg.train.lora.enabled:
                        model.save_pretrained(out.adapter)
                torch.save({"scheduler": self.scheduler.state_dict(),
                            "loop": self.state.state_dict(), "rng": torch.get_rng_state(),
                            **({} if sharded else {"optimizer": optimizer.state_dict()})},
                           out.training_state)
                shutil.copy(self.run.config, out.config)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def cleanup(self) -> None:
        """Stop the feed's reader thread (a run may end mid-epoch), write the profile window a
        run cut short (or say it never reached it), close the trackers."""
        if self.epochs is not None:
            self.epochs.close()
        profiler, step = self.profiler, self.state.step
        if profiler and (profiler.close(step) or not profiler.summary) and self.rank == 0:
            note_console(self.loop.run_dir, step, profiler.console_line())
        if self.trackers:
            self.trackers.close()


def train_loop_per_worker(loop_config: dict) -> None:
    """What Ray Train runs on every worker (`loop_config`: `LoopConfig.as_train_loop_config()`):
    set up, train, clean up."""
    loop = TrainingLoop(LoopConfig(**loop_config))
    try:
        loop.setup()
        loop.train()
    finally:
        loop.cleanup()


def note_start(run_dir: Path, rank: int, world_size: int, device, start_step: int,
               total_steps: int, global_batch: int, strategy: str = "ddp",
               read_weights: bool = True) -> None:
    """Append this worker's start to `workers/rank-N.jsonl`: where each rank ran, as which
    process, and from which step (a restart after a failure shows up as a second line), and
    whether it read the model's weights itself (fsdp: rank 0 only)."""
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
        "read_weights": read_weights, "time": time.time()})


def note_console(run_dir: Path, step: int, line: str) -> None:
    """A line for the driver's console (see `metrics.worker_notes`), from rank 0."""
    append_jsonl(RunFolder(run_dir).worker_log(0),
                 {"rank": 0, "note": line, "at_step": step, "time": time.time()})


def note_memory(run_dir: Path, rank: int, step: int, held: dict) -> None:
    """Append what this rank holds after its first optimizer step (parameters, gradients,
    optimizer state, peak memory; see `sharding.state_bytes`) to `workers/rank-N.jsonl`."""
    append_jsonl(RunFolder(run_dir).worker_log(rank),
                 {"rank": rank, "memory_at_step": step, **held, "time": time.time()})
