"""OpenAI response and stream-chunk bodies, built from shard events.

Shapes follow the OpenAI API exactly: the same id on every chunk of a stream, the role only in
the first delta of each choice, finish_reason once per choice, a usage chunk (empty choices)
only when the client asked, and `data: [DONE]` last.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from shards.types import Piece, TokenLogprob

FINGERPRINT = "fp_quorum"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def sse_chunks(events: AsyncIterator[bytes]) -> AsyncIterator[dict]:
    """The JSON objects of a stream of sse() events, up to [DONE] (for the surfaces that translate the
    chat stream: mesh/gateway/anthropic.py, ollama.py); `events` is closed when this is."""
    async with contextlib.aclosing(events):
        async for event in events:
            data = event.decode().removeprefix("data: ").strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


def usage(prompt: int, completion: int, cached: int | None = None) -> dict:
    """OpenAI's usage object; a chat's says how many prompt tokens the replica did not prefill because it
    kept their KV cache from an earlier request (a session's previous turn): prompt_tokens_details."""
    body = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached}
    return body


def chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict:
    return {
        "content": [
            {"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in e.top]}
            for e in entries
        ],
        "refusal": None,
    }


@dataclass
class ChoiceText:
    """What one choice has produced so far (for non-streamed answers)."""
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    message: dict | None = None  # the whole message when it is not plain text (tool calls)

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.logprobs.extend(piece.logprobs)


class ChatFormat:
    def __init__(self, model: str, logprobs: bool) -> None:
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def completion(self, choices: list[ChoiceText], prompt_tokens: int, completion_tokens: int,
                   cached_tokens: int = 0) -> dict:
        return {
            **self._head("chat.completion"),
            "choices": [
                {"index": i, "message": c.message or {"role": "assistant", "content": c.text, "refusal": None},
                 "logprobs": chat_logprobs(c.logprobs) if self.logprobs else None,
                 "finish_reason": c.finish_reason}
                for i, c in enumerate(choices)
            ],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
        }

    def chunk(self, index: int, delta: dict, finish_reason: str | None = None,
              logprobs: tuple[TokenLogprob, ...] = (), with_usage_field: bool = False) -> dict:
        body = {**self._head("chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta,
                             "logprobs": chat_logprobs(logprobs) if self.logprobs and logprobs else None,
                             "finish_reason": finish_reason}]}
        if with_usage_field:
            body["usage"] = None
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [],
                "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


class CompletionFormat:
    def __init__(self, model: str, logprobs: bool) -> None:
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs

    def _head(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def legacy_logprobs(self, entries: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        offsets, pos = [], offset
        for e in entries:
            offsets.append(pos)
            pos += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{t: lp for t, lp, _ in e.top} for e in entries], "text_offset": offsets}

    def completion(self, choices: list[ChoiceText], prompt_tokens: int, completion_tokens: int,
                   prefixes: list[str]) -> dict:
        return {
            **self._head(),
            "choices": [
                {"index": i, "text": prefixes[i] + c.text, "finish_reason": c.finish_reason,
                 "logprobs": self.legacy_logprobs(c.logprobs, len(prefixes[i]))}
                for i, c in enumerate(choices)
            ],
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def chunk(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None,
              with_usage_field: bool) -> dict:
        body = {**self._head(), "choices": [{"index": index, "text": text, "finish_reason": finish_reason,
                                            "logprobs": logprobs}]}
        if with_usage_field:
            body["usage"] = None
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        return {**self._head(), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
