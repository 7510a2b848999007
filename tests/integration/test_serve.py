"""The Serve app end to end: real Ray, real Serve, real HTTP, the tiny model.

One app (module-scoped) answers the protocol tests; overload, autoscaling and replica-kill tests
each deploy their own small app beside it with short delays and delete it afterwards.
"""

import json
import os
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForCausalLM

from aigc_ray.data.chat import chat_ids
from aigc_ray.serve import build_app, load_serve_config, model_name_for
from aigc_ray.tokenizer import load_tokenizer

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = [
    "Customer: I want a refund for my Orbit Watch.\nAgent:",
    "Hi",
    "Customer: How do I reset my password for Nimbus Drive? It keeps failing.\nAgent:",
    "Customer: Where is my order?\nAgent:",
]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}Agent:{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_port(ray_cluster):
    """Serve's HTTP proxy on a free port for this module; shut down after it."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a chat template in its tokenizer (so /v1/chat/completions works)."""
    folder = tmp_path_factory.mktemp("chat") / "final"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def deploy(name: str, folder, port: int, *overrides: str) -> dict:
    """Run an app under /{name}; returns its base URL (add /v1/... to it) and model id."""
    from ray import serve

    path, cfg = load_serve_config(str(folder), [
        f"serve.app_name={name}", f"serve.route_prefix=/{name}", f"serve.port={port}",
        "serve.cpus_per_replica=0.5", *overrides])
    serve.run(build_app(path, cfg), name=name, route_prefix=f"/{name}")
    return {"url": f"http://127.0.0.1:{port}/{name}", "model": model_name_for(path, cfg),
            "path": path, "name": name}


@pytest.fixture(scope="module")
def app(serve_port, chat_model_dir):
    from ray import serve

    # A wide batch window makes concurrent test requests land in one batch reliably.
    info = deploy("main", chat_model_dir, serve_port, f"serve.api_key={API_KEY}",
                  "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.05")
    yield info
    serve.delete("main")


def complete(url: str, timeout: float = 60, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=timeout)


def test_openai_client_completes_streams_chats_and_lists_models(app):
    from openai import OpenAI

    client = OpenAI(base_url=app["url"] + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [app["model"]]

    done = client.completions.create(model=app["model"], prompt=PROMPTS[0], max_tokens=8,
                                     temperature=0)
    tokenizer = load_tokenizer(str(app["path"]))
    assert done.usage.prompt_tokens == len(tokenizer(PROMPTS[0])["input_ids"])
    assert 1 <= done.usage.completion_tokens <= 8
    assert done.choices[0].finish_reason in ("length", "stop")

    chunks = list(client.completions.create(model=app["model"], prompt=PROMPTS[0], max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == done.choices[0].text  # streaming returns the same greedy text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    chat = client.chat.completions.create(
        model=app["model"], messages=[{"role": "user", "content": "Where is my order?"}],
        max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens >= 1
    streamed = client.chat.completions.create(
        model=app["model"], messages=[{"role": "user", "content": "Where is my order?"}],
        max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        chat.choices[0].message.content


def test_raw_stream_is_server_sent_events_ending_in_done(app):
    with httpx.stream("POST", app["url"] + "/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": "Hi", "max_tokens": 5, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] is not None


def test_greedy_output_equals_generate_single_and_batched(app):
    tokenizer = load_tokenizer(str(app["path"]))
    model = AutoModelForCausalLM.from_pretrained(app["path"]).eval()
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        expected.append(out[0, ids["input_ids"].shape[1]:].tolist())

    def token_ids(prompt):
        body = complete(app["url"], prompt=prompt, max_tokens=12, temperature=0,
                        return_token_ids=True).json()
        return body["choices"][0]["token_ids"]

    assert token_ids(PROMPTS[0]) == expected[0]  # alone
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: batched on the replica
        assert list(pool.map(token_ids, PROMPTS)) == expected
    # One request with a list of prompts of different lengths: left-padded in one batch.
    body = complete(app["url"], prompt=PROMPTS, max_tokens=12, temperature=0,
                    return_token_ids=True).json()
    assert [c["token_ids"] for c in body["choices"]] == expected
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)


def test_seeded_sampling_repeats_and_n_choices_differ(app):
    body = dict(prompt=PROMPTS[1], max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=2)
    first, again = complete(app["url"], **body).json(), complete(app["url"], **body).json()
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]
    assert texts[0] != texts[1]  # choice j is seeded with seed + j
    assert first["usage"]["completion_tokens"] <= 2 * 10
    assert len(first["choices"]) == 2 and [c["index"] for c in first["choices"]] == [0, 1]


def test_stop_string_cuts_the_text(app):
    plain = complete(app["url"], prompt=PROMPTS[0], max_tokens=20, temperature=0).json()
    text = plain["choices"][0]["text"]
    stop = text[3:5]  # a piece of the greedy reply; the reply must end right before it
    cut = complete(app["url"], prompt=PROMPTS[0], max_tokens=20, temperature=0,
                   stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop", (text, stop, cut)
    assert cut["text"] == text[:text.index(stop)], (text, stop, cut)


def metric_samples(name: str, app_name: str) -> list:
    """Samples of one of our Prometheus metrics for one app, from the node's metrics export."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    node = ray.nodes()[0]
    text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                     timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith(name) and s.labels.get("application") == app_name]


def test_concurrent_requests_are_batched_per_metrics(app):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: complete(app["url"], prompt=p, max_tokens=16,
                                                   temperature=0), PROMPTS * 2))
    assert all(r.status_code == 200 for r in replies)
    deadline = time.time() + 120  # Ray exports metrics every few seconds (slower when busy)
    while True:
        batches = metric_samples("ray_aigc_ray_batch_size", "main")
        count = sum(s.value for s in batches if s.name.endswith("_count"))
        singles = sum(s.value for s in batches if s.name.endswith("_bucket")
                      and s.labels["le"] == "1.0")
        tokens = sum(s.value for s in metric_samples("ray_aigc_ray_tokens_generated", "main"))
        ttft = metric_samples("ray_aigc_ray_time_to_first_token_seconds_count", "main")
        tpot = metric_samples("ray_aigc_ray_time_per_output_token_seconds_count", "main")
        # Poll for what is asserted: an export can hold some of the replica's counts and not
        # yet the rest (the replica records them as its chunks go out).
        if count - singles > 0 and tokens >= 16 * 8 and ttft and tpot or time.time() > deadline:
            break
        time.sleep(2)
    assert count - singles > 0, f"no batch of more than one request among {count} batches"
    assert tokens >= 16 * 8, f"the replica's token counter shows {tokens} tokens, want >= 128"
    assert ttft and tpot


def test_a_short_request_joins_a_running_long_one_and_finishes_first(serve_port,
                                                                      tiny_chat_model_dir):
    # Continuous batching: with a batch that only took requests when idle, the short request
    # would wait for the long one to end (checked: it fails with serve.continuous_batching=false).
    # Its own app on the 512-position model: a long request of ~500 tokens leaves the short one
    # seconds to get through HTTP and join, even on a machine busy with other tests.
    from ray import serve

    app = deploy("joins", tiny_chat_model_dir, serve_port, "serve.max_batch_size=8")
    try:
        _short_joins_long(app)
    finally:
        serve.delete("joins")


def _short_joins_long(app: dict) -> None:
    context = json.loads((Path(app["path"]) / "config.json").read_text())["n_positions"]
    long_tokens = context - 8
    ended: dict[str, float] = {}
    started = threading.Event()

    def long_stream():
        with httpx.stream("POST", app["url"] + "/v1/completions", timeout=120,
                          json={"prompt": "Hi", "max_tokens": long_tokens, "temperature": 0,
                                "ignore_eos": True, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                    reason = json.loads(line[6:])["choices"][0]["finish_reason"]
                    ended["long_reason"] = reason or ended.get("long_reason")
        ended["long"] = time.monotonic()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(60), "the long request produced nothing"
    short = httpx.post(app["url"] + "/v1/completions", timeout=120,
                       json={"prompt": PROMPTS[3], "max_tokens": 2, "temperature": 0})
    ended["short"] = time.monotonic()
    thread.join(120)
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] >= 1
    assert ended["long_reason"] == "length", ended  # it really ran all its steps
    assert ended["short"] < ended["long"], "the short request waited for the long one"


BAD_REQUESTS = [
    # (what, body or raw bytes, headers, status, words the error message must contain)
    ("empty prompt", {"prompt": ""}, AUTH, 400, "empty"),
    ("max_tokens 0", {"prompt": "Hi", "max_tokens": 0}, AUTH, 400, "max_tokens"),
    ("max_tokens too big", {"prompt": "Hi", "max_tokens": 5000}, AUTH, 400, "1024"),
    ("prompt + max_tokens over the context", {"prompt": "Hi " * 60, "max_tokens": 100}, AUTH,
     400, "128 tokens"),
    ("not JSON", b"{oops", AUTH, 422, "JSON"),
    ("prompt of the wrong type", {"prompt": 42}, AUTH, 422, "prompt"),
    ("missing prompt", {"max_tokens": 3}, AUTH, 422, "prompt"),
    ("oversized body", {"prompt": "x" * 1_100_000}, AUTH, 413, "larger than"),
    ("no API key", {"prompt": "Hi"}, {}, 401, "API key"),
    ("wrong API key", {"prompt": "Hi"}, {"Authorization": "Bearer nope"}, 401, "API key"),
    ("unknown model", {"prompt": "Hi", "model": "gpt-9"}, AUTH, 404, "gpt-9"),
    ("a field we do not implement", {"prompt": "Hi", "logit_bias": {"5": 10}}, AUTH, 400,
     "logit_bias"),
    ("an unknown field", {"prompt": "Hi", "temprature": 0}, AUTH, 400, "temprature"),
    ("min_tokens above max_tokens", {"prompt": "Hi", "max_tokens": 4, "min_tokens": 5}, AUTH,
     400, "min_tokens"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(app):
    for what, body, headers, status, words in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(app["url"] + "/v1/completions", content=content, timeout=60,
                              headers={"Content-Type": "application/json", **headers})
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert words in error["message"] and error["type"], (what, error)
    too_long = complete(app["url"], prompt="Hi " * 60, max_tokens=100).json()["error"]["message"]
    assert "100" in too_long  # the message says the numbers
    assert httpx.get(app["url"] + "/healthz", timeout=60).json()["status"] == "ok"
    assert complete(app["url"], prompt="Hi", max_tokens=3).status_code == 200


def test_overload_gets_fast_503s_and_loses_no_accepted_request(serve_port, chat_model_dir):
    from ray import serve

    app = deploy("overload", chat_model_dir, serve_port, "serve.max_ongoing_requests=2",
                 "serve.max_queued_requests=2", "serve.max_batch_size=2", "serve.retry_after_s=2",
                 "serve.autoscaling.max_replicas=1")
    try:
        def call(_):
            start = time.time()
            response = complete(app["url"], prompt="Hi", max_tokens=100, temperature=0)
            return response, time.time() - start

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(call, range(24)))
        ok = [r for r, _ in results if r.status_code == 200]
        rejected = [(r, s) for r, s in results if r.status_code == 503]
        assert len(ok) + len(rejected) == 24, [r.status_code for r, _ in results]
        assert len(ok) >= 2 and rejected
        for response, seconds in rejected:
            assert response.headers["Retry-After"] == "2"
            assert response.json()["error"]["code"] == "overloaded"
            assert seconds < 5  # answered at once, not after the queue drained
        for response in ok:  # every accepted request ran to the end
            assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert httpx.get(app["url"] + "/healthz", timeout=60).status_code == 200
    finally:
        serve.delete("overload")


class Load:
    """Background threads sending completions until stopped; counts outcomes."""

    def __init__(self, url: str, threads: int, max_tokens: int = 40):
        self.url, self.max_tokens = url, max_tokens
        self.ok = self.failed = 0
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self):
        while not self.stopped.is_set():
            try:
                response = complete(self.url, prompt="Hi", max_tokens=self.max_tokens,
                                    timeout=30)
                good = response.status_code == 200
            except httpx.HTTPError:
                good = False
            if good:
                self.ok += 1
            else:
                self.failed += 1

    def stop(self):
        self.stopped.set()
        for thread in self.threads:
            thread.join()


def running_replicas(app_name: str) -> int:
    from ray import serve

    deployment = serve.status().applications[app_name].deployments["GenerationReplica"]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout: float, every: float = 0.5) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


@pytest.mark.slow
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(serve_port, chat_model_dir):
    from ray import serve

    app = deploy("scale", chat_model_dir, serve_port, "serve.autoscaling.min_replicas=1",
                 "serve.autoscaling.max_replicas=2", "serve.autoscaling.target_ongoing_requests=1",
                 "serve.autoscaling.upscale_delay_s=1", "serve.autoscaling.downscale_delay_s=2",
                 "serve.autoscaling.look_back_period_s=2")
    try:
        assert running_replicas("scale") == 1
        load = Load(app["url"], threads=6)
        try:
            scaled_up = wait_for(lambda: running_replicas("scale") == 2, timeout=90)
        finally:
            load.stop()
        assert scaled_up, "sustained load did not bring a second replica"
        assert wait_for(lambda: running_replicas("scale") == 1, timeout=90), \
            "the second replica stayed after the load stopped"
        assert load.failed == 0 and load.ok > 0
    finally:
        serve.delete("scale")


@pytest.mark.slow
def test_killing_a_replica_under_load_recovers(serve_port, chat_model_dir):
    from ray import serve

    app = deploy("kill", chat_model_dir, serve_port, "serve.autoscaling.min_replicas=2",
                 "serve.autoscaling.max_replicas=2")
    handle = serve.get_deployment_handle("GenerationReplica", "kill")
    try:
        pids = set()
        assert wait_for(lambda: pids.add(handle.pid.remote().result()) or len(pids) == 2, 30, 0)
        load = Load(app["url"], threads=4)
        try:
            time.sleep(2)
            victim = sorted(pids)[0]  # a replica process this test deployed
            os.kill(victim, signal.SIGKILL)
            replaced = wait_for(lambda: running_replicas("kill") == 2 and victim not in {
                handle.pid.remote().result() for _ in range(4)}, timeout=90)
            time.sleep(2)  # keep the load on the recovered app a little
        finally:
            load.stop()
        total = load.ok + load.failed
        share = load.failed / max(total, 1)
        print(f"\nreplica {victim} killed under load: {load.failed}/{total} requests failed "
              f"({share:.1%})")
        assert replaced, "the killed replica was not replaced"
        assert load.ok > 0 and share < 0.2
        assert complete(app["url"], prompt="Hi", max_tokens=3).status_code == 200
    finally:
        serve.delete("kill")


# --- the rest of the OpenAI surface: logprobs, echo, penalties, lengths, refused fields ------


@pytest.fixture(scope="module")
def local_model(app):
    """The served model and tokenizer loaded here with plain transformers, for expected values."""
    return (AutoModelForCausalLM.from_pretrained(app["path"]).eval(),
            load_tokenizer(str(app["path"])))


def model_logprobs(model, ids: list[int]):
    """log_softmax of the model's logits for a sequence, one row per position."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_completion_logprobs_equal_the_models_batched_streamed_and_echoed(app, local_model):
    from aigc_ray.serve.api import TokenStrings

    model, tokenizer = local_model
    strings = TokenStrings(tokenizer)
    body = complete(app["url"], prompt=PROMPTS[:3], max_tokens=6, temperature=0.7, seed=3,
                    logprobs=2, ignore_eos=True, return_token_ids=True).json()
    for prompt, choice in zip(PROMPTS, body["choices"]):
        prompt_ids, made = tokenizer(prompt)["input_ids"], choice["token_ids"]
        want = model_logprobs(model, prompt_ids + made)[len(prompt_ids) - 1:-1]
        lp = choice["logprobs"]
        assert lp["tokens"] == [strings(t)[0] for t in made]
        for row, token, got, top in zip(want, made, lp["token_logprobs"], lp["top_logprobs"]):
            assert abs(got - float(row[token])) < 1e-4
            assert len(top) <= 2 and max(top.values()) == pytest.approx(float(row.max()),
                                                                         abs=1e-4)
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])

    # Streamed: every chunk carries the logprobs of its own tokens; together they are the same.
    alone = dict(prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=1, ignore_eos=True)
    whole = complete(app["url"], **alone).json()["choices"][0]["logprobs"]
    with httpx.stream("POST", app["url"] + "/v1/completions", headers=AUTH, timeout=60,
                      json={**alone, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    pieces = [c["choices"][0]["logprobs"] for c in chunks]
    assert all(p is not None for p in pieces)
    assert [t for p in pieces for t in p["tokens"]] == whole["tokens"]
    assert [t for p in pieces for t in p["token_logprobs"]] == \
        pytest.approx(whole["token_logprobs"], abs=1e-5)
    assert [t for p in pieces for t in p["text_offset"]] == whole["text_offset"]

    # Echo: the prompt comes first, its tokens with their logprobs (none for the first).
    echoed = complete(app["url"], **alone, echo=True).json()["choices"][0]
    prompt_ids = tokenizer(PROMPTS[0])["input_ids"]
    assert echoed["text"].startswith(PROMPTS[0])
    lp = echoed["logprobs"]
    assert lp["tokens"][:len(prompt_ids)] == [strings(t)[0] for t in prompt_ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = model_logprobs(model, prompt_ids)
    for j, token in enumerate(prompt_ids[1:]):
        assert abs(lp["token_logprobs"][j + 1] - float(want[j, token])) < 1e-4
    assert lp["tokens"][len(prompt_ids):] == whole["tokens"]
    assert lp["text_offset"][len(prompt_ids)] == len(PROMPTS[0])
    # Streamed with echo: the first chunk brings the prompt and its logprobs.
    with httpx.stream("POST", app["url"] + "/v1/completions", headers=AUTH, timeout=60,
                      json={**alone, "stream": True, "echo": True}) as response:
        chunks = [json.loads(line[6:])["choices"][0] for line in response.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(c["text"] for c in chunks) == echoed["text"]
    assert [t for c in chunks for t in c["logprobs"]["tokens"]] == lp["tokens"]
    assert [t for c in chunks for t in c["logprobs"]["text_offset"]] == lp["text_offset"]


def test_token_id_prompts_are_scored_as_given_and_max_tokens_0_scores_them_alone(app,
                                                                                  local_model):
    """What lm-evaluation-harness sends: token ids (its own tokenization, kept exactly), echo,
    logprobs 1, and max_tokens 1 (or 0: the prompt alone)."""
    model, tokenizer = local_model
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    scored = complete(app["url"], prompt=ids, echo=True, max_tokens=0, logprobs=1,
                      temperature=0).json()
    one_more = complete(app["url"], prompt=ids, echo=True, max_tokens=1, logprobs=1,
                        temperature=0).json()
    assert scored["usage"] == {"prompt_tokens": sum(map(len, ids)), "completion_tokens": 0,
                               "total_tokens": sum(map(len, ids))}
    for prompt, choice, longer in zip(ids, scored["choices"], one_more["choices"]):
        lp = choice["logprobs"]
        assert choice["text"] == tokenizer.decode(prompt, skip_special_tokens=True)
        assert choice["finish_reason"] == "length" and len(lp["tokens"]) == len(prompt)
        want = model_logprobs(model, prompt)
        assert lp["token_logprobs"][0] is None
        for j, token in enumerate(prompt[1:]):
            assert abs(lp["token_logprobs"][j + 1] - float(want[j, token])) < 1e-4
            assert max(lp["top_logprobs"][j + 1].values()) == pytest.approx(
                float(want[j].max()), abs=1e-4)
        # max_tokens 1 adds exactly one entry, the generated token's (EOS included), last.
        assert len(longer["logprobs"]["tokens"]) == len(prompt) + 1
        assert longer["logprobs"]["token_logprobs"][1:len(prompt)] == \
            pytest.approx(lp["token_logprobs"][1:], abs=1e-5)
    # One prompt of ids, streamed: one chunk, the prompt and its scores, then [DONE].
    with httpx.stream("POST", app["url"] + "/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": ids[0], "echo": True, "max_tokens": 0, "logprobs": 0,
                            "stream": True}) as response:
        chunks = [json.loads(line[6:])["choices"][0] for line in response.iter_lines()
                  if line.startswith("data: {")]
    assert len(chunks) == 1 and chunks[0]["finish_reason"] == "length"
    assert chunks[0]["text"] == scored["choices"][0]["text"]

    bad = complete(app["url"], prompt=[ids[0], [1, 10**6]], echo=True, max_tokens=1)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    assert "prompt[1] holds token id 1000000" in bad.json()["error"]["message"]
    no_echo = complete(app["url"], prompt=ids[0], max_tokens=0)
    assert no_echo.status_code == 400 and "0 only with echo" in no_echo.json()["error"]["message"]
    assert complete(app["url"], prompt=ids[0], max_tokens=2).status_code == 200  # still serving


def test_chat_logprobs_in_openais_shape_through_the_client(app, local_model):
    from openai import OpenAI

    model, tokenizer = local_model
    client = OpenAI(base_url=app["url"] + "/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "Where is my order?"}]
    reply = client.chat.completions.create(model=app["model"], messages=messages, max_tokens=5,
                                           temperature=0, logprobs=True, top_logprobs=3,
                                           extra_body={"ignore_eos": True,
                                                       "return_token_ids": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    prompt_ids = chat_ids(tokenizer, messages, add_generation_prompt=True)
    made = reply.choices[0].token_ids
    want = model_logprobs(model, prompt_ids + made)[len(prompt_ids) - 1:-1]
    for row, token, entry in zip(want, made, content):
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
    streamed = client.chat.completions.create(model=app["model"], messages=messages,
                                              max_tokens=5, temperature=0, logprobs=True,
                                              stream=True, extra_body={"ignore_eos": True})
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs
              for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_ignore_eos_and_min_tokens_give_exactly_the_asked_length(app):
    held = complete(app["url"], prompt=PROMPTS[:2], max_tokens=20, temperature=1.0, n=2,
                    ignore_eos=True).json()
    assert held["usage"]["completion_tokens"] == 4 * 20
    assert {c["finish_reason"] for c in held["choices"]} == {"length"}
    floor = complete(app["url"], prompt=PROMPTS[3], max_tokens=15, min_tokens=15,
                     temperature=0).json()
    assert floor["usage"]["completion_tokens"] == 15


def test_penalties_and_top_k_change_the_output_as_the_engine_says(app, local_model):
    from aigc_ray.decode.engine import decode_all
    from aigc_ray.decode.request import GenerationRequest

    model, tokenizer = local_model
    ids = tokenizer(PROMPTS[0])["input_ids"]
    settings = dict(repetition_penalty=1.8, frequency_penalty=1.5, presence_penalty=0.5)
    expected = decode_all(model, tokenizer, [GenerationRequest(
        ids, 24, temperature=0, ignore_eos=True, **settings)])[0]["token_ids"]
    plain = decode_all(model, tokenizer, [GenerationRequest(
        ids, 24, temperature=0, ignore_eos=True)])[0]["token_ids"]
    assert expected != plain  # the penalties matter for this prompt
    assert len(set(expected)) >= len(set(plain))  # and they only push away from repeats

    def served(**body):
        return complete(app["url"], prompt=PROMPTS[0], max_tokens=24, ignore_eos=True,
                        return_token_ids=True, **body).json()["choices"][0]["token_ids"]

    assert served(temperature=0, **settings) == expected
    # top_k=1 samples the likeliest token at any temperature: greedy's tokens.
    assert served(temperature=1.5, top_k=1, seed=5) == plain


REFUSED = [
    # (endpoint, field, value): every one a 400 naming the field, never a silent ignore
    ("chat", "response_format", {"type": "json_object"}),
    ("chat", "response_format", {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}),
    ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("chat", "tool_choice", "required"),
    ("chat", "functions", [{"name": "f"}]),
    ("chat", "parallel_tool_calls", True),
    ("chat", "logit_bias", {"5": 100}),
    ("completions", "best_of", 2),
    ("completions", "suffix", " the end"),
    ("completions", "logit_bias", {"5": 100}),
    ("completions", "min_p", 0.1),
]


def test_every_field_we_do_not_implement_is_a_400_naming_it(app):
    for endpoint, field, value in REFUSED:
        body = ({"messages": [{"role": "user", "content": "Hi"}]} if endpoint == "chat"
                else {"prompt": "Hi"})
        response = httpx.post(f"{app['url']}/v1/{endpoint.replace('chat', 'chat/completions')}",
                              json={**body, field: value, "max_tokens": 2}, headers=AUTH,
                              timeout=60)
        assert response.status_code == 400, (field, response.text)
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"], error
    # What clients send by default passes: nulls, empty lists, no-op values, user/metadata.
    fine = httpx.post(app["url"] + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "messages": [{"role": "user", "content": "Hi", "name": None}], "max_tokens": 2,
        "response_format": {"type": "text"}, "tools": [], "logit_bias": None, "user": "u-1",
        "metadata": {"team": "a"}, "stream_options": None})
    assert fine.status_code == 200, fine.text


def test_json_mode_through_the_openai_client_is_refused(app):
    import openai

    client = openai.OpenAI(base_url=app["url"] + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=app["model"], max_tokens=4,
                                       messages=[{"role": "user", "content": "Say JSON"}],
                                       response_format={"type": "json_object"})
    assert error.value.body["param"] == "response_format"


def test_the_api_key_is_absent_from_what_serve_reports(app):
    from ray import serve
    from ray.serve.context import _get_global_client

    shown = json.dumps(_get_global_client().get_serve_details(), default=str)
    shown += repr(serve.status())
    assert "main" in shown and API_KEY not in shown
    assert "AIGC_RAY_API_KEY" not in shown  # nor an environment variable that carries it


# --- one request cannot fail its batch; every error is JSON; /healthz generates nothing ------


def test_a_poisoned_request_batched_with_plain_ones_leaves_their_text_as_if_alone(app):
    # temperature 1e-40 once made the sampler emit the id one past the vocabulary, and the
    # next forward failed every request batched with it.
    def text(body: dict) -> tuple[int, str]:
        response = complete(app["url"], max_tokens=12, **body)
        choices = response.json().get("choices") or [{}]
        return response.status_code, choices[0].get("text")

    plain = [{"prompt": p, "temperature": 0, "ignore_eos": True} for p in PROMPTS]
    alone = [text(body) for body in plain]
    poisoned = {"prompt": PROMPTS[1], "temperature": 1e-40, "seed": 1, "ignore_eos": True}
    for _ in range(3):  # concurrent: batched together on the replica
        with ThreadPoolExecutor(len(plain) + 1) as pool:
            got = list(pool.map(text, [plain[0], poisoned, *plain[1:]]))
        assert [got[0], *got[2:]] == alone
        assert got[1] == alone[1]  # below the temperature floor: greedy


def post_raw(url: str, path: str, raw: str) -> httpx.Response:
    return httpx.post(url + path, content=raw.encode(), timeout=60,
                      headers={"Content-Type": "application/json", **AUTH})


NOT_FINITE = [
    # (path, raw body, the param the 400 names)
    ("/v1/completions", '{"prompt": "Hi", "repetition_penalty": Infinity}', "repetition_penalty"),
    ("/v1/completions", '{"prompt": "Hi", "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"prompt": "Hi", "metadata": {"a": [1e999]}}', "metadata.a[0]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], '
                             '"presence_penalty": -Infinity}', "presence_penalty"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "Hi", "x": 1e999}]}]}', "messages[0].content[0].x"),
]


def test_values_no_field_can_hold_and_deep_nesting_get_a_400_in_openais_shape(app):
    for path, raw, param in NOT_FINITE:
        response = post_raw(app["url"], path, raw)
        assert response.status_code == 400, (raw, response.text)
        error = response.json()["error"]
        assert error["param"] == param and "finite" in error["message"], error
    deep = '{"prompt": "Hi", "user": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for raw in (deep, '{"prompt": "Hi", "user": ' + "[" * 40 + "]" * 40 + "}"):
        response = post_raw(app["url"], "/v1/completions", raw)
        assert response.status_code == 400 and response.headers["content-type"].startswith(
            "application/json"), response.text[:200]
        assert "nests deeper" in response.json()["error"]["message"]
    surrogate = post_raw(app["url"], "/v1/completions", '{"prompt": "a\\ud800"}')
    assert surrogate.status_code == 400 and surrogate.json()["error"]["param"] == "prompt"
    wrong_method = httpx.delete(app["url"] + "/v1/completions", headers=AUTH, timeout=60)
    assert set(wrong_method.json()["error"]) == {"message", "type", "param", "code"}
    assert complete(app["url"], prompt="Hi", max_tokens=3).status_code == 200


def test_healthz_answers_from_the_heartbeat_without_generating_and_shows_no_pid(
        serve_port, chat_model_dir):
    # Its own app with one replica: the count of requests it took in is that replica's.
    from ray import serve

    app = deploy("health", chat_model_dir, serve_port, "serve.autoscaling.max_replicas=1")
    try:
        _healthz_generates_nothing(app, serve.get_deployment_handle("GenerationReplica", "health"))
    finally:
        serve.delete("health")


def _healthz_generates_nothing(app: dict, handle) -> None:
    before = handle.health.remote().result()["admitted"]
    for _ in range(10):
        response = httpx.get(app["url"] + "/healthz", timeout=60)
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "model": app["model"]}
        assert "pid" not in response.text
    assert handle.health.remote().result()["admitted"] == before  # nothing was generated
    load = Load(app["url"], threads=4, max_tokens=60)
    try:
        assert wait_for(lambda: load.ok > 0, timeout=120)
        under_load = [httpx.get(app["url"] + "/healthz", timeout=60) for _ in range(5)]
        admitted = handle.health.remote().result()["admitted"]
    finally:
        load.stop()
    assert [r.status_code for r in under_load] == [200] * 5
    assert load.failed == 0 and admitted > before  # the load itself was admitted
