"""Whether a peer's certificate, which a TLS handshake of this member verified, is still from a CA this member
trusts: asked by the peer port and gRPC on every request (a connection outlives the trust it was opened under).

Every context mesh/security/pki.py makes loads its CAs through `load_trust`, which records them (the DER of each
certificate): then `verified_against(context)` says which CAs a handshake on it could have verified a peer up
to. While every one of them is still trusted, so is the peer, without a signature check of this member's own;
only once a CA rotation has dropped one is the signature checked again, with cryptography (imported then: a
witness does not hold it while idle).
"""

from __future__ import annotations

import functools
import ssl
import threading
import weakref

from raft.pem import cert_blocks, still_covers, trust_set

# What each context loaded through `load_trust` verifies peers against: the certificates (DER) of every bundle
# loaded into it (a context's trust store only grows), None once one of them was not certain (raft/pem.py
# trust_set).
_TRUST: weakref.WeakKeyDictionary[ssl.SSLContext, frozenset[bytes] | None] = weakref.WeakKeyDictionary()
_TRUST_LOCK = threading.Lock()  # contexts are made on the event loop and in worker threads


def load_trust(ctx: ssl.SSLContext, ca_pem: bytes) -> None:
    """`ctx` trusts the CAs of `ca_pem` too (load_verify_locations), and it is recorded."""
    with _TRUST_LOCK:
        before = _TRUST.get(ctx, frozenset())
        ctx.load_verify_locations(cadata=ca_pem.decode())
        loaded = trust_set(ca_pem)
        _TRUST[ctx] = None if before is None or loaded is None else before | loaded


def verified_against(ctx: ssl.SSLContext) -> frozenset[bytes] | None:
    """Every CA certificate (DER) `ctx` trusts, when it was made here and they are certain; else None. A handshake
    it verified chained the peer's certificate to one of them."""
    with _TRUST_LOCK:
        return _TRUST.get(ctx)


def still_trusted(cert: bytes | None, trusted: bytes, verified: frozenset[bytes] | None = None) -> bool:
    """Whether a peer's certificate (DER, or PEM as gRPC gives it), which its TLS handshake verified, is from one
    of the CAs this member trusts now (`trusted`: its ca.pem, which follows the log). A connection outlives the
    trust it was opened under; the peer port and gRPC ask this on every request, so one opened with a certificate
    of a CA since retired (a removed authority's copy of the old key) serves nothing after RetireCas: a held
    connection gets no more than a new one would.

    `verified`: every CA the handshake's context trusted (`verified_against`; None for a resumed TLS session, whose
    certificate an earlier handshake verified, under what trust is not known). When each of them is still trusted
    the answer is yes without a signature check of our own (raft/pem.py still_covers says why); otherwise (a CA
    was dropped since the handshake, or the set is not known) the signature is checked against each CA trusted
    now, with cryptography."""
    if not cert:
        return False
    if still_covers(verified, _trusted_now(trusted)):
        return True
    return _issued_by_any(cert, trusted)


@functools.lru_cache(maxsize=16)
def _trusted_now(trusted: bytes) -> frozenset[bytes] | None:
    return trust_set(trusted)


@functools.lru_cache(maxsize=256)  # per (certificate, trusted CAs): a signature check per connection, not per call
def _issued_by_any(cert: bytes, trusted: bytes) -> bool:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        leaf = x509.load_pem_x509_certificate(cert) if cert.startswith(b"-----") else \
            x509.load_der_x509_certificate(cert)
    except ValueError:
        return False
    for pem in cert_blocks(trusted):
        try:
            leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(pem))
        except (ValueError, TypeError, InvalidSignature):  # another issuer, another key type
            continue
        return True
    return False
