"""A static-shape decode step: rows in fixed slots of a preallocated KV cache, one forward per
step whose shapes never change, captured as CUDA graphs on a GPU.

On a GPU a small model's decode step is bound by the host, not the GPU: Python runs through
every module of the forward and launches its kernels one at a time, while the GPU needs a
fraction of that time to run them. A CUDA graph replays a whole step's kernels in one launch, but
only over tensors at fixed addresses with fixed shapes. `BatchDecoder`'s padded cache grows by a
column every step and is re-padded when rows join, so it cannot be captured. Here:

- the KV cache is `slots` rows × the model's context, per layer, allocated once (`StaticStep`);
- a request takes a free slot: its prompt is prefilled as `BatchDecoder` prefills (eager, any
  length) and its keys and values are copied to the start of its slot;
- a decode step writes each row's new key and value at that row's own position (a scatter by
  a positions tensor) and attends over the slot's whole width, with a mask built from the
  positions inside the step (a 4D mask, which transformers passes to attention as it is);
- a graph is captured once per bucket of rows (1, 2, 4, ..., slots) and of columns (64, 128,
  ..., the context) before any row is loaded; a step replays the smallest bucket that covers the
  highest slot in use and the longest row, so short rows do not read the whole context's cache,
  and rows move down into free lower slots when that lets a smaller bucket run.

Where graphs cannot be captured (a CPU; a model whose forward reads a device value on the host)
the same static step runs eagerly; tests compare it with `BatchDecoder` on CPU.
"""

from __future__ import annotations

import functools

import torch

from aigc_ray.decode.engine import BatchDecoder, cache_argument, new_cache, plain_kv_cache
from aigc_ray.decode.request import GenerationRequest
from aigc_ray.tokenizer import context_length

# Attention implementations that take an additive 4D mask as it is (flash-attention kernels take
# none): the step's mask is how a row sees only its own slot's filled columns.
MASKED_ATTENTION = ("sdpa", "eager")
# Share of the GPU memory free after loading the model that the slots may take.
CACHE_MEMORY_SHARE = 0.5


def unsupported(model, tokenizer) -> str | None:
    """Why `model` cannot decode in static slots (None: it can)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in MASKED_ATTENTION:
        return f"attention implementation {attention!r} (needs one of {', '.join(MASKED_ATTENTION)})"
    if not plain_kv_cache(config):
        return "layers that are not plain full attention (sliding window, linear attention)"
    if context_length(config, tokenizer) is None:
        return "no stated context length to size the cache by"
    return None


@functools.cache
def _slot_layer():
    """A transformers cache layer over one layer's slot buffers: `update` writes the step's one
    new key and value per row at that row's position and returns the whole buffers."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """`keys`, `values`: views of the first rows and columns of the slot buffers."""

        def __init__(self, keys, values, positions):
            super().__init__()
            self.keys, self.values, self.positions = keys, values, positions
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            # scatter_, not an indexed assignment: a plain kernel, safe to capture on a GPU.
            at = self.positions.view(-1, 1, 1, 1)
            for buffer, states in ((self.keys, key_states), (self.values, value_states)):
                buffer.scatter_(2, at.expand(*states.shape[:2], 1, states.shape[-1]),
                                states[:, :, -1:])
            return self.keys, self.values

    return SlotLayer


class StaticStep:
    """The slots' KV cache and the decode step over them, captured once per bucket as a CUDA
    graph where `graphs` is true and the device is a GPU. Owned by a serving replica or a
    generation actor for its whole life (capturing costs seconds); `SlotDecoder`s borrow it."""

    def __init__(self, model, tokenizer, slots: int, graphs: bool = True):
        from transformers import Cache

        self.model, self.device = model, next(model.parameters()).device
        self.width = context_length(model.config, tokenizer)
        self.cache_arg = cache_argument(model)
        shapes = self._layer_shapes()
        per_slot = sum(2 * heads * self.width * dim for heads, dim, _ in shapes) * shapes[0][2].itemsize
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            slots = max(1, min(slots, int(free * CACHE_MEMORY_SHARE // per_slot)))
        self.slots = slots
        self.cache_bytes = per_slot * slots
        self.keys = [torch.zeros(slots, heads, self.width, dim, dtype=dtype, device=self.device)
                     for heads, dim, dtype in shapes]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        self.input_ids = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.host = torch.zeros(2, slots, dtype=torch.long,
                                pin_memory=self.device.type == "cuda")  # ids, positions
        self.columns = torch.arange(self.width, device=self.device)
        self.buckets = _doubling(1, slots)  # rows
        self.spans = _doubling(min(64, self.width), self.width)  # columns
        layer = _slot_layer()
        self.caches = {}
        for bucket in self.buckets:
            for span in self.spans:
                self.caches[bucket, span] = Cache(layers=[
                    layer(k[:bucket, :, :span], v[:bucket, :, :span], self.positions[:bucket])
                    for k, v in zip(self.keys, self.values)])
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.graph_error: str | None = None
        if graphs and self.device.type == "cuda":
            self._capture()

    def _layer_shapes(self) -> list[tuple[int, int, torch.dtype]]:
        """(heads, head dim, dtype) of each layer's keys, from a one-token forward."""
        cache = new_cache(self.model.config)
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model(input_ids=ids, use_cache=True, **{self.cache_arg: cache})
        return [(layer.keys.shape[1], layer.keys.shape[-1], layer.keys.dtype)
                for layer in cache.layers]

    def _forward(self, bucket: int, span: int) -> torch.Tensor:
        """The decode step for the first `bucket` slots over their first `span` columns:
        next-token logits, one row a slot."""
        positions = self.positions[:bucket]
        dtype = self.keys[0].dtype
        mask = torch.where(self.columns[None, :span] <= positions[:, None],
                           torch.zeros((), dtype=dtype, device=self.device),
                           torch.full((), torch.finfo(dtype).min, dtype=dtype, device=self.device))
        out = self.model(input_ids=self.input_ids[:bucket], position_ids=positions[:, None],
                         attention_mask=mask[:, None, None, :], use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: self.caches[bucket, span]})
        return out.logits[:, -1, :]

    def _capture(self) -> None:
        """One CUDA graph per bucket, sharing one memory pool; on failure the step stays eager
        and `graph_error` says why. Runs before any row is loaded: warm-up writes land in empty
        slots."""
        pool = torch.cuda.graph_pool_handle()
        try:
            with torch.inference_mode():
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                shapes = [(b, s) for b in self.buckets for s in self.spans]
                with torch.cuda.stream(side):
                    for shape in shapes:
                        for _ in range(2):  # lazy initializations happen outside the capture
                            self._forward(*shape)
                torch.cuda.current_stream(self.device).wait_stream(side)
                for shape in reversed(shapes):  # the largest first: it sizes the pool
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self._forward(*shape)
                    self.graphs[shape] = (graph, logits)
        except Exception as exc:  # a forward that syncs with the host cannot be captured
            self.graphs = {}
            self.graph_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            torch.cuda.synchronize(self.device)

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def run(self, tokens: dict[int, int], lengths: list[int]) -> torch.Tensor:
        """Logits (one row per slot of the bucket) after feeding `tokens` (slot → token) at
        each slot's length; other slots in the bucket compute on what they hold, unread."""
        bucket = self.bucket(max(tokens) + 1)
        longest = max(lengths[slot] for slot in tokens) + 1  # with the token fed now
        span = next(s for s in self.spans if s >= longest)
        ids, positions = [0] * bucket, [0] * bucket
        for slot, token in tokens.items():
            ids[slot], positions[slot] = token, lengths[slot]
        self.host[:, :bucket] = torch.tensor([ids, positions])
        self.input_ids[:bucket, 0].copy_(self.host[0, :bucket], non_blocking=True)
        self.positions[:bucket].copy_(self.host[1, :bucket], non_blocking=True)
        if (bucket, span) in self.graphs:
            graph, logits = self.graphs[bucket, span]
            graph.replay()
            return logits
        with torch.inference_mode():
            return self._forward(bucket, span)

    def load(self, slot: int, cache, row: int, length: int) -> None:
        """Copy a prefilled row's keys and values (the last `length` columns of `row` in a
        left-padded prefill cache) to the start of `slot`."""
        for keys, values, layer in zip(self.keys, self.values, cache.layers):
            keys[slot, :, :length].copy_(layer.keys[row, :, -length:])
            values[slot, :, :length].copy_(layer.values[row, :, -length:])

    def move(self, source: int, target: int, length: int) -> None:
        for buffers in (*self.keys, *self.values):
            buffers[target, :, :length].copy_(buffers[source, :, :length])


def _doubling(first: int, last: int) -> list[int]:
    """first, 2·first, 4·first, ... below `last`, then `last`."""
    out = [first]
    while out[-1] < last:
        out.append(min(2 * out[-1], last))
    return out


class SlotDecoder(BatchDecoder):
    """`BatchDecoder` over a `StaticStep`: the same rows, sampling, stops and chunks; each
    running row lives in a slot of the step's cache. Newcomers join while slots are free; the
    rest wait in `waiting` until rows finish. A request longer than a slot (the model's context)
    is refused at `add`, as `BatchDecoder` refuses it."""

    def __init__(self, model, tokenizer, step: StaticStep,
                 requests: list[GenerationRequest] = (), max_rows: int | None = None):
        self.static = step
        self.slot_of: dict[int, int] = {}  # request index → slot
        self.free = list(range(step.slots))  # sorted: the lowest free slot first
        self.lengths = [0] * step.slots  # tokens in each slot's cache
        self.next_tokens: list[int] | None = None  # per running row, in `active` order
        super().__init__(model, tokenizer, requests, max_rows)

    def _cache_room(self) -> int:
        return len(self.free)

    def _keep(self, batch_rows: list[int]) -> None:
        kept = set(batch_rows)
        for b, index in enumerate(self.active):
            if b not in kept:
                self.free.append(self.slot_of.pop(index))
                del self.rows[index]
        self.free.sort()
        if self.next_tokens is not None:
            self.next_tokens = [self.next_tokens[b] for b in batch_rows]
        self.active = [self.active[b] for b in batch_rows]

    def _compact(self) -> None:
        """Move rows from the highest slots into free lower ones when a smaller bucket would
        then cover them all (a copy of their filled columns, on the device)."""
        count = len(self.slot_of)
        highest = max(self.slot_of.values())
        if self.static.bucket(highest + 1) == self.static.bucket(count):
            return
        for index in sorted(self.slot_of, key=self.slot_of.get, reverse=True):
            source = self.slot_of[index]
            if source < count:
                break
            target = self.free.pop(0)
            self.static.move(source, target, self.lengths[source])
            self.slot_of[index], self.lengths[target] = target, self.lengths[source]
            self.free.append(source)
        self.free.sort()

    def _decode_active(self) -> torch.Tensor:
        self._compact()
        slots = [self.slot_of[index] for index in self.active]
        logits = self.static.run(dict(zip(slots, self.next_tokens)), self.lengths)
        for slot in slots:
            self.lengths[slot] += 1
        self.next_tokens = None
        return logits[torch.tensor(slots, device=logits.device)]

    def _join_prefilled(self, newcomers: list[int], mask, cache) -> None:
        # After the step's decode: its forward writes every slot of its bucket, the unfed ones
        # at column 0, which would overwrite a row loaded before it.
        for row, index in enumerate(newcomers):
            slot = self.free.pop(0)
            length = len(self.rows[index].request.prompt_ids)
            self.static.load(slot, cache, row, length)
            self.slot_of[index], self.lengths[slot] = slot, length

    def _feed(self, tokens: list[int]) -> None:
        self.next_tokens = tokens


def new_decoder(model, tokenizer, step: StaticStep | None,
                requests: list[GenerationRequest] = (), max_rows: int | None = None
                ) -> BatchDecoder:
    """A `SlotDecoder` over `step` when there is one, else a padded `BatchDecoder`."""
    if step is None:
        return BatchDecoder(model, tokenizer, requests, max_rows)
    return SlotDecoder(model, tokenizer, step, requests, max_rows)


def static_step_for(model, tokenizer, max_rows: int, cuda_graphs: bool
                    ) -> tuple[StaticStep | None, str | None]:
    """(the step a replica or generation actor decodes with, a note for its log): a slot per
    row of `max_rows` (fewer where GPU memory is short), with captured graphs on a GPU when `cuda_graphs` is on and the model allows it (the note gives
    their size and capture time); otherwise None (the padded `BatchDecoder`), with a note saying
    why when graphs were asked for but cannot run (the eager slots are no faster than the
    padded cache)."""
    if not cuda_graphs or next(model.parameters()).device.type != "cuda":
        return None, None
    reason = unsupported(model, tokenizer)
    if reason:
        return None, f"decoding without CUDA graphs: the model has {reason}"
    import time

    started = time.perf_counter()
    step = StaticStep(model, tokenizer, max_rows)
    if step.graph_error:
        return None, f"decoding without CUDA graphs: capturing the step failed ({step.graph_error})"
    note = (f"decoding with CUDA graphs: {step.slots} rows × {step.width} tokens of KV cache "
            f"({step.cache_bytes / 2**30:.2f} GiB), {len(step.graphs)} graphs captured in "
            f"{time.perf_counter() - started:.1f} s")
    if step.slots < max_rows:
        note += f"; {step.slots} rows, not {max_rows}: what half the free GPU memory holds"
    return step, note
