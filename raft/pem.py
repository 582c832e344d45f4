"""PEM certificate blocks: the one pattern the mesh splits a trust bundle (ca.pem) with, from the Raft floor up
(raft/apply_trust.py checks a proposed CA, raft/tls.py reloads the trusted CAs, mesh/security/pki.py splits
bundles and takes fingerprints), and their DER bytes, read with the standard library alone."""

from __future__ import annotations

import base64
import binascii
import re

CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)


def cert_blocks(pem: bytes) -> list[bytes]:
    """The certificates of a PEM bundle, each as its own block ending in a newline, in order."""
    return [m.group(0) + b"\n" for m in CERT_BLOCK.finditer(pem)]


def block_der(block: bytes) -> bytes:
    """The DER bytes of one certificate block; ValueError unless its body is canonical base64 (the only spelling
    of those bytes, so every reader of the block, OpenSSL's and cryptography's included, gets the same ones)."""
    body = b"".join(block.splitlines()[1:-1])
    try:
        der = base64.b64decode(body, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"a PEM certificate's body is not base64: {exc}") from None
    if base64.b64encode(der) != body:
        raise ValueError("a PEM certificate's body is not canonical base64")
    return der


def still_covers(verified: frozenset[bytes] | None, now: frozenset[bytes] | None) -> bool:
    """Whether every CA a connection's handshake trusted (`verified`, trust_set of its context) is trusted `now`.
    Then OpenSSL verified the peer's certificate up to a CA trusted now (the mesh's contexts load no other trust
    anchor) and no signature check of our own is needed. The only certificates that check would still refuse
    chain through an intermediate CA, which only the key of a CA trusted now can sign, and that key can sign a
    member certificate directly anyway. False when either set is not known."""
    return bool(verified) and now is not None and verified <= now


def trust_set(pem: bytes) -> frozenset[bytes] | None:
    """The certificates (DER) that OpenSSL trusts after load_verify_locations(cadata=pem), or None when that is
    not certain: a block this pattern does not take (another PEM label, a body that is not base64), which OpenSSL
    might still load. The peer port and Raft compare the set a connection was verified against with the CAs
    trusted now (mesh/security/held_trust.py, raft/tls.py RaftTls.reload); None sends them to the full
    check."""
    blocks = cert_blocks(pem)
    if not blocks or pem.count(b"-----BEGIN") != len(blocks):
        return None
    try:
        return frozenset(block_der(block) for block in blocks)
    except ValueError:  # a body OpenSSL may read otherwise: not certain, as said above
        return None
