"""The leader's typed events for a member relaying a request to it, and where to resume one.

A member that is not the leader relays a streamed generation to the leader's peer port with
`x-quorum-relay: events`. The leader admits it as always and answers with its Run's typed events
instead of a rendered stream: a 200 whose headers carry the prompt's token count and the number of
choices, then one JSON object per line (application/x-ndjson), each one event of one choice:

    {"i": 0, "text": "Hel", "tokens": [9259], "logprobs": [["Hel", -0.1, [72, 101, 108], [["Hi", -2.3, [72, 105]]]]]}
    {"i": 0, "finish": "stop", "prompt_tokens": 12, "completion_tokens": 7}   (+ "cached_tokens": 64 when reused)
    {"i": 0, "error": "the replica was lost and no other could resume", "retryable": false}

The relaying member renders the client's stream from them itself (mesh/gateway/stream_render.py)
and keeps each choice's token ids. If the leader dies or freezes, it sends the same request to the
next leader with `x-quorum-resume: {"choice": C, "tokens": [...]}`: that leader admits choice C
alone, going on from those tokens, exactly as a replica resumes a lost one's choice
(mesh/replicas/failover.py). Both headers are honoured on the peer port only (a member's
certificate vouches for them; mesh/security/peer_tls.py strips them from the public port), and a
resume is still checked here like any input: a malformed one is a 400, never a 5xx.

JSON rather than protobuf: a witness relays too, and its base install has no protobuf.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from mesh.gateway.runs import Run
from mesh.replicas.failover import ResumeAt
from shards.types import Event, Failed, Finished, Piece, TokenLogprob

RELAY_HEADER = "x-quorum-relay"  # "events": answer a relaying member with typed events
RESUME_HEADER = "x-quorum-resume"
PROMPT_TOKENS_HEADER = "x-quorum-prompt-tokens"
CHOICES_HEADER = "x-quorum-choices"
NDJSON = "application/x-ndjson"
MAX_RESUME_BYTES = 256 * 1024
MAX_RESUME_TOKENS = 32768  # more than any context window a member on this mesh loads
TOKEN_IDS = range(0, 1 << 31)  # as the shards' gRPC carries them (int32)


class BadResume(ValueError):
    """A resume header that is not one a relaying member writes."""


class BadFrame(ValueError):
    """A line of the leader's events that is not one this module writes."""


# -- the leader's side: a Run's events, one line each ---------------------------------------------

async def event_lines(run: Run) -> AsyncIterator[bytes]:
    """`run`'s typed events as lines; a failure is the last line; the run is cancelled at the end."""
    try:
        async for index, event in run.events(stream=True):
            yield encode(index, event)
            if isinstance(event, Failed):
                return
    finally:
        run.cancel()


def encode(index: int, event: Event) -> bytes:
    if isinstance(event, Piece):
        frame = {"i": index, "text": event.text, "tokens": list(event.tokens)}
        if event.logprobs:
            frame["logprobs"] = [[lp.token, lp.logprob, list(lp.bytes), [[t, p, list(b)] for t, p, b in lp.top]]
                                 for lp in event.logprobs]
    elif isinstance(event, Finished):
        frame = {"i": index, "finish": event.reason, "prompt_tokens": event.prompt_tokens,
                 "completion_tokens": event.completion_tokens}
        if event.cached_tokens:
            frame["cached_tokens"] = event.cached_tokens
    elif isinstance(event, Failed):
        frame = {"i": index, "error": event.message, "retryable": event.retryable}
    else:
        raise TypeError(f"not a generation event: {event!r}")
    return json.dumps(frame, separators=(",", ":")).encode() + b"\n"


def resume_header(at: ResumeAt) -> str:
    return json.dumps({"choice": at.choice, "tokens": list(at.tokens)}, separators=(",", ":"))


def parse_resume(text: str | None, choices: int) -> ResumeAt | None:
    """Where a relaying member asks to resume (None: not a resume); BadResume when the header is
    not one it would write: not JSON, a choice outside the request's, token ids outside int32."""
    if text is None:
        return None
    if len(text) > MAX_RESUME_BYTES:
        raise BadResume("resume state too large")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadResume(f"malformed resume state: {exc}") from None
    if not isinstance(raw, dict) or set(raw) != {"choice", "tokens"}:
        raise BadResume("resume state must be {\"choice\": int, \"tokens\": [int]}")
    choice, tokens = raw["choice"], raw["tokens"]
    if not _is_int(choice) or not 0 <= choice < choices:
        raise BadResume(f"resume choice out of range (the request has {choices})")
    if not isinstance(tokens, list) or len(tokens) > MAX_RESUME_TOKENS:
        raise BadResume(f"resume tokens must be a list of at most {MAX_RESUME_TOKENS} token ids")
    if not all(_is_int(t) and t in TOKEN_IDS for t in tokens):
        raise BadResume("resume tokens must be token ids (0 <= id < 2^31)")
    return ResumeAt(choice, tuple(tokens))


# -- the relaying member's side --------------------------------------------------------------------

def decode(line: bytes | str) -> tuple[int, Event]:
    """(choice index, event) of one line from the leader; BadFrame for anything else."""
    try:
        frame = json.loads(line)
        index = frame["i"]
        if not _is_int(index) or index < 0:
            raise BadFrame(f"bad choice index {index!r}")
        if "text" in frame:
            logprobs = tuple(TokenLogprob(str(t), float(p), tuple(int(x) for x in b),
                                          tuple((str(tt), float(tp), tuple(int(x) for x in tb)) for tt, tp, tb in top))
                             for t, p, b, top in frame.get("logprobs", ()))
            return index, Piece(str(frame["text"]), tuple(int(t) for t in frame["tokens"]), logprobs)
        if "finish" in frame:
            return index, Finished(str(frame["finish"]), int(frame["prompt_tokens"]), int(frame["completion_tokens"]),
                                   cached_tokens=int(frame.get("cached_tokens", 0)))
        if "error" in frame:
            return index, Failed(str(frame["error"]), bool(frame["retryable"]))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BadFrame(f"malformed event from the leader: {exc}") from None
    raise BadFrame(f"unknown event from the leader: {str(line)[:200]}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
