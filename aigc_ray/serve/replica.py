"""The model deployment: one replica holds the model and decodes concurrent requests in batches.

`Batcher` drives one `BatchDecoder` (on a GPU with `serve.cuda_graphs` on, a `SlotDecoder`
over the replica's captured CUDA graphs) in a decode thread of its own, so the replica keeps
accepting requests while the model runs. Batching is continuous: a request that arrives while
the batch decodes joins it at the next step (up to `serve.max_batch_size` rows, which the
decoder holds as its `max_rows`) instead of waiting for the whole batch to finish, and a
finished row leaves at once. When the decoder is idle, the first request waits up to
`serve.batch_wait_timeout_s` for company.

Why not `serve.batch`: its loop forms the next batch as soon as the wait timeout passes, even
while the previous one still decodes (ray/serve/batching.py `_process_batches`), so with one
batch running at a time the queue is split into many small batches: at 32 concurrent requests
its own metrics showed 95 requests in 51 batches, and a batch, once formed, never takes in a
newcomer.

No request can take the loop down with it: a request the decoder refuses fails alone at
admission, a row that fails in a step ends alone (`BatchDecoder`), a step that fails for the
whole batch fails that batch, and the loop goes on to the next. The loop beats (`Batcher.beat`)
at every step and at least every BEAT_S while idle; a caller whose loop has stopped beating for
`stall_s` gets an error instead of waiting forever, and `/healthz` answers from the beat.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ray import serve

from aigc_ray.decode.engine import BatchDecoder
from aigc_ray.decode.graphs import StaticStep, new_decoder, static_step_for
from aigc_ray.decode.request import Chunk, GenerationRequest, RowFailed, merge_chunks
from aigc_ray.model import load_for_inference

_DONE = object()  # ends a request's chunk queue

# A decode step that has not finished in this long means the replica is wedged, not busy.
STALL_S = 120.0
# The idle decode loop wakes this often, only to beat: its heartbeat is then never older than
# this while it is healthy, busy or not.
BEAT_S = 1.0
# How often a caller waiting on the loop checks that it still beats.
CHECK_S = 5.0
# The longest the replica's metrics wait for a delivery of chunks to ride along with.
METRICS_WAIT_S = 1.0


@dataclass(eq=False)
class PendingRequest:
    """A request from `Batcher.submit` until its end: what the decode thread needs to serve it
    and to hand its chunks back to its caller."""

    request: GenerationRequest
    stream: bool  # False: chunks are held back until the completion is whole
    loop: asyncio.AbstractEventLoop  # the caller's: its chunks are put on `chunks` there
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)  # chunks, errors, then _DONE
    cancel: Callable[[], None] | None = None  # stops its row; set when the decoder admits it
    cancelled: bool = False  # its caller is done or gone
    held: list[Chunk] = field(default_factory=list)  # with stream False: the chunks so far
    first_token_at: float | None = None  # wall clock, for time per output token


class Batcher:
    """One decode thread per replica: takes queued requests in batches, streams chunks back.

    The whole decode loop runs in its own thread rather than one `to_thread` hop per step: each
    hop waits for the GIL behind the event loop (up to the 5 ms switch interval), which at 32
    steps per request cost more than the model itself on a small model.
    """

    def __init__(self, model, tokenizer, max_rows: int, wait_s: float, metrics: dict,
                 continuous: bool = True, step: StaticStep | None = None,
                 stall_s: float = STALL_S):
        self.model, self.tokenizer, self.step = model, tokenizer, step  # step: see new_decoder
        self.max_rows = max_rows  # the decoder's row cap (serve.max_batch_size); it holds it
        self.wait_s, self.metrics = wait_s, metrics
        self.continuous, self.stall_s = continuous, stall_s
        self.pending: queue.Queue = queue.Queue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.beat = time.monotonic()  # the decode loop's last sign of life
        self.step_started: float | None = None  # monotonic start of the step now running
        self.admitted = 0  # requests the loop has taken in (a health check adds none)
        self.observations: list[tuple[str, float]] = []  # metrics waiting for the next delivery
        self.observed_at = time.monotonic()  # when metrics last went to the event loop

    def start(self) -> None:
        """Start the decode thread, or a new one if it ever ended (it should not)."""
        if self.thread is None or not self.thread.is_alive():
            self.beat = time.monotonic()
            self.thread = threading.Thread(target=self._run, name="decode", daemon=True)
            self.thread.start()

    def trouble(self) -> str | None:
        """Why the decode loop cannot serve now (None: it beats)."""
        if self.thread is None or not self.thread.is_alive():
            return "the decode loop is not running"
        silent = time.monotonic() - self.beat
        if silent > self.stall_s:
            return f"the decode loop has not moved for {silent:.0f} s (a step is stuck)"
        return None

    async def submit(self, request: GenerationRequest, stream: bool = True
                     ) -> AsyncIterator[Chunk]:
        """The request's chunks as its batch decodes them; with stream=False one chunk at the
        end holding the whole completion (no event-loop wake-up per step for nobody). Raises
        what failed the request: RequestError (refused), RowFailed (it failed alone), the
        step's error (its batch failed), or RuntimeError once the loop stops beating."""
        self.start()
        self.loop = asyncio.get_running_loop()  # the replica's one serving loop
        entry = PendingRequest(request, stream, self.loop)
        self.pending.put(entry)
        chunks, after = entry.chunks, None
        try:
            while True:
                item = after if after is not None else await self._next(chunks)
                after = None
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                # A caller that fell behind the decode loop (a busy event loop, a slow client)
                # gets what queued meanwhile as one chunk: one message downstream, not one per
                # step, so streams cost less exactly when the replica is loaded.
                held = [item]
                while not chunks.empty():
                    item = chunks.get_nowait()
                    if item is _DONE or isinstance(item, BaseException):
                        after = item
                        break
                    held.append(item)
                yield held[0] if len(held) == 1 else merge_chunks(held)
        finally:
            entry.cancelled = True  # the caller is done or gone: stop paying for its row
            if entry.cancel is not None:
                entry.cancel()

    async def _next(self, chunks: asyncio.Queue):
        """The next item for a caller. A whole completion sends nothing until its end, so the
        wait has no deadline of its own; it ends when the loop stops beating (its timeout)."""
        if not chunks.empty():
            return chunks.get_nowait()
        while True:
            try:
                async with asyncio.timeout(min(CHECK_S, self.stall_s)):
                    return await chunks.get()
            except TimeoutError:
                if (why := self.trouble()) is not None:
                    raise RuntimeError(f"{why}; this request was given up") from None

    def _take(self, room: int, wait: bool) -> list[PendingRequest]:
        """Up to `room` queued requests. With `wait` (the decoder is idle) wait up to BEAT_S for
        the first and give company `wait_s` to arrive; otherwise only what has queued already."""
        try:
            batch = [self.pending.get(timeout=BEAT_S)] if wait else []
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.wait_s
        while len(batch) < room:
            try:
                batch.append(self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                             if wait else self.pending.get_nowait())
            except queue.Empty:
                break
        return [entry for entry in batch if not entry.cancelled]

    def _run(self) -> None:
        decoder, entries = None, {}  # entries: the decoder's request index → its PendingRequest
        while True:
            self.beat = time.monotonic()
            newcomers = []
            try:
                if decoder is None:  # the first, or the one after a batch failed
                    decoder = new_decoder(self.model, self.tokenizer, self.step,
                                          max_rows=self.max_rows)
                idle = decoder.done
                # Requests stay in the queue until the decoder has room for them (a batch that
                # fails takes none of them down); without continuous batching only when idle.
                room = decoder.room if idle or self.continuous else 0
                if idle and self.observations:  # nothing steps until the next request: record
                    self._deliver([], after=lambda seen=self.observations: self._observe(seen))
                    self.observations = []
                newcomers = self._take(room, wait=idle) if room > 0 else []
                if idle and not newcomers:
                    continue
                if newcomers:
                    self._admit(decoder, entries, newcomers)
                    newcomers = []
                if not decoder.done:
                    self._step(decoder, entries)
            except Exception as exc:  # fail the requests of this batch, keep serving the next
                failed = {id(e): e for e in [*entries.values(), *newcomers]}.values()
                self._deliver([(entry, item) for entry in failed for item in (exc, _DONE)])
                decoder, entries = None, {}

    def _deliver(self, items: list[tuple[PendingRequest, object]], after=None) -> None:
        """Hand chunks to their callers' event loop: one wake-up per step, not per chunk."""
        def put_all(items):
            for entry, item in items:
                entry.chunks.put_nowait(item)
            if after is not None:
                after()

        loops: dict = {}  # in a replica one loop; a test may run several one after another
        for entry, item in items:
            loops.setdefault(entry.loop, []).append((entry, item))
        if after is not None:
            loops.setdefault(self.loop, [])
        for loop, its_items in loops.items():
            try:
                loop.call_soon_threadsafe(put_all, its_items)
            except RuntimeError:  # that loop has closed: nobody waits there any more
                pass

    def _admit(self, decoder: BatchDecoder, entries: dict[int, PendingRequest],
               batch: list[PendingRequest]) -> None:
        """Requests join the running batch (continuous batching): prefilled at the next step.
        One at a time, so a request the decoder refuses fails alone."""
        refused = []
        for entry in batch:
            try:
                [index] = decoder.add([entry.request])
            except Exception as exc:
                refused += [(entry, exc), (entry, _DONE)]
                continue
            self.admitted += 1
            entries[index] = entry
            entry.cancel = lambda index=index: decoder.cancel(index)
            if entry.cancelled:  # gone before `cancel` was set
                decoder.cancel(index)
        self._deliver(refused)
        self.observations.append(("batch_size", decoder.batch_size))

    def _step(self, decoder: BatchDecoder, entries: dict[int, PendingRequest]) -> None:
        """One decoder step; chunks (and a request's end) go to their callers."""
        self.step_started = time.monotonic()
        try:
            chunks = decoder.step()
        finally:
            self.step_started = None
        now, generated, out = time.time(), 0, []
        observations = self.observations  # held until a delivery takes them
        for index, chunk in chunks.items():
            entry = entries.pop(index) if chunk.finish_reason == "error" else entries[index]
            generated += len(chunk.token_ids)
            if chunk.finish_reason == "error":  # this request failed alone; its batch goes on
                out += [(entry, RowFailed(chunk.error)), (entry, _DONE)]
                continue
            if entry.first_token_at is None:
                entry.first_token_at = now
                observations.append(("ttft", max(0.0, now - entry.request.arrival_time)))
            if chunk.finish_reason is not None and chunk.completion_tokens > 1:
                per_token = (now - entry.first_token_at) / (chunk.completion_tokens - 1)
                observations.append(("tpot", per_token))
            if not entry.stream:  # hold it back until the completion is whole
                entry.held.append(chunk)
                if chunk.finish_reason is None:
                    continue
                chunk = merge_chunks(entry.held)
            out.append((entry, chunk))
            if chunk.finish_reason is not None:
                out.append((entry, _DONE))
                del entries[index]
        for index in [i for i in entries if i not in decoder.rows]:
            del entries[index]  # cancelled: its caller is gone
        if generated:
            observations.append(("tokens", generated))
        # Metrics are recorded on the event loop, beside the rest of Ray's bookkeeping, riding
        # along with chunks so that a step with nothing to hand out (whole completions still
        # decoding) does not wake the loop for metrics alone: they wait, at most METRICS_WAIT_S.
        now = time.monotonic()
        if out or (observations and now - self.observed_at > METRICS_WAIT_S):
            self.observed_at, self.observations = now, []
            self._deliver(out, after=lambda seen=observations: self._observe(seen))

    def _observe(self, observations: list[tuple[str, float]]) -> None:
        for name, value in observations:
            if name == "tokens":
                self.metrics[name].inc(value)
            else:
                self.metrics[name].observe(value)


def _metrics():
    from ray.serve.metrics import Counter, Histogram

    return {
        "ttft": Histogram(
            "aigc_ray_time_to_first_token_seconds",
            description="Seconds from the ingress receiving a request to its first token.",
            boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]),
        "tpot": Histogram(
            "aigc_ray_time_per_output_token_seconds",
            description="Seconds per generated token after the first, per request.",
            boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]),
        "tokens": Counter("aigc_ray_tokens_generated",
                          description="Completion tokens generated."),
        "batch_size": Histogram(
            "aigc_ray_batch_size",
            description="Rows decoding together, sampled each time requests join the batch.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128]),
    }


@serve.deployment(name="GenerationReplica")
class GenerationReplica:
    """Holds the model; `complete` and `stream` go through the replica's one `Batcher`."""

    def __init__(self, checkpoint: str, serve_section: dict, trust_remote_code: bool = False):
        from aigc_ray.config import Serve

        cfg = Serve.model_validate(serve_section)
        self.model, self.tokenizer = load_for_inference(
            checkpoint, cfg.device, cfg.dtype, trust_remote_code=trust_remote_code,
            threads=cfg.cpus_per_replica)
        step, note = static_step_for(self.model, self.tokenizer, cfg.max_batch_size,
                                     cfg.cuda_graphs)
        if note:
            print(f"[aigc-ray] serve: {note}", flush=True)
        self.batcher = Batcher(self.model, self.tokenizer, cfg.max_batch_size,
                               cfg.batch_wait_timeout_s, _metrics(), cfg.continuous_batching,
                               step)
        self._probe()  # a replica that cannot run its model must fail here, not on traffic
        self.batcher.start()  # beating before the first request, for /healthz

    async def complete(self, request: GenerationRequest) -> dict:
        """The whole completion: text, token_ids, finish_reason, token counts, logprobs and
        prompt_logprobs (None unless asked)."""
        chunks = [chunk async for chunk in self.batcher.submit(request, stream=False)]
        whole = merge_chunks(chunks or [Chunk("", [], 0, len(request.prompt_ids))])
        return {"text": whole.text, "token_ids": whole.token_ids,
                "finish_reason": whole.finish_reason, "prompt_tokens": len(request.prompt_ids),
                "completion_tokens": whole.completion_tokens, "logprobs": whole.logprobs,
                "prompt_logprobs": whole.prompt_logprobs}

    async def complete_all(self, requests: list[GenerationRequest]) -> list[dict]:
        """`complete` for each of a request's choices, in one call: they join the batch
        together, and the handle counts one ongoing request, not one per choice (a request of
        64 prompts would otherwise fill `max_ongoing_requests` and wait in the router's
        backoff). The first failure fails them all, as it fails their HTTP request."""
        tasks = [asyncio.ensure_future(self.complete(request)) for request in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # the others stop costing rows
            for task in tasks:
                task.cancel()
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """The completion step by step; a step that produced no visible text rides along with
        the next one that does (its tokens and logprobs are not lost)."""
        held: list[Chunk] = []
        async for chunk in self.batcher.submit(request):
            held.append(chunk)
            if chunk.text or chunk.finish_reason:
                yield held[0] if len(held) == 1 else merge_chunks(held)
                held = []

    async def health(self) -> dict:
        """What `/healthz` reports, from the decode loop's heartbeat: it generates nothing,
        since anyone can call it as often as they like. `trouble` is None when the loop beats;
        `admitted` counts the requests the loop has taken in (tests check it stays put)."""
        return {"trouble": self.batcher.trouble(), "admitted": self.batcher.admitted,
                "seconds_since_beat": round(time.monotonic() - self.batcher.beat, 3)}

    def pid(self) -> int:
        """The replica's process id (tests kill replicas by pid)."""
        return os.getpid()

    async def check_health(self) -> None:
        """Serve's replica health check (Serve's controller calls it every
        serve.health_check_period_s, nobody else): the decode loop beats, no step is stuck,
        and the model still computes."""
        started = self.batcher.step_started
        if started is not None and time.monotonic() - started > STALL_S:
            raise RuntimeError(f"a decode step has run for more than {STALL_S:.0f} s")
        if (why := self.batcher.trouble()) is not None:
            raise RuntimeError(why)
        await asyncio.to_thread(self._probe)

    def _probe_token(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id or 0

    def _probe(self) -> None:
        import torch

        with torch.inference_mode():
            ids = torch.tensor([[self._probe_token()]], device=self.model.device)
            logits = self.model(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("the model produced non-finite logits")
