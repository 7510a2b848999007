"""Batched decoding: many requests, one forward pass per step, each row with its own settings.

Pure PyTorch + transformers, no Ray: the serving replica (`aigc_ray.serve.replica`) drives
`BatchDecoder.step` from its batch loop, batch generation (`aigc_ray.generate`) runs a batch to
the end with `decode_all`, and unit tests drive it directly. Rows are left-padded so every
row's next token sits in the last column; position ids come from the attention mask so a padded
row sees the same positions (0, 1, 2, ...) as the same prompt alone, and greedy output equals
`model.generate`. How each row picks its token is `sampling`'s.
"""

from __future__ import annotations

import functools
import random

import torch

from aigc_ray.decode.request import (
    Chunk,
    GenerationRequest,
    RowFailed,
    TokenLogprob,
    check_request,
    failure,
    merge_chunks,
)
from aigc_ray.decode.sampling import (
    process_logits,
    prompt_token_logprobs,
    sample_batch,
    token_logprob,
)
from aigc_ray.tokenizer import context_length


class _Row:
    """Decoding state of one request."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.processed = request.processed  # read every step: kept, not recomputed
        self.generated: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.text = ""  # the generated tokens' text so far (see `Detokenizer`)
        self.prefix_offset = self.read_offset = 0  # `Detokenizer`'s window into `generated`
        self.finish_reason: str | None = None
        self.error: str | None = None  # why it failed (finish_reason "error")
        # Its own random stream, on the host: one uniform per sampled token, so rows sample
        # together in one batched draw and a seed repeats whatever rows share the batch.
        self.rng = None if request.greedy else random.Random(request.seed)
        # Text that might be the start of a stop string is held back until it cannot be.
        self.hold_back = max((len(s) for s in request.stop), default=1) - 1
        self.stop_floor = 0  # a stop string must start here or later (text of min_tokens)
        self.prompt_logprobs: list | None = None  # computed at prefill, sent with the first chunk


class Detokenizer:
    """A row's text, extended one token at a time in time that does not grow with the text
    (decoding every generated token again at every step costs O(length) per token, which at
    batch 64 and hundreds of tokens was the larger part of a step's host time). As TGI and vLLM
    do it: decode a short window of tokens before the new ones, with and without them, and
    append the difference, so a tokenizer that renders a token differently at the start of a
    text (SentencePiece's leading space) still gives what decoding the whole text gives. Bytes
    of a character not yet complete wait for the token that completes it."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            # The Rust tokenizer itself: transformers' decode checks every id in Python first.
            self.decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def extend(self, row: _Row, final: bool = False) -> str:
        """The row's whole text after its latest token; `final` flushes an incomplete
        character as the replacement character a whole decode would show."""
        ids = row.generated
        before = self.decode(ids[row.prefix_offset:row.read_offset])
        after = self.decode(ids[row.prefix_offset:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            row.text += after[len(before):]
            row.prefix_offset, row.read_offset = row.read_offset, len(ids)
        return row.text


@functools.cache
def _spare_room_layer():
    """A transformers `DynamicLayer` that writes each step's keys and values into room kept
    free at the end of its buffers, instead of concatenating (a new allocation and a copy of
    the whole cache at every token, for every layer). `keys` and `values` stay views of the
    filled part, so whatever reads or replaces them (batch selection when rows leave, padding
    trims, joins) works as on a plain layer; after a replacement the next update copies the
    new tensors into a fresh buffer with room again."""
    from transformers.cache_utils import DynamicLayer

    class SpareRoomLayer(DynamicLayer):
        ROOM = 64  # tokens of room added at a time

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            new = key_states.shape[-2]
            buffers = getattr(self, "_buffers", None)
            if self.keys is not getattr(self, "_view", None) or length + new > buffers[0].shape[-2]:
                room = length + new + self.ROOM
                buffers = tuple(
                    states.new_empty((*states.shape[:2], room, states.shape[-1]))
                    for states in (key_states, value_states))
                if length:
                    buffers[0][:, :, :length] = self.keys
                    buffers[1][:, :, :length] = self.values
                self._buffers = buffers
            buffers[0][:, :, length:length + new] = key_states
            buffers[1][:, :, length:length + new] = value_states
            self.keys, self.values = (b[:, :, :length + new] for b in buffers)
            self._view = self.keys
            return self.keys, self.values

    return SpareRoomLayer


def new_cache(config):
    """An empty KV cache for `config`'s model: transformers' `DynamicCache`, with its plain
    full-attention layers made `_spare_room_layer`s (sliding-window layers stay as they are)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    spare_room = _spare_room_layer()
    cache.layers = [spare_room() if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def cache_argument(model) -> str:
    """The forward's name for the KV cache: transformers 5.2x renamed `past_key_values` to
    `cache` (the old name warns, and goes in 5.40); remote-code models may still take the old."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def plain_kv_cache(config) -> bool:
    """Whether every layer of `config`'s model keeps a plain per-token KV cache (no sliding
    window, no linear attention): rows can then join a batch and padding be trimmed."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def vocabulary_size(model) -> int:
    """Token ids the model's embedding takes (0 .. this - 1)."""
    weight = getattr(model.get_input_embeddings(), "weight", None)
    return weight.shape[0] if weight is not None else model.config.vocab_size


class BatchDecoder:
    """Decodes requests together with one KV cache; rows join and leave between steps.

    `add` admits requests at any time (continuous batching): at the next `step` they are
    prefilled on their own, their KV cache is left-padded to the running batch's length (or the
    batch's to theirs) and joined to it, and from then on they decode with the rest. Finished
    and cancelled rows leave the batch and its cache, and padding columns no row needs any more
    are trimmed, so a long-lived batch costs what its live rows cost.

    One request cannot fail its neighbours: `add` refuses a request the batch cannot take
    (`check_request`), and a step that fails for one row (its prefill, penalties, sampled id or
    text) ends that row alone with an "error" chunk. Only a failure of the forward over the
    running rows raises from `step` (see `_prefill_groups` for why).
    """

    def __init__(self, model, tokenizer, requests: list[GenerationRequest] = (),
                 max_rows: int | None = None):
        self.model = model
        # Rows decoding at once (serve.max_batch_size, generate.batch_size); more wait and join
        # as rows finish. Held by `room` and `_newcomers`, nowhere else.
        self.max_rows = max_rows
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.detokenizer = Detokenizer(tokenizer)
        self.cache_arg = cache_argument(model)
        self.rows: dict[int, _Row] = {}  # request index → state, until it has finished
        self.next_index = 0
        self.waiting: list[int] = []  # admitted, prefilled at the next step
        self.active: list[int] = []  # batch row → request index
        self.next_input = self.attention_mask = self.cache = None
        # Rows can join and padding can be trimmed only in a plain per-token KV cache (not in
        # sliding-window layers, say); that is fixed by the model, so it is read once here.
        self.plain_cache = plain_kv_cache(model.config)
        self.context = context_length(model.config, tokenizer)  # None: no stated limit
        self.vocab_size = vocabulary_size(model)
        self.add(requests)

    def add(self, requests: list[GenerationRequest]) -> list[int]:
        """Admit requests; returns their indices (the keys of their chunks from `step`). Raises
        RequestError, admitting none of them, when one cannot join a batch (`check_request`)."""
        for request in requests:
            check_request(request, self.vocab_size, self.context)
        indices = list(range(self.next_index, self.next_index + len(requests)))
        for index, request in zip(indices, requests):
            self.rows[index] = _Row(request)
        self.next_index += len(requests)
        self.waiting += indices
        return indices

    @property
    def done(self) -> bool:
        return not self.active and not self.waiting

    @property
    def batch_size(self) -> int:
        """Rows the next forward pass decodes or prefills."""
        return len(self.active) + len(self.waiting)

    @property
    def room(self) -> int | None:
        """Requests `add` can take before the rows decoding and waiting reach `max_rows` (None:
        no cap). A caller that holds requests of its own (the serving replica's queue) adds
        this many; one that adds more (`decode_all`) leaves the rest waiting here."""
        return None if self.max_rows is None else max(0, self.max_rows - self.batch_size)

    @property
    def joinable(self) -> bool:
        """Whether newcomers can join now: with a plain cache always, otherwise only once the
        running rows have finished."""
        return self.plain_cache or not self.active

    def cancel(self, index: int) -> None:
        """Stop decoding request `index` (its caller went away); it leaves at the next step."""
        row = self.rows.get(index)
        if row is not None and row.finish_reason is None:
            row.finish_reason = "cancelled"

    def _keep(self, batch_rows: list[int]) -> None:
        """Shrink the batch to `batch_rows` (positions in the current batch)."""
        kept_rows = set(batch_rows)
        for b, index in enumerate(self.active):
            if b not in kept_rows:
                del self.rows[index]
        self.active = [self.active[b] for b in batch_rows]
        if not batch_rows:
            self.next_input = self.attention_mask = self.cache = None
            return
        kept = torch.tensor(batch_rows, device=self.device)
        self.cache.batch_select_indices(kept)
        self.attention_mask = self.attention_mask[kept]
        if self.next_input is not None:
            self.next_input = self.next_input[kept]
        # Columns that are padding in every row left (the longest row left with them).
        used = self.attention_mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0 and self.plain_cache:
            self.attention_mask = self.attention_mask[:, start:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:, :]
                layer.values = layer.values[:, :, start:, :]

    def _forward(self, input_ids, attention_mask, cache, every_position: bool = False
                 ) -> torch.Tensor:
        """The last position's logits (every position's with `every_position`)."""
        # Positions count real tokens only, so left padding does not shift them.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=positions, use_cache=True, **{self.cache_arg: cache},
                         logits_to_keep=0 if every_position else 1)
        return out.logits if every_position else out.logits[:, -1, :]

    def _prefill(self, indices: list[int]):
        """(logits, attention mask, cache) of the newcomers' prompts, left-padded together.
        Rows that asked for their prompt's logprobs get them here (`_Row.prompt_logprobs`)."""
        prompts = [self.rows[i].request.prompt_ids for i in indices]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = new_cache(self.model.config)
        rows = [self.rows[i] for i in indices]
        if all(row.request.prompt_logprobs is None for row in rows):
            return self._forward(ids, mask, cache), mask, cache
        every = self._forward(ids, mask, cache, every_position=True)
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            if row.request.prompt_logprobs is not None:
                row.prompt_logprobs = prompt_token_logprobs(
                    every[i, width - len(prompt):], prompt, row.request.prompt_logprobs)
        return every[:, -1, :], mask, cache

    def _join(self, mask, cache) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter side."""
        if self.cache is None:
            self.attention_mask, self.cache = mask, cache
            return
        width = max(mask.shape[1], self.attention_mask.shape[1])

        def left_pad(tensor, dim):
            missing = width - tensor.shape[dim]
            if not missing:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        self.attention_mask = torch.cat([left_pad(self.attention_mask, 1), left_pad(mask, 1)])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)])
            mine.values = torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)])

    @torch.inference_mode()
    def step(self) -> dict[int, Chunk]:
        """One forward pass for the running rows and, when any are waiting (and can join),
        one prefill for the newcomers; returns a chunk per request that produced one (finish
        reason "error" for a request that failed alone)."""
        live = [b for b, index in enumerate(self.active)
                if self.rows[index].finish_reason is None]
        if len(live) < len(self.active):  # cancelled since the last step
            self._keep(live)
        for index in [i for i in self.waiting if self.rows[i].finish_reason is not None]:
            self.waiting.remove(index)  # cancelled before it started
            del self.rows[index]
        newcomers = self._newcomers()
        if not self.active and not newcomers:
            return {}
        self.waiting = self.waiting[len(newcomers):]
        results: dict[int, Chunk] = {}
        if any(self.rows[i].request.max_tokens == 0 for i in newcomers):
            newcomers = self._score_prompts(newcomers, results)
        # Prefilled first, in caches of their own: the running rows' cache is touched only once
        # every newcomer that can join has been prefilled.
        groups = self._prefill_groups(newcomers, results) if newcomers else []
        logits = [self._decode_active()] if self.active else []
        for indices, (group_logits, mask, cache) in groups:
            self._join_prefilled(indices, mask, cache)
            self.active += indices
            logits.append(group_logits)
        if not logits:  # no row was running, and every newcomer failed or only scored
            return results
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        chosen = self._choose(logits).tolist()  # the step's one read from the device

        tokens, keep = [], []
        for batch_row, index in enumerate(self.active):
            row = self.rows[index]
            results[index] = self._settle(row, logits[batch_row], chosen[batch_row])
            if row.finish_reason is None:
                tokens.append(chosen[batch_row])
                keep.append(batch_row)

        self.next_input = None  # consumed; the sampled tokens are the next input
        if len(keep) < len(self.active):
            # A finished row stops costing compute: drop it from the batch and the KV cache.
            self._keep(keep)
        if self.active:
            self._feed(tokens)
        return results

    def _prefill_groups(self, newcomers: list[int], results: dict[int, Chunk]) -> list:
        """[(request indices, (logits, mask, cache))]: the newcomers prefilled together; when
        that raises, each one alone, and those that still fail leave with an error chunk in
        `results`.

        Why retry here, and only here: a prefill writes into a fresh cache and touches nothing
        shared, so running it again is safe and costs only on failure, and one bad prompt then
        fails no prompt prefilled with it. The running rows' forward writes into their shared
        cache (a layer may have written before another raised), so it cannot be retried;
        instead its inputs are kept valid (`check_request` bounds ids and positions at `add`,
        `_settle` every sampled id), and a failure there is the device's (memory, a kernel),
        not a row's: `step` raises and the caller fails that batch."""
        try:
            return [(newcomers, self._prefill(newcomers))]
        except Exception as exc:
            if len(newcomers) == 1:
                results[newcomers[0]] = self._drop_failed(newcomers[0], exc)
                return []
        groups = []
        for index in newcomers:
            try:
                groups.append(([index], self._prefill([index])))
            except Exception as exc:
                results[index] = self._drop_failed(index, exc)
        return groups

    def _score_prompts(self, newcomers: list[int], results: dict[int, Chunk]) -> list[int]:
        """The newcomers that generate. Those with max_tokens 0 only score their prompt: they
        are prefilled on their own (one bad prompt failing none of the others, as in
        `_prefill_groups`), leave with their prompt logprobs in one final chunk, and never join
        the batch or hold a row of its cache."""
        scoring = [i for i in newcomers if self.rows[i].request.max_tokens == 0]
        generating = [i for i in newcomers if i not in scoring]
        for indices, _ in self._prefill_groups(scoring, results):
            for index in indices:
                row = self.rows.pop(index)
                results[index] = Chunk(
                    text="", token_ids=[], completion_tokens=0,
                    prompt_tokens=len(row.request.prompt_ids), finish_reason="length",
                    logprobs=None if row.request.logprobs is None else [],
                    prompt_logprobs=row.prompt_logprobs)
        return generating

    def _drop_failed(self, index: int, exc: BaseException) -> Chunk:
        """A newcomer that failed before it joined: gone from the decoder; its error chunk."""
        row = self.rows.pop(index)
        row.finish_reason, row.error = "error", failure(exc)
        return self._error_chunk(row)

    @staticmethod
    def _error_chunk(row: _Row) -> Chunk:
        return Chunk(text="", token_ids=[], completion_tokens=len(row.generated),
                     prompt_tokens=len(row.request.prompt_ids), finish_reason="error",
                     error=row.error)

    def _settle(self, row: _Row, logits: torch.Tensor, token: int) -> Chunk:
        """The row's chunk for its sampled `token`. Whatever fails here (its penalties in
        `_choose`, an id outside the vocabulary, its logprobs or text) ends this row alone."""
        if row.finish_reason == "error":  # its penalties failed in `_choose`
            return self._error_chunk(row)
        try:
            if not 0 <= token < logits.shape[-1]:
                raise RowFailed(f"the sampler chose token id {token}, outside the vocabulary "
                                f"of {logits.shape[-1]}: the row's scores were not finite")
            req = row.request
            logprob = None if req.logprobs is None else token_logprob(logits, token, req.logprobs)
            return self._advance(row, token, logprob)
        except Exception as exc:
            row.finish_reason, row.error = "error", failure(exc)
            return self._error_chunk(row)

    # How the rows' KV cache is kept: here one left-padded batch that grows a column a step;
    # `decode_graphs.SlotDecoder` keeps fixed slots instead, behind the same four methods.

    def _newcomers(self) -> list[int]:
        """The waiting requests that join at this step (a prefix of `waiting`): as many as the
        cache takes (`_cache_room`) and `max_rows` leaves. The one place the row cap holds."""
        room = self._cache_room()
        if self.max_rows is not None:
            room = min(room, self.max_rows - len(self.active))
        return self.waiting[:max(0, room)]

    def _cache_room(self) -> int:
        """Newcomers the cache can take now."""
        return len(self.waiting) if self.joinable else 0

    def _decode_active(self) -> torch.Tensor:
        """The running rows' next-token logits, in `active` order."""
        return self._forward(self.next_input, self.attention_mask, self.cache)

    def _join_prefilled(self, newcomers: list[int], mask, cache) -> None:
        """Join prefilled newcomers (`_prefill`'s mask and cache) to the running rows."""
        self._join(mask, cache)

    def _feed(self, tokens: list[int]) -> None:
        """The sampled tokens (one per running row) are the next step's input."""
        self.next_input = torch.tensor(tokens, device=self.device).unsqueeze(-1)
        ones = torch.ones((len(self.active), 1), dtype=self.attention_mask.dtype,
                          device=self.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Every running row's next token, on the device: penalties and masks for the rows that
        ask (`process_logits`), then argmax for greedy rows and one batched draw
        (`sample_batch`) for the sampled ones."""
        rows = [self.rows[index] for index in self.active]
        scores = logits
        if any(row.processed for row in rows):
            scores = logits.float().clone()  # the raw logits stay for logprobs
            for batch_row, row in enumerate(rows):
                if row.processed:
                    try:
                        scores[batch_row] = process_logits(logits[batch_row], row.request,
                                                           row.generated, self.eos_ids)
                    except Exception as exc:  # this row alone fails (`_settle`)
                        row.finish_reason, row.error = "error", failure(exc)
        tokens = torch.argmax(scores, dim=-1)
        sampled = [b for b, row in enumerate(rows) if not row.request.greedy]
        if sampled:
            requests = [rows[b].request for b in sampled]
            at = torch.tensor(sampled, device=tokens.device)
            tokens[at] = sample_batch(scores[at], [r.temperature for r in requests],
                                      [r.top_p for r in requests], [r.top_k for r in requests],
                                      [rows[b].rng.random() for b in sampled])
        return tokens

    def _advance(self, row: _Row, token: int, logprob: TokenLogprob | None = None) -> Chunk:
        req = row.request
        new_ids = []
        if token in self.eos_ids and not req.ignore_eos:
            row.finish_reason = "stop"
        else:
            row.generated.append(token)
            new_ids.append(token)
            if len(row.generated) >= req.max_tokens:
                row.finish_reason = "length"
        text = self.detokenizer.extend(row, final=row.finish_reason is not None)
        # As vLLM: stop strings count only from the min_tokens-th token on, and only in text
        # that came after the last token below it.
        stops_count = len(row.generated) >= req.min_tokens
        for stop in req.stop if stops_count else ():
            at = text.find(stop, max(row.stop_floor, row.emitted - len(stop)))
            if stop and at != -1:
                text, row.finish_reason = text[:at], "stop"
        if row.finish_reason is None:
            end = len(text) - (row.hold_back if stops_count else 0)
            while end > row.emitted and text[end - 1] == "\ufffd":  # a character still incomplete
                end -= 1
        else:
            end = len(text)
        new_text = text[row.emitted:end] if end > row.emitted else ""
        row.emitted = max(row.emitted, end)
        if not stops_count:
            row.stop_floor = row.emitted
        chunk = Chunk(text=new_text, token_ids=new_ids, completion_tokens=len(row.generated),
                      prompt_tokens=len(req.prompt_ids), finish_reason=row.finish_reason)
        if req.logprobs is not None:  # the EOS that ended it too (see `Chunk.logprobs`)
            chunk.logprobs = [logprob] if logprob is not None else []
        if row.prompt_logprobs is not None:
            chunk.prompt_logprobs, row.prompt_logprobs = row.prompt_logprobs, None
        return chunk


def decode_all(model, tokenizer, requests: list[GenerationRequest],
               decoder: BatchDecoder | None = None) -> list[dict]:
    """Run a batch to the end (on `decoder`, an empty one, else a new `BatchDecoder`); per
    request: text, token_ids, finish_reason, logprobs and prompt_logprobs (None unless asked)
    (for tests, tools, batch generation)."""
    decoder = decoder if decoder is not None else BatchDecoder(model, tokenizer)
    first = decoder.add(requests)[0] if requests else 0
    chunks: list[list[Chunk]] = [[] for _ in requests]
    while not decoder.done:
        for index, chunk in decoder.step().items():
            chunks[index - first].append(chunk)
    merged = [merge_chunks(c) for c in chunks]
    for number, chunk in enumerate(merged):
        if chunk.finish_reason == "error":
            raise RowFailed(f"request {number} of {len(merged)} failed: {chunk.error}")
    return [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
             "logprobs": c.logprobs, "prompt_logprobs": c.prompt_logprobs} for c in merged]
