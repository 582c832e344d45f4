"""Rendering a Run's typed events as an OpenAI stream, once for every endpoint.

`render` owns what every stream shares: a failure ends it with an error chunk, the usage chunk
comes last when the client asked for it, then `data: [DONE]`, and the run is cancelled however the
stream ends (a client that leaves stops its generation). What differs per endpoint is a small
renderer turning one event into chunk bodies: a chat's text, a chat whose answers may be tool calls,
a completion's text. The same renderers run on the leader and on a member relaying to it, which
receives the leader's typed events (mesh/gateway/leader_link.py) and renders them itself, so a
stream resumed through a new leader goes on under the same id with nothing sent twice.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from mesh.gateway.responses import ChatFormat, CompletionFormat, sse
from mesh.gateway.runs import Run, stream_failure
from mesh.gateway.tools import ToolShaper, ToolUse, content_violation
from shards.types import Event, Failed, Finished, Piece, TokenLogprob


class Renderer(Protocol):
    def event(self, index: int, event: Event) -> list[dict]:
        """The chunk bodies one Piece or Finished of choice `index` becomes."""

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict: ...


async def render(run: Run, renderer: Renderer, include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE stream of `run`'s events through `renderer`."""
    completion = cached = 0
    try:
        async for index, event in run.events(stream=True):
            if isinstance(event, Failed):
                yield sse(stream_failure(event).body())
                return
            for body in renderer.event(index, event):
                yield sse(body)
            if isinstance(event, Finished):
                completion += event.completion_tokens
                cached = max(cached, event.cached_tokens)
        if include_usage:
            yield sse(renderer.usage_chunk(run.prompt_tokens, completion, cached))
        yield sse("[DONE]")
    finally:
        run.cancel()


class ChatStream:
    """A chat's text: the role on each choice's first chunk, then its content, then its finish (after
    a refusal when a JSON answer missed its response_format schema)."""

    def __init__(self, fmt: ChatFormat, tool_use: ToolUse | None, include_usage: bool) -> None:
        self.fmt = fmt
        self.tool_use = tool_use
        self.usage_field = include_usage
        self.texts: dict[int, str] = {}  # each choice's text, for the schema check at its end

    def event(self, index: int, event: Event) -> list[dict]:
        chunks = []
        if index not in self.texts:
            self.texts[index] = ""
            chunks.append(self._chunk(index, {"role": "assistant", "content": "", "refusal": None}))
        if isinstance(event, Piece):
            self.texts[index] += event.text
            chunks.append(self._chunk(index, {"content": event.text}, logprobs=event.logprobs))
        elif isinstance(event, Finished):
            if (problem := content_violation(self.tool_use, self.texts[index])) is not None:
                chunks.append(self._chunk(index, {"refusal": problem}))
            chunks.append(self._chunk(index, {}, finish_reason=event.reason))
        return chunks

    def _chunk(self, index: int, delta: dict, finish_reason: str | None = None,
               logprobs: tuple[TokenLogprob, ...] = ()) -> dict:
        return self.fmt.chunk(index, delta, finish_reason=finish_reason, logprobs=logprobs,
                              with_usage_field=self.usage_field)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        return self.fmt.usage_chunk(prompt_tokens, completion_tokens, cached_tokens)


class ToolCallStream(ChatStream):
    """A chat whose answers may be tool calls: each choice's text goes through a ToolShaper, which
    holds a call's header back until it is whole and then releases its arguments as they come. The
    role rides on each choice's first delta; the logprobs of text held back go out with the next chunk."""

    def __init__(self, fmt: ChatFormat, tool_use: ToolUse, include_usage: bool) -> None:
        super().__init__(fmt, tool_use, include_usage)
        self.shapers: dict[int, ToolShaper] = {}
        self.started: set[int] = set()
        self.held: dict[int, list[TokenLogprob]] = {}  # per choice: logprobs not sent yet

    def event(self, index: int, event: Event) -> list[dict]:
        shaper = self.shapers.setdefault(index, ToolShaper(self.tool_use))
        if isinstance(event, Piece):
            self.held.setdefault(index, []).extend(event.logprobs)
            return [self._delta(index, delta) for delta in shaper.feed(event.text)]
        if isinstance(event, Finished):
            chunks = [self._delta(index, delta) for delta in shaper.finish()]
            return [*chunks, self._delta(index, {}, shaper.finish_reason(event.reason))]
        return []

    def _delta(self, index: int, delta: dict, finish_reason: str | None = None) -> dict:
        if index not in self.started:
            self.started.add(index)
            delta = {"role": "assistant", "content": None, "refusal": None, **delta}
        return self._chunk(index, delta, finish_reason, tuple(self.held.pop(index, ())))


class CompletionStream:
    """A completion's text (after its prompt, with `echo`), legacy logprobs with text offsets."""

    def __init__(self, fmt: CompletionFormat, prompts: tuple[str, ...], n: int, echo: bool,
                 include_usage: bool) -> None:
        self.fmt = fmt
        self.prompts = prompts
        self.n = n
        self.echo = echo
        self.usage_field = include_usage
        self.offsets: dict[int, int] = {}  # per choice: characters sent (for logprobs' text offsets)

    def event(self, index: int, event: Event) -> list[dict]:
        chunks = []
        if index not in self.offsets:
            self.offsets[index] = 0
            if self.echo:
                prompt = self.prompts[index // self.n]
                self.offsets[index] = len(prompt)
                chunks.append(self.fmt.chunk(index, prompt, None, None, self.usage_field))
        if isinstance(event, Piece):
            lp = self.fmt.legacy_logprobs(event.logprobs, self.offsets[index])
            self.offsets[index] += len(event.text)
            chunks.append(self.fmt.chunk(index, event.text, None, lp, self.usage_field))
        elif isinstance(event, Finished):
            chunks.append(self.fmt.chunk(index, "", event.reason, None, self.usage_field))
        return chunks

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        return self.fmt.usage_chunk(prompt_tokens, completion_tokens, cached_tokens)
