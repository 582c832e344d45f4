"""Leaving the mesh: drain this member's shards, hand leadership over if it holds it, and have the leader
remove it (bounded; retried while the leader changes). Forgetting the mesh is the daemon's part."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable

import httpx

from mesh.core.errors import StartupError
from mesh.node.startup import until
from raft.commands import Command, SetMemberState
from raft.node import RaftNode
from raft.vocab import MemberState

log = logging.getLogger("quorum.node")

DRAIN_TIMEOUT_S = 120.0
HANDOVER_TIMEOUT_S = 30.0
REMOVAL_TIMEOUT_S = 60.0


async def leave_mesh(raft: RaftNode, node_id: str, propose: Callable[[Command], Awaitable[dict]],
                     leader_url: Callable[[], str | None], client: httpx.AsyncClient, admin_token: str) -> None:
    """Returns once the leader has removed `node_id`; StartupError when a step does not complete in time."""
    await propose(SetMemberState(node_id, MemberState.DRAINING))
    log.info("leaving: draining this node's shards")
    await until(lambda: not raft.state.shards_on(node_id), "this node's shards to move elsewhere", DRAIN_TIMEOUT_S)
    if raft.is_leader():
        await asyncio.wrap_future(raft.transfer_leadership())
        await until(lambda: not raft.is_leader() and leader_url() is not None,
                    "leadership to move to another member", HANDOVER_TIMEOUT_S)
    deadline = time.monotonic() + REMOVAL_TIMEOUT_S
    while True:
        leader = leader_url()
        reply = None
        if leader is not None:
            with contextlib.suppress(httpx.HTTPError):  # the leader may be changing: retried below
                reply = await client.post(f"{leader}/control/v1/remove", json={"node": node_id},
                                          headers={"Authorization": f"Bearer {admin_token}"})
        if reply is not None and reply.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise StartupError("the leader did not remove this node; try `meshctl remove` later")
        await asyncio.sleep(0.5)
