"""Text that JSON can carry but no tokenizer encodes: a lone surrogate (`"\\ud800"`) in a prompt or a chat message is
a 400 naming the parameter, not an internal error (500)."""

from __future__ import annotations

import json

import pytest

from asyncbatch.serve.protocol import ApiError, ServedModel, parse_chat, parse_completion


@pytest.fixture(scope="module")
def served():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return ServedModel("m", fast, 128, 64)


def _raw(body: dict) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as the escape "\ud800"


@pytest.mark.parametrize(("parse", "body", "param"), [
    (parse_completion, {"model": "m", "prompt": "w5 \ud800 w6"}, "prompt"),
    (parse_completion, {"model": "m", "prompt": ["w5 \udfff"]}, "prompt"),
    (parse_chat, {"model": "m", "messages": [{"role": "user", "content": "w5 \ud800"}]}, "messages"),
])
def test_a_lone_surrogate_is_a_400_naming_the_parameter(served, parse, body, param):
    with pytest.raises(ApiError) as info:
        parse(_raw(body), served)

    assert (400, param) == (info.value.status, info.value.param)
    assert "is not valid Unicode text" in info.value.message


def test_valid_text_with_an_escaped_pair_still_parses(served):
    gen = parse_completion(_raw({"model": "m", "prompt": "w5 \U0001F600 w6"}), served)

    assert (5, 0, 6) == gen.prompt_ids
