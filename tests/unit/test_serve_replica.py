"""The replica's batch loop without Ray Serve: a stream that falls behind the decode loop gets
what queued meanwhile as one chunk, and loses nothing."""

import asyncio
import functools

import pytest
from transformers import AutoModelForCausalLM

from aigc_ray.decode import GenerationRequest, decode_all
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
    batcher = Batcher(model, tokenizer, max_batch_size=4, wait_s=0, metrics=metrics)
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
    batcher = Batcher(model, tokenizer, max_batch_size=4, wait_s=0, metrics=metrics)
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
