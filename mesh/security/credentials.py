"""Shared shape of the mesh's bearer credentials (join tokens, API keys): `<prefix>.<id>.<secret>`.

The id names the credential in the Raft log; only the sha256 of the secret is stored there.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class Credential:
    id: str
    secret: str
    text: str  # what the user is given, once

    @property
    def digest(self) -> str:
        return digest(self.secret)


def mint(prefix: str) -> Credential:
    cred_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    return Credential(cred_id, secret, f"{prefix}.{cred_id}.{secret}")


def parse(prefix: str, text: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed credential with this prefix, else None."""
    match = re.fullmatch(rf"{re.escape(prefix)}\.([0-9a-f]{{12}})\.([A-Za-z0-9_-]{{43}})", text) \
        if isinstance(text, str) else None
    return None if match is None else (match.group(1), match.group(2))


def matches(stored_digest: str, secret: str) -> bool:
    return hmac.compare_digest(stored_digest, digest(secret))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
