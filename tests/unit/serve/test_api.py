"""The OpenAI wire format without Ray: which fields a request may carry, the new sampling
fields' checks and how they reach the decoder, and the two logprobs shapes."""

import json

import pytest

from aigc_ray.decode.request import TokenLogprob
from aigc_ray.serve.api import (
    UNSUPPORTED,
    ApiError,
    ChatRequest,
    CompletionRequest,
    TokenStrings,
    check_sampling,
    choice_logprobs,
    generation_requests,
    parse_body,
)
from aigc_ray.tokenizer import load_tokenizer


def parse(schema=CompletionRequest, **body):
    base = {"prompt": "Hi"} if schema is CompletionRequest else {
        "messages": [{"role": "user", "content": "Hi"}]}
    return parse_body(json.dumps({**base, **body}).encode(), schema)


def refused(schema=CompletionRequest, **body) -> ApiError:
    with pytest.raises(ApiError) as error:
        req = parse(schema, **body)
        check_sampling(req, 16, 1024)
    return error.value


CHAT_ONLY = {"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
             "response_format", "audio", "modalities", "prediction", "reasoning_effort",
             "web_search_options"}
SOME_VALUE = {"response_format": {"type": "json_object"}, "tools": [{"type": "function"}],
              "tool_choice": "auto", "functions": [{"name": "f"}], "function_call": "auto",
              "logit_bias": {"50": 10}, "best_of": 3, "suffix": "end", "store": True,
              "modalities": ["text", "audio"], "service_tier": "flex",
              "parallel_tool_calls": False, "audio": {"voice": "x"}, "reasoning_effort": "low",
              "prediction": {"type": "content"}, "web_search_options": {"x": 1}}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_every_unsupported_field_is_a_400_naming_it(field):
    schema = ChatRequest if field in CHAT_ONLY else CompletionRequest
    error = refused(schema, **{field: SOME_VALUE[field]})
    assert error.status == 400 and error.param == field and field in error.message
    assert error.code == "unsupported_parameter" and "\n" not in error.message


def test_json_mode_and_json_schema_are_refused_not_ignored():
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x"}}):
        error = refused(ChatRequest, response_format=fmt)
        assert error.param == "response_format" and "JSON" in error.message


def test_unknown_fields_are_400_and_no_op_values_pass():
    error = refused(temprature=0.5)
    assert error.param == "temprature" and error.code == "unknown_parameter"
    assert refused(messages=[{"role": "user", "content": "Hi"}]).param == "messages"
    assert refused(ChatRequest, echo=True).param == "echo"  # and the other way round
    assert refused(ChatRequest, messages=[
        {"role": "user", "content": "Hi", "tool_call_id": "1"}]).param == "messages[0].tool_call_id"
    image = refused(ChatRequest, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}])
    assert "messages[0].content[1]" in image.message and "image_url" in image.message
    assert refused(stream_options={"include_usage": True, "chunk": 1}).param == \
        "stream_options.chunk"
    # Nulls, empty lists/objects and values that ask for what we do anyway change nothing.
    req = parse(ChatRequest, user="u1", metadata={"k": "v"}, response_format={"type": "text"},
                tools=[], tool_choice="none", logit_bias={}, store=False, temperature=None,
                messages=[{"role": "assistant", "content": "Hi", "refusal": None,
                           "tool_calls": []}, {"role": "user", "content": "more"}],
                stream_options={"include_usage": True, "include_obfuscation": False})
    assert req.temperature == 1.0 and len(req.messages) == 2
    assert parse(best_of=1, suffix="", echo=False).echo is False
    assert refused(best_of=True).param == "best_of"  # true is not 1


@pytest.mark.parametrize("body, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"top_k": -2}, "top_k"),
    ({"min_tokens": 17}, "min_tokens"),  # above max_tokens (16 here)
    ({"logprobs": 21}, "logprobs"),
])
def test_out_of_range_sampling_fields_are_400(body, param):
    error = refused(**body)
    assert error.status == 400 and error.param == param and "\n" not in error.message


def test_chat_top_logprobs_needs_logprobs_and_a_bound():
    assert refused(ChatRequest, top_logprobs=2).param == "top_logprobs"
    assert refused(ChatRequest, logprobs=True, top_logprobs=21).param == "top_logprobs"


def test_request_fields_reach_the_decoder():
    req = parse(top_k=5, min_tokens=3, ignore_eos=True, repetition_penalty=1.3,
                presence_penalty=0.5, frequency_penalty=-0.5, logprobs=2, echo=True, n=2)
    [first, second] = generation_requests([[1, 2, 3]], req, check_sampling(req, 16, 1024), 0.0)
    assert (first.top_k, first.min_tokens, first.ignore_eos, first.repetition_penalty,
            first.presence_penalty, first.frequency_penalty) == (5, 3, True, 1.3, 0.5, -0.5)
    assert first.logprobs == 2 and first.prompt_logprobs == 2 and second.logprobs == 2
    plain = generation_requests([[1]], parse(top_k=-1), 4, 0.0)[0]
    assert plain.top_k == 0 and plain.logprobs is None and plain.prompt_logprobs is None
    assert not plain.processed
    chat = parse(ChatRequest, logprobs=True)
    assert generation_requests([[1]], chat, 4, 0.0)[0].logprobs == 0
    assert generation_requests([[1]], parse(ChatRequest, logprobs=True, top_logprobs=4), 4,
                               0.0)[0].logprobs == 4


@pytest.mark.parametrize("prompt, prompts, indexed", [
    ("Hi", ["Hi"], False),
    (["Hi", "there"], ["Hi", "there"], True),
    ([5, 7, 9], [[5, 7, 9]], False),
    ([[5, 7], [9]], [[5, 7], [9]], True),
])
def test_prompts_are_text_or_token_ids_one_or_many(prompt, prompts, indexed):
    req = parse(prompt=prompt)
    assert req.prompts() == prompts and req.indexed is indexed


@pytest.mark.parametrize("prompt", [["1", 2], [1.5, 2], [True, 3], [[1], 2], [[1, "a"]]])
def test_token_ids_are_whole_numbers_never_coerced(prompt):
    with pytest.raises(ApiError) as error:
        parse(prompt=prompt)
    assert error.value.status == 422 and error.value.param.startswith("prompt")


def test_max_tokens_0_scores_the_prompt_only_with_echo():
    req = parse(max_tokens=0, echo=True)
    assert check_sampling(req, 16, 1024) == 0
    [scoring] = generation_requests([[1, 2]], req, 0, 0.0)
    # The decoder needs the prompt's scores to have anything to do; the reply shows them only
    # when `logprobs` asked (scoring.logprobs is None).
    assert (scoring.max_tokens, scoring.prompt_logprobs, scoring.logprobs) == (0, 0, None)
    assert generation_requests([[1, 2]], parse(max_tokens=0, echo=True, logprobs=3), 0,
                               0.0)[0].prompt_logprobs == 3
    error = refused(max_tokens=0)
    assert error.param == "max_tokens" and "0 only with echo: true" in error.message
    assert refused(ChatRequest, max_tokens=0).param == "max_tokens"


def test_logprobs_in_openais_completion_and_chat_shapes(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    strings = TokenStrings(tokenizer)
    prompt = tokenizer("Hi there")["input_ids"]
    made = tokenizer(" Agent")["input_ids"]
    entries = [TokenLogprob(t, -0.5 - i, [(t, -0.5 - i), (prompt[0], -3.0)])
               for i, t in enumerate(made)]
    tokens = [tokenizer.decode([t]) for t in made]

    plain = choice_logprobs(strings, entries, None, chat=False)
    assert plain["tokens"] == tokens and "".join(tokens) == " Agent"
    assert plain["token_logprobs"] == [-0.5 - i for i in range(len(made))]
    assert plain["top_logprobs"][0] == {tokens[0]: -0.5, tokenizer.decode([prompt[0]]): -3.0}
    assert plain["text_offset"][0] == 0 and plain["text_offset"][-1] == len(" Agent") - len(
        tokens[-1])

    prompt_entries = [None] + [TokenLogprob(t, -1.0, []) for t in prompt[1:]]
    echoed = choice_logprobs(strings, entries, prompt_entries, chat=False, echo_ids=prompt)
    assert echoed["tokens"][:len(prompt)] == [tokenizer.decode([t]) for t in prompt]
    assert echoed["token_logprobs"][0] is None and echoed["top_logprobs"][0] is None
    assert echoed["text_offset"][len(prompt)] == len("Hi there")  # the completion follows

    chat = choice_logprobs(strings, entries, None, chat=True)
    first = chat["content"][0]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"}
    assert first["token"] == tokens[0] and first["bytes"] == list(tokens[0].encode())
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.5, -3.0]
    assert choice_logprobs(strings, None, None, chat=True) is None


def test_tokens_that_split_a_character_show_as_bytes_and_offsets_stay_right(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    strings = TokenStrings(tokenizer)
    text = "Hi \u2603 snow \u00e9t\u00e9"  # a snowman and accents: rare, split into bytes
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    shown = [strings(t) for t in ids]
    assert b"".join(raw for _, raw in shown) == text.encode()  # each token's own bytes
    assert any(token.startswith("bytes:\\x") for token, _ in shown)  # some are partial
    assert all("\ufffd" not in token for token, _ in shown)
    lp = choice_logprobs(strings, [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids], None,
                         chat=False)
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        if not token.startswith("bytes:"):
            assert text[offset:offset + len(token)] == token
    eos = tokenizer.eos_token_id
    assert strings(eos)[0] == tokenizer.eos_token and strings.text_bytes(eos) == b""


# --- values no field can hold: a 400 naming where, before anything reads them ----------------


COMPLETION = '{"prompt": "Hi", %s}'
CHAT = '{"messages": [{"role": "user", "content": "Hi"}], %s}'


@pytest.mark.parametrize("template, field, param", [
    (COMPLETION, '"repetition_penalty": Infinity', "repetition_penalty"),
    (COMPLETION, '"temperature": NaN', "temperature"),
    (COMPLETION, '"presence_penalty": -Infinity', "presence_penalty"),
    (COMPLETION, '"top_p": 1e999', "top_p"),  # too large for a float: parsed as infinity
    (COMPLETION, '"metadata": {"run": [1, {"score": 1e999}]}', "metadata.run[1].score"),
    (COMPLETION, '"stream_options": {"include_usage": NaN}', "stream_options.include_usage"),
    (CHAT, '"frequency_penalty": -1e999', "frequency_penalty"),
    (CHAT, '"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", '
           '"weight": NaN}]}]', "messages[0].content[0].weight"),
])
def test_numbers_that_are_not_finite_are_a_400_naming_the_field_anywhere(template, field, param):
    schema = ChatRequest if template is CHAT else CompletionRequest
    with pytest.raises(ApiError) as error:
        parse_body((template % field).encode(), schema)
    assert error.value.status == 400 and error.value.param == param
    assert param in error.value.message and "finite" in error.value.message
    assert error.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_bodies_are_a_400_not_a_crash(depth):
    # 100,000 levels overflow the JSON parser's own recursion; 40 pass it and stop at ours.
    body = '{"prompt": "Hi", "user": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(ApiError) as error:
        parse_body(body.encode(), CompletionRequest)
    assert error.value.status == 400 and "nests deeper than" in error.value.message
    assert "\n" not in error.value.message and len(error.value.message) < 200


def test_text_that_is_not_unicode_is_a_400_naming_the_field():
    # A lone surrogate is valid JSON and a Python str, but the tokenizer cannot take it (it
    # raised TypeError: a plain-text 500).
    with pytest.raises(ApiError) as error:
        parse_body(b'{"prompt": ["Hi", "a\\ud800b"]}', CompletionRequest)
    assert error.value.status == 400 and error.value.param == "prompt[1]"
    assert "surrogate" in error.value.message


def test_every_error_status_has_openais_shape():
    for status in (400, 401, 404, 405, 413, 422, 500, 503):
        body = ApiError(status, "why", param="p", code="c").body()
        assert body == {"error": {"message": "why", "type": body["error"]["type"], "param": "p",
                                  "code": "c"}} and body["error"]["type"]
    assert ApiError(500, "bug").body()["error"]["type"] == "server_error"


def test_what_a_replica_raised_becomes_a_400_or_a_500_naming_the_cause():
    # Ray hands the ingress a replica's exception wrapped in a RayTaskError.
    from ray.exceptions import RayTaskError

    from aigc_ray.decode.request import RequestError, RowFailed
    from aigc_ray.serve.ingress import replica_error

    def from_replica(exc):
        return replica_error(RayTaskError("complete", "Traceback ...", exc).as_instanceof_cause())

    refused = from_replica(RequestError("prompt_ids holds token id 9999, outside the model's "
                                        "vocabulary (0 to 511)"))
    assert refused.status == 400 and refused.message.startswith("prompt_ids holds token id 9999")
    alone = from_replica(RowFailed("the sampler chose token id 512, outside the vocabulary"))
    assert alone.status == 500 and "for this request: the sampler chose" in alone.message
    batch = from_replica(RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"))
    assert batch.status == 500 and batch.message == \
        "generation failed: RuntimeError: CUDA out of memory."
    assert replica_error(RowFailed("plain")).status == 500  # unwrapped works too


def test_an_unhandled_error_in_the_ingress_is_a_json_500_in_openais_shape():
    # The ingress's own handlers on a bare app with a route that fails as a bug would.
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from aigc_ray.serve.ingress import fastapi_app

    bare = FastAPI(exception_handlers=fastapi_app.exception_handlers)

    @bare.get("/bug")
    def bug():
        raise KeyError("secret detail")

    response = TestClient(bare, raise_server_exceptions=False).get("/bug")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "KeyError" in error["message"]
    assert "secret detail" not in response.text  # the details go to the log
