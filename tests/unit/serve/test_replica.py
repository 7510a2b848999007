"""The replica's batch loop without Ray Serve: a stream that falls behind the decode loop gets
what queued meanwhile as one chunk, and loses nothing."""

import asyncio
import functools

import pytest
from transformers import AutoModelForCausalLM

from aigc_ray.decode.engine import decode_all
from aigc_ray.decode.request import GenerationRequest
from aigc_ray.serve.replica import Batcher
from aigc_ray.tokenizer import load_tokenizer


class Sink:
    """Stands in for the replica's Prometheus metrics (Ray's need a Serve replica)."""

    def __init__(self):
        self.seen = []

    def inc(self, value):
        self.seen.append(value)

    observe = inc


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def test_a_stream_that_falls_behind_gets_the_queued_steps_as_one_chunk(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    metrics = {name: Sink() for name in ("ttft", "tpot", "tokens", "batch_size")}
    batcher = Batcher(model, tokenizer, max_rows=4, wait_s=0, metrics=metrics)
    ids = tokenizer("Customer: I want a refund for my Orbit Watch.\nAgent:")["input_ids"]
    want = decode_all(model, tokenizer, [GenerationRequest(ids, 24, temperature=0,
                                                           ignore_eos=True)])[0]

    async def stream(lag: float) -> list:
        chunks = []
        async for chunk in batcher.submit(GenerationRequest(ids, 24, temperature=0,
                                                            ignore_eos=True)):
            chunks.append(chunk)
            await asyncio.sleep(lag)  # a slow reader: the decode thread runs ahead meanwhile
        return chunks

    for lag in (0.0, 0.05):
        chunks = asyncio.run(stream(lag))
        assert [t for c in chunks for t in c.token_ids] == want["token_ids"]
        assert "".join(c.text for c in chunks) == want["text"]
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 24
        if lag:
            assert len(chunks) <= 6  # 24 steps of ~1 ms behind a 50 ms reader: merged


def test_tokens_decoded_before_a_failed_step_are_still_recorded(model_and_tokenizer,
                                                                 monkeypatch):
    """Metrics ride with chunk deliveries. A whole (non-streamed) completion hands out nothing
    until its end, and a step that raises delivers only the error: the loop records the
    metrics it holds once it goes idle, before it waits for the next request."""
    model, tokenizer = model_and_tokenizer
    forward, calls = model.forward, []

    @functools.wraps(forward)  # the decoder reads the forward's signature
    def failing_sixth_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("a stand-in for CUDA running out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing_sixth_forward)
    metrics = {name: Sink() for name in ("ttft", "tpot", "tokens", "batch_size")}
    batcher = Batcher(model, tokenizer, max_rows=4, wait_s=0, metrics=metrics)
    ids = tokenizer("Customer: where is my parcel?\nAgent:")["input_ids"]

    async def fail_then_wait():
        with pytest.raises(RuntimeError, match="stand-in"):
            [c async for c in batcher.submit(GenerationRequest(ids, 20, temperature=0,
                                                               ignore_eos=True), stream=False)]
        for _ in range(100):  # the decode thread goes idle and hands over what it holds
            if metrics["tokens"].seen:
                break
            await asyncio.sleep(0.05)

    asyncio.run(fail_then_wait())
    assert sum(metrics["tokens"].seen) == 5  # the prefill's token and four steps' after it
    assert metrics["batch_size"].seen == [1] and len(metrics["ttft"].seen) == 1
    assert metrics["tpot"].seen == []  # no completion ended


# --- one request cannot fail its batch, and nothing leaves a caller waiting ------------------


def new_batcher(model, tokenizer, **settings) -> Batcher:
    metrics = {name: Sink() for name in ("ttft", "tpot", "tokens", "batch_size")}
    # A wide batch window: requests submitted together are admitted together.
    return Batcher(model, tokenizer, **{"max_rows": 8, "wait_s": 0.2, "metrics": metrics,
                                        **settings})


async def outcome(batcher: Batcher, request: GenerationRequest, stream: bool = False):
    """The request's text, or the exception that failed it."""
    try:
        return "".join([c.text async for c in batcher.submit(request, stream=stream)])
    except Exception as exc:
        return exc


PLAIN = ["Customer: where is my parcel?\nAgent:", "Hi", "Customer: I want a refund.\nAgent:"]


def greedy(tokenizer, prompt: str, n: int = 12) -> GenerationRequest:
    return GenerationRequest(tokenizer(prompt)["input_ids"], n, temperature=0, ignore_eos=True)


def test_a_poisoned_request_fails_alone_and_the_plain_ones_get_their_solo_text(
        model_and_tokenizer, monkeypatch):
    from aigc_ray.decode.request import RequestError, RowFailed

    model, tokenizer = model_and_tokenizer
    solo = [decode_all(model, tokenizer, [greedy(tokenizer, p)])[0]["text"] for p in PLAIN]
    # A prompt the model cannot take (a stand-in for whatever checks miss): its prefill raises
    # whenever the poison token is in the batch, as an out-of-range id did.
    poison = tokenizer.eos_token_id
    forward = model.forward

    @functools.wraps(forward)
    def forward_that_chokes_on_the_poison(*args, **kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and (ids[:, 0] == poison).any():
            raise RuntimeError("a stand-in for a device-side assert")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_that_chokes_on_the_poison)
    batcher = new_batcher(model, tokenizer)
    ids = tokenizer(PLAIN[0])["input_ids"]

    async def together():
        return await asyncio.gather(
            outcome(batcher, greedy(tokenizer, PLAIN[0])),
            outcome(batcher, GenerationRequest([poison, *ids], 12, temperature=0)),
            outcome(batcher, greedy(tokenizer, PLAIN[1]), stream=True),
            outcome(batcher, GenerationRequest(ids, 12, repetition_penalty=float("inf"))),
            outcome(batcher, GenerationRequest(ids, 12, temperature=1e-40, ignore_eos=True)),
            outcome(batcher, GenerationRequest([1, 2], 10_000, temperature=0)),
            outcome(batcher, greedy(tokenizer, PLAIN[2])))

    got = asyncio.run(together())
    assert max(metrics_seen(batcher, "batch_size")) > 2  # they really shared a batch
    assert [got[0], got[2], got[6]] == solo
    assert got[4] == solo[0]  # a temperature of 1e-40 decodes greedily
    assert isinstance(got[1], RowFailed) and "device-side assert" in str(got[1])
    assert isinstance(got[3], RequestError) and "repetition_penalty" in str(got[3])
    assert isinstance(got[5], RequestError) and "context" in str(got[5])
    assert asyncio.run(outcome(batcher, greedy(tokenizer, PLAIN[1]))) == solo[1]  # still serving


def metrics_seen(batcher: Batcher, name: str) -> list:
    return batcher.metrics[name].seen


def test_slot_admission_errors_fail_their_request_not_the_decode_thread(model_and_tokenizer):
    # SlotDecoder.add once raised inside the loop's admission, outside its error handling: the
    # decode thread died and every caller waited forever.
    from aigc_ray.decode.graphs import StaticStep
    from aigc_ray.decode.request import RequestError

    model, tokenizer = model_and_tokenizer
    step = StaticStep(model, tokenizer, slots=4, graphs=False)
    batcher = new_batcher(model, tokenizer, max_rows=4, step=step)
    solo = decode_all(model, tokenizer, [greedy(tokenizer, PLAIN[0])])[0]["text"]

    async def together():
        return await asyncio.gather(
            outcome(batcher, GenerationRequest([1] * 100, step.width, temperature=0)),
            outcome(batcher, greedy(tokenizer, PLAIN[0])))

    too_long, plain = asyncio.run(together())
    assert isinstance(too_long, RequestError) and "context" in str(too_long)
    assert plain == solo and batcher.thread.is_alive() and batcher.trouble() is None


def test_a_caller_whose_decode_loop_is_stuck_gets_an_error_not_a_wait(model_and_tokenizer,
                                                                      monkeypatch):
    import threading

    model, tokenizer = model_and_tokenizer
    forward, release = model.forward, threading.Event()

    @functools.wraps(forward)
    def stuck_forward(*args, **kwargs):
        release.wait(60)  # a wedged step: a hung kernel, a deadlock
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", stuck_forward)
    batcher = new_batcher(model, tokenizer, stall_s=0.5)
    failed = asyncio.run(outcome(batcher, greedy(tokenizer, PLAIN[1], 3)))
    assert isinstance(failed, RuntimeError) and "has not moved" in str(failed)
    assert "has not moved" in batcher.trouble()
    release.set()  # the step ends after all: the loop goes on serving
    monkeypatch.setattr(model, "forward", forward)
    assert asyncio.run(outcome(batcher, greedy(tokenizer, PLAIN[1], 3))) == decode_all(
        model, tokenizer, [greedy(tokenizer, PLAIN[1], 3)])[0]["text"]


def test_the_idle_decode_loop_keeps_beating_and_health_needs_no_generation(
        model_and_tokenizer):
    import time

    from aigc_ray.serve.replica import BEAT_S

    model, tokenizer = model_and_tokenizer
    batcher = new_batcher(model, tokenizer)
    batcher.start()
    first = batcher.beat
    time.sleep(3 * BEAT_S)
    assert batcher.beat > first and batcher.trouble() is None
    assert batcher.admitted == 0  # nothing was generated to find that out
