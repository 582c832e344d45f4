"""Responses API answers: the Response object, and its stream of typed events, from the chat API's.

A whole answer is the chat.completion the gateway collected, reshaped: text as a `message` output
item with an `output_text` part (and a `refusal` part when a JSON answer missed its schema), each
tool call as a `function_call` item. A stream translates the gateway's chat SSE stream, event by
event, into OpenAI's sequence, each event with its `event:` line and a `sequence_number`:

    response.created, response.in_progress,
    per text item: response.output_item.added, response.content_part.added,
        response.output_text.delta..., response.output_text.done, response.content_part.done,
        response.output_item.done;
    per function call: response.output_item.added, response.function_call_arguments.delta...,
        response.function_call_arguments.done, response.output_item.done;
    response.completed (response.incomplete when max_output_tokens cut it; response.failed, with
    the error, when the generation failed).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from typing import AsyncIterator

from mesh.gateway.responses import sse_chunks
from mesh.gateway.responses_parse import ResponsesAsk


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _usage(prompt: int, completion: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseShape:
    """The Response object of one request: what it repeats of the request, and its output."""

    def __init__(self, response_id: str, model: str, ask: ResponsesAsk) -> None:
        self.id = response_id
        self.model = model
        self.ask = ask
        self.created_at = int(time.time())

    def body(self, status: str, output: list[dict], usage: dict | None, error: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None, "error": error,
                "incomplete_details": incomplete, "instructions": self.ask.instructions, "model": self.model,
                "output": output, "previous_response_id": self.ask.previous,
                "reasoning": {"effort": None, "summary": None}, "store": self.ask.store,
                "truncation": "disabled", "usage": usage, **self.ask.echo}

    def whole(self, completion: dict) -> dict:
        """The Response of a collected chat.completion."""
        choice = completion["choices"][0]
        status = _status(choice["finish_reason"])
        usage = completion["usage"]
        return self.body(status, output_items(choice["message"], status),
                         _usage(usage["prompt_tokens"], usage["completion_tokens"]))


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def output_items(message: dict, status: str) -> list[dict]:
    """A chat.completion message as output items."""
    items: list[dict] = []
    content = [_text_part(message["content"])] if message.get("content") else []
    if message.get("refusal"):
        content.append({"type": "refusal", "refusal": message["refusal"]})
    if content:
        items.append({"type": "message", "id": _item_id("msg"), "status": status, "role": "assistant",
                      "content": content})
    for call in message.get("tool_calls") or ():
        items.append({"type": "function_call", "id": _item_id("fc"), "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": status})
    return items


class ResponseStream:
    """The chat SSE stream of one request as the Responses API's events."""

    def __init__(self, shape: ResponseShape, prompt_tokens: int) -> None:
        self.shape = shape
        self.seq = 0
        self.output: list[dict] = []  # items done
        self.item: dict | None = None  # the item in progress
        self.usage = _usage(prompt_tokens, 0)
        self.reason: str | None = None

    def event(self, kind: str, **data) -> bytes:
        data = {"type": kind, **data, "sequence_number": self.seq}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()

    async def render(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        yield self.event("response.created", response=self.shape.body("in_progress", [], None))
        yield self.event("response.in_progress", response=self.shape.body("in_progress", [], None))
        async with contextlib.aclosing(sse_chunks(events)) as chunks:
            async for chunk in chunks:
                if "error" in chunk:
                    for out in self._failed(chunk["error"]):
                        yield out
                    return
                for out in self._chunk(chunk):
                    yield out
        for out in self._close():
            yield out
        status = _status(self.reason)
        yield self.event(f"response.{status}", response=self.shape.body(status, self.output, self.usage))

    def _chunk(self, chunk: dict) -> list[bytes]:
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"])
        if not chunk.get("choices"):
            return []
        choice = chunk["choices"][0]
        delta = choice["delta"]
        out = self._text(delta["content"]) if delta.get("content") else []
        for piece in delta.get("tool_calls") or ():
            out += self._call(piece)
        if delta.get("refusal"):
            out += self._refusal(delta["refusal"])
        self.reason = choice.get("finish_reason") or self.reason
        return out

    def _text(self, text: str) -> list[bytes]:
        out = []
        if self.item is None or self.item["type"] != "message":
            out += self._close()
            self.item = {"type": "message", "id": _item_id("msg"), "status": "in_progress", "role": "assistant",
                         "content": []}
            out.append(self.event("response.output_item.added", output_index=len(self.output), item=self.item))
            out.append(self._part_added(_text_part("")))
        part = self.item["content"][0]
        part["text"] += text
        out.append(self.event("response.output_text.delta", item_id=self.item["id"], output_index=len(self.output),
                              content_index=0, delta=text, logprobs=[]))
        return out

    def _part_added(self, part: dict) -> bytes:
        self.item["content"].append(part)
        return self.event("response.content_part.added", item_id=self.item["id"], output_index=len(self.output),
                          content_index=len(self.item["content"]) - 1, part=dict(part, text="") if "text" in part
                          else dict(part, refusal=""))

    def _refusal(self, refusal: str) -> list[bytes]:
        """A JSON answer that missed its schema: a refusal part after the text (see mesh/gateway/tools.py)."""
        out = [] if self.item is not None and self.item["type"] == "message" else self._text("")
        part = {"type": "refusal", "refusal": refusal}
        out.append(self._part_added(part))
        index = len(self.item["content"]) - 1
        out.append(self.event("response.refusal.delta", item_id=self.item["id"], output_index=len(self.output),
                              content_index=index, delta=refusal))
        return out

    def _call(self, piece: dict) -> list[bytes]:
        fn = piece.get("function") or {}
        out = []
        if piece.get("id"):
            out += self._close()
            self.item = {"type": "function_call", "id": _item_id("fc"), "call_id": piece["id"],
                         "name": fn.get("name") or "", "arguments": "", "status": "in_progress"}
            out.append(self.event("response.output_item.added", output_index=len(self.output), item=dict(self.item)))
        if fn.get("arguments") and self.item is not None:
            self.item["arguments"] += fn["arguments"]
            out.append(self.event("response.function_call_arguments.delta", item_id=self.item["id"],
                                  output_index=len(self.output), delta=fn["arguments"]))
        return out

    def _close(self) -> list[bytes]:
        """The done events of the item in progress."""
        item, self.item = self.item, None
        if item is None:
            return []
        item["status"] = _status(self.reason) if self.reason else "completed"
        index = len(self.output)
        out = self._message_done(item, index) if item["type"] == "message" else [self.event(
            "response.function_call_arguments.done", item_id=item["id"], output_index=index,
            name=item["name"], arguments=item["arguments"])]
        self.output.append(item)
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        return out

    def _message_done(self, item: dict, index: int) -> list[bytes]:
        out = []
        for j, part in enumerate(item["content"]):
            if part["type"] == "output_text":
                out.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                      content_index=j, text=part["text"], logprobs=[]))
            else:
                out.append(self.event("response.refusal.done", item_id=item["id"], output_index=index,
                                      content_index=j, refusal=part["refusal"]))
            out.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                  content_index=j, part=part))
        return out

    def _failed(self, error: dict) -> list[bytes]:
        """The generation failed mid-stream: what was made so far, and the error."""
        out = self._close()
        code = "server_error" if error.get("type") != "service_unavailable" else "service_unavailable"
        failure = {"code": code, "message": error.get("message", "")}
        out.append(self.event("response.failed", response=self.shape.body("failed", self.output, self.usage,
                                                                          error=failure)))
        return out
