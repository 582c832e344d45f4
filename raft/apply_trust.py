"""Apply handlers for the CAs the mesh trusts: a rotation owed, made, reported and finished.

The rules (issue 14, "removal revokes"; modelled on how Kubernetes, etcd and Consul rotate a CA: a trust
bundle with both CAs, cross-over, then the old one dropped):
- a removed member that held the CA key owes a rotation (raft/state.py), as does `meshctl ca rotate`
  (RequestCaRotation); a rotation not owed is refused, so of two authorities that race, one wins;
- RotateCa comes from a live authority (or, when none is live, from a live member that is not a witness: it
  becomes the authority); its CA joins the trusted set and signs from then on; the first rotation adopts the
  CAs its proposer trusted before (`trusted_before`), which the state did not name yet; each of them must be one
  self-signed CA certificate with a key of ours (`ca_fingerprint`), judged from its bytes alone (cryptography,
  which every member has, imported only when a CA is proposed or such an entry replayed: a witness does not hold
  it while idle), so every member gives the same verdict;
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
import binascii
import dataclasses
import hashlib
from typing import TYPE_CHECKING

from raft.commands import RequestCaRotation, RetireCas, RotateCa, SetMemberCa
from raft.pem import CERT_BLOCK
from raft.records import MeshState, Rejected
from raft.vocab import MemberState

if TYPE_CHECKING:
    from cryptography import x509

MAX_TRUSTED = 8  # CAs trusted at once: a rotation every removal, each finished before long
MAX_CA_PEM = 4096


CA_CURVES = ("secp256r1", "secp384r1")  # EC keys a CA may have (meshd makes P-256)
CA_RSA_BITS = (2048, 4096)  # or RSA keys of that many bits, at least and at most
CA_HASHES = ("SHA256", "SHA384", "SHA512")  # signature hashes, by their class in cryptography.hazmat.primitives.hashes


def ca_fingerprint(pem: str) -> str:
    """The fingerprint (sha256 of the DER, base64url without padding: mesh/security/pki.py fingerprint) of a CA
    certificate the mesh may trust; Rejected, with the reason, unless `pem` is one PEM certificate that is a CA
    (basicConstraints CA=true; keyCertSign when it says its key usage), self-signed, with a key and a signature
    hash of ours. Every member writes what the log trusts into its ca.pem, so one proposer (a compromised
    authority) must not get a malformed CA there. The verdict depends on the bytes alone (no clock), so every
    member, and every replay of the log, gives the same one."""
    if not isinstance(pem, str) or len(pem) > MAX_CA_PEM or not pem.isascii():
        raise Rejected("a CA certificate is a PEM string of at most 4 KB")
    raw = pem.strip().encode()
    block = CERT_BLOCK.match(raw)  # the first block: it must be all there is
    if block is None or block.end() != len(raw):
        raise Rejected("not a PEM certificate: a CA is one PEM certificate block and nothing else")
    body = b"".join(block.group(0).splitlines()[1:-1])
    from cryptography import x509

    try:
        der = base64.b64decode(body, validate=True)
        cert = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError):
        raise Rejected("not a PEM certificate: its body is not a DER X.509 certificate") from None
    _check_ca(cert)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def _check_ca(cert: x509.Certificate) -> None:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        extensions = cert.extensions
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise Rejected("not a CA certificate: it has no basicConstraints (CA=true)") from None
    except ValueError as exc:  # duplicate or malformed extensions
        raise Rejected(f"not a CA certificate: its extensions do not parse ({exc})") from None
    if not constraints.ca:
        raise Rejected("not a CA certificate: basicConstraints says CA=false")
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None  # no key usage: any, certificate signing included
    if usage is not None and not usage.key_cert_sign:
        raise Rejected("not a CA certificate: its key usage does not allow signing certificates")
    try:
        key = cert.public_key()
        digest = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        raise Rejected("a CA key is EC P-256 or P-384, or RSA of 2048 to 4096 bits") from None
    if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in CA_CURVES) and \
            not (isinstance(key, rsa.RSAPublicKey) and CA_RSA_BITS[0] <= key.key_size <= CA_RSA_BITS[1]):
        raise Rejected("a CA key is EC P-256 or P-384, or RSA of 2048 to 4096 bits")
    if not isinstance(digest, tuple(getattr(hashes, name) for name in CA_HASHES)):
        raise Rejected("a CA certificate is signed with SHA-256, SHA-384 or SHA-512")
    if cert.issuer != cert.subject:
        raise Rejected("a CA certificate of the mesh is self-signed: its issuer is not its subject")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise Rejected("a CA certificate of the mesh is self-signed: its signature does not verify with its own key") \
            from None
    if cert.not_valid_before_utc >= cert.not_valid_after_utc:
        raise Rejected("a CA certificate's validity ends before it begins")


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
