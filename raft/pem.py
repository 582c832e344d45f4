"""PEM certificate blocks: the one pattern the mesh splits a trust bundle (ca.pem) with, from the Raft floor up
(raft/apply_trust.py checks a proposed CA, raft/tls.py reloads the trusted CAs, mesh/security/pki.py splits
bundles)."""

from __future__ import annotations

import re

CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)


def cert_blocks(pem: bytes) -> list[bytes]:
    """The certificates of a PEM bundle, each as its own block ending in a newline, in order."""
    return [m.group(0) + b"\n" for m in CERT_BLOCK.finditer(pem)]
