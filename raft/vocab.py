"""The mesh's domain words, defined once: roles, member states, shard states.

Each is a StrEnum: a member equals its string ("gone" == MemberState.GONE), so the Raft log, the
journal, the control API's JSON and mesh.toml keep carrying plain strings and old logs still apply.
Device classes are the device's own fact and live with its probe (nodes/device_class.py).
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    REASONING = "reasoning"  # chat and completions
    CONTEXT = "context"  # embeddings, and fitting long conversations into a context window
    TOOL_USE = "tool-use"  # tool calls and JSON answers under a grammar
    WITNESS = "witness"  # votes in Raft, holds no model


# The roles that hold a model, in placement order (the placer fills reasoning first).
MODEL_ROLES: tuple[Role, ...] = (Role.REASONING, Role.TOOL_USE, Role.CONTEXT)
# The roles that generate text (the others embed or hold nothing).
GENERATING_ROLES = frozenset({Role.REASONING, Role.TOOL_USE})


class MemberState(StrEnum):
    JOINING = "joining"
    ACTIVE = "active"
    DRAINING = "draining"  # leaving: its shards move elsewhere first
    GONE = "gone"  # removed; its id is never reused


class ShardState(StrEnum):
    ASSIGNED = "assigned"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"  # did not load, or its process died (restarting)
    CRASHED = "crashed"  # its process crash-looped on that node, which will not start it again
