"""mesh/security/pki.py: the mesh CA signs node certificates for the ids it assigns; fingerprints identify
the CA; garbage requests and other meshes' CAs are refused."""

from __future__ import annotations

import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.security.pki import (
    PkiError,
    certificate_request,
    check_fingerprint,
    common_name,
    create_ca,
    fingerprint,
    issue_node_certificate,
    new_key,
    sign_request,
    signed_by,
)


@pytest.fixture(scope="module")
def ca():
    return create_ca("test")


def test_a_node_certificate_is_signed_by_its_mesh_ca_only(ca):
    ca_pem, ca_key = ca
    key, cert = issue_node_certificate(ca_pem, ca_key, "abc123")
    assert common_name(cert) == "abc123"
    assert signed_by(cert, ca_pem)
    other_ca, _ = create_ca("other")
    assert not signed_by(cert, other_ca)


def test_the_ca_names_the_certificate_whatever_the_request_says(ca):
    """The leader assigns node ids: a request naming another id still gets a certificate for the
    assigned one, for the request's own key."""
    ca_pem, ca_key = ca
    key = new_key()
    cert = sign_request(ca_pem, ca_key, certificate_request(key, "someone-else"), "me")
    assert common_name(cert) == "me" and signed_by(cert, ca_pem)
    assert x509.load_pem_x509_certificate(cert).public_key().public_numbers() == \
        serialization.load_pem_private_key(key, None).public_key().public_numbers()


BAD_PEM = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"


@pytest.mark.parametrize("junk", [b"", BAD_PEM, b"x" * 10_000, "not bytes"])
def test_garbage_requests_are_refused(ca, junk):
    with pytest.raises(PkiError):
        sign_request(ca[0], ca[1], junk, "me")


def test_fingerprints_identify_the_ca(ca):
    fp = fingerprint(ca[0])
    assert len(fp) == 43
    check_fingerprint(ca[0], fp)
    with pytest.raises(PkiError, match="does not match"):
        check_fingerprint(create_ca("other")[0], fp)
    with pytest.raises(PkiError):
        fingerprint(b"garbage")


def test_tls_contexts_load_and_require_the_mesh_ca(ca, tmp_path):
    from mesh.security.pki import NodeIdentity

    key, cert = issue_node_certificate(ca[0], ca[1], "n1")
    identity = NodeIdentity(key, cert, ca[0])
    server, client = identity.server_context(), identity.client_context()
    assert server.verify_mode == ssl.CERT_OPTIONAL and client.verify_mode == ssl.CERT_REQUIRED
    assert identity.node_id == "n1"
