"""How every generating route starts its Run, written once for OpenAI's, Anthropic's, Ollama's and the
Responses API's routes, so each of their streams survives the loss of the leader the same way.

- On a member relaying a stream to the leader (a LeaderLink in the ASGI scope, put there by
  mesh/gateway/forward.py), the leader generates: the Run is the leader's typed events
  (mesh/gateway/leader_link.py), and this member's route renders them into the client's stream in its
  own API's shape, resuming through the next leader if the leader is lost.
- On the leader, answering such a relaying member (`x-quorum-relay: events` on its peer port), the
  answer is the Run's typed events themselves (mesh/gateway/event_wire.py), resumed from a choice's
  tokens when the member asks (`x-quorum-resume`).
- Anywhere else, the gateway admits the request here (a 429 comes before any byte of a stream).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from mesh.core.errors import bad_request
from mesh.core.metrics import Metrics
from mesh.gateway.disconnect import until_disconnect
from mesh.gateway.event_wire import (
    CHOICES_HEADER,
    NDJSON,
    PROMPT_TOKENS_HEADER,
    RELAY_HEADER,
    RESUME_HEADER,
    BadResume,
    event_lines,
    parse_resume,
)
from mesh.gateway.leader_client import FORWARDED
from mesh.gateway.leader_link import LEADER_LINK
from mesh.gateway.runs import Run
from mesh.gateway.service import choices_of

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Start = Callable[..., Awaitable[Run]]  # (request, resume=None) -> Run: the gateway's start_chat or start_completion


async def start_run(request: Request, req: Any, start: Start, metrics: Metrics) -> Run | Response:
    """The Run of `req` (see the module doc), or, on the leader answering a relaying member, the
    Response carrying its typed events (the route returns it as it is)."""
    link = request.scope.get(LEADER_LINK)
    if link is not None:  # relayed by this member: the leader generates, this member renders
        return await until_disconnect(request, link.start(req, start, metrics))
    if request.headers.get(FORWARDED) and request.headers.get(RELAY_HEADER) == "events":
        return await typed_events(request, req, start)  # a member relays this request to its leader
    return await start(req)


async def typed_events(request: Request, req: Any, start: Start) -> Response:
    """The leader's answer to a relaying member: its Run's typed events (mesh/gateway/event_wire.py)."""
    try:
        resume = parse_resume(request.headers.get(RESUME_HEADER), choices_of(req))
    except BadResume as exc:
        raise bad_request(str(exc), RESUME_HEADER) from None
    run = await start(req, resume)
    return StreamingResponse(event_lines(run), media_type=NDJSON, headers={
        **STREAM_HEADERS, PROMPT_TOKENS_HEADER: str(run.prompt_tokens), CHOICES_HEADER: str(run.choices)})
