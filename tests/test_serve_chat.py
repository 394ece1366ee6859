"""The HTTP server on a local checkpoint with a tokenizer and a chat template (saved by this module; no hub): the
`openai` client's chat completions, streamed and whole, give the text and tokens of `Engine.generate` on the
templated prompt; text prompts; stop strings, also across token boundaries; bad messages.

Every test runs against both front ends: uvicorn in a thread beside the engine (`thread`), and `asyncbatch serve`
started as a user starts it, with the HTTP side in a process of its own (`process`, the default)."""

from __future__ import annotations

import httpx
import openai
import pytest
import yaml
from serve_process import ServeProcess

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.serve import AsyncEngine
from asyncbatch.serve.app import build_app
from asyncbatch.serve.server import BackgroundServer

MESSAGES = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w5 w6 w7"}]
TEXT_PROMPT = "w100 w200 w300"
GREEDY = {"max_tokens": 12, "temperature": 0}
SAMPLED = {"max_tokens": 10, "temperature": 0.9, "seed": 21}


def _save_tokenizer(path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # contents, one after another
    fast.save_pretrained(path)


def _params(kw: dict) -> SamplingParams:
    return SamplingParams(max_new_tokens=kw["max_tokens"], temperature=kw["temperature"], seed=kw.get("seed"))


@pytest.fixture(scope="module", params=["thread", "process"])
def server(request, tmp_path_factory, tiny64):
    path = tmp_path_factory.mktemp("chat-ckpt")
    tiny64.save_pretrained(path)
    _save_tokenizer(path, tiny64.config.vocab_size)
    engine_cfg = {"model": {"path": str(path), "dtype": "float64"}, "runtime": "cpu", "threads": 1,
                  "serve": {"model_name": "tiny-chat", "front_end": request.param}}
    engine = Engine.from_config(EngineConfig.from_dict(engine_cfg))
    tok = engine.tokenizer
    chat_ids = tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
    text_ids = tok.encode(TEXT_PROMPT)
    refs = {name: list(engine.generate([ids], _params(kw))[0].token_ids)
            for name, ids, kw in (("chat_greedy", chat_ids, GREEDY), ("chat_sampled", chat_ids, SAMPLED),
                                  ("text_greedy", text_ids, GREEDY))}
    if request.param == "thread":
        context = BackgroundServer(build_app(AsyncEngine(engine)))
    else:
        config = path / "serve.yaml"
        config.write_text(yaml.safe_dump({"engine": engine_cfg}))
        context = ServeProcess(config)
    with context as srv:
        srv.refs = refs
        srv.decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
        srv.prompt_tokens = len(chat_ids)
        yield srv
    if request.param == "process":
        assert 0 == srv.code, srv.text


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize(("name", "kwargs"), [("chat_greedy", GREEDY), ("chat_sampled", SAMPLED)])
def test_a_streamed_chat_completion_equals_generate(server, client, name, kwargs):
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, stream=True, **kwargs))

    ref = server.refs[name]
    assert "assistant" == chunks[0].choices[0].delta.role
    assert server.decode(ref) == "".join(c.choices[0].delta.content or "" for c in chunks)
    assert ref == [t for c in chunks for t in c.choices[0].token_ids]
    assert (len(ref) < kwargs["max_tokens"] and "stop" or "length") == chunks[-1].choices[0].finish_reason


def test_a_whole_chat_completion(server, client):
    out = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, **GREEDY)

    ref = server.refs["chat_greedy"]
    assert ("assistant", server.decode(ref)) == (out.choices[0].message.role, out.choices[0].message.content)
    assert (server.prompt_tokens, len(ref)) == (out.usage.prompt_tokens, out.usage.completion_tokens)
    assert "chat.completion" == out.object


def _boundary_stop(text: str) -> str:
    """Three characters around the second space of `text`: the end of one token's text and the next one's start."""
    i = text.index(" ", text.index(" ") + 1)
    return text[i - 1 : i + 2]


def test_text_prompts_and_stop_strings(server, client):
    full = server.decode(server.refs["text_greedy"])
    stop = _boundary_stop(full)
    expected = full[: full.index(stop)]

    plain = client.completions.create(model="tiny-chat", prompt=TEXT_PROMPT, **GREEDY)
    whole = client.completions.create(model="tiny-chat", prompt=TEXT_PROMPT, stop=["zzz", stop], **GREEDY)
    chunks = list(client.completions.create(model="tiny-chat", prompt=TEXT_PROMPT, stop=stop, stream=True,
                                            **GREEDY))

    assert full == plain.choices[0].text
    assert (expected, "stop") == (whole.choices[0].text, whole.choices[0].finish_reason)
    assert (expected, "stop") == ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason)
    assert len(whole.choices[0].token_ids) < len(server.refs["text_greedy"])  # generation stopped early


@pytest.mark.parametrize(("messages", "param", "words"), [
    ([{"role": "wizard", "content": "w5"}], "messages[0]", "'role' in"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content",
     "only text parts"),
    ([], "messages", "non-empty list"),
])
def test_bad_messages_are_refused(server, messages, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-chat", "messages": messages})

    err = r.json()["error"]
    assert (400, param) == (r.status_code, err["param"])
    assert words in err["message"]
