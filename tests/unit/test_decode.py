"""Batched decoding without Ray: same tokens as `generate`, per-row settings, rows leave early
and join a running batch."""

import pytest
from transformers import AutoModelForCausalLM

from aigc_ray.decode import BatchDecoder, GenerationRequest, context_length, decode_all
from aigc_ray.tokenizer import load_tokenizer

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
        for index, chunk in decoder.step().items():
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
    assert 1 not in chunks and set(chunks) == {0, 2} and decoder.batch_size == 2


def test_requests_joining_a_running_batch_decode_as_if_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    decoder = BatchDecoder(model, tokenizer, [GenerationRequest(ids[1], 12, temperature=0)])
    results: dict[int, list[int]] = {}
    sizes, widths = [], []

    def step():
        sizes.append(decoder.batch_size)
        for index, chunk in decoder.step().items():
            results.setdefault(index, []).extend(chunk.token_ids)
        if decoder.attention_mask is not None:
            widths.append(decoder.attention_mask.shape[1])

    for _ in range(3):
        step()
    # A longer prompt joins a 3-step-old row (its cache is padded to the newcomer's length),
    # then a short one joins both (it is padded to theirs).
    late = decoder.add([GenerationRequest(ids[2], 5, temperature=0)])
    step()
    later = decoder.add([GenerationRequest(ids[0], 8, temperature=0)])
    while not decoder.done:
        step()
    assert results[0] == generate_ids(model, tokenizer, PROMPTS[1], 12)
    assert results[late[0]] == generate_ids(model, tokenizer, PROMPTS[2], 5)
    assert results[later[0]] == generate_ids(model, tokenizer, PROMPTS[0], 8)
    assert sizes[:5] == [1, 1, 1, 2, 3]
    # When the long-prompt row left, the padding columns only it needed were trimmed.
    assert min(widths[-3:]) < max(widths) and not decoder.rows


def test_a_sliding_window_cache_makes_newcomers_wait_and_still_decodes_right(
        model_and_tokenizer):
    # Sliding-window KV layers cannot be left-padded and joined: a request added mid-batch
    # waits until the running rows finish, then decodes as it would alone.
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    _, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=32,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    first = GenerationRequest(tokenizer(PROMPTS[1])["input_ids"], 5, temperature=0)
    late = GenerationRequest(tokenizer(PROMPTS[0])["input_ids"], 4, temperature=0)
    decoder = BatchDecoder(model, tokenizer, [first])
    assert not decoder.plain_cache
    results: dict[int, list[int]] = {}
    for index, chunk in decoder.step().items():
        results.setdefault(index, []).extend(chunk.token_ids)
    [late_index] = decoder.add([late])
    started_with = None
    while not decoder.done:
        chunks = decoder.step()
        if late_index in chunks and started_with is None:
            started_with = set(decoder.rows) - {late_index}
        for index, chunk in chunks.items():
            results.setdefault(index, []).extend(chunk.token_ids)
    assert len(results[0]) == 5  # it ran all its steps, so the newcomer really waited
    assert started_with == set()  # the first row had left before the newcomer started
    assert results[0] == generate_ids(model, tokenizer, PROMPTS[1], 5)
    assert results[late_index] == generate_ids(model, tokenizer, PROMPTS[0], 4)


def test_context_length_is_the_position_table_else_the_tokenizer_limit(model_and_tokenizer):
    # Serving and batch generation size prompts by this one rule.
    from types import SimpleNamespace

    model, tokenizer = model_and_tokenizer
    assert context_length(model.config, tokenizer) == model.config.n_positions
    no_positions = SimpleNamespace()
    assert context_length(no_positions, SimpleNamespace(model_max_length=512)) == 512
    assert context_length(no_positions, SimpleNamespace(model_max_length=int(1e30))) is None
