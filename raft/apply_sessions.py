"""Apply handlers for the session log (SessionTurnStart, SessionAppend, SessionTurnEnd) and its caps.

Pure like the rest of apply(): the same log evicts the same turns and sessions on every member.
"""

from __future__ import annotations

import dataclasses

from raft.commands import SessionAppend, SessionTurnEnd, SessionTurnStart
from raft.records import MeshState, Rejected, Session, Turn
from raft.session_budget import SESSION_BYTES, SESSIONS_BYTES, evict_sessions, fit_turns

# Session log policy (fixed here so every member applies the same): a session idle for longer than
# SESSION_TTL_S is dropped when the next turn of any session starts; beyond MAX_SESSIONS the least
# recently used go first; a session keeps its last MAX_TURNS turns (trimmed when a turn ends: turns are
# numbered by position, and the open turn's number must hold until it ends).
SESSION_TTL_S = 24 * 3600
MAX_SESSIONS = 1000
MAX_TURNS = 64
# A turn's prompt token ids (the whole rendered conversation) are kept when there are at most
# MAX_PROMPT_IDS of them (more than the context windows we load: 4096 by default; a longer list is
# kept as its count only), and only on a session's last PROMPT_IDS_TURNS turns: each prompt holds
# the conversation before it, so the last finished turn's prompt and answer rebuild the KV cache,
# and older copies would make the log grow with the square of a session's length. Worst case
# 1000 sessions x 2 turns x 8192 ids.
MAX_PROMPT_IDS = 8192
PROMPT_IDS_TURNS = 2
# And in bytes (raft/session_budget.py): SESSION_BYTES per session (oldest turns first), SESSIONS_BYTES in
# all (least recently used sessions first); MeshState counts what they evicted.


MAX_REPLICA_ID = 64  # characters of SessionTurnEnd.replica (member ids are 16-32)

def session_metrics(state: MeshState) -> dict[str, int]:
    """The session log's size and what its caps evicted, for the metrics layer (the three *_evicted values are
    counters: they only grow, the same on every member; the bytes are estimates, raft/session_budget.py)."""
    return {
        "session_bytes": state.session_bytes,
        "session_bytes_budget": SESSIONS_BYTES,
        "session_bytes_budget_per_session": SESSION_BYTES,
        "sessions": len(state.sessions),
        "sessions_evicted": state.sessions_evicted,
        "session_turns_evicted": state.session_turns_evicted,
        "session_bytes_evicted": state.session_bytes_evicted,
    }


def _session_turn_start(state: MeshState, cmd: SessionTurnStart) -> MeshState:
    sessions = {k: v for k, v in state.sessions.items() if cmd.at - v.last_used <= SESSION_TTL_S}
    old = sessions.get(cmd.session_id)
    if old is not None and old.owner != cmd.owner:
        raise Rejected(f"unknown session {cmd.session_id}")  # another key's: as if it did not exist
    turns = old.turns if old is not None else ()
    if turns and turns[-1].finish_reason is None:
        turns = turns[:-1]  # an unfinished turn (its answer was never completed) is replaced
    if cmd.turn != len(turns):
        raise Rejected(f"session {cmd.session_id}: turn {cmd.turn} out of order (next is {len(turns)})")
    ids = tuple(int(t) for t in cmd.prompt_token_ids) if len(cmd.prompt_token_ids) <= MAX_PROMPT_IDS else ()
    turn = Turn(messages=tuple(tuple(m) for m in cmd.messages), prompt_tokens=cmd.prompt_tokens,
                prompt_token_ids=ids)
    if turn.size > SESSION_BYTES and ids:
        turn = dataclasses.replace(turn, prompt_token_ids=())  # alone over the budget: its ids go first
    # Turns are numbered by position, and the open turn keeps its number until it ends: older turns are only
    # dropped (MAX_TURNS, SESSION_BYTES) once it has ended (_session_turn_end).
    turns = (*turns, turn)
    keep_from = len(turns) - PROMPT_IDS_TURNS
    turns = tuple(dataclasses.replace(t, prompt_token_ids=()) if i < keep_from and t.prompt_token_ids else t
                  for i, t in enumerate(turns))
    sessions[cmd.session_id] = Session(turns=turns, last_used=cmd.at, owner=cmd.owner)
    evicted = freed = 0
    if len(sessions) > MAX_SESSIONS:
        keep = set(sorted(sessions, key=lambda k: (sessions[k].last_used, k))[-MAX_SESSIONS:])
        evicted = len(sessions) - len(keep)
        freed = sum(s.size for k, s in sessions.items() if k not in keep)
        sessions = {k: s for k, s in sessions.items() if k in keep}
    state = dataclasses.replace(state, sessions_evicted=state.sessions_evicted + evicted,
                                session_bytes_evicted=state.session_bytes_evicted + freed)
    return _within_total(state, sessions, cmd.session_id)


def _within_total(state: MeshState, sessions: dict[str, Session], session_id: str) -> MeshState:
    """`state` with `sessions`, the least recently used evicted (never `session_id`, which has just grown) until
    they fit SESSIONS_BYTES, counted."""
    sessions, evicted, freed = evict_sessions(sessions, session_id, SESSIONS_BYTES)
    return dataclasses.replace(state, sessions=sessions, sessions_evicted=state.sessions_evicted + evicted,
                               session_bytes_evicted=state.session_bytes_evicted + freed)


def _open_turn(state: MeshState, session_id: str, turn: int) -> tuple[Session, Turn]:
    session = state.sessions.get(session_id)
    if session is None or not session.turns:
        raise Rejected(f"unknown session {session_id}")
    last = session.turns[-1]
    if turn != len(session.turns) - 1 or last.finish_reason is not None:
        raise Rejected(f"session {session_id}: turn {turn} is not the open turn")
    return session, last


def _session_append(state: MeshState, cmd: SessionAppend) -> MeshState:
    session, turn = _open_turn(state, cmd.session_id, cmd.turn)
    turn = dataclasses.replace(turn, answer_tokens=turn.answer_tokens + tuple(cmd.tokens),
                               answer_text=turn.answer_text + cmd.text)
    session = dataclasses.replace(session, turns=(*session.turns[:-1], turn))
    return _within_total(state, {**state.sessions, cmd.session_id: session}, cmd.session_id)


def _session_turn_end(state: MeshState, cmd: SessionTurnEnd) -> MeshState:
    if not isinstance(cmd.replica, str) or len(cmd.replica) > MAX_REPLICA_ID:
        raise Rejected(f"a turn's replica is a member id of at most {MAX_REPLICA_ID} characters")
    session, turn = _open_turn(state, cmd.session_id, cmd.turn)
    turn = dataclasses.replace(turn, finish_reason=cmd.finish_reason)
    turns = (*session.turns[:-1], turn)
    dropped = max(0, len(turns) - MAX_TURNS)
    freed = sum(t.size for t in turns[:dropped])
    turns, over, over_freed = fit_turns(turns[dropped:], SESSION_BYTES)  # oldest first, the newest kept
    session = dataclasses.replace(session, turns=turns, last_used=cmd.at, replica=cmd.replica)
    state = dataclasses.replace(state, session_turns_evicted=state.session_turns_evicted + dropped + over,
                                session_bytes_evicted=state.session_bytes_evicted + freed + over_freed)
    return _within_total(state, {**state.sessions, cmd.session_id: session}, cmd.session_id)


HANDLERS = {
    SessionTurnStart: _session_turn_start,
    SessionAppend: _session_append,
    SessionTurnEnd: _session_turn_end,
}
