"""Why no replica of a model serves yet, in one line, from the replicated state: what a 503 and /health say.

The shards of the model that are not ready, with their state and detail (loading, crashed, waiting for the
stages of a split), or else the last placement's shortfall for it (`Unplaced`: no member can hold it, with the
placer's reason). None when the state explains nothing (every shard is ready: the gateway just cannot reach
one), so the caller falls back to its own detail.
"""

from __future__ import annotations

from raft.state import MeshState

MAX_REASON = 400  # characters: a reason is for people, in an error message


def why_no_replica(state: MeshState, model: str) -> str | None:
    names = {m.node_id: m.name for m in state.members.values()}
    waiting = sorted((s for s in state.shards.values() if s.model == model and s.state != "ready"),
                     key=lambda s: s.key)
    if waiting:
        reason = "; ".join(f"{s.role} on {names.get(s.node_id, s.node_id)}: {s.state}"
                           + (f" ({s.detail})" if s.detail else "") for s in waiting)
    elif any(s.model == model for s in state.shards.values()):
        return None
    else:
        shortfalls = [u.reason for u in state.unplaced if u.model == model]
        reason = "; ".join(shortfalls) if shortfalls else "no member holds it yet"
    return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 1] + "…"
