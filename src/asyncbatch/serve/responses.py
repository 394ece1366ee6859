"""OpenAI response objects: whole completions, streamed chunks, usage, and server-sent events.

Every choice also carries `token_ids`, the generated token ids it adds (an extension; OpenAI clients keep unknown
fields), so that a model without a tokenizer still answers with something usable.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache supplied."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class ResponseWriter:
    """Builds the objects of one response (completion or chat): one id and creation time for all its chunks."""

    def __init__(self, model: str, *, chat: bool, include_usage: bool = False) -> None:
        self.chat = chat
        self.model = model
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, token_ids: list[int], finish_reason: str,
             prompt_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
        """A non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason, "token_ids": token_ids}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                      "token_ids": token_ids}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(prompt_tokens, len(token_ids), cached_tokens)}

    def chunk(self, text: str, token_ids: list[int], finish_reason: str | None = None, *,
              role: bool = False) -> dict[str, Any]:
        """One streamed chunk; `role` starts a chat stream (the assistant's role, no content yet)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason,
                      "token_ids": token_ids}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                      "token_ids": token_ids}
            out = {**self._head("text_completion"), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
        """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}
