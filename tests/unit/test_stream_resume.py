"""mesh/gateway/stream_resume.py: what a relaying member keeps of a chat stream, and the resume header."""

from __future__ import annotations

import json

import pytest

from mesh.gateway.stream_resume import EXTRA, BadResume, StreamState, split_events


def event(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(index=0, delta=None, finish=None, extra=None) -> dict:
    body = {"id": "chatcmpl-abc", "created": 7, "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta or {}, "finish_reason": finish}]}
    if extra is not None:
        body[EXTRA] = {"index": index, **extra}
    return body


def test_observe_tracks_progress_and_strips_the_private_field():
    state = StreamState()
    out = state.observe(event(chunk(delta={"role": "assistant", "content": ""}, extra={"prompt_tokens": 9})))
    assert EXTRA.encode() not in out and json.loads(out[6:])["id"] == "chatcmpl-abc"
    state.observe(event(chunk(delta={"content": "Hel"}, extra={"tokens": [1, 2]})))
    state.observe(event(chunk(delta={"content": "lo"}, extra={"tokens": [3]})))
    c = state.choices[0]
    assert (c.tokens, c.text, c.started, c.finished, state.prompt_tokens) == ([1, 2, 3], "Hello", True, False, 9)
    state.observe(event(chunk(finish="stop", extra={"completion_tokens": 3})))
    assert state.choices[0].finished and state.choices[0].completion_tokens == 3
    assert state.first_unfinished(2) == 1
    assert state.observe(b"data: [DONE]\n\n") == b"data: [DONE]\n\n" and state.done


def test_header_round_trip():
    state = StreamState()
    state.observe(event(chunk(delta={"role": "assistant", "content": "hi"}, extra={"tokens": [5], "prompt_tokens": 4})))
    again = StreamState.from_header(state.header(), choices=1)
    assert again.choices[0].tokens == [5] and again.id == "chatcmpl-abc" and again.prompt_tokens == 4


@pytest.mark.parametrize("text", ["", "nope", "[]", "[" * 100_000, json.dumps({"id": "x"}), "{" * 10_000,
                                  json.dumps({"id": "chatcmpl-a", "created": 1, "prompt_tokens": 1,
                                              "choices": {"5": {"tokens": [], "text": "", "started": True,
                                                                "finished": False, "completion_tokens": 0}}}),
                                  json.dumps({"id": "other", "created": 1, "prompt_tokens": 1, "choices": {}}),
                                  "x" * 300_000])
def test_malformed_or_hostile_resume_headers_are_refused(text):
    with pytest.raises(BadResume):
        StreamState.from_header(text, choices=1)


def test_split_events_keeps_partial_events_for_later():
    buffer = bytearray(b"data: a\n\ndata: b\n\ndata: c")
    assert split_events(buffer) == [b"data: a\n\n", b"data: b\n\n"]
    assert bytes(buffer) == b"data: c"
