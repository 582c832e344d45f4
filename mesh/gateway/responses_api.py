"""OpenAI's Responses API (POST /v1/responses) on the gateway, for the `openai` SDK's
`client.responses` and the agents that speak it.

Nothing here generates: a request is translated into the gateway's ChatRequest
(mesh/gateway/responses_parse.py), so admission (429), routing, replica failover, validation and
errors are the chat API's, in OpenAI's error shape; the answer or the stream is translated back
(mesh/gateway/responses_render.py). Accepted: `model`, `input` (a string or input items),
`instructions`, `max_output_tokens`, `temperature`, `top_p`, `tools` (function tools),
`tool_choice`, `parallel_tool_calls`, `text.format` (text, json_object, json_schema), `stream`,
`store`, `previous_response_id` and `metadata`; `reasoning`, `include`, `truncation`, `user`,
`service_tier`, `prompt_cache_key` and `safety_identifier` are accepted and ignored.

Stored responses (the default, `store: true`) are turns of sessions in the Raft log, so
`previous_response_id` continues a conversation after the loss of any minority of members, like
X-Session-Id does (mesh/gateway/responses_log.py); `store: false` records nothing.
`instructions` lead the conversation of their own turn only, as in OpenAI's API.
"""

from __future__ import annotations

import dataclasses
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mesh.core.errors import ApiError
from mesh.gateway.disconnect import until_disconnect
from mesh.gateway.responses_log import Thread, resolve
from mesh.gateway.responses_parse import ResponsesAsk, parse_responses, renamed
from mesh.gateway.responses_render import ResponseShape, ResponseStream
from mesh.gateway.route_start import STREAM_HEADERS
from mesh.gateway.validation import ChatRequest, parse_chat
from mesh.security.api_keys import caller_key_id
from shards.types import Message


def responses_routes(gateway, read_json: Callable[[Request], Awaitable[dict]]) -> list[Route]:
    """POST /v1/responses over `gateway`; `read_json` is the app's bounded body reader."""

    async def create(request: Request) -> Response:
        ask = parse_responses(await read_json(request))
        thread = resolve(gateway.sessions, ask.previous, ask.store, caller_key_id() or "")
        req = chat_request(ask, thread, gateway.config.gateway)
        # Relayed byte for byte from other members (mesh/gateway/forward.py): the leader's log decides
        # the thread, so the ids it reports are the ones it records.
        run = await gateway.start_chat(req)  # admission: a 429 comes before any byte of a stream
        shape = ResponseShape(thread.response_id(req.messages, run.prompt_tokens), req.model, ask)
        if req.stream:
            events = ResponseStream(shape, run.prompt_tokens).render(gateway.stream_chat(req, run))
            return StreamingResponse(events, media_type="text/event-stream", headers=STREAM_HEADERS)
        try:
            whole = await until_disconnect(request, gateway.collect_chat(req, run))
        finally:
            run.cancel()
        return JSONResponse(shape.whole(whole))

    return [Route("/v1/responses", create, methods=["POST"])]


def chat_request(ask: ResponsesAsk, thread: Thread, limits) -> ChatRequest:
    """The ChatRequest of a Responses request on its thread: the conversation it carries, then its input."""
    try:
        req = parse_chat(ask.chat, limits)
    except ApiError as exc:
        raise renamed(exc) from None
    instructions = (Message("system", ask.instructions),) if ask.instructions else ()
    return dataclasses.replace(req, session_id=thread.session_id, messages=(*thread.carried, *req.messages),
                               instructions=instructions)
