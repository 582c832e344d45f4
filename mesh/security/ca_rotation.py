"""Removal revokes: the mesh rotates its CA when a member that held the CA key is removed (or on
`meshctl ca rotate`), without stopping.

The trusted CAs are replicated state (raft/apply_trust.py). `TrustKeeper` runs on every member and moves it
through a rotation, one step per check (after every applied change, and every few seconds while one is under
way):

1. owed (a removed authority, or an operator's request): a live authority makes a new CA, keeps its key as
   ca-next.key, and proposes RotateCa. The leader, when it is an authority, goes first; the others follow
   STAGGER_S apart, and the log takes only the first. With no live authority left, a member that may hold the
   key (security.authorities) makes it, and becomes the authority. A proposal whose outcome is unknown (no
   majority then) is proposed again, the same CA, every AGAIN_S while the rotation is owed; ca-next.key is
   shredded only once no entry can make its CA the signing one (the log rotated to another CA), never on a
   timer.
2. every member trusts the CAs the log names (ca.pem: the signing one first; Raft, gRPC, the peer port and its
   clients reload from it) and reports so (SetMemberCa: the newest CA it trusts, the CA of its certificate).
   Once every live member trusts the new CA, each renews its certificate under it (mesh/security/renewal.py)
   and reports that. Renewing only then keeps a member that was away (a phone asleep) able to reach the
   others when it returns: they still present certificates it trusts until it has learnt the new CA. The
   authority that made the CA installs its key; every other authority fetches it over the peer port (POST
   CA_KEY_PATH, its own recorded certificate; only a live member recorded as an authority gets it) from the
   maker, or, when the maker is away, from any other live authority that holds it by then, and never signs
   with the old one.
3. once every live member reports the signing CA, the leader retires the others (RetireCas): from then on a
   certificate signed with the removed member's copy of the old key is refused at every handshake.

Requests are served throughout: each member trusts both CAs until every member holds a new certificate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable

import httpx

from mesh.security.datadir import DataDir
from mesh.security.own_cert import holds_from, own_issuer
from mesh.security.pki import (
    PkiError,
    create_ca,
    fingerprint,
    make_bundle,
    same_key,
    split_bundle,
)
from mesh.security.renewal import LiveIdentity
from raft.apply_trust import behind, untrusting
from raft.commands import Command, RetireCas, RotateCa, SetMemberCa
from raft.node import ProposalFailed
from raft.records import Member, Rejected
from raft.state import MeshState
from raft.vocab import MemberState

log = logging.getLogger("quorum.trust")

CA_KEY_PATH = "/control/v1/ca-key"
STAGGER_S = 3.0  # between authorities in line to make a new CA
BUSY_S = 2.0  # how often to check while a rotation is under way
AGAIN_S = 30.0  # a CA this member proposed that the log has not taken (nor settled otherwise) is proposed again


def signing_pem(state: MeshState) -> bytes | None:
    return next((pem.encode() for fp, pem in state.trusted_cas if fp == state.signing_ca), None)


def trust_bundle(state: MeshState) -> bytes | None:
    """ca.pem as the log says it: the signing CA first, then the others still trusted; None before any rotation."""
    signing = signing_pem(state)
    if signing is None:
        return None
    return make_bundle(signing, [pem.encode() for fp, pem in state.trusted_cas if fp != state.signing_ca])


def key_sources(state: MeshState, node_id: str) -> list[Member]:
    """Whom an authority asks for the signing CA's key: the live authority that made the CA first, then every
    other live authority (one that fetched it already hands it on); never itself."""
    line = [m for m in state.live_members() if m.authority and m.node_id != node_id]
    return sorted(line, key=lambda m: (m.node_id != state.ca_made_by, m.node_id))


def rotators(state: MeshState, leader: str | None, may_hold: Callable[[Member], bool]) -> list[str]:
    """Who makes the new CA, in turn: the live authorities (the leader first), or, with none, the live members
    that may hold the key."""
    live = state.live_members()
    line = [m for m in live if m.authority] or [m for m in live if not m.witness and may_hold(m)]
    return [m.node_id for m in sorted(line, key=lambda m: (m.node_id != leader, m.node_id))]


class TrustKeeper:
    """This member's part in a CA rotation (the module docstring)."""

    def __init__(self, node_id: str, dd: DataDir, live: LiveIdentity, state: Callable[[], MeshState],
                 leader: Callable[[], str | None], propose: Callable[[Command], Awaitable[dict]],
                 may_hold: Callable[[Member], bool], fetch_key: Callable[[Member], Awaitable[bytes]],
                 renew: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.node_id, self.dd, self.live, self.state, self.leader = node_id, dd, live, state, leader
        self.propose, self.may_hold, self.fetch_key, self.renew, self.clock = propose, may_hold, fetch_key, renew, clock
        self._owed_since: float | None = None  # since when this member has been in line for the rotation owed
        self._proposed_at: float | None = None  # when this member last proposed the CA in ca-next.pem
        self._renewal_asked = ""  # the signing CA this member last asked the renewer for a certificate from

    async def check(self) -> bool:
        """One pass; whether a rotation is under way (check again soon)."""
        state = self.state()
        me = state.members.get(self.node_id)
        if me is None or me.state == MemberState.GONE:
            return False
        self._follow(state)
        await self._keys(state, me)
        if state.ca_rotation_owed:
            await self._rotate(state)
        else:  # settled (by this member's RotateCa or another's): the next rotation owed waits its turn afresh
            self._owed_since = None
        current = self.live()  # its own certificate: checked without cryptography (own_cert), every member
        if state.trusted_cas and not holds_from(current.cert_pem, current.key_pem, current.ca_pem) \
                and (not untrusting(state) or state.ca_finish) and self._renewal_asked != state.signing_ca:
            self._renewal_asked = state.signing_ca
            self.renew()  # every member trusts the signing CA: a certificate from it, now
        issuer = own_issuer(current.cert_pem, current.key_pem, current.ca_pem)
        trusts = fingerprint(current.ca_pem)
        cert = fingerprint(current.cert_pem)
        if issuer is not None and (issuer, trusts, cert) != (me.ca, me.trusts, me.cert):
            await self._propose(SetMemberCa(self.node_id, issuer, trusts, cert), "report this member's CAs")
        if len(state.trusted_cas) > 1 and self.leader() == self.node_id:
            away = set(untrusting(state))
            renewing = [name for name in behind(state) if name not in away]
            if not behind(state) and await self._propose(RetireCas(state.signing_ca), "retire the old CA"):
                log.info("CA rotation finished: every member holds a certificate from the new CA; the old one is "
                         "no longer trusted")
            elif state.ca_finish and not renewing and \
                    await self._propose(RetireCas(state.signing_ca, force=True), "finish the CA rotation"):
                log.warning("CA rotation finished by an operator; left behind (they must join again): %s",
                            ", ".join(sorted(away)) or "nobody")
        return bool(state.ca_rotation_owed) or len(state.trusted_cas) > 1 or self.dd.next_ca() is not None

    def _follow(self, state: MeshState) -> None:
        """Trusts exactly the CAs the log names."""
        bundle = trust_bundle(state)
        current = self.live()
        if bundle is None or bundle == current.ca_pem:
            return
        self.dd.write_trust(bundle)
        self.live.replace(dataclasses.replace(current, ca_pem=bundle))
        log.info("trusting %d CA%s (signing: %s)", len(state.trusted_cas), "" if len(state.trusted_cas) == 1 else "s",
                 state.signing_ca[:12])

    async def _keys(self, state: MeshState, me: Member) -> None:
        """Installs the key of a CA this member made once the log signs with it, and shreds it once the log can no
        longer make it sign; fetches the signing key when this member is an authority holding an older one."""
        pending = self.dd.next_ca()
        if pending is not None:
            made = fingerprint(pending[0])
            if made == state.signing_ca:
                self.dd.install_next_ca()
                self._proposed_at = None
                log.info("this member's new CA signs from now on")
            elif any(fp == made for fp, _ in state.trusted_cas) or not state.ca_rotation_owed:
                # Dead: another CA was rotated in after it, or instead of it (a RotateCa settles what is owed, and
                # the log takes one per rotation owed: a late copy of this proposal is refused).
                self.dd.drop_next_ca()
                self._proposed_at = None
                log.info("shredded the CA this member made for a rotation (%s): the log rotated to %s", made[:12],
                         state.signing_ca[:12])
            # else: owed and not taken yet: _rotate proposes the same CA again
        signing = signing_pem(state)
        key = self.dd.ca_key()
        if signing is None or key is None or not me.authority or same_key(signing, key):
            return
        reasons = []
        for source in key_sources(state, self.node_id):
            try:
                new = await self.fetch_key(source)
                if not same_key(signing, new):
                    raise PkiError("the key does not match the signing CA")
            except (httpx.HTTPError, PkiError, KeyError, TypeError, ValueError, TimeoutError) as exc:
                # unreachable, refused, not holding it yet, or not the key: the next authority, then the next check
                reasons.append(f"{source.name}: {type(exc).__name__}: {exc}")
                continue
            self.dd.write_ca_key(new)
            log.info("holds the new CA key (from %s); the old one is deleted", source.name)
            return
        if reasons:  # this member signs nothing meanwhile, and asks again next check
            log.warning("could not fetch the new CA key (%s); retrying", "; ".join(reasons))

    async def _rotate(self, state: MeshState) -> None:
        line = rotators(state, self.leader(), self.may_hold)
        if self.node_id not in line:
            self._owed_since = None
            return
        pending = self.dd.next_ca()
        if pending is not None:  # proposed, outcome unknown: the same CA again (its key may be the one the log takes)
            now = self.clock()
            if self._proposed_at is None or now - self._proposed_at >= AGAIN_S:
                self._proposed_at = now
                await self._propose_ca(state, pending[0])
            return
        now = self.clock()
        self._owed_since = self._owed_since if self._owed_since is not None else now
        if now - self._owed_since < line.index(self.node_id) * STAGGER_S:
            return
        cert, key = await asyncio.to_thread(create_ca, state.name, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
        self.dd.write_next_ca(cert, key)
        self._proposed_at = now
        await self._propose_ca(state, cert)

    async def _propose_ca(self, state: MeshState, cert: bytes) -> None:
        before = tuple(pem.decode() for pem in split_bundle(self.live().ca_pem))
        outcome = await self._propose(RotateCa(self.node_id, cert.decode(), before), "rotate the CA")
        if outcome is True:
            self._owed_since = None
            log.warning("made a new mesh CA (%s) because %s; every member moves to it", fingerprint(cert)[:12],
                        state.ca_rotation_owed)
        # False (refused) or None (unknown): ca-next.key stays until the log settles the rotation (_keys)

    async def _propose(self, cmd: Command, what: str) -> bool | None:
        """True once applied, False when the state refused it, None when the outcome is unknown."""
        try:
            await self.propose(cmd)
            return True
        except Rejected as exc:  # the log moved on (another authority rotated first): the next check follows it
            log.info("did not %s: %s", what, exc)
            return False
        except (ProposalFailed, TimeoutError) as exc:  # no majority now: the next check retries
            log.warning("could not %s: %s", what, exc or "timeout")
            return None

    async def run(self, changed: asyncio.Event) -> None:
        """Checks now, after every applied change, and every BUSY_S while a rotation is under way."""
        while True:
            try:
                busy = await self.check()
            except Exception:  # noqa: BLE001 - a disk or reply error must not end meshd; the next check retries
                log.exception("CA rotation check failed")
                busy = True
            try:
                await asyncio.wait_for(changed.wait(), BUSY_S if busy else 60.0)
            except TimeoutError:
                pass  # the periodic check
            changed.clear()
