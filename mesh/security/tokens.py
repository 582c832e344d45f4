"""Join tokens: `qjt1.<id>.<secret>.<ca fingerprint>`.

The mesh log keeps only the id, the sha256 of the secret and the expiry; the secret itself is
shown once, to whoever created the token. The fingerprint (sha256 of the mesh CA certificate) lets
the joining node check the member it talks to before it sends the secret (see mesh/node/bootstrap.py);
the leader checks the presented secret against the log.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from mesh.security.credentials import matches, mint, parse
from raft.commands import CreateToken
from raft.state import MeshState

PREFIX = "qjt1"
DEFAULT_TTL_S = 24 * 3600


class BadToken(ValueError):
    """A token that is malformed, unknown, revoked or expired (the message does not say which)."""


@dataclass(frozen=True)
class NewToken:
    text: str
    command: CreateToken


def new_token(ca_fingerprint: str, ttl_s: float = DEFAULT_TTL_S, now: float | None = None,
              uses: int = 1) -> NewToken:
    if not 60 <= ttl_s <= 365 * 24 * 3600:
        raise ValueError("a token's lifetime must be between 60 s and 365 days")
    if not re.fullmatch(r"[A-Za-z0-9_-]{43}", ca_fingerprint):
        raise ValueError("a CA fingerprint is 43 base64url characters")
    now = time.time() if now is None else now
    cred = mint(PREFIX)
    cmd = CreateToken(token_id=cred.id, secret_sha256=cred.digest, created_at=now, expires_at=now + ttl_s,
                      uses=uses)
    return NewToken(text=f"{cred.text}.{ca_fingerprint}", command=cmd)


def split_token(text: str) -> tuple[str, str]:
    """(credential part, CA fingerprint) of a well-formed join token; BadToken otherwise."""
    if isinstance(text, str):
        cred, dot, fp = text.strip().rpartition(".")
        if dot and re.fullmatch(r"[A-Za-z0-9_-]{43}", fp) and parse(PREFIX, cred) is not None:
            return cred, fp
    raise BadToken("malformed join token (expected qjt1.<id>.<secret>.<fingerprint>, from `meshctl token create`)")


def check_token(state: MeshState, text: str, now: float) -> str:
    """Returns the token id if `text` is a token of this mesh valid at `now`; else BadToken."""
    parsed = parse(PREFIX, split_token(text)[0])
    if parsed is None:
        raise BadToken("malformed join token")
    token = state.tokens.get(parsed[0])
    if token is None or not matches(token.secret_sha256, parsed[1]):
        raise BadToken("unknown join token")
    if not token.valid_at(now):
        raise BadToken("join token expired or revoked")
    return token.token_id
