"""Named sessions (X-Session-Id) in the Raft log: the gateway's side.

A turn's start (with the prompt's token ids as the shard tokenized them), its answer in
checkpoints (every `checkpoint_tokens` tokens or `checkpoint_ms`, whichever comes first, proposed
without waiting so decoding never waits on Raft), and its end go through the log. The end is
committed on a majority before the answer's last chunk leaves the gateway: a client that saw a
turn finish can continue it by id after any minority loss or a full restart. Retention is fixed
in raft/state.py (idle TTL, session count, turns per session, prompt ids on the last two turns).

With API keys on, a session belongs to the key that started it (its id is in the log with the
session): another key is answered 404, as if the session did not exist. Without keys (owner "")
any caller continues any session, as before.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import Future

from mesh.core.errors import ApiError, bad_request
from raft.commands import SessionAppend, SessionTurnEnd, SessionTurnStart
from raft.node import ProposalFailed, RaftNode
from raft.state import MAX_PROMPT_IDS, MeshState, Rejected
from shards.types import Message, Piece

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
COMMIT_TIMEOUT_S = 10.0


class NotCommitted(RuntimeError):
    """The turn could not be committed on a majority (this member is cut off, or no leader)."""


def check_session_id(value: str) -> str:
    if not SESSION_ID.fullmatch(value):
        raise bad_request("X-Session-Id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'.",
                          "X-Session-Id")
    return value


class SessionLog:
    def __init__(self, raft: RaftNode, checkpoint_tokens: int = 16, checkpoint_ms: int = 250) -> None:
        self.raft = raft
        self.checkpoint_tokens = checkpoint_tokens
        self.checkpoint_s = checkpoint_ms / 1000

    def history(self, session_id: str, owner: str = "") -> tuple[int, list[Message]]:
        """(index of the next turn, the conversation so far) for a session; (0, []) if it is new;
        404 if it belongs to another API key than `owner` ("" without keys)."""
        session = self.raft.state.sessions.get(session_id)
        if session is None:
            return 0, []
        if session.owner != owner:
            raise session_not_found(session_id)
        finished = [t for t in session.turns if t.finish_reason is not None]
        return len(finished), [Message(role, content) for role, content in session.history()]

    def recorder(self, session_id: str, turn: int, messages: tuple[Message, ...], prompt_tokens: int,
                 prompt_token_ids: tuple[int, ...] = (), owner: str = "") -> TurnRecorder:
        return TurnRecorder(self, session_id, turn, messages, prompt_tokens, prompt_token_ids, owner)


def recorded_replica(state: MeshState, owner: str, session_id: str) -> str | None:
    """The member whose replica ended the session's last turn, as the log says (None: no such session of `owner`,
    or none recorded)."""
    session = state.sessions.get(session_id)
    if session is None or session.owner != owner:
        return None
    return session.replica or None


def session_not_found(session_id: str) -> ApiError:
    return ApiError(404, f"No session {session_id!r}.", param="X-Session-Id", code="session_not_found")


class TurnRecorder:
    """Records one turn: its prompt's token ids when it starts, then its answer (choice 0) as it is
    generated. A prompt over MAX_PROMPT_IDS tokens is recorded as its count only (the state
    would drop the ids anyway; leaving them out keeps the entry small)."""

    def __init__(self, log: SessionLog, session_id: str, turn: int, messages: tuple[Message, ...],
                 prompt_tokens: int, prompt_token_ids: tuple[int, ...] = (), owner: str = "") -> None:
        self.log = log
        self.session_id = session_id
        self.turn = turn
        ids = tuple(prompt_token_ids) if len(prompt_token_ids) <= MAX_PROMPT_IDS else ()
        self._pending: list[Future] = [log.raft.propose(SessionTurnStart(
            session_id, turn, tuple((m.role, m.content) for m in messages), prompt_tokens, time.time(), ids,
            owner))]
        self._tokens: list[int] = []
        self._text = ""
        self._last = time.monotonic()

    def add(self, piece: Piece) -> None:
        self._tokens.extend(piece.tokens)
        self._text += piece.text
        now = time.monotonic()
        if len(self._tokens) >= self.log.checkpoint_tokens or now - self._last >= self.log.checkpoint_s:
            self._checkpoint()
            self._last = now

    def _checkpoint(self) -> None:
        if self._tokens or self._text:
            self._pending.append(self.log.raft.propose(
                SessionAppend(self.session_id, self.turn, tuple(self._tokens), self._text)))
            self._tokens, self._text = [], ""

    async def finish(self, finish_reason: str, replica: str = "") -> None:
        """Commits the rest of the answer and the turn's end (`replica`: the member whose replica ended it, where
        the session's next turn finds its KV cache); NotCommitted if a majority did not."""
        self._checkpoint()
        self._pending.append(self.log.raft.propose(
            SessionTurnEnd(self.session_id, self.turn, finish_reason, time.time(), replica)))
        pending, self._pending = self._pending, []
        try:
            await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in pending)), COMMIT_TIMEOUT_S)
        except (ProposalFailed, Rejected, TimeoutError) as exc:
            raise NotCommitted(f"the session turn could not be committed on a majority of the mesh "
                               f"({exc or 'timeout'})") from None
