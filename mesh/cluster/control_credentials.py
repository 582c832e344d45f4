"""The control API's credential routes: join tokens, API keys, admin credentials, certificates and the CA.

- tokens, keys, admins: create, list, revoke (the log keeps only digests; the secret is printed once);
- /sign (authorities, peer port): signs a live member's certificate request with this member's CA key;
- /ca-key (authorities, peer port): hands the signing CA's key to another live authority after a rotation
  (mesh/security/ca_rotation.py);
- /ca/rotate: an operator who suspects the CA key leaked asks for a rotation (`meshctl ca rotate`);
  {"finish": true} retires the old CAs even while some member still holds a certificate from them.
`Control` (mesh/cluster/control.py) serves these beside its own routes.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.core.errors import ApiError, bad_request, unavailable
from mesh.core.json_body import parse_json
from mesh.security.admin import new_admin
from mesh.security.api_keys import new_key
from mesh.security.authority import qualifies, sign_here
from mesh.security.ca_rotation import CA_KEY_PATH
from mesh.security.peer_tls import PEER_CERT_KEY, PEER_KEY
from mesh.security.pki import PkiError, fingerprint
from mesh.security.tokens import new_token
from raft.apply_trust import untrusting
from raft.commands import RequestCaRotation, RetireCas, RevokeAdminCredential, RevokeApiKey, RevokeToken
from raft.state import Member
from raft.vocab import MemberState

log = logging.getLogger("quorum.control")


def not_found(what: str) -> ApiError:
    return ApiError(404, what, code="not_found")


async def body_of(request: Request) -> dict[str, Any]:
    raw = await request.body()
    return parse_json(raw) if raw else {}


def required_str(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise bad_request(f"'{key}' is required and must be a non-empty string", key)
    return value


class CredentialRoutes:
    """Mixed into Control: uses its `d` (ControlPlane) and `_propose`."""

    def credential_routes(self) -> list[Route]:
        return [
            Route("/control/v1/tokens", self.create_token, methods=["POST"]),
            Route("/control/v1/tokens/revoke", self.revoke_token, methods=["POST"]),
            Route("/control/v1/sign", self.sign, methods=["POST"]),
            Route(CA_KEY_PATH, self.ca_key, methods=["POST"]),
            Route("/control/v1/ca/rotate", self.rotate_ca, methods=["POST"]),
            Route("/control/v1/keys", self.list_keys, methods=["GET"]),
            Route("/control/v1/keys", self.create_key, methods=["POST"]),
            Route("/control/v1/keys/revoke", self.revoke_key, methods=["POST"]),
            Route("/control/v1/admins", self.list_admins, methods=["GET"]),
            Route("/control/v1/admins", self.create_admin, methods=["POST"]),
            Route("/control/v1/admins/revoke", self.revoke_admin, methods=["POST"]),
        ]

    async def create_token(self, request: Request) -> Response:
        body = await body_of(request)
        ttl = body.get("ttl_s", 24 * 3600)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            raise bad_request("'ttl_s' must be a number of seconds", "ttl_s")
        uses = body.get("uses", 1)
        if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= 1000:
            raise bad_request("'uses' must be a whole number of joins from 1 to 1000", "uses")
        try:
            token = new_token(fingerprint(self.d.ca_pem()), float(ttl), uses=uses)  # the signing CA
        except ValueError as exc:
            raise bad_request(str(exc), "ttl_s") from None
        command = token.command
        await self._propose(command)
        log.info("join token %s created (expires in %.0f s, %d join%s)", command.token_id, ttl, uses,
                 "" if uses == 1 else "s")
        return JSONResponse({"token": token.text, "token_id": command.token_id, "expires_at": command.expires_at,
                             "uses": uses})

    async def revoke_token(self, request: Request) -> Response:
        body = await body_of(request)
        await self._propose(RevokeToken(required_str(body, "token_id")))
        return JSONResponse({"revoked": body["token_id"]})

    async def list_keys(self, request: Request) -> Response:
        keys = sorted(self.d.raft.state.api_keys.values(), key=lambda k: k.created_at)
        return JSONResponse({"keys": [{"key_id": k.key_id, "name": k.name, "created_at": k.created_at,
                                       "revoked": k.revoked} for k in keys]})

    async def create_key(self, request: Request) -> Response:
        body = await body_of(request)
        name = body.get("name") or "unnamed"
        if not isinstance(name, str) or len(name) > 64:
            raise bad_request("'name' must be a string of at most 64 characters", "name")
        key = new_key(name)
        await self._propose(key.command)
        log.info("API key %s (%s) created", key.command.key_id, name)
        return JSONResponse({"key": key.text, "key_id": key.command.key_id, "name": name})

    async def revoke_key(self, request: Request) -> Response:
        body = await body_of(request)
        await self._propose(RevokeApiKey(required_str(body, "key_id")))
        return JSONResponse({"revoked": body["key_id"]})

    async def list_admins(self, request: Request) -> Response:
        state = self.d.raft.state
        creds = sorted(state.admins.values(), key=lambda c: c.created_at)
        owner = {m.node_id: m.name for m in state.members.values()}
        return JSONResponse({"admins": [{"id": c.cred_id, "name": c.name, "created_at": c.created_at,
                                         "member": owner.get(c.node_id, c.node_id) if c.node_id else None,
                                         "revoked": c.revoked} for c in creds]})

    async def create_admin(self, request: Request) -> Response:
        """An operator's credential (printed once by meshctl): not tied to a member."""
        body = await body_of(request)
        name = required_str(body, "name")
        if len(name) > 64:
            raise bad_request("'name' must be at most 64 characters", "name")
        cred = new_admin(name)
        await self._propose(cred.command)
        log.info("admin credential %s (%s) created", cred.command.cred_id, name)
        return JSONResponse({"admin": cred.text, "id": cred.command.cred_id, "name": name})

    async def revoke_admin(self, request: Request) -> Response:
        """Revokes a credential by id or name (a name must be unambiguous among live credentials)."""
        body = await body_of(request)
        which = required_str(body, "admin")
        state = self.d.raft.state
        live = [c for c in state.admins.values() if not c.revoked and which in (c.cred_id, c.name)]
        if not live:
            raise not_found(f"No live admin credential with id or name {which!r}.")
        if len(live) > 1:
            raise bad_request(f"{len(live)} live credentials are named {which!r}; revoke one by its id.", "admin")
        await self._propose(RevokeAdminCredential(live[0].cred_id))
        log.info("admin credential %s (%s) revoked", live[0].cred_id, live[0].name)
        return JSONResponse({"revoked": live[0].cred_id, "name": live[0].name})

    def _peer_member(self, request: Request, what: str) -> Member:
        """The live member whose certificate the peer-port connection carries; 403 for anyone else.

        Once a member has recorded its certificate (SetMemberCa), only that very certificate counts: during a CA
        rotation the old CA is still trusted, and a removed authority's copy of its key can mint a certificate for
        any live id; with it, it must get neither a certificate from the new CA nor the new CA's key."""
        caller = request.scope.get(PEER_KEY)
        member = self.d.raft.state.members.get(caller) if caller else None
        if member is None or member.state == MemberState.GONE:  # the public port (no certificate), or a stranger
            raise ApiError(403, f"{what} live members, over the peer port, only.", type="permission_error",
                           code="not_a_member")
        if member.cert and request.scope.get(PEER_CERT_KEY) != member.cert:
            log.warning("refused a certificate for %s (%s) that is not the one it recorded", member.name,
                        member.node_id)
            raise ApiError(403, f"{what} live members presenting the certificate they recorded, only.",
                           type="permission_error", code="not_the_recorded_certificate")
        return member

    async def sign(self, request: Request) -> Response:
        """Authorities only, peer port only: signs a live member's request (mesh/security/authority.py) with
        this member's own CA key; never forwarded."""
        member = self._peer_member(request, "Certificates are signed for")
        ca_key = self.d.authority.signing_key()
        if ca_key is None:
            raise unavailable("This member does not hold the signing CA's key.", 5, code="not_an_authority")
        body = await body_of(request)
        try:
            cert = sign_here(self.d.ca_pem(), ca_key, body, member.node_id, self.d.raft.state, self.d.authority.days)
        except PkiError as exc:
            raise bad_request(f"Not signed: {exc}.", "csr") from None
        log.info("signed a %s certificate for %s (%s)", body.get("kind"), member.name, member.node_id)
        return JSONResponse({"certificate": cert.decode()})

    async def ca_key(self, request: Request) -> Response:
        """Peer port only: the signing CA's key, for a live member the log records as an authority (it held the
        CA key before the rotation) and that may hold it under this member's security.authorities."""
        member = self._peer_member(request, "The CA key goes to")
        if not member.authority or not qualifies(self.d.authorities, member.name, member.profile.device_class,
                                                 member.witness):
            log.warning("%s asked for the CA key but is not an authority", member.name)
            raise ApiError(403, f"{member.name} is not an authority of this mesh.", type="permission_error",
                           code="not_an_authority")
        key = self.d.authority.signing_key()
        if key is None:
            raise unavailable("This member does not hold the signing CA's key.", 5, code="not_an_authority")
        log.info("handed the signing CA key to authority %s (%s)", member.name, member.node_id)
        return JSONResponse({"ca_key": key.decode()})

    async def rotate_ca(self, request: Request) -> Response:
        """Asks for a CA rotation ({"reason"}), or finishes one ({"finish": true}: without the members that do not
        trust the new CA yet, which then must join again; the old CAs go once the others have renewed)."""
        body = await body_of(request)
        state = self.d.raft.state
        if body.get("finish") is True:
            if len(state.trusted_cas) < 2:
                raise ApiError(409, "No CA rotation is under way.", code="no_rotation")
            away = untrusting(state)
            await self._propose(RetireCas(state.signing_ca, force=True))
            log.warning("CA rotation finished by an operator%s", f" (left behind: {', '.join(away)})" if away else "")
            return JSONResponse({"finishing": state.signing_ca, "left_behind": away})
        reason = body.get("reason") or "an operator asked"
        if not isinstance(reason, str) or len(reason) > 200:
            raise bad_request("'reason' must be a string of at most 200 characters", "reason")
        if not any(m.authority for m in state.live_members()) and \
                not any(qualifies(self.d.authorities, m.name, m.profile.device_class, m.witness)
                        for m in state.live_members()):
            raise ApiError(409, "No live member holds or may hold the CA key (security.authorities).",
                           code="no_authority")
        await self._propose(RequestCaRotation(reason))
        log.warning("CA rotation requested: %s", reason)
        return JSONResponse({"rotating": True, "reason": reason, "signing": state.signing_ca or None})
