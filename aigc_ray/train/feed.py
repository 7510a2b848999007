"""What the model eats: blocks from the worker's shard (or the cached split) collated into
batches, trimmed, pinned and moved to the device, reshuffled every epoch; and the clock that
counts how long the GPU waited for them.
"""

from __future__ import annotations

import time

from aigc_ray.config import Config
from aigc_ray.errors import DataError

# Block columns the model's step reads; position_ids only where data.packing made them.
PASSED_COLUMNS = ("input_ids", "labels", "position_ids")


def batch_collator(pin: bool):
    """A Ray Data collate function that does a batch's CPU work in Ray's prefetch threads, off
    the training step: trim the padding, make long tensors, count tokens and targets (so the
    step never reads a device tensor), and pin the memory for a non-blocking copy to the GPU."""
    import numpy as np
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    from aigc_ray.tokenizer import IGNORE_INDEX
    from aigc_ray.train.loss import trimmed_length

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


# A streamed split mixes its blocks through a local buffer of this many optimizer steps' worth
# (at least MIN_SHUFFLE_BLOCKS): large enough to mix neighbouring documents, small enough that
# the first step does not wait long for it to fill.
SHUFFLE_BUFFER_STEPS = 16


MIN_SHUFFLE_BLOCKS = 1024


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed for one epoch of one rank, drawn from the run's seed: the same every run."""
    from aigc_ray.data.read import seeded_rng

    return int(seeded_rng(seed, epoch, rank).integers(2**31))


def rank_share(order, start: int, rank: int, world_size: int):
    """Rank `rank`'s part of an epoch's block `order` from global position `start`: the blocks
    dealt to it in turn, equal shares (fewer than `world_size` left over are left out)."""
    rest = order[start:]
    return rest[rank::world_size][: len(rest) // world_size]


class CachedBlocks:
    """The cached training split as one worker reads it: every block of it, zero-copy from the
    object store, in an order drawn for each epoch.

    Each epoch is one permutation of the whole split, from `train.seed` and the epoch number
    (or the split's own order with `data.shuffle=false`), dealt out to the ranks in turn from
    where the run is in it: rank r takes positions start + r, start + r + N, ... So the global
    batch at any step holds the same blocks whatever the number of workers, a run repeats
    exactly, and a resume (with as many workers or, elastic, fewer) goes on from exactly the
    block its checkpoint had reached: none twice, none skipped. Reading here instead of through
    a Ray Data split also costs no pipeline start per epoch, and nothing is handed out as it
    happens to be ready."""

    def __init__(self, refs: list, rank: int, world_size: int, seed: int, shuffle: bool):
        import numpy as np
        import ray

        from aigc_ray.data.cache import block_columns

        tables = [block_columns(table) for table in ray.get(refs) if table.num_rows]
        self.tables = tables
        sizes = [len(table["input_ids"]) for table in tables]
        self.table_of = np.repeat(np.arange(len(tables)), sizes)
        self.row_of = np.concatenate([np.arange(size) for size in sizes]) if sizes else sizes
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle

    def order(self, epoch: int, start: int = 0):
        """This rank's blocks for `epoch` from global position `start` (the blocks the run has
        consumed of it), as indices into the split (equal shares: a remainder of fewer than
        world_size blocks is left out, as Ray's equal split does)."""
        import numpy as np

        from aigc_ray.data.read import seeded_rng

        rows = len(self.table_of)
        order = seeded_rng(self.seed, epoch).permutation(rows) if self.shuffle else np.arange(rows)
        return rank_share(order, start, self.rank, self.world_size)

    def batches(self, epoch: int, batch_size: int, collate, start: int = 0):
        """One epoch of collated host batches (full ones only) from global position `start`."""
        import numpy as np

        order = self.order(epoch, start)
        names = list(self.tables[0]) if self.tables else []
        for first in range(0, len(order) - batch_size + 1, batch_size):
            picked = order[first:first + batch_size]
            yield collate({name: np.stack([self.tables[self.table_of[i]][name][self.row_of[i]]
                                           for i in picked]) for name in names})


class EpochFeed:
    """The training split epoch after epoch, read by a background thread into a small queue:
    the next epoch starts while the loop still steps through the batches queued from the
    current one. `passes(epoch, start)` gives one epoch's collated host batches (a `CachedBlocks`
    permutation, or a pass over the worker's Ray Data shard); epochs count from `first_epoch`,
    the first from global block position `start` (a resume mid-epoch); `epochs` None: until
    `close()`."""

    END = object()  # marks the end of an epoch in the queue

    def __init__(self, passes, device, first_epoch: int, epochs: int | None, start: int = 0,
                 depth: int = 8):
        import queue
        import threading

        self.device, self.queue, self.stop = device, queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True, name="aigc-ray-feed",
                                       args=(passes, first_epoch, epochs, start))
        self.thread.start()

    def _produce(self, passes, first_epoch: int, epochs: int | None, start: int) -> None:
        import itertools

        numbers = (range(first_epoch, first_epoch + epochs) if epochs is not None
                   else itertools.count(first_epoch))
        try:
            for epoch in numbers:
                for batch in passes(epoch, start if epoch == first_epoch else 0):
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


def training_passes(cached_blocks: list | None, cfg: Config, device, rank: int,
                    world_size: int):
    """`passes(epoch, start)` for the `EpochFeed`: the cached split (`cached_blocks`, its object
    refs) permuted per epoch, or else this rank's Ray Data shard, mixed through a local buffer
    when `data.shuffle` is true (a global shuffle already happened in the dataset; see
    run_train). `start` is the global block position to go on from: exact for the cached split;
    a streamed shard skips its share of it (exact only with as many workers as before)."""
    import itertools

    import ray.train

    batch_size = cfg.train.batch_size
    if cached_blocks is not None:
        cached = CachedBlocks(cached_blocks, rank, world_size, cfg.train.seed,
                              cfg.data.shuffle is True)
        collate = batch_collator(device.type == "cuda")
        return lambda epoch, start: cached.batches(epoch, batch_size, collate, start)
    shard = ray.train.get_dataset_shard("train")
    buffer = (max(MIN_SHUFFLE_BLOCKS, SHUFFLE_BUFFER_STEPS * batch_size
                  * accumulation(cfg, world_size)) if cfg.data.shuffle is True else 0)
    return lambda epoch, start: itertools.islice(
        collated(shard, batch_size, device, cfg.train.prefetch_batches, True, buffer,
                 epoch_seed(cfg.train.seed, epoch, rank)),
        start // (world_size * batch_size), None)


def accumulation(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step on `world_size` workers: train.grad_accum_steps with all
    scaling.num_workers, scaled up when fewer run (elastic) so that the global batch stays
    batch_size × grad_accum_steps × num_workers; the nearest whole number (at least 1) where
    none keeps it (`global_batch_note` says so)."""
    return max(1, round(cfg.train.grad_accum_steps * cfg.scaling.num_workers / world_size))


def global_batch(cfg: Config, world_size: int) -> int:
    """Sequences per optimizer step on `world_size` workers."""
    return cfg.train.batch_size * accumulation(cfg, world_size) * world_size


def global_batch_note(cfg: Config, world_size: int) -> str | None:
    """A console line when `world_size` workers cannot keep the configured global batch."""
    planned, actual = global_batch(cfg, cfg.scaling.num_workers), global_batch(cfg, world_size)
    if actual == planned:
        return None
    return (f"[aigc-ray] the global batch of {planned} sequences cannot be kept with "
            f"{world_size} of scaling.num_workers={cfg.scaling.num_workers} workers: "
            f"{actual} per step ({world_size} × train.batch_size {cfg.train.batch_size} × "
            f"{accumulation(cfg, world_size)} accumulation steps) until they are back; a "
            "num_workers × grad_accum_steps that every worker count divides keeps it")


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
