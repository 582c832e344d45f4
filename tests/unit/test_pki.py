"""mesh/security/pki.py: the mesh CA signs node certificates; fingerprints identify the CA; requests that
name another node, or come from another mesh, are refused."""

from __future__ import annotations

import ssl

import pytest

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


def test_a_request_must_name_the_joining_node(ca):
    ca_pem, ca_key = ca
    csr = certificate_request(new_key(), "someone-else")
    with pytest.raises(PkiError, match="does not name"):
        sign_request(ca_pem, ca_key, csr, "me")


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
