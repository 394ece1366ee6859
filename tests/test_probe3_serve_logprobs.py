"""`logprobs: 0` on `/v1/completions`, with the official `openai` client.

In the completions API `logprobs` counts the alternatives listed beside each chosen token, and the chosen token's
log probability always comes back: 0 asks for logprobs too. The server does not compute them, and its promise is
to refuse such a parameter (400, `unsupported_parameter`) rather than answer without what was asked. It served
the request with `logprobs: null`, as if none had been asked for. (Chat's `logprobs` is a flag: `false` asks for
nothing and is still served.)"""

from __future__ import annotations

import openai
import pytest

from asyncbatch import Engine, EngineConfig
from asyncbatch.serve import AsyncEngine
from asyncbatch.serve.app import build_app
from asyncbatch.serve.server import BackgroundServer


@pytest.fixture(scope="module")
def client(tiny32):
    engine = Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu"}))
    with BackgroundServer(build_app(AsyncEngine(engine))) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def test_a_completion_asking_for_logprobs_is_refused_even_with_zero_alternatives(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2, logprobs=0)

    error = info.value.body
    assert (400, "logprobs", "unsupported_parameter") == (info.value.status_code, error["param"], error["code"])
    # asking for none is served
    out = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2, extra_body={"logprobs": None})
    assert (2, None) == (len(out.choices[0].token_ids), out.choices[0].logprobs)
