"""The witness role: a Raft voter that keeps a copy of the log and serves no model.

A witness runs from the base install alone: it never imports grpcio, numpy, llama-cpp-python or
onnxruntime (`heavy_modules_loaded()` says which of them a process holds; /control/v1/status shows
it as node.heavy_modules), and holds cryptography only after a rare event that needs it (node.on_demand_modules).
What that means for the roles a witness can play:

- It votes and may be elected, but the gateway runs on the leader and routes over gRPC, which a
  witness has not got. So a witness that finds itself leading hands leadership to a healthy model
  node (`LeadershipHandoff`), usually within one heartbeat or two.
- Its HTTP port answers like any follower's: /v1/* is relayed to the leader (mesh/gateway/forward.py: httpx
  to the leader's HTTPS peer port, no gRPC). While the witness itself leads, a request waits
  (bounded) for the handoff and then goes to the new leader; a relayed request reaching a witness
  leader gets 503 `no_leader` + Retry-After, which the relaying member takes as "try the next one".

Router-class devices (OpenWrt) join as witnesses by default: placement never gives them a shard.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from nodes.device_class import DeviceClass
from raft.node import ProposalFailed, RaftNode
from raft.vocab import MemberState, ShardState

log = logging.getLogger("quorum.witness")

HEAVY_MODULES = ("grpc", "numpy", "llama_cpp", "onnxruntime")
# In the base install, but imported only for a rare event (a key and a certificate request at a join or a renewal,
# signing, a CA rotation: mesh/security/pki.py): a witness holds none of them once started and idle.
ON_DEMAND_MODULES = ("cryptography",)
ROUTER_CLASS = DeviceClass.OPENWRT_ROUTER
HANDOFF_WAIT_S = 2.0  # after a transfer was sent: how long to wait for it before trying again


def heavy_modules_loaded() -> list[str]:
    """Which of the model-node-only packages this process has imported."""
    return [name for name in HEAVY_MODULES if name in sys.modules]


def on_demand_modules_loaded() -> list[str]:
    """Which of ON_DEMAND_MODULES this process holds now (one imported stays until the process ends)."""
    return [name for name in ON_DEMAND_MODULES if name in sys.modules]


def joins_as_witness(flag: bool, root: Path = Path("/")) -> bool:
    """`meshd join --witness`, or any router-class device (they never hold a model shard).
    `root` is the machine's root directory (a captured one in tests)."""
    from nodes.device_class import device_class

    return flag or device_class(root) == ROUTER_CLASS


class LeadershipHandoff:
    """While this witness leads, asks the best model node to take over (Raft TimeoutNow)."""

    def __init__(self, raft: RaftNode, every_s: float = 0.1) -> None:
        self.raft = raft
        self.every_s = every_s
        self._leading_since: float | None = None  # while this witness leads and no handoff worked yet
        self._stuck_logged = False

    def targets(self) -> list[str]:
        """Raft addresses of the members that could lead instead, best first: active, connected
        model nodes; those holding a ready shard before the others."""
        state, connected = self.raft.state, self.raft.partners()
        serving = {s.node_id for s in state.shards.values() if s.state == ShardState.READY}
        members = [m for m in state.members.values()
                   if m.state == MemberState.ACTIVE and not m.witness and connected.get(m.raft_address)]
        members.sort(key=lambda m: (m.node_id not in serving, m.name))
        return [m.raft_address for m in members]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            if not self.raft.is_leader():
                self._leading_since, self._stuck_logged = None, False
                continue
            if self._leading_since is None:
                self._leading_since = time.monotonic()
            await self.hand_off()

    async def hand_off(self) -> bool:
        """One round: True if a member took leadership over."""
        targets = self.targets()
        for address in targets:
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.raft.transfer_leadership(address)), HANDOFF_WAIT_S)
            except (ProposalFailed, TimeoutError) as exc:
                # Refused: the target is not fully caught up yet, or the connection just dropped.
                # The next target (or the next round, a tick later) tries again.
                log.debug("leadership transfer to %s refused: %s", address, exc or "timeout")
                continue
            deadline = time.monotonic() + HANDOFF_WAIT_S
            while self.raft.is_leader() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if not self.raft.is_leader():
                log.info("this witness was elected leader; leadership handed to %s", address)
                return True
        leading_for = time.monotonic() - (self._leading_since or time.monotonic())
        if leading_for > HANDOFF_WAIT_S and not self._stuck_logged:
            self._stuck_logged = True
            log.warning("this witness leads and no model node %s; API requests wait for one",
                        "took leadership over" if targets else "is connected")
        return False
