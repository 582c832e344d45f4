"""A member's key and certificate request are made by a child process (mesh/security/keygen.py), so that meshd
itself never imports cryptography for a join or a renewal (a witness would hold its 11.7 MB until it restarts)."""

from __future__ import annotations

import sys

import pytest

from mesh.security.keygen import key_and_request
from mesh.security.own_cert import holds_from
from mesh.security.pki import PkiError, create_ca, sign_request


def test_the_child_makes_a_key_and_a_request_the_authority_signs_for_that_key():
    ca_pem, ca_key = create_ca("home")
    key, csr = key_and_request("joining")
    cert = sign_request(ca_pem, ca_key, csr, "a1b2c3")
    assert holds_from(cert, key, ca_pem)
    other_key, _ = key_and_request("joining")
    assert other_key != key and not holds_from(cert, other_key, ca_pem)  # a new key every time


def test_a_failing_child_is_a_pki_error_not_a_crash(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(PkiError, match="making a new key failed"):
        key_and_request("joining")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(PkiError, match="making a new key failed"):
        key_and_request("joining")
    monkeypatch.setattr(sys, "executable", "/bin/echo")  # answers, but not a key and a request
    with pytest.raises(PkiError, match="not a key and a request"):
        key_and_request("joining")
