"""Batched decoding without Ray: same tokens as `generate`, per-row settings, rows leave early
and join a running batch."""


import pytest
from transformers import AutoModelForCausalLM

from aigc_ray.decode.engine import BatchDecoder, decode_all
from aigc_ray.decode.request import GenerationRequest, RequestError
from aigc_ray.tokenizer import context_length, load_tokenizer

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
        model_and_tokenizer, random_lm):
    # Sliding-window KV layers cannot be left-padded and joined: a request added mid-batch
    # waits until the running rows finish, then decodes as it would alone.
    _, tokenizer = model_and_tokenizer
    model = random_lm("mistral", tokenizer, sliding_window=32)
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


# --- min_tokens / ignore_eos, logprobs through the engine -----------------------------------


def test_ignore_eos_and_min_tokens_hold_a_completion_to_length(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(PROMPTS[0])["input_ids"]
    # Make the token greedy decoding picks first the end of text, so it would end at once.
    first = decode_all(model, tokenizer, [GenerationRequest(ids, 1, temperature=0)])[0]

    def run(**settings):
        decoder = BatchDecoder(model, tokenizer, [GenerationRequest(ids, temperature=0,
                                                                    **settings)])
        decoder.eos_ids = set(first["token_ids"])
        chunks = []
        while not decoder.done:
            chunks += decoder.step().values()
        return [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason

    assert run(max_tokens=10) == ([], "stop")
    tokens, reason = run(max_tokens=10, ignore_eos=True)
    assert len(tokens) == 10 and reason == "length" and tokens[0] == first["token_ids"][0]
    tokens, reason = run(max_tokens=10, min_tokens=6)
    assert len(tokens) >= 6 and first["token_ids"][0] not in tokens[:6]
    tokens, reason = run(max_tokens=6, min_tokens=6)
    assert len(tokens) == 6 and reason == "length"


def test_stop_strings_do_not_end_a_completion_before_min_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(PROMPTS[0])["input_ids"]
    full = decode_all(model, tokenizer, [GenerationRequest(ids, 16, temperature=0,
                                                           ignore_eos=True)])[0]
    stop = full["text"][1:3]  # found within the first tokens
    early = decode_all(model, tokenizer, [GenerationRequest(ids, 16, temperature=0, stop=[stop],
                                                            ignore_eos=True)])[0]
    assert early["finish_reason"] == "stop" and len(early["token_ids"]) < 12
    held = decode_all(model, tokenizer, [GenerationRequest(ids, 16, temperature=0, stop=[stop],
                                                           ignore_eos=True, min_tokens=12)])[0]
    assert len(held["token_ids"]) >= 12
    assert held["token_ids"][:12] == full["token_ids"][:12]
    assert full["text"].startswith(held["text"])


def expected_logprobs(model, prompt_ids, generated):
    """log_softmax of the model's logits (plain transformers, one unpadded forward pass) at
    each generated position: [V] per generated token."""
    import torch

    ids = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)[len(prompt_ids) - 1:-1]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_log_softmax_of_the_models_logits_single_and_batched(
        model_and_tokenizer, temperature):
    import torch

    model, tokenizer = model_and_tokenizer
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]

    def request(i, **settings):
        return GenerationRequest(ids[i], 8, temperature=temperature, seed=i, logprobs=3,
                                 ignore_eos=True, **settings)

    alone = decode_all(model, tokenizer, [request(0)])
    # Batched: different prompt lengths (left padding), a row without logprobs beside them
    # and one with penalties (its logprobs are still the model's own, before the penalty).
    batched = decode_all(model, tokenizer, [
        request(0), request(1, repetition_penalty=1.5, presence_penalty=1.0),
        GenerationRequest(ids[2], 8, temperature=temperature), request(2)])
    assert batched[2]["logprobs"] is None
    assert batched[0]["token_ids"] == alone[0]["token_ids"]
    for prompt, result in [(ids[0], alone[0]), (ids[0], batched[0]), (ids[1], batched[1]),
                           (ids[2], batched[3])]:
        want = expected_logprobs(model, prompt, result["token_ids"])
        assert [e.token_id for e in result["logprobs"]] == result["token_ids"]
        got = torch.tensor([e.logprob for e in result["logprobs"]])
        chosen = want.gather(1, torch.tensor(result["token_ids"]).unsqueeze(1)).squeeze(1)
        assert torch.allclose(got, chosen, atol=1e-4)
        for row, entry in zip(want, result["logprobs"]):
            values, top_ids = torch.topk(row, 3)
            assert [t for t, _ in entry.top] == top_ids.tolist()
            assert torch.allclose(torch.tensor([v for _, v in entry.top]), values, atol=1e-4)
        if temperature == 0:  # greedy: the chosen token is the likeliest one
            assert all(e.top[0][0] == e.token_id for e in result["logprobs"]) or \
                result is batched[1]


def test_prompt_logprobs_are_log_softmax_over_the_prompt(model_and_tokenizer):
    import torch

    model, tokenizer = model_and_tokenizer
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    results = decode_all(model, tokenizer, [
        GenerationRequest(ids[0], 2, temperature=0, logprobs=0, prompt_logprobs=2),
        GenerationRequest(ids[1], 2, temperature=0, logprobs=0, prompt_logprobs=2)])
    for prompt, result in zip(ids, results):
        entries = result["prompt_logprobs"]
        assert len(entries) == len(prompt) and entries[0] is None
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0]
        want = torch.log_softmax(logits, dim=-1)[:-1]
        for j, entry in enumerate(entries[1:]):
            assert entry.token_id == prompt[j + 1]
            assert abs(entry.logprob - float(want[j, prompt[j + 1]])) < 1e-4
            assert [t for t, _ in entry.top] == torch.topk(want[j], 2).indices.tolist()
        assert [e.top for e in result["logprobs"]] == [[], []]  # logprobs=0: the token's own


def test_max_tokens_0_scores_the_prompt_alone_and_never_joins_the_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    echoed = decode_all(model, tokenizer, [
        GenerationRequest(ids[0], 1, temperature=0, logprobs=1, prompt_logprobs=1)])[0]
    alone = [decode_all(model, tokenizer, [GenerationRequest(ids[i], n, temperature=0)])[0]
             for i, n in ((1, 6), (2, 3))]

    decoder = BatchDecoder(model, tokenizer)
    running = decoder.add([GenerationRequest(ids[1], 6, temperature=0)])[0]
    chunks = {running: list(decoder.step().values())}
    scored, joining = decoder.add([
        GenerationRequest(ids[0], 0, temperature=0, logprobs=1, prompt_logprobs=1),
        GenerationRequest(ids[2], 3, temperature=0)])
    step = decoder.step()
    assert decoder.active == [running, joining]  # the scored prompt holds no row
    score = step.pop(scored)
    assert (score.finish_reason, score.token_ids, score.logprobs, score.completion_tokens) == \
        ("length", [], [], 0)
    got, want = score.prompt_logprobs, echoed["prompt_logprobs"]
    assert [e and (e.token_id, e.top[0][0]) for e in got] == \
        [e and (e.token_id, e.top[0][0]) for e in want]
    assert [e and e.logprob for e in got] == pytest.approx([e and e.logprob for e in want])
    while True:  # the batch decodes on as if the scored prompt had never come
        for index, chunk in step.items():
            chunks.setdefault(index, []).append(chunk)
        if decoder.done:
            break
        step = decoder.step()
    assert [[t for c in chunks[i] for t in c.token_ids] for i in (running, joining)] == \
        [a["token_ids"] for a in alone]
    # Refused where nothing asks for the scores: max_tokens 0 is for scoring only.
    with pytest.raises(RequestError, match="0 only to score the prompt"):
        decoder.add([GenerationRequest(ids[0], 0)])


def test_the_eos_that_ends_a_completion_has_its_logprob(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(PROMPTS[0])["input_ids"]
    first = decode_all(model, tokenizer, [GenerationRequest(ids, 1, temperature=0)])[0]
    decoder = BatchDecoder(model, tokenizer)
    decoder.eos_ids = set(first["token_ids"])  # the greedy first token now ends it
    result = decode_all(model, tokenizer, [GenerationRequest(ids, 4, temperature=0, logprobs=1)],
                        decoder=decoder)[0]
    assert (result["finish_reason"], result["token_ids"], result["text"]) == ("stop", [], "")
    [entry] = result["logprobs"]  # no text, no token id, but the model chose it: listed
    assert entry.token_id == first["token_ids"][0] and entry.top[0][0] == entry.token_id


def test_the_kv_cache_writes_into_spare_room_instead_of_reallocating(model_and_tokenizer):
    import torch

    from aigc_ray.decode.engine import new_cache

    model, _ = model_and_tokenizer
    layer = new_cache(model.config).layers[0]
    first = layer.update(torch.ones(2, 4, 3, 8), torch.ones(2, 4, 3, 8))[0]
    second = layer.update(torch.full((2, 4, 1, 8), 2.0), torch.zeros(2, 4, 1, 8))[0]
    assert second.shape == (2, 4, 4, 8)
    assert second.data_ptr() == first.data_ptr()  # the same buffer: nothing copied
    assert torch.equal(second[:, :, 3], torch.full((2, 4, 8), 2.0))
    layer.batch_select_indices(torch.tensor([1]))  # a row left: the view was replaced
    third = layer.update(torch.full((1, 4, 1, 8), 3.0), torch.zeros(1, 4, 1, 8))[0]
    assert third.shape == (1, 4, 5, 8) and torch.equal(third[0, :, :4], second[1])
    assert torch.equal(third[0, :, 4], torch.full((4, 8), 3.0))


def test_max_rows_keeps_that_many_decoding_and_starts_waiting_rows_as_others_finish(
        model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    requests = [GenerationRequest(tokenizer(p)["input_ids"], n, temperature=0, ignore_eos=True)
                for p, n in zip(PROMPTS * 2, [3, 9, 5, 2, 7, 4])]
    decoder = BatchDecoder(model, tokenizer, requests, max_rows=2)
    steps = []  # (requests waiting before the step, rows it decoded)
    while not decoder.done:
        waiting = len(decoder.waiting)
        steps.append((waiting, len(decoder.step())))
    # Two rows every step while any request waits; only the tail runs fewer.
    assert all(rows == 2 for waiting, rows in steps if waiting)
    assert max(rows for _, rows in steps) == 2 and steps[-1][1] == 1
    assert decode_all(model, tokenizer, requests, BatchDecoder(model, tokenizer, max_rows=2)) \
        == decode_all(model, tokenizer, requests)


def test_room_is_what_max_rows_leaves_and_a_finished_decoder_takes_a_new_batch(
        model_and_tokenizer):
    """The serving replica adds only `room` requests and keeps one decoder from batch to batch."""
    model, tokenizer = model_and_tokenizer
    requests = [GenerationRequest(tokenizer(p)["input_ids"], 4, temperature=0, ignore_eos=True)
                for p in PROMPTS]
    assert BatchDecoder(model, tokenizer).room is None  # no cap
    decoder = BatchDecoder(model, tokenizer, max_rows=2)
    assert decoder.room == 2
    decoder.add(requests[:1])
    assert decoder.room == 1
    decoder.add(requests[1:])  # more than the cap: they wait
    assert decoder.room == 0
    while not decoder.done:
        decoder.step()
    assert decoder.room == 2 and not decoder.rows  # finished rows leave nothing behind
    assert decode_all(model, tokenizer, requests, decoder) == decode_all(model, tokenizer,
                                                                         requests)


# --- one request cannot fail its batch ------------------------------------------------------


def test_an_absurdly_small_temperature_samples_the_greedy_token_never_an_id_past_the_vocabulary(
        model_and_tokenizer):
    import torch

    from aigc_ray.decode.request import MIN_TEMPERATURE
    from aigc_ray.decode.sampling import sample_batch

    # 1e-40 once turned every logit into ±inf: softmax gave NaN and the draw the id 50 (the
    # vocabulary's size), which failed the next forward of every row batched with it.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 50, generator=generator) * 20
    logits[:8] *= 1e36  # near float32's limit: dividing by a tiny temperature overflows
    logits[8:16, ::2] = float("-inf")  # masked tokens (min_tokens, top-k)
    draws = [(i + 0.5) / 40 for i in range(40)]
    for temperature in (1e-40, 1e-30, 1e-8, MIN_TEMPERATURE, MIN_TEMPERATURE / 2):
        picked = sample_batch(logits, [temperature] * 40, [1.0] * 40, [0] * 40, draws)
        assert picked.tolist() == logits.argmax(-1).tolist(), temperature
    for top_p, top_k in ((0.5, 0), (1.0, 3)):
        picked = sample_batch(logits, [1e-40] * 40, [top_p] * 40, [top_k] * 40, draws)
        assert picked.tolist() == logits.argmax(-1).tolist()

    # Through the decoder (serving and `aigc-ray generate` share it): greedy's tokens.
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(PROMPTS[0])["input_ids"]
    tiny, greedy = decode_all(model, tokenizer, [
        GenerationRequest(ids, 12, temperature=1e-40, seed=1, ignore_eos=True),
        GenerationRequest(ids, 12, temperature=0, ignore_eos=True)])
    assert tiny["token_ids"] == greedy["token_ids"]


def test_a_poisoned_request_fails_alone_and_its_batch_neighbours_finish_as_if_alone(
        model_and_tokenizer):
    """Poisons that slipped past every check (values changed after `add` admitted them): a
    NaN repetition penalty on a sampled row makes its draw leave the vocabulary, a prompt id
    past the embedding makes the prefill raise; either ends its own row with an error chunk."""
    model, tokenizer = model_and_tokenizer
    vocab = model.config.vocab_size
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]

    def plain(i, n=10):
        return GenerationRequest(ids[i], n, temperature=0, ignore_eos=True)

    alone = {i: decode_all(model, tokenizer, [plain(i)])[0]["text"] for i in range(3)}
    decoder = BatchDecoder(model, tokenizer)
    first = decoder.add([plain(0), GenerationRequest(ids[1], 10, temperature=0.7, seed=3),
                         GenerationRequest(ids[2], 10, temperature=1e-40), plain(2)])
    nan_row, tiny_row = first[1], first[2]
    decoder.rows[nan_row].request.repetition_penalty = float("nan")
    decoder.rows[nan_row].processed = True
    chunks: dict[int, list] = {}

    def step():
        for index, chunk in decoder.step().items():
            chunks.setdefault(index, []).append(chunk)

    step()
    step()
    # Newcomers joining a running batch, prefilled together with a prompt that breaks the
    # forward: it is prefilled again alone and fails alone.
    late = decoder.add([plain(1), plain(0)])
    broken = decoder.add([plain(2)])[0]
    decoder.rows[broken].request.prompt_ids = ids[2][:-1] + [vocab + 5]
    while not decoder.done:
        step()

    def text(index):
        return "".join(c.text for c in chunks[index])

    assert [text(i) for i in (first[0], first[3], late[0], late[1])] == \
        [alone[0], alone[2], alone[1], alone[0]]
    assert text(tiny_row) == alone[2]  # a temperature of 1e-40 is greedy
    assert chunks[nan_row][-1].finish_reason == "error"
    assert "outside the vocabulary" in chunks[nan_row][-1].error
    assert [c.finish_reason for c in chunks[broken]] == ["error"]
    assert "IndexError" in chunks[broken][0].error and not decoder.rows


@pytest.mark.parametrize("settings, words", [
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"temperature": float("nan")}, "temperature"),
    ({"presence_penalty": float("-inf")}, "presence_penalty"),
    ({"top_p": 0.0}, "top_p"),
    ({"prompt_ids": [1, 10_000]}, "prompt_ids holds token id 10000"),
    ({"prompt_ids": []}, "prompt_ids is empty"),
    ({"max_tokens": 200}, "context of 128"),
])
def test_requests_the_batch_cannot_take_are_refused_at_add_and_nothing_is_admitted(
        model_and_tokenizer, settings, words):
    from aigc_ray.decode.request import RequestError

    model, tokenizer = model_and_tokenizer
    bad = GenerationRequest(**{"prompt_ids": [1, 2], "max_tokens": 4, **settings})
    decoder = BatchDecoder(model, tokenizer)
    with pytest.raises(RequestError, match=words):
        decoder.add([GenerationRequest([1, 2], 4), bad])
    assert decoder.done and not decoder.rows

