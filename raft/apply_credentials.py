"""Apply handlers for what grants access: join tokens, API keys, admin credentials and authorities."""

from __future__ import annotations

import dataclasses

from raft.commands import (
    CreateAdminCredential,
    CreateApiKey,
    CreateToken,
    RevokeAdminCredential,
    RevokeApiKey,
    RevokeToken,
    SetAuthority,
    SpendToken,
)
from raft.records import AdminCredential, ApiKey, JoinToken, MeshState, Rejected
from raft.vocab import MemberState


def _set_authority(state: MeshState, cmd: SetAuthority) -> MeshState:
    member = state.members.get(cmd.node_id)
    if member is None or member.state == "gone":
        raise Rejected(f"unknown member {cmd.node_id}")
    if not isinstance(cmd.authority, bool):
        raise Rejected("authority is true or false")
    member = dataclasses.replace(member, authority=cmd.authority)
    return dataclasses.replace(state, members={**state.members, cmd.node_id: member})


def _create_token(state: MeshState, cmd: CreateToken) -> MeshState:
    if cmd.token_id in state.tokens:
        raise Rejected(f"token {cmd.token_id} already exists")
    if cmd.expires_at <= cmd.created_at:
        raise Rejected("a token must expire after it is created")
    if not isinstance(cmd.uses, int) or cmd.uses < 1:
        raise Rejected("a token allows at least one join")
    token = JoinToken(cmd.token_id, cmd.secret_sha256, cmd.created_at, cmd.expires_at, uses=cmd.uses)
    return dataclasses.replace(state, tokens={**state.tokens, cmd.token_id: token})


def _spend_token(state: MeshState, cmd: SpendToken) -> MeshState:
    token = state.tokens.get(cmd.token_id)
    if token is None:
        raise Rejected(f"unknown token {cmd.token_id}")
    if not token.valid_at(cmd.at):
        raise Rejected(f"token {cmd.token_id} is expired, revoked or used up")
    return dataclasses.replace(state, tokens={**state.tokens, cmd.token_id: dataclasses.replace(
        token, used=token.used + 1)})


def _revoke_token(state: MeshState, cmd: RevokeToken) -> MeshState:
    token = state.tokens.get(cmd.token_id)
    if token is None:
        raise Rejected(f"unknown token {cmd.token_id}")
    return dataclasses.replace(state, tokens={**state.tokens, cmd.token_id: dataclasses.replace(token, revoked=True)})


def _create_api_key(state: MeshState, cmd: CreateApiKey) -> MeshState:
    if cmd.key_id in state.api_keys:
        raise Rejected(f"API key {cmd.key_id} already exists")
    key = ApiKey(cmd.key_id, cmd.name, cmd.secret_sha256, cmd.created_at)
    return dataclasses.replace(state, api_keys={**state.api_keys, cmd.key_id: key})


def _revoke_api_key(state: MeshState, cmd: RevokeApiKey) -> MeshState:
    key = state.api_keys.get(cmd.key_id)
    if key is None:
        raise Rejected(f"unknown API key {cmd.key_id}")
    return dataclasses.replace(state, api_keys={**state.api_keys, cmd.key_id: dataclasses.replace(key, revoked=True)})


def _create_admin(state: MeshState, cmd: CreateAdminCredential) -> MeshState:
    if cmd.cred_id in state.admins:
        raise Rejected(f"admin credential id {cmd.cred_id} already exists")
    if cmd.node_id:
        member = state.members.get(cmd.node_id)
        if member is None or member.state == MemberState.GONE:
            raise Rejected(f"no live member {cmd.node_id} to hold an admin credential")
    cred = AdminCredential(cmd.cred_id, cmd.name, cmd.secret_sha256, cmd.created_at, cmd.node_id)
    return dataclasses.replace(state, admins={**state.admins, cmd.cred_id: cred})


def _revoke_admin(state: MeshState, cmd: RevokeAdminCredential) -> MeshState:
    cred = state.admins.get(cmd.cred_id)
    if cred is None:
        raise Rejected(f"unknown admin credential {cmd.cred_id}")
    return dataclasses.replace(state, admins={**state.admins, cmd.cred_id: dataclasses.replace(cred, revoked=True)})


HANDLERS = {
    CreateToken: _create_token,
    RevokeToken: _revoke_token,
    SpendToken: _spend_token,
    CreateApiKey: _create_api_key,
    RevokeApiKey: _revoke_api_key,
    CreateAdminCredential: _create_admin,
    RevokeAdminCredential: _revoke_admin,
    SetAuthority: _set_authority,
}
