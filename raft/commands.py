"""Typed commands: the only way the replicated state changes.

Commands travel through the Raft log as plain dicts ({"kind": ..., fields...}) so the journal does
not depend on Python class paths; `encode`/`decode` convert at the boundary. Everything a command
needs (ids, timestamps) is inside it: apply() never reads a clock or a random source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

MEMBER_STATES = ("joining", "active", "draining", "gone")
SHARD_STATES = ("assigned", "loading", "ready", "failed")


@dataclass(frozen=True)
class Command:
    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class InitMesh(Command):
    """First entry of every mesh: fixes its identity."""
    kind: ClassVar[str] = "init_mesh"
    mesh_id: str
    name: str
    created_at: float


@dataclass(frozen=True)
class AddMember(Command):
    kind: ClassVar[str] = "add_member"
    node_id: str
    name: str
    http_address: str
    raft_address: str
    profile: dict[str, Any]
    joined_at: float


@dataclass(frozen=True)
class SetMemberState(Command):
    kind: ClassVar[str] = "set_member_state"
    node_id: str
    state: str


@dataclass(frozen=True)
class RegisterModel(Command):
    kind: ClassVar[str] = "register_model"
    name: str
    file: str
    sha256: str
    size: int
    roles: tuple[str, ...]
    context_length: int
    chat_template: str | None
    memory_bytes: int


@dataclass(frozen=True)
class AssignShard(Command):
    kind: ClassVar[str] = "assign_shard"
    role: str
    model: str
    node_id: str


@dataclass(frozen=True)
class SetShardState(Command):
    kind: ClassVar[str] = "set_shard_state"
    role: str
    model: str
    node_id: str
    state: str
    detail: str = ""


COMMANDS: dict[str, type[Command]] = {
    cls.kind: cls
    for cls in (InitMesh, AddMember, SetMemberState, RegisterModel, AssignShard, SetShardState)
}


class BadCommand(ValueError):
    """A log entry that is not a well-formed command (never applied)."""


def encode(cmd: Command) -> dict[str, Any]:
    body = {f.name: getattr(cmd, f.name) for f in dataclasses.fields(cmd)}
    for key, value in body.items():
        if isinstance(value, tuple):
            body[key] = list(value)
    return {"kind": cmd.kind, **body}


def decode(wire: Any) -> Command:
    if not isinstance(wire, dict) or wire.get("kind") not in COMMANDS:
        raise BadCommand(f"not a command: {str(wire)[:200]}")
    cls = COMMANDS[wire["kind"]]
    names = {f.name: f for f in dataclasses.fields(cls)}
    body = {k: v for k, v in wire.items() if k != "kind"}
    unknown = set(body) - set(names)
    missing = {n for n, f in names.items() if f.default is dataclasses.MISSING} - set(body)
    if unknown or missing:
        raise BadCommand(f"{cls.kind}: unknown {sorted(unknown)} missing {sorted(missing)}")
    for key, value in body.items():
        if isinstance(value, list):
            body[key] = tuple(value)
    return cls(**body)
