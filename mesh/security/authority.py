"""The CA stays home: which members hold the mesh CA's key, and how everyone else gets certificates signed.

An authority is a member that holds `ca.key`. The mesh's first member is one; with `security.authorities =
"auto"` a desktop-, server- or Raspberry Pi-class voter that joins through a member holding the key receives
it too (never a phone, a router or a witness); with a list of names, exactly those members. Each member
records in the Raft log whether it holds the key (SetAuthority, raft/commands.py), so every member knows
where to send a request.

Three things need the key, and go to an authority when this member has none (`Authority.sign`), as a POST to
SIGN_PATH on its HTTPS peer port, with this member's certificate (only a live member's is taken):
- "join": the certificate of a node the leader admits (the leader names the new id);
- "node": the renewal of the caller's own certificate (the authority names the caller's id, from its
  certificate, never from the body);
- "gateway": the caller's gateway HTTPS certificate for the names it lists (server authentication only).
An authority signs only with its own key and never forwards, so a request cannot loop. With no authority
reachable, `NoAuthority` says why (a join answers 503 with it).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

import httpx

from mesh.security.pki import PkiError, same_key, sign_gateway_request, sign_request
from raft.state import MeshState
from raft.vocab import MemberState

log = logging.getLogger("quorum.authority")

SIGN_PATH = "/control/v1/sign"
AUTO_CLASSES = frozenset({"desktop", "server", "raspberry-pi"})  # never termux-phone, openwrt-router
KINDS = ("join", "node", "gateway")


class NoAuthority(RuntimeError):
    """No member that holds the CA key could sign; the message says why."""


def qualifies(policy: str | tuple[str, ...], name: str, device_class: str, witness: bool) -> bool:
    """Whether a member may hold the CA key under `security.authorities`."""
    if policy == "auto":
        return not witness and device_class in AUTO_CLASSES
    return name in policy


def authority_peers(state: MeshState, self_id: str, peer_of: Callable[[object], str]) -> list[str]:
    """Peer addresses of the live members recorded as authorities, this member excluded."""
    return [peer_of(m) for m in state.live_members() if m.authority and m.node_id != self_id
            and m.state != MemberState.GONE]


def sign_here(ca_pem: bytes, ca_key: bytes, body: dict, caller: str, state: MeshState, days: float) -> bytes:
    """Signs the request `body` from the live member `caller` with this member's CA key. PkiError when the
    request is not one this mesh signs."""
    kind, csr = body.get("kind"), body.get("csr")
    csr_pem = csr.encode() if isinstance(csr, str) else b""
    if kind == "node":
        return sign_request(ca_pem, ca_key, csr_pem, caller, days)
    if kind == "join":
        node_id = body.get("node_id")
        if not isinstance(node_id, str) or node_id in state.members:
            raise PkiError("a join certificate is for a node id the mesh has never had")
        return sign_request(ca_pem, ca_key, csr_pem, node_id, days)
    if kind == "gateway":
        names = body.get("names")
        if not isinstance(names, list) or not 0 < len(names) <= 32 or \
                not all(isinstance(n, str) and 0 < len(n) <= 253 for n in names):
            raise PkiError("a gateway certificate needs 1 to 32 names")
        return sign_gateway_request(ca_pem, ca_key, csr_pem, tuple(names))
    raise PkiError(f"'kind' is one of {', '.join(KINDS)}")


@dataclass
class Authority:
    """Signs with the CA key here when this member holds it (`ca_key()` not None), else through an authority
    member (`peers()`: their peer addresses, `client()`: an identity-checked peer client)."""
    node_id: str
    ca_pem: Callable[[], bytes]  # the trusted CAs, the signing one first (they change with a rotation)
    ca_key: Callable[[], bytes | None]
    state: Callable[[], MeshState]
    peers: Callable[[], list[str]]
    client: Callable[[], httpx.AsyncClient]
    days: float = 30

    def signing_key(self) -> bytes | None:
        """This member's CA key when it is the signing CA's (during a rotation an authority may still hold the
        old one until it fetches the new: it never signs with it)."""
        key = self.ca_key()
        return key if key is not None and same_key(self.ca_pem(), key) else None

    def here(self) -> bool:
        return self.signing_key() is not None

    async def sign(self, body: dict, timeout_s: float = 10.0) -> bytes:
        key = self.signing_key()
        if key is not None:
            return sign_here(self.ca_pem(), key, body, self.node_id, self.state(), self.days)
        peers = self.peers()
        if not peers:
            raise NoAuthority("no member of the mesh that holds the CA key is known (security.authorities)")
        reasons = []
        for peer in peers:
            try:
                reply = await asyncio.wait_for(self.client().post(f"https://{peer}{SIGN_PATH}", json=body), timeout_s)
            except (httpx.HTTPError, TimeoutError) as exc:  # unreachable or refused at TLS: try the next one
                reasons.append(f"{peer}: {type(exc).__name__}")
                continue
            if reply.status_code == 200:
                return reply.json()["certificate"].encode()
            if reply.status_code == 400:  # the request itself is refused: another authority would refuse too
                raise PkiError(_message(reply))
            reasons.append(f"{peer}: HTTP {reply.status_code} {_message(reply)}")
        raise NoAuthority("no authority member signed: " + "; ".join(reasons))


def _message(reply: httpx.Response) -> str:
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:200]

