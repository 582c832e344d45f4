"""Keeps this member's replicated profile current: battery and free memory change while a node runs.

A node announces its whole profile once at start (AddMember). Every `every_s` seconds this loop
re-reads the facts that change (battery, memory) and commits an UpdateProfile only when one that
placement uses moved enough to matter, so a steady node adds nothing to the Raft log:

- battery: it appeared or went away, charging flipped, or the charge moved BATTERY_STEP points
  from the recorded one (a reading jittering around one value never commits);
- memory: moved by MEMORY_STEP of the recorded value (at least MEMORY_STEP_MIN bytes), and only
  while this node holds no shard. A loaded model lowers the free memory it reports, and placement
  already counts the shards it gave the node: refreshing then would count them twice and push the
  node's own shards off it. So the recorded figure stays "what the node can give to shards".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from nodes import memory
from nodes.battery import Sensors, battery
from nodes.probe import Runner, run_command
from raft.commands import Command, UpdateProfile
from raft.node import ProposalFailed
from raft.state import MeshState, Rejected
from raft.vocab import MemberState

log = logging.getLogger("quorum.profile")

BATTERY_STEP = 5.0  # percentage points
MEMORY_STEP = 0.10  # fraction of the recorded figure
MEMORY_STEP_MIN = 64 << 20  # bytes
MEMORY_KEYS = ("ram_total", "ram_available", "memory_available_for_models")
Reader = Callable[[str], dict[str, Any]]  # device class -> live facts (see live_facts)


def live_facts(device_class: str, root: Path = Path("/"), environ: Mapping[str, str] | None = None,
               run: Runner = run_command, sensors: Sensors | None = None) -> dict[str, Any]:
    """The profile fields that change while a node runs, read as nodes.profile reads them (the same
    root/environ/runner/sensors seams, so tests point it at a captured machine)."""
    total, available = memory.ram(root)
    return {"battery": battery(root, environ, run, sensors), "ram_total": total, "ram_available": available,
            "memory_available_for_models": memory.available_for_models(total, available, device_class)}


def changed_facts(recorded: Mapping[str, Any], live: Mapping[str, Any], holds_shards: bool) -> dict[str, Any]:
    """The fields of `live` worth committing over the `recorded` profile; {} when none are."""
    out: dict[str, Any] = {}
    if "battery" in live and _battery_moved(recorded.get("battery"), live["battery"]):
        out["battery"] = live["battery"]
    if not holds_shards and "memory_available_for_models" in live:
        old = recorded.get("memory_available_for_models")
        new = int(live["memory_available_for_models"])
        if not isinstance(old, int) or abs(new - old) >= max(MEMORY_STEP_MIN, MEMORY_STEP * old):
            out.update({key: live[key] for key in MEMORY_KEYS if key in live})
    return out


def _battery_moved(old: Any, new: Any) -> bool:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return old != new  # a battery appeared or went away
    if old.get("charging") != new.get("charging"):
        return True
    before, after = old.get("percent"), new.get("percent")
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return before != after
    return abs(after - before) >= BATTERY_STEP


class ProfileRefresher:
    """Reads this node's live facts now and then and commits the ones that moved (see module doc)."""

    def __init__(self, node_id: str, state: Callable[[], MeshState], propose: Callable[[Command], Awaitable],
                 local_shards: Callable[[], Mapping] = dict, read: Reader = live_facts) -> None:
        self.node_id = node_id
        self.state = state
        self.propose = propose
        self.local_shards = local_shards  # shards loaded here, which may outlive their place in the state
        self.read = read

    async def refresh(self) -> dict[str, Any]:
        """One round: the fields committed ({} when nothing moved or the commit failed)."""
        state = self.state()
        member = state.members.get(self.node_id)
        if member is None or member.state == MemberState.GONE:
            return {}
        live = await asyncio.to_thread(self.read, member.profile.device_class)
        holds = bool(state.shards_on(self.node_id)) or bool(self.local_shards()) \
            or any(self.node_id in split.members for split in state.splits.values())  # a stage holds layers
        fields = changed_facts(member.profile.to_wire(), live, holds)
        if not fields:
            return {}
        try:
            await self.propose(UpdateProfile(self.node_id, fields))
        except (Rejected, ProposalFailed, TimeoutError) as exc:
            # No leader right now, or this member was just removed: the next round reads and tries again.
            log.info("profile refresh not committed: %s", exc)
            return {}
        log.info("profile refreshed: %s", ", ".join(f"{k}={v}" for k, v in sorted(fields.items())))
        return fields

    async def run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a failed reading must not stop the daemon; the next round retries
                log.exception("profile refresh failed")
