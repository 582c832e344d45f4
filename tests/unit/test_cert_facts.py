"""mesh/security/cert_facts.py, mesh/security/own_cert.py and pki's fingerprints without cryptography: the same
answers as cryptography gives, on every kind of certificate the mesh makes and on a few it does not; strict on
malformed DER; a certificate whose key this member holds is checked by OpenSSL (own_cert.holds_from)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from mesh.security import cert_facts
from mesh.security.own_cert import holds_from, own_issuer
from mesh.security.pki import (
    PkiError,
    certificate_names,
    certificate_request,
    check_fingerprint,
    common_name,
    create_ca,
    expires_within,
    fingerprint,
    gateway_request,
    issue_node_certificate,
    lifetime,
    make_bundle,
    new_key,
    node_id_of,
    sign_gateway_request,
    sign_request,
)
from raft.pem import block_der, cert_blocks, trust_set

UTC = datetime.timezone.utc


@pytest.fixture(scope="module")
def ca():
    return create_ca("facts")


def crafted(subject: x509.Name, not_after: datetime.datetime, alt: list[x509.GeneralName] | None) -> bytes:
    """A self-signed certificate of a shape meshd never makes (several names, other string types, late dates)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
               .serial_number(7).not_valid_before(datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC))
               .not_valid_after(not_after))
    if alt is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def expected(pem: bytes) -> tuple:
    """What cryptography reads: the facts pki used to take from it."""
    cert = x509.load_pem_x509_certificate(pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = (*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))
    except x509.ExtensionNotFound:
        names = ()
    der = cert.public_bytes(serialization.Encoding.DER)
    return (cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(),
            str(cns[0].value) if cns else "", names,
            base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode())


def test_the_facts_are_cryptographys_for_every_certificate_the_mesh_makes(ca):
    ca_pem, ca_key = ca
    key, node = issue_node_certificate(ca_pem, ca_key, "0123456789ab")
    gateway_key = new_key()
    gateway = sign_gateway_request(ca_pem, ca_key, gateway_request(gateway_key),
                                   ("pi5.local", "10.0.0.7", "::1", "localhost", "fe80::1"))
    for pem in (ca_pem, node, gateway, make_bundle(node, [ca_pem])):
        assert (*lifetime(pem), common_name(pem), certificate_names(pem), fingerprint(pem)) == expected(pem)
    assert node_id_of(node) == "0123456789ab" and common_name(gateway) == "Quorum gateway"


def test_the_facts_are_cryptographys_for_other_shapes_too():
    late = datetime.datetime(2061, 3, 4, 5, 6, 7, tzinfo=UTC)  # GeneralizedTime from 2050 on
    several = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "first", _type=_ASN1Type.PrintableString),
                         x509.NameAttribute(NameOID.COMMON_NAME, "second")])
    alt = [x509.UniformResourceIdentifier("https://x"), x509.DNSName("a.example"),
           x509.IPAddress(ipaddress.ip_address("192.0.2.1")), x509.RFC822Name("m@x"), x509.DNSName("b.example")]
    for pem in (crafted(several, late, alt), crafted(x509.Name([]), late, None),
                crafted(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ünïcode")]), late, [])):
        assert (*lifetime(pem), common_name(pem), certificate_names(pem), fingerprint(pem)) == expected(pem)


def test_node_ids_need_the_san_and_expiry_counts_from_now(ca):
    ca_pem, ca_key = ca
    key = new_key()
    no_san = crafted(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "abc")]),
                     datetime.datetime.now(UTC) + datetime.timedelta(days=2), None)
    assert common_name(no_san) == "abc" and node_id_of(no_san) is None
    assert expires_within(no_san, 3 * 86400) and not expires_within(no_san, 86400)
    assert node_id_of(sign_request(ca_pem, ca_key, certificate_request(key, "x"), "abc")) == "abc"


def der_of(pem: bytes) -> bytes:
    return block_der(cert_blocks(pem)[0])


@pytest.mark.parametrize("damage", [
    lambda d: d[:-1],  # truncated
    lambda d: d + b"\x00",  # trailing bytes
    lambda d: b"\x30\x80" + d[4:],  # indefinite length
    lambda d: d[:1] + b"\x83\x00" + d[2:],  # a length longer than its shortest form
    lambda d: b"\x31" + d[1:],  # a SET where the SEQUENCE is
    lambda d: b"",
])
def test_malformed_der_is_refused(ca, damage):
    with pytest.raises(ValueError):
        cert_facts.read(damage(der_of(ca[0])))


def test_a_pem_that_is_not_a_certificate_has_no_fingerprint(ca):
    der = der_of(ca[0])
    bad_body = b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(der[:-1]) + b"\n-----END CERTIFICATE-----\n"
    for junk in (b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", bad_body):
        with pytest.raises(PkiError):
            fingerprint(junk)


def test_a_join_refuses_a_ca_with_another_appended(ca):
    """A fingerprint covers the first certificate; the joiner trusts the whole text for the TLS carrying its token.
    A second CA behind the real one (a forged answer to the plain HTTP fetch) must not get through."""
    fp = fingerprint(ca[0])
    check_fingerprint(ca[0], fp)
    check_fingerprint(b"\n" + ca[0] + b"\n", fp)
    for forged in (ca[0] + create_ca("thief")[0], ca[0] + b"junk", b"junk\n" + ca[0]):
        with pytest.raises(PkiError, match="not one PEM certificate"):
            check_fingerprint(forged, fp)


def test_trust_sets_are_none_when_openssl_might_read_more_than_the_pattern(ca):
    other = create_ca("other")[0]
    assert trust_set(make_bundle(ca[0], [other])) == {der_of(ca[0]), der_of(other)}
    labelled = other.replace(b"BEGIN CERTIFICATE", b"BEGIN TRUSTED CERTIFICATE")
    assert trust_set(ca[0] + labelled) is None
    lines = ca[0].splitlines(keepends=True)
    assert trust_set(b"".join([lines[0], b" " + lines[1], *lines[2:]])) is None  # not canonical base64
    assert trust_set(b"") is None


def test_own_certificates_are_checked_by_openssl(ca):
    ca_pem, ca_key = ca
    other, other_key = create_ca("other")
    key, cert = issue_node_certificate(ca_pem, ca_key, "n1")
    assert holds_from(cert, key, ca_pem) and holds_from(cert, key, make_bundle(ca_pem, [other]))
    assert not holds_from(cert, key, other) and not holds_from(cert, key, make_bundle(other, [ca_pem]))
    assert not holds_from(cert, new_key(), ca_pem)  # not this certificate's key
    assert own_issuer(cert, key, make_bundle(other, [ca_pem])) == fingerprint(ca_pem)
    assert own_issuer(cert, key, other) is None
    expired = sign_request(ca_pem, ca_key, certificate_request(key, "n1"), "n1", days=-0.001)  # ended 86 s ago
    assert not holds_from(expired, key, ca_pem)
    forged = sign_request(other, other_key, certificate_request(key, "n1"), "n1")  # same key, another CA
    assert not holds_from(forged, key, ca_pem) and holds_from(forged, key, other)
    gateway_key = new_key()
    gateway = sign_gateway_request(ca_pem, ca_key, gateway_request(gateway_key), ("localhost",))
    assert holds_from(gateway, gateway_key, ca_pem) and not holds_from(gateway, gateway_key, other)
