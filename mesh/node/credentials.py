"""This member's certificate and CA-key duties while it runs: renewal (mesh/security/renewal.py), whether
it stays an authority (mesh/security/authority.py) and its part in a CA rotation (mesh/security/ca_rotation.py),
wired to its Raft state and data dir."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import httpx

from mesh.core.config import MeshConfig
from mesh.node.startup import peer_address_of
from mesh.security.authority import authority_peers, qualifies
from mesh.security.ca_rotation import CA_KEY_PATH, TrustKeeper
from mesh.security.datadir import DataDir
from mesh.security.pki import PkiError
from mesh.security.renewal import LiveIdentity
from raft.commands import Command, SetAuthority
from raft.node import ProposalFailed, RaftNode
from raft.records import Member

log = logging.getLogger("quorum.node")


class AuthorityKeeper:
    """Records in the log whether this member holds the CA key, and deletes a key this member should not
    hold (a phone, a router or a witness of a mesh made before the key stayed home; a member no longer in
    security.authorities) once another live authority exists: the mesh always keeps at least one."""

    def __init__(self, raft: RaftNode, dd: DataDir, node_id: str, cfg: MeshConfig,
                 propose: Callable[[Command], Awaitable[dict]]) -> None:
        self.raft, self.dd, self.node_id, self.cfg, self.propose = raft, dd, node_id, cfg, propose
        self._warned = False

    async def check(self) -> None:
        state = self.raft.state
        me = state.members.get(self.node_id)
        if me is None or me.state == "gone":
            return
        holds = self.dd.ca_key() is not None or self.dd.next_ca() is not None  # a CA it made for a rotation
        fits = qualifies(self.cfg.security.authorities, me.name, me.profile.device_class, me.witness)
        if holds and not fits:
            if authority_peers(state, self.node_id, peer_address_of):
                self.dd.drop_ca_key()
                holds = False
                log.warning("deleted ca.key: this member (%s, %s%s) is not an authority under security.authorities "
                            "= %s, and another member holds the key", me.name, me.profile.device_class,
                            ", witness" if me.witness else "", self.cfg.security.authorities)
            elif not self._warned:
                self._warned = True
                log.warning("this member holds the mesh CA key but is not an authority under security.authorities "
                            "= %s; it keeps the key until another authority joins (the mesh needs one)",
                            self.cfg.security.authorities)
        if holds != me.authority:
            try:
                await self.propose(SetAuthority(self.node_id, holds))
            except (ProposalFailed, TimeoutError) as exc:  # no majority now: the next change retries
                log.warning("could not record whether this member holds the CA key: %s", exc or "timeout")

    async def run(self, changed: asyncio.Event) -> None:
        """Checks now and after every applied change (a new authority, this member's profile)."""
        while True:
            await self.check()
            await changed.wait()
            changed.clear()


def trust_keeper(raft: RaftNode, dd: DataDir, node_id: str, cfg: MeshConfig, live: LiveIdentity,
                 propose: Callable[[Command], Awaitable[dict]], client: Callable[[], httpx.AsyncClient],
                 renew: Callable[[], None]) -> TrustKeeper:
    """This member's TrustKeeper: the CA key fetched over the peer port (`client`: identity-checked)."""
    async def fetch_key(maker: Member) -> bytes:
        reply = await asyncio.wait_for(client().post(f"https://{peer_address_of(maker)}{CA_KEY_PATH}"), 15.0)
        if reply.status_code != 200:
            raise PkiError(f"HTTP {reply.status_code}: {reply.text[:200]}")
        return reply.json()["ca_key"].encode()

    def leader() -> str | None:
        address = raft.leader()
        return next((m.node_id for m in raft.state.live_members() if m.raft_address == address), None)

    def may_hold(member: Member) -> bool:
        return qualifies(cfg.security.authorities, member.name, member.profile.device_class, member.witness)

    return TrustKeeper(node_id, dd, live, lambda: raft.state, leader, propose, may_hold, fetch_key, renew)
