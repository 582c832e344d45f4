"""mesh/security/tokens.py: join tokens are checked against the log (secret, lifetime, uses) and carry the
mesh CA's fingerprint."""

from __future__ import annotations

import dataclasses

import pytest

from mesh.security.tokens import BadToken, check_token, new_token, split_token
from raft.commands import AddMember, InitMesh, RevokeToken
from raft.state import MeshState, Rejected, apply

FP = "F" * 43


def mesh_with(token, uses: int = 1) -> MeshState:
    state = apply(MeshState(), InitMesh("m", "m", 1.0))
    state = apply(state, AddMember("first", "first", "h:1", "h:3", {}, 1.0))
    return apply(state, dataclasses.replace(token.command, uses=uses))


def join(state: MeshState, token, n: int, when: float = 1001.0) -> MeshState:
    return apply(state, AddMember(f"node{n}", f"node{n}", f"h:{10 * n}", f"h:{10 * n + 2}", {}, when,
                                  token_id=token.command.token_id))


def test_a_fresh_token_is_valid_until_it_expires():
    token = new_token(FP, ttl_s=600, now=1000.0)
    state = mesh_with(token)
    assert check_token(state, token.text, 1000.0) == token.command.token_id
    assert check_token(state, f"  {token.text}\n", 1599.0) == token.command.token_id
    with pytest.raises(BadToken, match="expired"):
        check_token(state, token.text, 1600.0)
    with pytest.raises(BadToken, match="expired or revoked"):
        check_token(apply(state, RevokeToken(token.command.token_id)), token.text, 1001.0)


def test_the_token_carries_the_ca_fingerprint():
    token = new_token(FP, now=1000.0)
    assert token.text.endswith("." + FP)
    assert split_token(token.text)[1] == FP
    with pytest.raises(ValueError):
        new_token("not a fingerprint")


@pytest.mark.parametrize("text", ["", "qjt1", "qjt1.abc.def", None, 42, "qk1.000000000000." + "A" * 43 + "." + FP,
                                  "qjt1.000000000000." + "A" * 43])  # the last: no fingerprint
def test_malformed_tokens_are_refused(text):
    with pytest.raises(BadToken, match="malformed"):
        check_token(mesh_with(new_token(FP)), text, 0.0)


def test_right_id_wrong_secret_is_refused():
    token = new_token(FP, now=1000.0)
    cred, fp = split_token(token.text)
    forged = cred.rsplit(".", 1)[0] + "." + "A" * 43 + "." + fp
    with pytest.raises(BadToken, match="unknown"):
        check_token(mesh_with(token), forged, 1001.0)


def test_a_token_is_spent_by_the_join_it_admits():
    token = new_token(FP, now=1000.0)
    state = join(mesh_with(token), token, 1)
    assert state.tokens[token.command.token_id].used == 1
    with pytest.raises(BadToken, match="expired or revoked"):  # replayed: spent
        check_token(state, token.text, 1002.0)
    with pytest.raises(Rejected, match="valid join token"):
        join(state, token, 2, 1002.0)


def test_a_token_made_for_several_joins_admits_that_many():
    token = new_token(FP, now=1000.0)
    state = mesh_with(token, uses=2)
    state = join(join(state, token, 1), token, 2)
    with pytest.raises(Rejected):
        join(state, token, 3)


def test_lifetimes_are_bounded():
    for ttl in (1, 400 * 24 * 3600):
        with pytest.raises(ValueError):
            new_token(FP, ttl_s=ttl)
