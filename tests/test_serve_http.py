"""The HTTP server on localhost with the tiny model, which has no tokenizer (token-id prompts): the official
`openai` client streams completions whose tokens equal `Engine.generate`; bad requests get OpenAI-shaped errors
while everyone else is served; a client that disconnects frees its KV blocks; 200 concurrent requests all
complete; models, health and Prometheus metrics.

One server for the module (uvicorn in a thread, 127.0.0.1, a free port). References are generated offline by the
same engine before it starts serving. Float64: token identity is asserted.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import openai
import pytest

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.serve import AsyncEngine
from asyncbatch.serve.app import build_app
from asyncbatch.serve.server import BackgroundServer

CASES = {  # name: (prompt, OpenAI parameters, the same as SamplingParams)
    "greedy": ([1, 2, 3, 4], {"max_tokens": 10, "temperature": 0},
               SamplingParams(max_new_tokens=10)),
    "sampled": ([7, 8, 9], {"max_tokens": 12, "temperature": 0.8, "seed": 4},
                SamplingParams(max_new_tokens=12, temperature=0.8, seed=4)),
    "top_p_top_k": ([100, 200, 300, 400], {"max_tokens": 9, "temperature": 1.2, "top_p": 0.9, "seed": 7,
                                           "extra_body": {"top_k": 50}},
                    SamplingParams(max_new_tokens=9, temperature=1.2, top_p=0.9, top_k=50, seed=7)),
}
rng = random.Random(0)
MANY = [([rng.randrange(3, 512) for _ in range(rng.randrange(1, 30))], rng.randrange(1, 12), i)
        for i in range(200)]  # (prompt, max_tokens, seed)


def _many_params(max_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, temperature=0.7, seed=seed, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tiny64):
    engine = Engine.from_model(tiny64, EngineConfig.from_dict({"runtime": "cpu"}))
    refs = {name: list(engine.generate([p], params)[0].token_ids) for name, (p, _, params) in CASES.items()}
    refs["many"] = [list(o.token_ids) for o in engine.generate([p for p, _, _ in MANY],
                                                               [_many_params(m, s) for _, m, s in MANY])]
    app = build_app(AsyncEngine(engine))
    with BackgroundServer(app) as srv:
        srv.refs = refs
        srv.live = app.state.live
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_openai_client_streams_the_tokens_of_generate(server, client, name):
    prompt, kwargs, _ = CASES[name]

    chunks = list(client.completions.create(model="tiny", prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **kwargs))

    tokens = [t for c in chunks for choice in c.choices for t in choice.token_ids]
    assert server.refs[name] == tokens
    assert [None] * (len(chunks) - 2) + ["length"] == [c.choices[0].finish_reason for c in chunks[:-1]]
    usage = chunks[-1].usage
    assert ([], len(prompt), len(tokens)) == (chunks[-1].choices, usage.prompt_tokens, usage.completion_tokens)


def test_a_whole_completion(server, client):
    prompt, kwargs, _ = CASES["sampled"]

    out = client.completions.create(model="tiny", prompt=prompt, **kwargs)

    choice = out.choices[0]
    assert (server.refs["sampled"], "length", "") == (choice.token_ids, choice.finish_reason, choice.text)
    assert (len(prompt), 12, len(prompt) + 12) == (out.usage.prompt_tokens, out.usage.completion_tokens,
                                                   out.usage.total_tokens)
    assert ("text_completion", "tiny") == (out.object, out.model)


BAD = [  # body, status, param, code, words of the message
    (b"{", 400, None, "invalid_json", "not valid JSON"),
    (b"[1]", 400, None, "invalid_json", "must be a JSON object, got list"),
    ({"model": "gpt-4", "prompt": [1]}, 400, "model", "model_not_found", "'gpt-4' does not exist"),
    ({"model": "tiny"}, 400, "prompt", None, "'prompt' is required"),
    ({"model": "tiny", "prompt": "hello"}, 400, "prompt", None, "text prompts need a tokenizer"),
    ({"model": "tiny", "prompt": [1, 512]}, 400, "prompt", None, "token 512 at position 1 is outside the vocab"),
    ({"model": "tiny", "prompt": [[1], [2]]}, 400, "prompt", None, "one prompt per request"),
    ({"model": "tiny", "prompt": [1] * 2048}, 400, "prompt", "context_length_exceeded", "context length is 2048"),
    ({"model": "tiny", "prompt": [1], "max_tokens": 2048}, 400, "max_tokens", "context_length_exceeded",
     "you requested 2049 tokens (1 in the prompt, 2048 in the completion)"),
    ({"model": "tiny", "prompt": [1], "max_tokens": 0}, 400, "max_tokens", None, "at least 1"),
    ({"model": "tiny", "prompt": [1], "temperature": -1}, 400, "temperature", None, "temperature must be >= 0"),
    ({"model": "tiny", "prompt": [1], "temperature": "hot"}, 400, "temperature", None, "must be a number"),
    ({"model": "tiny", "prompt": [1], "top_p": 0}, 400, "top_p", None, "top_p must be in (0, 1]"),
    ({"model": "tiny", "prompt": [1], "seed": -5}, 400, "seed", None, "seed must be None or an int"),
    ({"model": "tiny", "prompt": [1], "n": 2}, 400, "n", None, "only n=1"),
    ({"model": "tiny", "prompt": [1], "stream_options": {"include_usage": True}}, 400, "stream_options", None,
     "only allowed when 'stream' is true"),
    ({"model": "tiny", "prompt": [1], "logprobs": 3}, 400, "logprobs", "unsupported_parameter", "not supported"),
    ({"model": "tiny", "prompt": [1], "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter",
     "not supported"),
    ({"model": "tiny", "prompt": [1], "stop": "\n"}, 400, "stop", None, "use 'stop_token_ids'"),
    ({"model": "tiny", "prompt": [1], "stop_token_ids": [600]}, 400, "stop_token_ids", None, "outside the vocab"),
    ({"model": "tiny", "prompt": [1], "frobnicate": 1}, 400, "frobnicate", None, "Unrecognized request argument"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    got = []
    for body, *_ in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
        err = r.json()["error"]
        got.append((r.status_code, err["param"], err["code"], err["type"], set(err)))
        assert BAD[len(got) - 1][4] in err["message"]
    chat = httpx.post(server.url + "/v1/chat/completions",
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    missing = httpx.get(server.url + "/v1/nope")
    wrong_method = httpx.get(server.url + "/v1/completions")
    ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 10,
                                                          "temperature": 0})

    keys = {"message", "type", "param", "code"}
    assert [(s, p, c, "invalid_request_error", keys) for _, s, p, c, _ in BAD] == got
    assert (400, "no_chat_template") == (chat.status_code, chat.json()["error"]["code"])
    assert "has no tokenizer" in chat.json()["error"]["message"]
    assert (404, "not_found_error") == (missing.status_code, missing.json()["error"]["type"])
    assert 405 == wrong_method.status_code and set(wrong_method.json()["error"]) == keys
    assert (200, server.refs["greedy"]) == (ok.status_code, ok.json()["choices"][0]["token_ids"])


def test_the_openai_client_raises_the_servers_error(client):
    with pytest.raises(openai.BadRequestError, match="does not exist") as info:
        client.completions.create(model="nope", prompt=[1])

    assert ("model", "model_not_found") == (info.value.param, info.value.code)


def _metric(server, name: str, default: float | None = None) -> float:
    text = httpx.get(server.url + "/metrics").text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or
              line.startswith(name + "{")]
    if not values and default is not None:
        return default
    assert values, f"{name} not in the scrape"
    return sum(values)


def _wait_idle(server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _metric(server, "asyncbatch_kv_blocks_used") == 0 and _metric(server, "asyncbatch_requests_running") == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"still busy after {timeout} s: {server.live.stats()}")


def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(server):
    _wait_idle(server)
    cancelled = 'asyncbatch_requests_finished_total{finish_reason="cancelled"}'
    before = _metric(server, cancelled, default=0.0)
    body = {"model": "tiny", "prompt": [5] * 40, "max_tokens": 2000, "stream": True,
            "stop_token_ids": [], "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["token_ids"]:
                break
        held = server.live.stats()
    # the connection is closed here, 1 token in
    _wait_idle(server)

    assert 1 == held["running"] and held["kv_blocks_used"] >= 3  # 40 prompt tokens and more, blocks of 16
    assert before + 1 == _metric(server, cancelled)


def test_a_client_that_gives_up_on_a_whole_response_frees_its_kv_blocks(server):
    _wait_idle(server)
    body = {"model": "tiny", "prompt": [5] * 40, "max_tokens": 2000, "ignore_eos": True}

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.3))

    _wait_idle(server)


def test_200_concurrent_requests_all_complete(server):
    async def one(client: httpx.AsyncClient, prompt, max_tokens, seed):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
                "ignore_eos": True, "stream": seed % 2 == 0}
        if not body["stream"]:
            r = await client.post("/v1/completions", json=body)
            return r.status_code, r.json()["choices"][0]["token_ids"]
        tokens = []
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    tokens += json.loads(line[6:])["choices"][0]["token_ids"]
        return r.status_code, tokens

    async def main():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(one(client, *m) for m in MANY))

    results = asyncio.run(main())

    assert [(200, ref) for ref in server.refs["many"]] == results


def test_the_openai_client_retrieves_the_served_model_and_is_told_of_another(client):
    card = client.models.retrieve("tiny")
    with pytest.raises(openai.NotFoundError, match="does not exist") as info:
        client.models.retrieve("org/other")

    assert ("tiny", "model") == (card.id, card.object)
    assert (404, "model", "model_not_found") == (info.value.status_code, info.value.param, info.value.code)


def test_models_health_and_metrics(server):
    models = httpx.get(server.url + "/v1/models").json()
    health = httpx.get(server.url + "/health")
    scrape = httpx.get(server.url + "/metrics")

    assert ["tiny"] == [m["id"] for m in models["data"]]
    assert (200, {"status": "ok"}) == (health.status_code, health.json())
    assert scrape.headers["content-type"].startswith("text/plain")
    for name in ("asyncbatch_requests_waiting", "asyncbatch_requests_running", "asyncbatch_kv_blocks_used",
                 "asyncbatch_kv_blocks_total", "asyncbatch_step_seconds_count", "asyncbatch_busy_fraction",
                 "asyncbatch_time_to_first_token_seconds_count", "asyncbatch_inter_token_latency_seconds_count"):
        assert _metric(server, name) >= 0
    assert _metric(server, "asyncbatch_time_to_first_token_seconds_count") >= 1
    assert _metric(server, "asyncbatch_generation_tokens_total") >= _metric(
        server, "asyncbatch_inter_token_latency_seconds_count")
    # the costs bench-serve's overhead figures come from: host work of the steps, and CPU inside and outside
    # the step loop's thread
    work, step_seconds = (_metric(server, "asyncbatch_step_host_work_seconds_total"),
                          _metric(server, "asyncbatch_step_seconds_sum"))
    assert 0 < work <= step_seconds
    loop_cpu = _metric(server, "asyncbatch_step_loop_cpu_seconds_total")
    assert 0 < loop_cpu < _metric(server, "asyncbatch_process_cpu_seconds_total")


def test_a_served_prefix_cache_reports_cached_prompt_tokens_in_usage(tiny64):
    """`engine.prefix_cache: radix` on a server: a second request with the same 40-token prefix is told, in
    OpenAI's `usage.prompt_tokens_details.cached_tokens`, how many prompt tokens it did not prefill (whole blocks
    of 16), streamed or not; its tokens are those of the engine without a cache."""
    prefix = list(range(3, 43))
    first, second = prefix + [50, 51], prefix + [60]
    plain = Engine.from_model(tiny64, EngineConfig.from_dict({"runtime": "cpu"}))
    want = list(plain.generate([second], SamplingParams(max_new_tokens=5))[0].token_ids)
    engine = Engine.from_model(tiny64, EngineConfig.from_dict({"runtime": "cpu", "prefix_cache": "radix",
                                                               "cache": {"block_size": 16}}))
    with BackgroundServer(build_app(AsyncEngine(engine))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        cold = client.completions.create(model="tiny", prompt=first, max_tokens=5, temperature=0)
        warm = client.completions.create(model="tiny", prompt=second, max_tokens=5, temperature=0)
        chunks = list(client.completions.create(model="tiny", prompt=second, max_tokens=5, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))

    assert (0, 32) == (cold.usage.prompt_tokens_details.cached_tokens, warm.usage.prompt_tokens_details.cached_tokens)
    assert want == warm.choices[0].token_ids
    assert 32 == chunks[-1].usage.prompt_tokens_details.cached_tokens
