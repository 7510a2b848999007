"""The static-slot decode engine without Ray: the same tokens, logprobs and chunks as the padded
`BatchDecoder` (eager on CPU; captured as CUDA graphs on a GPU, where one test compares the two),
rows joining while slots are free and waiting while none are, rows moving down to a smaller
bucket, and the models it refuses."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from aigc_ray.decode.engine import BatchDecoder, decode_all
from aigc_ray.decode.graphs import (
    SlotDecoder,
    StaticStep,
    new_decoder,
    static_step_for,
    unsupported,
)
from aigc_ray.decode.request import GenerationRequest
from aigc_ray.tokenizer import load_tokenizer

PROMPTS = ["Customer: I want a refund for my Orbit Watch.\nAgent:", "Hi",
           "Customer: How do I reset my password for Nimbus Drive? It keeps failing.\nAgent:",
           "Agent: Hello, how can I help?", "Customer: my order"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def requests(tokenizer, **settings) -> list[GenerationRequest]:
    """Greedy and seeded sampled rows of different lengths, with logprobs."""
    lengths, temperatures = [20, 6, 30, 12, 9], [0, 0.9, 0, 1.0, 0.7]
    return [GenerationRequest(tokenizer(p)["input_ids"], n, temperature=t, top_p=0.95, seed=i,
                              logprobs=2, ignore_eos=True, **settings)
            for i, (p, n, t) in enumerate(zip(PROMPTS, lengths, temperatures))]


def run_with_joins(decoder: BatchDecoder, reqs: list[GenerationRequest]) -> dict:
    """Two requests start, three join at the third step; per request: tokens, logprobs, the
    text and finish reason of its chunks."""
    out: dict[int, dict] = {}
    decoder.add(reqs[:2])
    steps = 0
    while not decoder.done or steps < 3:
        if steps == 2:
            decoder.add(reqs[2:])
        for index, chunk in decoder.step().items():
            row = out.setdefault(index, {"tokens": [], "logprobs": [], "text": ""})
            row["tokens"] += chunk.token_ids
            row["logprobs"] += [e.logprob for e in chunk.logprobs or []]
            row["text"] += chunk.text
            row["finish_reason"] = chunk.finish_reason
        steps += 1
    return out


def assert_same_rows(got: dict, want: dict, logprob_tolerance: float = 1e-4) -> None:
    assert sorted(got) == sorted(want)
    for index in want:
        assert got[index]["tokens"] == want[index]["tokens"], index
        assert got[index]["text"] == want[index]["text"]
        assert got[index]["finish_reason"] == want[index]["finish_reason"]
        assert got[index]["logprobs"] == pytest.approx(want[index]["logprobs"],
                                                       abs=logprob_tolerance)


def test_slots_decode_what_the_padded_batch_decodes_with_joins_and_waits(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    want = run_with_joins(BatchDecoder(model, tokenizer), requests(tokenizer))
    step = StaticStep(model, tokenizer, slots=4, graphs=False)
    assert step.slots == 4 and step.buckets == [1, 2, 4] and not step.graphs
    decoder = SlotDecoder(model, tokenizer, step)
    got = run_with_joins(decoder, requests(tokenizer))
    assert_same_rows(got, want)  # five requests through four slots: one waited for a slot
    assert not decoder.rows and sorted(decoder.free) == [0, 1, 2, 3]
    # The same step serves the next batch (a replica keeps one for its life).
    assert_same_rows(run_with_joins(SlotDecoder(model, tokenizer, step), requests(tokenizer)),
                     want)


def test_a_rotary_gqa_model_decodes_in_slots_as_in_the_padded_batch(model_and_tokenizer,
                                                                      random_lm):
    """Llama's shape (rotary positions, grouped key/value heads), random weights."""
    _, tokenizer = model_and_tokenizer
    model = random_lm("llama", tokenizer, hidden_size=64, intermediate_size=128,
                      max_position_embeddings=256)
    assert unsupported(model, tokenizer) is None
    want = run_with_joins(BatchDecoder(model, tokenizer), requests(tokenizer))
    step = StaticStep(model, tokenizer, slots=4, graphs=False)
    assert step.keys[0].shape == (4, 2, 256, 16)  # the key/value heads, not the query heads
    assert_same_rows(run_with_joins(SlotDecoder(model, tokenizer, step), requests(tokenizer)),
                     want)


def test_a_request_waits_until_a_slot_frees(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    step = StaticStep(model, tokenizer, slots=2, graphs=False)
    reqs = requests(tokenizer)[:3]
    decoder = SlotDecoder(model, tokenizer, step, reqs)
    started = []
    while not decoder.done:
        started.append(len(decoder.active))
        decoder.step()
        assert len(decoder.active) <= 2
    # The third request started only when the 6-token one had finished.
    assert started[:3] == [0, 2, 2] and len(decoder.waiting) == 0
    results = decode_all(model, tokenizer, reqs, decoder=SlotDecoder(model, tokenizer, step))
    assert [r["token_ids"] for r in results] == [
        r["token_ids"] for r in decode_all(model, tokenizer, requests(tokenizer)[:3])]


def test_rows_move_down_when_a_smaller_bucket_would_cover_them(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    step = StaticStep(model, tokenizer, slots=8, graphs=False)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    short = [GenerationRequest(ids[i % 5], 2, temperature=0, ignore_eos=True) for i in range(4)]
    long = GenerationRequest(ids[2], 12, temperature=0, ignore_eos=True)
    decoder = SlotDecoder(model, tokenizer, step, [*short, long])
    chunks = decoder.step()  # the prefill: slots 0-4
    assert decoder.slot_of == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
    tokens, alone_in = list(chunks[4].token_ids), []
    while not decoder.done:
        tokens += decoder.step()[4].token_ids
        if set(decoder.rows) == {4}:
            alone_in.append(decoder.slot_of[4])
    # Once alone, it moved from slot 4 to slot 0 at its next step: bucket 1 runs, not 8.
    assert alone_in[0] == 4 and set(alone_in[1:]) == {0}
    assert tokens == decode_all(model, tokenizer, [long])[0]["token_ids"]


def test_stops_penalties_and_cancels_behave_as_in_the_padded_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(PROMPTS[0])["input_ids"]
    full = decode_all(model, tokenizer, [GenerationRequest(ids, 16, temperature=0,
                                                           ignore_eos=True)])[0]
    reqs = [GenerationRequest(ids, 16, temperature=0, stop=[full["text"][4:6]]),
            GenerationRequest(ids, 10, temperature=0, repetition_penalty=1.4,
                              presence_penalty=0.5, top_k=3),
            GenerationRequest(ids, 8, temperature=0, min_tokens=8)]
    step = StaticStep(model, tokenizer, slots=4, graphs=False)
    assert decode_all(model, tokenizer, reqs, decoder=SlotDecoder(model, tokenizer, step)) == \
        decode_all(model, tokenizer, reqs)
    decoder = SlotDecoder(model, tokenizer, step, [GenerationRequest(ids, 10, temperature=0)
                                                   for _ in range(3)])
    decoder.step()
    decoder.cancel(1)
    chunks = decoder.step()
    assert set(chunks) == {0, 2} and 1 not in decoder.slot_of
    assert decoder.slot_of == {0: 0, 2: 1}  # its slot was freed and row 2 moved into it


def test_max_rows_refills_slots_as_rows_finish(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    step = StaticStep(model, tokenizer, slots=4, graphs=False)
    reqs = requests(tokenizer)
    decoder = SlotDecoder(model, tokenizer, step, max_rows=2)
    rows_per_step, step_once = [], decoder.step

    def counted_step():
        chunks = step_once()
        rows_per_step.append(len(chunks))
        return chunks

    decoder.step = counted_step
    results = decode_all(model, tokenizer, reqs, decoder)
    assert max(rows_per_step) == 2  # never more than max_rows, though 4 slots were free
    for got, want in zip(results, decode_all(model, tokenizer, requests(tokenizer))):
        assert (got["token_ids"], got["text"]) == (want["token_ids"], want["text"])
        assert [e.logprob for e in got["logprobs"]] == pytest.approx(
            [e.logprob for e in want["logprobs"]], abs=1e-4)
    assert set(decoder.free) == {0, 1, 2, 3}


def test_a_request_longer_than_the_context_is_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    step = StaticStep(model, tokenizer, slots=1, graphs=False)
    with pytest.raises(ValueError, match="context"):
        SlotDecoder(model, tokenizer, step, [GenerationRequest([1] * 100, step.width,
                                                               temperature=0)])


def test_models_the_slots_cannot_hold_say_why(model_and_tokenizer, random_lm):
    model, tokenizer = model_and_tokenizer
    assert unsupported(model, tokenizer) is None
    assert isinstance(new_decoder(model, tokenizer, None), BatchDecoder)
    assert static_step_for(model, tokenizer, 4, True) == (None, None)  # CPU: the padded engine
    sliding = random_lm("mistral", tokenizer, sliding_window=32)
    assert "sliding window" in unsupported(sliding, tokenizer)
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert "flash_attention_2" in unsupported(model, tokenizer)
    finally:
        model.config._attn_implementation = "sdpa"


def test_a_poisoned_row_fails_alone_in_the_slots_too(model_and_tokenizer):
    # As in decode/test_engine.py: poisons past every check fail their own row, and the rest decode
    # what the padded batch decodes for them; the broken prompt's prefill takes no slot.
    model, tokenizer = model_and_tokenizer
    vocab = model.config.vocab_size
    plain = requests(tokenizer)
    want = decode_all(model, tokenizer, plain)
    step = StaticStep(model, tokenizer, slots=4, graphs=False)
    decoder = SlotDecoder(model, tokenizer, step)
    ids = decoder.add(plain[:2]) + decoder.add([GenerationRequest(
        tokenizer(PROMPTS[2])["input_ids"], 8, temperature=0.8, repetition_penalty=1.2)])
    decoder.rows[ids[2]].request.repetition_penalty = float("nan")
    chunks: dict[int, list] = {}
    for number in range(100):
        if number == 2:
            ids += decoder.add(plain[2:4])
            [broken] = decoder.add([GenerationRequest([1, 2, 3], 5, temperature=0)])
            decoder.rows[broken].request.prompt_ids = [1, vocab + 1, 3]
        for index, chunk in decoder.step().items():
            chunks.setdefault(index, []).append(chunk)
        if decoder.done and number > 2:
            break
    for index, result in zip((ids[0], ids[1], ids[3], ids[4]), want[:4]):
        assert [t for c in chunks[index] for t in c.token_ids] == result["token_ids"]
        assert "".join(c.text for c in chunks[index]) == result["text"]
    assert chunks[ids[2]][-1].finish_reason == "error"
    assert "outside the vocabulary" in chunks[ids[2]][-1].error
    assert [c.finish_reason for c in chunks[broken]] == ["error"]
    assert set(decoder.free) == {0, 1, 2, 3} and not decoder.rows


# The serving dtype is bf16 on a GPU (serve.dtype auto), so the captured graphs must give the
# padded engine's tokens there, not only in float32 (logprobs as close as bf16 logits allow).
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, logprob_tolerance", [(torch.float32, 1e-4),
                                                      (torch.bfloat16, 5e-2)])
def test_captured_cuda_graphs_decode_what_the_padded_batch_decodes(tiny_model_dir, dtype,
                                                                   logprob_tolerance):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).to("cuda").eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    want = run_with_joins(BatchDecoder(model, tokenizer), requests(tokenizer))
    step, note = static_step_for(model, tokenizer, 4, True)
    assert step is not None and "decoding with CUDA graphs: 4 rows" in note, note
    assert step.graph_error is None and len(step.graphs) == len(step.buckets) * len(step.spans)
    assert step.keys[0].dtype == dtype
    assert_same_rows(run_with_joins(SlotDecoder(model, tokenizer, step), requests(tokenizer)),
                     want, logprob_tolerance)
