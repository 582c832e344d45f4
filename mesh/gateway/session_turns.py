"""Named sessions, the gateway's side: the conversation a turn is generated from and its recording.

A chat with X-Session-Id continues the session's history (read from the Raft log); choice 0's
answer is recorded turn by turn (mesh/cluster/sessions.py), its end committed on a majority before
the answer's last chunk is passed on. A choice the leader resumes for a relaying member after the
previous leader was lost is recorded again from its first token: the replica replays the tokens
already sent, and they reach the recorder like new ones.
"""

from __future__ import annotations

from mesh.cluster.sessions import NotCommitted, SessionLog, TurnRecorder
from mesh.core.errors import bad_request
from mesh.gateway.validation import ChatRequest
from mesh.security.api_keys import caller_key_id
from shards.types import Event, Failed, Finished, Message, Piece


class SessionTurn:
    """The session side of one chat request: its history (when named) and, once admitted, its recorder."""

    def __init__(self, sessions: SessionLog | None, req: ChatRequest) -> None:
        self.req = req
        self.sessions = sessions
        self.owner = caller_key_id() or ""  # with API keys on, the session is the key's (404 for another)
        self.turn, history = 0, []
        if req.session_id is not None:
            if sessions is None:
                raise bad_request("Sessions need a mesh node (this gateway keeps no log).", "X-Session-Id")
            self.turn, history = sessions.history(req.session_id, self.owner)
        self.messages = conversation(req, history)

    def recorder(self, prompt_tokens: int, prompt_token_ids: tuple[int, ...]) -> TurnRecorder | None:
        """The recorder of choice 0's answer; None for an unnamed chat."""
        if self.req.session_id is None or self.sessions is None:
            return None
        return self.sessions.recorder(self.req.session_id, self.turn, self.req.messages, prompt_tokens,
                                      prompt_token_ids, self.owner)


def conversation(req: ChatRequest, history: tuple[Message, ...] | list[Message]) -> tuple[Message, ...]:
    """The conversation a replica renders: what the tools or the JSON answer need the model to
    know (a system message), the instructions, the session's history, then this turn's messages."""
    use = req.tool_use
    preamble = (Message("system", use.preamble),) if use is not None and use.preamble else ()
    return (*preamble, *req.instructions, *history, *req.messages)


async def record(recorder: TurnRecorder, event: Event, replica: str = "") -> Event:
    """Adds choice 0's answer to the session log; its end is committed before it is passed on, with the member
    whose replica generated it (`replica`)."""
    if isinstance(event, Piece):
        recorder.add(event)
    elif isinstance(event, Finished):
        try:
            await recorder.finish(event.reason, replica)
        except NotCommitted as exc:
            return Failed(str(exc), retryable=True)
    return event
