"""Whether a CA issued a certificate whose key this member holds, checked by OpenSSL through the ssl module.

cryptography would cost a witness 11.7 MB resident for a check it makes after every applied change (which CA
signed its own certificate: mesh/security/ca_rotation.py). The ssl module cannot verify a certificate alone,
but it can run a TLS handshake in memory: a server presenting the certificate (and proving its key), a client
trusting only the CA. OpenSSL's client then does what every handshake of the mesh does to a peer: it checks the
certificate's signature with the CA's key and its issuer against the CA's subject, and beyond what
`pki.signed_by` asks, that the CA is a CA and the certificate fits a TLS server, which every member and gateway
certificate the mesh makes does. Time is left out here (X509_V_FLAG_NO_CHECK_TIME), so the verdict depends on
the bytes alone and is kept; `holds_from` compares the validity period with the clock.
"""

from __future__ import annotations

import functools
import ssl
import time

from mesh.security.pki import fingerprint, lifetime, split_bundle
from raft.pem import cert_blocks
from raft.tls import load_chain

NO_CHECK_TIME = 0x200000  # OpenSSL's X509_V_FLAG_NO_CHECK_TIME (1.1.0 and later); ssl.VerifyFlags has no name for it
_ROUNDS = 8  # a TLS 1.3 handshake takes two flights each way; a few spare


def holds_from(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> bool:
    """pki.signed_by for a certificate whose key this member holds (its own node or gateway certificate), without
    cryptography: `key_pem` is the certificate's key, OpenSSL verifies the certificate against the CA `ca_pem`
    alone (of a bundle, the first: the signing CA; `verifies`), and its validity period holds now."""
    blocks = cert_blocks(ca_pem)
    if not blocks or not verifies(cert_pem, key_pem, blocks[0]):
        return False
    start, end = lifetime(cert_pem)
    return start <= time.time() <= end


def own_issuer(cert_pem: bytes, key_pem: bytes, bundle: bytes) -> str | None:
    """pki.issuer_of for a certificate whose key this member holds (`holds_from` with each CA of the bundle)."""
    return next((fingerprint(ca) for ca in split_bundle(bundle) if holds_from(cert_pem, key_pem, ca)), None)


@functools.lru_cache(maxsize=32)
def verifies(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> bool:
    """Whether OpenSSL verifies the first certificate of `cert_pem` against the CAs of `ca_pem` alone (no chain
    from `cert_pem`: only the certificate itself is presented), with `key_pem` as its key. False when the key is
    not the certificate's, or either is unreadable."""
    blocks = cert_blocks(cert_pem)
    if not blocks:
        return False
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        load_chain(server, blocks[0], key_pem)
    except ssl.SSLError:  # not a certificate and its key (OpenSSL checks they match): nothing this key can prove
        return False
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # the name is not in question, only who signed the certificate
    client.verify_mode = ssl.CERT_REQUIRED
    client.verify_flags = client.verify_flags | NO_CHECK_TIME
    try:
        client.load_verify_locations(cadata=ca_pem.decode())
    except ssl.SSLError:  # not a certificate OpenSSL reads: a CA that signed nothing
        return False
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = client.wrap_bio(to_client, to_server, server_side=False)
    theirs = server.wrap_bio(to_server, to_client, server_side=True)
    for _ in range(_ROUNDS):
        try:
            ours.do_handshake()
            return True
        except ssl.SSLWantReadError:
            pass  # waiting for the server's next flight
        except ssl.SSLCertVerificationError:
            return False
        try:
            theirs.do_handshake()
        except ssl.SSLWantReadError:
            pass  # waiting for the client's next flight
    raise ssl.SSLError("an in-memory TLS handshake did not finish")
