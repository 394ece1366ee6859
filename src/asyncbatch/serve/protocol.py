"""OpenAI request bodies in, engine requests out: parsing and validation for `/v1/completions` and
`/v1/chat/completions`. Every refusal is an `ApiError` that names the parameter, in the OpenAI error shape.

What is accepted beyond the OpenAI API: `prompt` as a list of token ids (OpenAI allows it too), and the extensions
`stop_token_ids`, `top_k` (0 or -1: off) and `ignore_eos`, as vLLM spells them. Parameters that would change the result and are not implemented
(`n` > 1, logprobs, penalties, logit bias, echo, suffix, tools) are refused rather than ignored, and so are keys
the API does not know.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from ..core.errors import RequestError
from ..core.types import SamplingParams, show

# Values these parameters may take without changing what is generated; anything else is refused as unsupported.
_NEUTRAL = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "best_of": (1,),
    "echo": (False,), "suffix": ("",), "top_logprobs": (0,), "tools": ([],), "functions": ([],),
    "tool_choice": ("none",), "function_call": ("none",), "response_format": ({"type": "text"},),
}
_IGNORED = ("user", "parallel_tool_calls", "service_tier", "store", "metadata")
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "logprobs",
           "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "stop_token_ids", "ignore_eos", *_IGNORED}
_COMPLETION_KEYS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
_CHAT_KEYS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                        "tool_choice", "functions", "function_call"}
_ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


class ApiError(Exception):
    """A refused HTTP request: status and the OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def served_model_name(config: Any) -> str:
    """`engine.serve.model_name`, else the checkpoint path, else the preset's name (`config`: an `EngineConfig`)."""
    model = config.model
    return config.serve.model_name or model.path or model.source_preset or "model"


@attrs.frozen
class ServedModel:
    """What request parsing needs to know of the served model."""

    name: str
    tokenizer: Any
    max_len: int
    vocab: int

    def no_tokenizer(self) -> str:
        return f"this model ({self.name!r}) has no tokenizer"


@attrs.frozen
class GenerationRequest:
    """One parsed request: token ids, sampling values, and how to answer."""

    chat: bool
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    return body


def parse_completion(raw: bytes, model: ServedModel) -> GenerationRequest:
    body = _checked(raw, model, _COMPLETION_KEYS)
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required", param="prompt")
    ids = _prompt(body["prompt"], model)
    return _generation(body, model, ids, chat=False, max_tokens=_opt_int(body, "max_tokens"))


def parse_chat(raw: bytes, model: ServedModel) -> GenerationRequest:
    body = _checked(raw, model, _CHAT_KEYS)
    messages = _messages(body.get("messages"))
    tok = model.tokenizer
    if tok is None:
        raise ApiError(400, f"chat completions need the model's chat template, and {model.no_tokenizer()}: serve a "
                            "checkpoint that has one (engine.model.path or engine.model.tokenizer), or use "
                            "/v1/completions with a prompt of token ids", param="messages", code="no_chat_template")
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, f"chat completions need a chat template, and the tokenizer of {model.name!r} has none: "
                            "use /v1/completions", param="messages", code="no_chat_template")
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001  (the template's own error: a role order it refuses, ...)
        raise ApiError(400, f"the chat template refused the messages: {exc}", param="messages") from None
    ids = tuple(tok.encode(_unicode(text, "messages"), add_special_tokens=False))  # the template writes any BOS
    given = _opt_int(body, "max_completion_tokens")
    return _generation(body, model, ids, chat=True, max_tokens=given if given is not None else
                       _opt_int(body, "max_tokens"))


# ---------------------------------------------------------------- parts


def _checked(raw: bytes, model: ServedModel, known: set[str]) -> dict[str, Any]:
    body = parse_body(raw)
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError(400, f"'model' is required: a string, the served model {model.name!r}", param="model")
    if name != model.name:
        raise ApiError(400, f"The model {name!r} does not exist: this server serves {model.name!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    for key in body:
        if key not in known:
            raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key)
    for key, neutral in _NEUTRAL.items():
        v = body.get(key)
        if v is not None and not any(v == ok and type(v) is type(ok) for ok in neutral):
            raise ApiError(400, f"'{key}' is not supported by this server (got {show(body[key])})", param=key,
                           code="unsupported_parameter")
    return body


def _prompt(value: Any, model: ServedModel) -> tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        if model.tokenizer is None:
            raise ApiError(400, f"text prompts need a tokenizer, and {model.no_tokenizer()}: send the prompt as a "
                                "list of token ids", param="prompt")
        ids = tuple(model.tokenizer.encode(_unicode(value, "prompt")))
    elif isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        ids = tuple(value)
    elif isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise ApiError(400, f"one prompt per request: got a list of {len(value)} prompts; send one request each",
                       param="prompt")
    else:
        raise ApiError(400, f"'prompt' must be a string or a list of token ids, got {show(value)}", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty: a request needs at least one prompt token", param="prompt")
    for i, t in enumerate(ids):
        if not 0 <= t < model.vocab:
            raise ApiError(400, f"prompt token {t} at position {i} is outside the vocabulary [0, {model.vocab})",
                           param="prompt")
    return ids


def _unicode(text: str, param: str) -> str:
    """`text` if it is valid Unicode: JSON's escapes can spell a lone surrogate (`"\\ud800"`), which no tokenizer
    encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"'{param}' is not valid Unicode text: {exc.reason} ({show(exc.object[exc.start:exc.end])}"
                            f" at position {exc.start})", param=param) from None
    return text


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(400, f"{where} must be an object with a 'role' in {list(_ROLES)}, got {show(m)}",
                           param=where)
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"{where}.content: only text parts are supported, got {show(part)}",
                                   param=f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts, got {show(content)}",
                           param=f"{where}.content")
        out.append({**m, "content": content})
    return out


def _generation(body: dict[str, Any], model: ServedModel, ids: tuple[int, ...], *, chat: bool,
                max_tokens: int | None) -> GenerationRequest:
    n = len(ids)
    room = model.max_len - n
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {model.max_len} tokens, and the prompt has {n}: "
                            f"at most {model.max_len - 1} prompt tokens leave room for a new one",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = room if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
    elif max_tokens < 1:
        raise ApiError(400, f"'{key}' must be at least 1, got {max_tokens}", param=key)
    elif max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {model.max_len} tokens. However, you requested "
                            f"{n + max_tokens} tokens ({n} in the {'messages' if chat else 'prompt'}, {max_tokens} in "
                            "the completion). Please reduce the length of the prompt or the completion.",
                       param=key, code="context_length_exceeded")
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise ApiError(400, f"only n=1 is supported, got {show(body.get('n'))}", param="n")
    logprobs = body.get("logprobs")
    # Chat's logprobs is a flag (false: none). A completion's is how many alternatives to list beside the chosen
    # token, whose log probability it always asks for: 0 too wants logprobs back, so only null (or false) is none.
    if not (logprobs is None or logprobs is False or (chat and type(logprobs) is int and logprobs == 0)):
        why = "" if chat or logprobs != 0 else ": a completion's logprobs 0 asks for the chosen tokens' ones"
        raise ApiError(400, f"'logprobs' is not supported by this server (got {show(logprobs)}{why})",
                       param="logprobs", code="unsupported_parameter")
    stream = _opt_bool(body, "stream") or False
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, f"'stream_options' must be an object with 'include_usage', got {show(options)}",
                           param="stream_options")
        include_usage = _opt_bool(options, "include_usage", "stream_options.include_usage") or False
    stop = _stop(body.get("stop"), model)
    temperature = _opt_number(body, "temperature")
    top_p = _opt_number(body, "top_p")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not (isinstance(stop_ids, list) and
                                     all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
        raise ApiError(400, f"'stop_token_ids' must be a list of token ids, got {show(stop_ids)}",
                       param="stop_token_ids")
    top_k = _opt_int(body, "top_k")
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p, top_k=0 if top_k in (None, -1) else top_k,  # -1: vLLM's "off"
        seed=_opt_int(body, "seed"),
        stop_token_ids=tuple(stop_ids or ()), ignore_eos=_opt_bool(body, "ignore_eos") or False)
    try:
        params.validate()
    except RequestError as exc:
        field = str(exc).split(" ", 1)[0]  # RequestError messages start with the field's name
        raise ApiError(400, str(exc), param=field) from None
    for t in params.stop_token_ids:
        if t >= model.vocab:
            raise ApiError(400, f"stop token {t} is outside the vocabulary [0, {model.vocab})", param="stop_token_ids")
    return GenerationRequest(chat, ids, params, stream=stream, include_usage=include_usage, stop=stop)


def _stop(value: Any, model: ServedModel) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of them, got {show(value)}", param="stop")
    if stops and model.tokenizer is None:
        raise ApiError(400, f"stop strings need a tokenizer, and {model.no_tokenizer()}: use 'stop_token_ids'",
                       param="stop")
    return tuple(stops)


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise ApiError(400, f"'{key}' must be an integer, got {show(v)}", param=key)
    return v


def _opt_number(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ApiError(400, f"'{key}' must be a number, got {show(v)}", param=key)
    return v


def _opt_bool(body: dict[str, Any], key: str, name: str | None = None) -> bool | None:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"'{name or key}' must be true or false, got {show(v)}", param=name or key)
    return v
