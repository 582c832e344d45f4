"""The mesh's certificate authority and each node's key and certificate.

`meshd init` creates the CA (an EC P-256 key and a self-signed certificate) and the first node's key
and certificate. A joining node makes its own key and sends a certificate request; the leader checks the
join token and has an authority member sign it (mesh/security/authority.py): the CA key lives only on
authorities.

A node certificate names its node id twice: as the common name and as the DNS name `ID.quorum-node`
(`node_dns_name`), beside the plain NODE_DNS_NAME older clients ask for. A client that dials a member asks
for that member's `ID.quorum-node`, so TLS itself refuses any other member's certificate (a removed phone
posing as the leader's peer port or a shard). Node certificates last NODE_DAYS (30) and are renewed by the
daemon well before (mesh/security/renewal.py); the replicated member list refuses removed ids everywhere.

Files (in the data dir; keys 0600): ca.pem, ca.key, node.pem, node.key.

The cryptography package is imported only by what makes keys, requests and certificates, or checks a signature
on a certificate of another member (a join, a renewal, a CA rotation): a witness on a 256 MB router never holds
it while idle. Fingerprints, this member's own certificate's facts (mesh/security/cert_facts.py) and whether a
CA issued a certificate whose key this member holds (mesh/security/own_cert.py: OpenSSL, in an in-memory
handshake) need only the standard library; so does whether a peer's connection is still trusted while every CA it
was verified against is (mesh/security/held_trust.py).
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import re
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mesh.security import cert_facts
from mesh.security.held_trust import load_trust
from raft.pem import CERT_BLOCK, block_der, cert_blocks
from raft.tls import load_chain

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

NODE_DNS_NAME = "quorum-node"
CA_YEARS = 20
NODE_DAYS = 30  # a node certificate's life; renewed after two thirds of it (mesh/security/renewal.py)
MAX_CSR_BYTES = 4096
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")  # a DNS label: node ids are 12 hex digits


class PkiError(ValueError):
    """A certificate, request or fingerprint that does not check out; the message says which."""


@dataclass(frozen=True)
class NodeIdentity:
    """What a node presents and trusts: its key and certificate, and the mesh CA (PEM bytes)."""
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    @property
    def node_id(self) -> str:
        return common_name(self.cert_pem)

    def server_context(self) -> ssl.SSLContext:
        """TLS for a node's HTTPS peer port: this node's certificate; a client certificate is
        verified against the mesh CA when one is sent (joining nodes have none yet)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # TLS 1.3 without session tickets: no connection resumes a session verified under a CA since dropped
        # (TLS 1.2's session ids would, and only members, all TLS 1.3, talk to this port).
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.num_tickets = 0
        load_chain(ctx, self.cert_pem, self.key_pem)
        load_trust(ctx, self.ca_pem)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """TLS to another member: its certificate must come from this mesh's CA; ours goes along."""
        ctx = trusting(self.ca_pem)
        load_chain(ctx, self.cert_pem, self.key_pem)
        return ctx


def load_identity(ctx: ssl.SSLContext, identity: NodeIdentity, before: NodeIdentity | None = None) -> None:
    """Loads `identity` into an existing context: its certificate replaces the one there for new handshakes,
    and its CA is trusted too (`before`'s stays trusted: a CA rotation adds before it drops). Call it on the
    thread that makes the context's connections (for asyncio servers and clients: the loop)."""
    load_chain(ctx, identity.cert_pem, identity.key_pem)
    if before is None or before.ca_pem != identity.ca_pem:
        load_trust(ctx, identity.ca_pem)


def trusting(ca_pem: bytes) -> ssl.SSLContext:
    """A client context that accepts exactly the certificates this CA signed (any member)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # members are named by address; the CA signature is what identifies them
    ctx.verify_mode = ssl.CERT_REQUIRED
    load_trust(ctx, ca_pem)
    return ctx


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_key() -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec

    return _key_pem(ec.generate_private_key(ec.SECP256R1()))


def create_ca(mesh_name: str, label: str = "") -> tuple[bytes, bytes]:
    """(CA certificate PEM, CA key PEM) for a new mesh, or a new CA of a mesh (`label`, e.g. the date of a
    rotation, keeps its name apart from the CA it replaces)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    label = f" {label}" if label else ""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Quorum mesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"Quorum mesh CA {mesh_name}"[:64 - len(label)] + label)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def certificate_request(key_pem: bytes, node_id: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = serialization.load_pem_private_key(key_pem, None)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def node_dns_name(node_id: str) -> str:
    """The DNS name in `node_id`'s certificate that a client asks for when it dials that member."""
    return f"{node_id}.{NODE_DNS_NAME}"


def sign_request(ca_pem: bytes, ca_key_pem: bytes, csr_pem: bytes, node_id: str, days: float = NODE_DAYS) -> bytes:
    """The node certificate for `node_id`, the id the leader assigned, for the key of a self-consistent
    request, valid for `days`. The request's own subject is ignored: a joiner proves it holds the key,
    the CA names it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    if not _NODE_ID.fullmatch(node_id or ""):
        raise PkiError(f"not a node id: {node_id!r}")
    csr = _request(csr_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    now = _now()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NODE_DNS_NAME),
                                                        x509.DNSName(node_dns_name(node_id))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def issue_node_certificate(ca_pem: bytes, ca_key_pem: bytes, node_id: str,
                           days: float = NODE_DAYS) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for a node whose key is made here (the mesh's first node)."""
    key = new_key()
    return key, sign_request(ca_pem, ca_key_pem, certificate_request(key, node_id), node_id, days)


def fingerprint(ca_pem: bytes) -> str:
    """sha256 of the (first) certificate (DER), base64url without padding: 43 characters."""
    return der_fingerprint(_first_der(ca_pem))


def _first_der(pem: bytes) -> bytes:
    """The DER of the first certificate of a PEM bundle, read through (cert_facts) to be sure it is one."""
    blocks = cert_blocks(pem)
    try:
        der = block_der(blocks[0])
        cert_facts.read(der)
    except (IndexError, ValueError):
        raise PkiError("not a PEM certificate") from None
    return der


def der_fingerprint(der: bytes) -> str:
    """fingerprint() of a certificate already in DER (what a TLS connection's getpeercert(True) gives)."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def split_bundle(pem: bytes) -> list[bytes]:
    """The certificates of a PEM bundle (ca.pem during a CA rotation holds several: the signing CA first)."""
    return cert_blocks(pem)


def make_bundle(signing: bytes, others: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
    """A trust bundle: the signing CA first (what `fingerprint` and the signer read), then the others."""
    return b"".join([signing.strip() + b"\n", *(o.strip() + b"\n" for o in others if o.strip() != signing.strip())])


def issuer_of(cert_pem: bytes, bundle: bytes) -> str | None:
    """The fingerprint of the CA in `bundle` that signed `cert_pem` (and whose validity period holds), or None."""
    return next((fingerprint(ca) for ca in split_bundle(bundle) if signed_by(cert_pem, ca)), None)


def check_fingerprint(ca_pem: bytes, expected: str) -> None:
    """Raises PkiError unless `ca_pem` is the CA the join token names, and nothing else: one PEM certificate. A
    joiner trusts all of `ca_pem` for the TLS that carries its token, and a fingerprint covers only the first
    certificate, so a CA appended behind the real one (an answer forged on the plain HTTP fetch) is refused."""
    import hmac

    raw = ca_pem.strip()
    block = CERT_BLOCK.match(raw)  # the first block (fullmatch would stretch it over a second one)
    if block is None or block.end() != len(raw):
        raise PkiError("the peer's mesh CA is not one PEM certificate and nothing else")
    if not hmac.compare_digest(fingerprint(ca_pem), expected):
        raise PkiError("the peer's mesh CA does not match the token's fingerprint: it is not a member "
                       "of the mesh this token was made for")


def common_name(cert_pem: bytes) -> str:
    return _facts(cert_pem).common_name


@functools.lru_cache(maxsize=32)
def _facts(cert_pem: bytes) -> cert_facts.CertFacts:
    """The facts of the first certificate of `cert_pem` (PkiError, a ValueError, if it is none)."""
    try:
        return cert_facts.read(block_der(cert_blocks(cert_pem)[0]))
    except (IndexError, ValueError):
        raise PkiError("not a PEM certificate") from None


def node_id_of(cert_pem: bytes) -> str | None:
    """The node id a node certificate names in its SAN (`ID.quorum-node`) and common name alike; None
    when they disagree or the SAN names none (a certificate from before ids were in the SAN)."""
    cn = common_name(cert_pem)
    return cn if node_dns_name(cn) in certificate_names(cert_pem) else None


def lifetime(cert_pem: bytes) -> tuple[float, float]:
    """(not before, not after) as Unix times."""
    facts = _facts(cert_pem)
    return facts.not_before, facts.not_after


def signed_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    """Whether `cert_pem` was issued by the CA `ca_pem` (signature and validity period; of a bundle, the first:
    the signing CA)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):  # another issuer, another key type, a forged signature
        return False
    now = _now()
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


# -- the gateway's HTTPS certificate ------------------------------------------------------------
# Not a member certificate: server authentication only (a TLS server refuses it as a client
# certificate, so it can never pass for a member on the peer port or gRPC), named for the hosts
# clients type, and short-lived. Whoever holds the CA key signs it from a request: today the member
# itself, later an authority member (the request carries only the key; the signer decides the names).

GATEWAY_CN = "Quorum gateway"  # never a node id
GATEWAY_DAYS = 90


def gateway_request(key_pem: bytes) -> bytes:
    """A certificate request for the gateway key `key_pem` (it proves the key; it names nothing)."""
    return certificate_request(key_pem, GATEWAY_CN)


def sign_gateway_request(ca_pem: bytes, ca_key_pem: bytes, csr_pem: bytes, names: tuple[str, ...],
                         days: int = GATEWAY_DAYS) -> bytes:
    """The gateway certificate for the key in `csr_pem`, valid for `names` (DNS names or IP
    addresses) for `days`."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    if not names:
        raise PkiError("a gateway certificate needs at least one name")
    csr = _request(csr_pem)
    alt: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GATEWAY_CN)]))
            .issuer_name(ca.subject).public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_names(cert_pem: bytes) -> tuple[str, ...]:
    """The DNS names and IP addresses a certificate is valid for."""
    facts = _facts(cert_pem)
    return (*facts.dns_names, *facts.ip_addresses)


def expires_within(cert_pem: bytes, seconds: float) -> bool:
    return _facts(cert_pem).not_after <= time.time() + seconds


def server_only_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """TLS for a public HTTPS port: this certificate and key, TLS 1.2 or later, no client certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_chain(ctx, cert_pem, key_pem)
    return ctx


def same_key(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the certificate is for this private key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pub = serialization.load_pem_private_key(key_pem, None).public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return (x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(serialization.Encoding.DER, spki)
            == pub.public_bytes(serialization.Encoding.DER, spki))


def _request(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A certificate request that proves its EC key (its subject is never used: the CA names what it signs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(csr_pem, bytes) or len(csr_pem) > MAX_CSR_BYTES:
        raise PkiError("certificate request missing or too large")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise PkiError("certificate request is not a PEM CSR") from None
    if not csr.is_signature_valid:
        raise PkiError("certificate request signature is invalid")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise PkiError("certificate request must carry an EC key")
    return csr
