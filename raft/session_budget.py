"""Byte budgets for the session log (raft/state.py applies them; pure, the same on every member).

A session's size is an estimate of what its turns cost in a full dump (raft/codec.py): UTF-8 text, four bytes
a token id (codec packs ids of a 262k vocabulary in 4), and a fixed overhead per turn and per message. It is a
function of the session's content only, so every member, whether it replayed the log or loaded a dump, computes
the same number and evicts the same turns and sessions.

- Per session (SESSION_BYTES), when a turn ends: the oldest turns go first; the newest turn always stays, and
  when it alone is over the budget its prompt token ids go (they only speed up a rebuild of the KV cache; the
  messages rebuild it too; a turn that starts over the budget loses them at once). Turns are numbered by
  position and the open turn's number must hold while its stream is recorded, so no turn is dropped before it
  ends: a session holds at most its budget plus its open turn.
- In total (SESSIONS_BYTES), after every command that grows a session: the least recently used sessions go
  first (by last use, then id), never the one the command is writing.

The budgets are fixed here, like MAX_SESSIONS: a per-member setting would let members evict differently and
their states diverge. Changing them needs a replicated command (see the report of issue #13).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

SESSION_BYTES = 1024 * 1024  # per session
SESSIONS_BYTES = 16 * 1024 * 1024  # all sessions together
TURN_OVERHEAD = 64
MESSAGE_OVERHEAD = 8
TOKEN_BYTES = 4


def text_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def turn_bytes(turn: Any) -> int:
    """The estimated size of a raft.state.Turn."""
    size = TURN_OVERHEAD + text_bytes(turn.answer_text)
    size += TOKEN_BYTES * (len(turn.answer_tokens) + len(turn.prompt_token_ids))
    for role, content in turn.messages:
        size += MESSAGE_OVERHEAD + text_bytes(role) + text_bytes(content)
    return size


def turns_bytes(turns: Iterable[Any]) -> int:
    return sum(t.size for t in turns)


def fit_turns(turns: tuple, limit: int = SESSION_BYTES) -> tuple[tuple, int, int]:
    """(turns within `limit`, turns dropped, bytes freed): oldest first, the newest kept (without its prompt ids
    when it alone is over). Turns are raft.state.Turn (their `size` is cached)."""
    total = turns_bytes(turns)
    if total <= limit:
        return turns, 0, 0
    drop = 0
    freed = 0
    while total - freed > limit and drop < len(turns) - 1:
        freed += turns[drop].size
        drop += 1
    kept = turns[drop:]
    if total - freed > limit and kept and kept[-1].prompt_token_ids:
        last = dataclasses.replace(kept[-1], prompt_token_ids=())
        freed += kept[-1].size - last.size
        kept = (*kept[:-1], last)
    return kept, drop, freed


def evict_sessions(sessions: dict, keep: str, limit: int = SESSIONS_BYTES) -> tuple[dict, int, int]:
    """(sessions within `limit`, sessions evicted, bytes freed): least recently used first, never `keep`.
    Sessions are raft.state.Session (their `size` is cached)."""
    total = sum(s.size for s in sessions.values())
    if total <= limit:
        return sessions, 0, 0
    order = sorted((k for k in sessions if k != keep), key=lambda k: (sessions[k].last_used, k))
    gone = set()
    freed = 0
    for k in order:
        if total - freed <= limit:
            break
        freed += sessions[k].size
        gone.add(k)
    return {k: v for k, v in sessions.items() if k not in gone}, len(gone), freed
