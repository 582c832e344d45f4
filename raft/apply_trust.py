"""Apply handlers for the CAs the mesh trusts: a rotation owed, made, reported and finished.

The rules (issue 14, "removal revokes"; modelled on how Kubernetes, etcd and Consul rotate a CA: a trust
bundle with both CAs, cross-over, then the old one dropped):
- a removed member that held the CA key owes a rotation (raft/state.py), as does `meshctl ca rotate`
  (RequestCaRotation); a rotation not owed is refused, so of two authorities that race, one wins;
- RotateCa comes from a live authority (or, when none is live, from a live member that is not a witness: it
  becomes the authority); its CA joins the trusted set and signs from then on; the first rotation adopts the
  CAs its proposer trusted before (`trusted_before`), which the state did not name yet;
- each member reports the newest CA it trusts and the one that signed its certificate (SetMemberCa); members
  renew under the new CA only once every live member trusts it (`untrusting`), so a member that was away
  (a phone asleep) still reaches the others when it returns, learns the new CA, and the rotation goes on;
- RetireCas keeps only the signing CA, and only once every live member reports it: from then on a certificate
  any other CA signed, the removed member's copy of the old key included, is refused at every handshake. With
  `force` (an operator) the members that do not trust the new CA are left out: `ca_finish` lets the others
  renew at once, and the old CA goes as soon as they have (`force` again, from the leader).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ssl

from raft.commands import RequestCaRotation, RetireCas, RotateCa, SetMemberCa
from raft.records import MeshState, Rejected
from raft.vocab import MemberState

MAX_TRUSTED = 8  # CAs trusted at once: a rotation every removal, each finished before long
MAX_CA_PEM = 4096


def ca_fingerprint(pem: str) -> str:
    """sha256 of the certificate's DER, base64url without padding (mesh/security/pki.py fingerprint)."""
    if not isinstance(pem, str) or len(pem) > MAX_CA_PEM:
        raise Rejected("a CA certificate is a PEM string of at most 4 KB")
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.strip() + "\n")
    except ValueError:
        raise Rejected("not a PEM certificate") from None
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def owe_rotation(state: MeshState, reason: str) -> MeshState:
    return dataclasses.replace(state, ca_rotation_owed=reason[:200] or "requested")


def _request(state: MeshState, cmd: RequestCaRotation) -> MeshState:
    if not isinstance(cmd.reason, str):
        raise Rejected("a rotation's reason is a string")
    return owe_rotation(state, cmd.reason)


def _rotate(state: MeshState, cmd: RotateCa) -> MeshState:
    if not state.ca_rotation_owed:
        raise Rejected("no CA rotation is owed (meshctl ca rotate asks for one)")
    member = state.members.get(cmd.node_id)
    if member is None or member.state == MemberState.GONE:
        raise Rejected(f"unknown member {cmd.node_id}")
    if not member.authority and (member.witness or any(m.authority for m in state.live_members())):
        raise Rejected(f"{member.name} is not an authority: a live authority makes the new CA")
    fingerprint = ca_fingerprint(cmd.ca_pem)
    trusted = state.trusted_cas
    if not trusted:
        if not cmd.trusted_before:
            raise Rejected("the first rotation names the CAs trusted before it")
        trusted = tuple((ca_fingerprint(pem), pem) for pem in cmd.trusted_before)
    if any(fp == fingerprint for fp, _ in trusted):
        raise Rejected("that CA is trusted already")
    if len(trusted) >= MAX_TRUSTED:
        raise Rejected(f"{len(trusted)} CAs are trusted already: finish the rotation first (meshctl ca finish)")
    members = {**state.members, cmd.node_id: dataclasses.replace(member, authority=True)}
    return dataclasses.replace(state, trusted_cas=(*trusted, (fingerprint, cmd.ca_pem)), signing_ca=fingerprint,
                               ca_rotation_owed="", ca_made_by=cmd.node_id, members=members, ca_finish=False)


def _set_member_ca(state: MeshState, cmd: SetMemberCa) -> MeshState:
    member = state.members.get(cmd.node_id)
    if member is None or member.state == MemberState.GONE:
        raise Rejected(f"unknown member {cmd.node_id}")
    for fp in (cmd.ca, cmd.trusts):
        if not isinstance(fp, str) or len(fp) != 43:
            raise Rejected("a CA fingerprint is 43 characters")
        if state.trusted_cas and all(known != fp for known, _ in state.trusted_cas):
            raise Rejected("that CA is not trusted by the mesh")
    if not isinstance(cmd.cert, str) or len(cmd.cert) not in (0, 43):
        raise Rejected("a certificate fingerprint is 43 characters")
    member = dataclasses.replace(member, ca=cmd.ca, trusts=cmd.trusts, cert=cmd.cert or member.cert)
    return dataclasses.replace(state, members={**state.members, cmd.node_id: member})


def untrusting(state: MeshState) -> list[str]:
    """Names of the live members that do not trust the signing CA yet (as they report it)."""
    return [m.name for m in state.live_members() if m.trusts != state.signing_ca]


def behind(state: MeshState) -> list[str]:
    """Names of the live members whose certificate is not from the signing CA yet (as they report it)."""
    return [m.name for m in state.live_members() if m.ca != state.signing_ca]


def _retire(state: MeshState, cmd: RetireCas) -> MeshState:
    if not state.signing_ca or cmd.keep != state.signing_ca:
        raise Rejected("only the CAs other than the signing one are retired")
    if len(state.trusted_cas) < 2:
        raise Rejected("no other CA is trusted")
    if cmd.force is True:
        away = set(untrusting(state))
        if any(name not in away for name in behind(state)):  # some still renewing: drop once they have
            return dataclasses.replace(state, ca_finish=True)
    elif behind(state):
        raise Rejected(f"still on an older CA: {', '.join(behind(state))}")
    keep = tuple(pair for pair in state.trusted_cas if pair[0] == cmd.keep)
    return dataclasses.replace(state, trusted_cas=keep, ca_finish=False)


HANDLERS = {
    RequestCaRotation: _request,
    RotateCa: _rotate,
    SetMemberCa: _set_member_ca,
    RetireCas: _retire,
}
