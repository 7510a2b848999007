"""Batched decoding without Ray: same tokens as `generate`, per-row settings, rows leave early."""

import pytest
from transformers import AutoModelForCausalLM

from aigc_ray.model import load_tokenizer
from aigc_ray.serve_decode import BatchDecoder, GenerationRequest, decode_all

PROMPTS = ["Customer: I want a refund for my Orbit Watch.\nAgent:", "Hi",
           "Customer: How do I reset my password for Nimbus Drive? It keeps failing.\nAgent:"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def generate_ids(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_left_padded_greedy_batch_equals_generate_with_per_row_max_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    lengths = [12, 3, 7]
    requests = [GenerationRequest(prompt_ids=tokenizer(p)["input_ids"], max_tokens=n,
                                  temperature=0) for p, n in zip(PROMPTS, lengths)]
    decoder = BatchDecoder(model, tokenizer, requests)
    results = [[] for _ in requests]
    sizes = []
    while not decoder.done:
        sizes.append(decoder.batch_size)
        for index, chunk in enumerate(decoder.step()):
            if chunk is not None:
                results[index] += chunk.token_ids
    for prompt, n, got in zip(PROMPTS, lengths, results):
        assert got == generate_ids(model, tokenizer, prompt, n)
    assert sizes[0] == 3 and sizes[-1] == 1  # finished rows left the batch


def test_stop_string_ends_the_row_before_it(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(PROMPTS[0])["input_ids"]
    full = decode_all(model, tokenizer, [GenerationRequest(ids, 16, temperature=0)])[0]["text"]
    stop = full[4:6]
    cut = decode_all(model, tokenizer, [GenerationRequest(ids, 16, temperature=0, stop=[stop])])[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.index(stop)]


def test_seeded_sampling_does_not_depend_on_batch_companions(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer

    def sampled(seed, companions):
        requests = [GenerationRequest(tokenizer(PROMPTS[0])["input_ids"], 10, temperature=0.9,
                                      top_p=0.95, seed=seed)]
        requests += [GenerationRequest(tokenizer(p)["input_ids"], 10, temperature=1.0)
                     for p in companions]
        return decode_all(model, tokenizer, requests)[0]["token_ids"]

    assert sampled(3, []) == sampled(3, PROMPTS[1:]) != sampled(4, [])


def test_cancelled_row_stops_costing_compute(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    requests = [GenerationRequest(tokenizer(p)["input_ids"], 10, temperature=0) for p in PROMPTS]
    decoder = BatchDecoder(model, tokenizer, requests)
    decoder.step()
    decoder.cancel(1)
    chunks = decoder.step()
    assert chunks[1] is None and decoder.batch_size == 2
