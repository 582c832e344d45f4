"""Resuming a relayed chat stream on a new leader.

A member relaying a streamed chat answer from the leader keeps what the client has received: per
choice, the tokens (the leader adds them to each chunk of a relayed stream, in an `x_quorum`
field the relaying member strips), the characters, whether its role chunk and its finish were
sent. If the leader dies mid-stream, the member sends the same request to the next leader with
that state in an `X-Quorum-Resume` header; the new leader resumes each unfinished choice exactly
as it would after losing a replica (mesh/replicas/failover.py) and continues the stream under the same id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

RESUME_HEADER = "x-quorum-resume"
EXTRA = "x_quorum"
MAX_HEADER_BYTES = 256 * 1024


class BadResume(ValueError):
    """A resume header that is not one this mesh wrote."""


@dataclass
class ChoiceProgress:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    started: bool = False
    finished: bool = False
    completion_tokens: int = 0


@dataclass
class StreamState:
    id: str = ""
    created: int = 0
    prompt_tokens: int = 0
    choices: dict[int, ChoiceProgress] = field(default_factory=dict)
    done: bool = False

    def observe(self, event: bytes) -> bytes:
        """Notes one SSE event from the leader; returns it as the client must see it."""
        if not event.startswith(b"data: "):
            return event
        payload = event[6:].strip()
        if payload == b"[DONE]":
            self.done = True
            return event
        try:
            chunk = json.loads(payload)
        except ValueError:
            return event
        if not isinstance(chunk, dict):
            return event
        extra = chunk.pop(EXTRA, None)
        self.id = chunk.get("id", self.id)
        self.created = chunk.get("created", self.created)
        for choice in chunk.get("choices") or ():
            progress = self.choices.setdefault(int(choice.get("index", 0)), ChoiceProgress())
            delta = choice.get("delta") or {}
            progress.started = progress.started or "role" in delta
            progress.text += delta.get("content") or ""
            if choice.get("finish_reason"):
                progress.finished = True
        if isinstance(extra, dict):
            self.prompt_tokens = int(extra.get("prompt_tokens", self.prompt_tokens))
            index = int(extra.get("index", 0))
            progress = self.choices.setdefault(index, ChoiceProgress())
            progress.tokens.extend(int(t) for t in extra.get("tokens", ()))
            if "completion_tokens" in extra:
                progress.completion_tokens = int(extra["completion_tokens"])
        if extra is None:
            return event
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def header(self) -> str:
        return json.dumps({"id": self.id, "created": self.created, "prompt_tokens": self.prompt_tokens,
                           "choices": {str(i): vars(c) for i, c in self.choices.items()}}, separators=(",", ":"))

    @classmethod
    def from_header(cls, text: str, choices: int) -> StreamState:
        if len(text) > MAX_HEADER_BYTES:
            raise BadResume("resume state too large")
        try:
            raw = json.loads(text)
            state = cls(id=str(raw["id"]), created=int(raw["created"]), prompt_tokens=int(raw["prompt_tokens"]))
            for key, c in raw["choices"].items():
                index = int(key)
                if not 0 <= index < choices:
                    raise BadResume(f"choice {index} out of range")
                state.choices[index] = ChoiceProgress(
                    tokens=[int(t) for t in c["tokens"]], text=str(c["text"]), started=bool(c["started"]),
                    finished=bool(c["finished"]), completion_tokens=int(c["completion_tokens"]))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise BadResume(f"malformed resume state: {exc}") from None
        if not state.id.startswith("chatcmpl-"):
            raise BadResume("resume state names no chat stream")
        return state

    def first_unfinished(self, choices: int) -> int:
        return next((i for i in range(choices) if not self.choices.get(i, ChoiceProgress()).finished), choices)


def split_events(buffer: bytearray) -> list[bytes]:
    """Takes the complete SSE events (ending in a blank line) off the front of `buffer`."""
    events = []
    while (end := buffer.find(b"\n\n")) >= 0:
        events.append(bytes(buffer[:end + 2]))
        del buffer[:end + 2]
    return events
