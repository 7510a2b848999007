"""The replica's batch loop without Ray Serve: a stream that falls behind the decode loop gets
what queued meanwhile as one chunk, and loses nothing."""

import asyncio

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


def test_a_cancelled_whole_completion_still_counts_its_tokens_once_idle(model_and_tokenizer):
    """Metrics ride with chunk deliveries; a whole (non-streamed) completion whose caller left
    delivers none, so the loop records what it holds before it waits for the next request."""
    model, tokenizer = model_and_tokenizer
    metrics = {name: Sink() for name in ("ttft", "tpot", "tokens", "batch_size")}
    batcher = Batcher(model, tokenizer, max_batch_size=4, wait_s=0, metrics=metrics)
    ids = tokenizer("Customer: where is my parcel?\nAgent:")["input_ids"]

    async def leave_early():
        async def whole():
            return [c async for c in batcher.submit(
                GenerationRequest(ids, 100_000, temperature=0, ignore_eos=True), stream=False)]
        task = asyncio.create_task(whole())
        await asyncio.sleep(0.3)  # well under METRICS_WAIT_S: nothing recorded yet
        task.cancel()
        for _ in range(50):  # the decode thread goes idle and hands over what it holds
            await asyncio.sleep(0.05)
            if metrics["tokens"].seen:
                break

    asyncio.run(leave_early())
    assert metrics["batch_size"].seen == [1]
    assert sum(metrics["tokens"].seen) > 0, "tokens decoded for a cancelled caller went unrecorded"
