"""Response ids in the Raft session log: how `previous_response_id` continues a conversation.

A stored response is a turn of a session in the log (mesh/cluster/sessions.py, the machinery of
X-Session-Id), so a conversation continued by response id survives the loss of any minority of
members like a named session does. A response id is its session's id and a fingerprint of its turn:

    resp_ + 24 hex (the session: "resp_<key>" in the log) + 16 hex (the turn)

The fingerprint hashes the session id, the turn's messages and its prompt's token count: all known
when the response is admitted (its id is in the first event of a stream), and all in the log with
the turn, so the turn is found again by content. Positions would not do: the log numbers turns by
position and drops a long session's oldest ones.

A request with `previous_response_id` P:
- when P is its session's last finished turn (a conversation carried on), the new turn is the
  session's next one, read and recorded by the chat API's own session code;
- when P is an earlier turn (a branch), or its session has a turn in progress, the conversation up
  to P is copied into the new turn of a new session, so no two branches share a log;
- with `store: false`, the conversation up to P is sent along and nothing is recorded.
The session is the API key's that started it: another key's previous_response_id is not found.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Iterable

from mesh.cluster.sessions import SessionLog
from mesh.core.errors import ApiError, bad_request
from shards.types import Message

PREFIX = "resp_"
_KEY_HEX = 24
_TURN_HEX = 16
_ID = re.compile(rf"{PREFIX}[0-9a-f]{{{_KEY_HEX + _TURN_HEX}}}")


@dataclass(frozen=True)
class Thread:
    """Where a response's turn goes: its session (None: not recorded) and the conversation it
    carries itself (a branch, or an unstored continuation)."""
    session_id: str | None
    carried: tuple[Message, ...] = ()

    def response_id(self, messages: Iterable[Message], prompt_tokens: int) -> str:
        """The id of this turn's response (random when it is not recorded)."""
        if self.session_id is None:
            return PREFIX + secrets.token_hex((_KEY_HEX + _TURN_HEX) // 2)
        pairs = [(m.role, m.content) for m in messages]
        return self.session_id + _fingerprint(self.session_id, pairs, prompt_tokens)


def resolve(log: SessionLog | None, previous: str | None, store: bool, owner: str) -> Thread:
    """The thread of a new response (see the module doc); 400 when `previous` is not found."""
    if previous is None:
        return Thread(_new_session() if store and log is not None else None)
    if log is None:
        raise bad_request("'previous_response_id' needs a mesh node (this gateway keeps no session log).",
                          "previous_response_id")
    session_id, turns, index = find(log, previous, owner)
    if store and index == len(turns) - 1 and turns[-1].finish_reason is not None:
        return Thread(session_id)  # carried on: the chat API's session code reads the history
    carried = tuple(Message(role, content) for turn in turns[: index + 1] for role, content in _pairs(turn))
    return Thread(_new_session() if store else None, carried)


def find(log: SessionLog, response_id: str, owner: str) -> tuple[str, tuple, int]:
    """(session id, its turns, the index of the response's turn); 400 when there is none, or it is
    another key's, or its answer never finished."""
    if _ID.fullmatch(response_id):
        session_id, mark = response_id[: -_TURN_HEX], response_id[-_TURN_HEX:]
        session = log.raft.state.sessions.get(session_id)
        if session is not None and session.owner == owner:
            for index in range(len(session.turns) - 1, -1, -1):
                turn = session.turns[index]
                if turn.finish_reason is not None and _fingerprint(
                        session_id, turn.messages, turn.prompt_tokens) == mark:
                    return session_id, session.turns, index
    raise not_found(response_id)


def not_found(response_id: str) -> ApiError:
    return ApiError(400, f"Previous response with id '{response_id}' not found.", param="previous_response_id",
                    code="previous_response_not_found")


def _pairs(turn) -> list[tuple[str, str]]:
    return [*turn.messages, ("assistant", turn.answer_text)]


def _new_session() -> str:
    return PREFIX + secrets.token_hex(_KEY_HEX // 2)


def _fingerprint(session_id: str, messages: Iterable[tuple[str, str]], prompt_tokens: int) -> str:
    data = json.dumps([session_id, [list(m) for m in messages], prompt_tokens], ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()[:_TURN_HEX]
