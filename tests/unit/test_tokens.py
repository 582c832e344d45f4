"""mesh/tokens.py: join tokens are checked against the log, secret and lifetime both."""

from __future__ import annotations

import pytest

from mesh.tokens import BadToken, check_token, new_token
from raft.commands import InitMesh, RevokeToken
from raft.state import MeshState, apply


def mesh_with(token) -> MeshState:
    return apply(apply(MeshState(), InitMesh("m", "m", 1.0)), token.command)


def test_a_fresh_token_is_valid_until_it_expires():
    token = new_token(ttl_s=600, now=1000.0)
    state = mesh_with(token)
    assert check_token(state, token.text, 1000.0) == token.command.token_id
    assert check_token(state, f"  {token.text}\n", 1599.0) == token.command.token_id
    with pytest.raises(BadToken, match="expired"):
        check_token(state, token.text, 1600.0)
    with pytest.raises(BadToken, match="expired or revoked"):
        check_token(apply(state, RevokeToken(token.command.token_id)), token.text, 1001.0)


@pytest.mark.parametrize("text", ["", "qjt1", "qjt1.abc.def", None, 42, "qk1.000000000000." + "A" * 43])
def test_malformed_tokens_are_refused(text):
    with pytest.raises(BadToken, match="malformed"):
        check_token(mesh_with(new_token()), text, 0.0)


def test_right_id_wrong_secret_is_refused():
    token = new_token(now=1000.0)
    forged = token.text.rsplit(".", 1)[0] + "." + "A" * 43
    with pytest.raises(BadToken, match="unknown"):
        check_token(mesh_with(token), forged, 1001.0)


def test_lifetimes_are_bounded():
    for ttl in (1, 400 * 24 * 3600):
        with pytest.raises(ValueError):
            new_token(ttl_s=ttl)
