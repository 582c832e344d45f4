"""The control API that meshctl and joining nodes talk to (/control/v1/*).

Reads answer from this member's copy of the state. Writes become Raft commands, which pysyncobj
carries to the leader from any member. Removals change Raft membership, which only the leader can
do: the forwarder relays them there. Every route but /ca, /join and /sign needs the admin credential
(mesh/security/admin.py). Joins arrive only on the leader's HTTPS peer port (mesh/security/peer_tls.py): the joining
node checked that port's certificate against its token's CA fingerprint before sending the token. The
leader has the new node's certificate signed by an authority (mesh/security/authority.py: itself when it
holds the CA key, else another member over /sign, which takes only a live member's certificate on the
peer port); the CA key goes along only to a joiner that qualifies as an authority.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.cluster.control_credentials import CredentialRoutes, body_of, not_found, required_str
from mesh.core.errors import ApiError, StartupError, bad_request, unavailable
from mesh.security.admin import credential_fields_ok
from mesh.security.authority import Authority, NoAuthority, qualifies
from mesh.security.pki import PkiError, fingerprint, split_bundle
from mesh.security.tokens import BadToken, check_token
from raft.commands import (
    AddMember,
    ClearSplit,
    Command,
    CreateAdminCredential,
    PinShard,
    SetMemberState,
    SetReplicas,
    SetSplit,
    SpendToken,
    UnpinShard,
)
from raft.node import ProposalFailed, RaftNode
from raft.state import Member, MeshState, Rejected
from raft.vocab import MemberState

log = logging.getLogger("quorum.control")

MEMBERSHIP_CHANGE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ControlPlane:
    """What the control API may touch on this member, and nothing more."""
    raft: RaftNode
    ca_pem: Callable[[], bytes]  # the trusted CAs now, the signing one first (a rotation changes them)
    status: Callable[[], dict]  # meshctl status's view of this member and the mesh
    leader_peer: Callable[[], str | None]  # the leader's HTTPS peer address, if known
    leave: Callable[[], Awaitable[dict]]  # drain, be removed, stop; StartupError if a step times out
    authority: Authority  # signs here or through an authority member
    authorities: str | tuple[str, ...] = "auto"  # security.authorities: who may receive the CA key


class Control(CredentialRoutes):
    def __init__(self, plane: ControlPlane | None) -> None:
        self.d = plane
        self._membership = asyncio.Lock()
        self._pending: asyncio.Future | None = None  # the last membership change, until committed

    def routes(self) -> list[Route]:
        return [
            Route("/control/v1/status", self.status, methods=["GET"]),
            Route("/control/v1/ca", self.ca, methods=["GET"]),
            Route("/control/v1/models", self.models, methods=["GET"]),
            Route("/control/v1/sessions/{session_id}", self.session, methods=["GET"]),
            Route("/control/v1/join", self.join, methods=["POST"]),
            *self.credential_routes(),
            Route("/control/v1/assign", self.assign, methods=["POST"]),
            Route("/control/v1/unassign", self.unassign, methods=["POST"]),
            Route("/control/v1/replicas", self.replicas, methods=["POST"]),
            Route("/control/v1/split", self.split, methods=["POST"]),
            Route("/control/v1/drain", self.drain, methods=["POST"]),
            Route("/control/v1/remove", self.remove, methods=["POST"]),
            Route("/control/v1/transfer", self.transfer, methods=["POST"]),
            Route("/control/v1/leave", self.leave, methods=["POST"]),
        ]

    # -- reads -------------------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        state = self.d.raft.state
        splits = [{"model": s.model, "head": s.head, "auto": s.auto,
                   "layers": getattr(state.models.get(s.model), "layers", 0),  # 0: not known
                   "stages": [{"node_id": n, "layers": k, "state": (s.stage_state(n) or ("", ""))[0],
                               "detail": (s.stage_state(n) or ("", ""))[1]} for n, k in s.stages]}
                  for s in sorted(state.splits.values(), key=lambda s: s.model)]
        return JSONResponse({**self.d.status(), "splits": splits})

    async def models(self, request: Request) -> Response:
        state = self.d.raft.state
        names = {m.node_id: m.name for m in state.members.values()}
        return JSONResponse({"models": [
            {**dataclasses.asdict(m), "holders": sorted(names.get(n, n) for n in state.model_files.get(m.name, ()))}
            for m in sorted(state.models.values(), key=lambda m: m.name)]})

    async def session(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        session = self.d.raft.state.sessions.get(sid)
        if session is None:
            raise not_found(f"No session {sid!r} in the log.")
        return JSONResponse({"session_id": sid, "last_used": session.last_used, "api_key_id": session.owner or None,
                             "turns": [dataclasses.asdict(t) for t in session.turns]})

    # -- writes ------------------------------------------------------------------------------

    async def assign(self, request: Request) -> Response:
        body = await _body(request)
        state = self.d.raft.state
        member = self._member(state, _str(body, "node"))
        role = _str(body, "role")
        model = _str(body, "model") if body.get("model") is not None else _model_for(state, role)
        await self._propose(PinShard(role=role, model=model, node_id=member.node_id))
        return JSONResponse({"pinned": {"role": role, "model": model, "node": member.name}})

    async def unassign(self, request: Request) -> Response:
        body = await _body(request)
        member = self._member(self.d.raft.state, _str(body, "node"))
        await self._propose(UnpinShard(role=_str(body, "role"), node_id=member.node_id))
        return JSONResponse({"unpinned": {"role": body["role"], "node": member.name}})

    async def replicas(self, request: Request) -> Response:
        body = await _body(request)
        count = body.get("count")
        if isinstance(count, bool) or not isinstance(count, int):
            raise bad_request("'count' must be an integer", "count")
        await self._propose(SetReplicas(role=_str(body, "role"), count=count))
        return JSONResponse({"replicas": {body["role"]: count}})

    async def split(self, request: Request) -> Response:
        """Runs a model as a pipeline: {"model", "head": member, "stages": [{"node": member, "layers": n}, ...]}
        (pipeline order: each stage holds that many of the model's last layers), or {"model", "clear": true}."""
        body = await _body(request)
        state = self.d.raft.state
        model = _str(body, "model")
        if body.get("clear") is True:
            await self._propose(ClearSplit(model))
            return JSONResponse({"cleared": model})
        head = self._member(state, _str(body, "head"))
        stages = body.get("stages")
        if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
            raise bad_request("'stages' must be a non-empty list of {\"node\": NAME, \"layers\": N}", "stages")
        pairs = []
        for stage in stages:
            layers = stage.get("layers")
            if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
                raise bad_request("each stage's 'layers' must be a positive integer", "stages")
            pairs.append((self._member(state, _str(stage, "node")).node_id, layers))
        await self._propose(SetSplit(model=model, head=head.node_id, stages=tuple(pairs)))
        names = {m.node_id: m.name for m in state.members.values()}
        return JSONResponse({"split": {"model": model, "head": head.name,
                                       "stages": [{"node": names[n], "layers": k} for n, k in pairs]}})

    async def drain(self, request: Request) -> Response:
        body = await _body(request)
        member = self._member(self.d.raft.state, _str(body, "node"))
        await self._propose(SetMemberState(member.node_id, MemberState.DRAINING))
        return JSONResponse({"draining": member.name})

    async def ca(self, request: Request) -> Response:
        """Public: the signing CA's certificate (a joining node checks it against its token's fingerprint),
        every CA trusted now (several during a rotation), and where the leader takes joins."""
        trusted = split_bundle(self.d.ca_pem())
        return JSONResponse({"mesh_id": self.d.raft.state.mesh_id, "ca": trusted[0].decode(),
                             "fingerprint": fingerprint(trusted[0]), "trusted": [c.decode() for c in trusted],
                             "leader_peer": self.d.leader_peer()})

    async def join(self, request: Request) -> Response:
        """Leader only, HTTPS peer port only: checks the token, assigns the node its id, signs its
        certificate for that id, records the member and adds it to Raft; answers with what a member
        keeps (its id, certificate, the trusted CAs, the CA key for an authority)."""
        if request.url.scheme != "https":
            raise bad_request("Joins go to a member's HTTPS peer port after checking its certificate; "
                              "use `meshd join --peer HOST:PORT --token TOKEN`.")
        raft = self.d.raft
        if not raft.is_leader():
            leader = self.d.leader_peer()
            return JSONResponse({"error": {"message": "This member is not the leader; join through the leader.",
                                           "type": "invalid_request_error", "param": None, "code": "not_leader"},
                                 "leader_peer": leader}, status_code=421)
        body = await _body(request)
        raft_address = _str(body, "raft_address")
        claimed = body.get("node_id")  # sent by meshd before ids were assigned here: never taken
        name, http_address, grpc_address, peer_address = (_str(body, k) for k in (
            "name", "http_address", "grpc_address", "peer_address"))
        async with self._membership:
            await self._settle_pending()
            state = raft.state
            now = time.time()
            try:
                token_id = check_token(state, body.get("token", ""), now)
            except BadToken as exc:
                log.warning("join of %s refused: %s", body.get("name"), exc)
                raise ApiError(403, f"Join refused: {exc}.", type="permission_error", code="bad_token") from None
            known = state.members.get(claimed) if isinstance(claimed, str) else None
            if known is not None:
                # Node ids are public (certificate CN, /control/v1/ca): a join naming a known one,
                # live or gone, would take that member's place. Refused, and the token use is spent so
                # that probing costs a use like a join does.
                log.warning("join of %s refused: node id %s is already %s's (%s)", body.get("name"), claimed,
                            known.name, known.state)
                await self._spend(token_id, now)
                raise ApiError(409, f"Join refused: node id {claimed} already belongs to a member of this mesh; "
                                    f"the leader assigns a joining node its id. The token use is spent.",
                               type="invalid_request_error", param="node_id", code="node_id_taken")
            node_id = new_node_id(state)
            csr = body.get("csr")
            try:
                certificate = await self.d.authority.sign({"kind": "join", "node_id": node_id,
                                                           "csr": csr if isinstance(csr, str) else ""})
            except PkiError as exc:
                await self._spend(token_id, now)
                raise bad_request(f"Join refused: {exc}.", "csr") from None
            except NoAuthority as exc:  # not the joiner's doing: the token use is kept
                log.warning("join of %s not signed: %s", name, exc)
                raise unavailable(f"No authority member (one holding the mesh CA key) could sign the certificate: "
                                  f"{exc}.", 5, code="no_authority") from None
            profile = body.get("profile") if isinstance(body.get("profile"), dict) else {}
            ca_key = self.d.authority.signing_key()  # the signing CA's (never an old one during a rotation)
            if ca_key is not None and not qualifies(self.d.authorities, name, str(profile.get("device_class", "")),
                                                    bool(body.get("witness"))):
                ca_key = None
            # Recorded with the member (authority): one lost before its daemon first starts still holds the key,
            # and its removal must start a CA rotation.
            cmd = AddMember(node_id=node_id, name=name, http_address=http_address,
                            raft_address=raft_address, grpc_address=grpc_address, profile=profile,
                            joined_at=now, witness=bool(body.get("witness")), token_id=token_id,
                            peer_address=peer_address, authority=ca_key is not None)
            try:
                await self._propose(cmd)
            except ApiError as exc:
                if exc.code == "rejected":  # refused by the state (a name or address in use): spent too
                    await self._spend(token_id, now)
                raise
            await self._record_admin(body.get("admin"), cmd.name, node_id, now)
            if raft_address not in raft.partners() and raft_address != raft.address:
                self._pending = asyncio.wrap_future(raft.add_partner(raft_address))
            log.info("%s (%s) joined from %s", cmd.name, node_id, raft_address)
        state = raft.state
        answer = {
            "mesh_id": state.mesh_id, "mesh_name": state.name, "node_id": node_id,
            "certificate": certificate.decode(), "trusted": [c.decode() for c in split_bundle(self.d.ca_pem())],
            "partners": sorted(m.raft_address for m in state.live_members() if m.node_id != node_id),
        }
        if ca_key is not None:
            answer["ca_key"] = ca_key.decode()  # the joiner is an authority (recorded with it: AddMember)
            log.info("%s receives the CA key (security.authorities = %s)", name, self.d.authorities)
        return JSONResponse(answer)

    async def remove(self, request: Request) -> Response:
        """Leader only: drops a member's shards and takes it out of the Raft group."""
        body = await _body(request)
        raft = self.d.raft
        member = self._member(raft.state, _str(body, "node"))
        if member.raft_address == raft.address:
            # The leader cannot remove itself: hand leadership over; the caller retries there.
            await asyncio.wrap_future(raft.transfer_leadership())
            raise unavailable("This member was the leader; leadership is moving. Retry the removal.", 1,
                              code="leader_moved")
        warning = None
        if member.authority:  # it held the CA key: the mesh rotates its CA (mesh/security/ca_rotation.py)
            live = [m for m in raft.state.live_members() if m.node_id != member.node_id]
            heirs = [m for m in live if m.authority] or [m for m in live if not m.witness and qualifies(
                self.d.authorities, m.name, m.profile.device_class, False)]
            if not heirs and body.get("force") is not True:
                raise ApiError(409, f"{member.name} is the mesh's last authority (the only member holding the CA "
                                    f"key) and no other member may hold it (security.authorities): the CA could not "
                                    f"be rotated, no node could join and no certificate be renewed. Let another "
                                    f"member be an authority first, or send \"force\": true.",
                               code="last_authority")
            warning = (f"{member.name} held the mesh CA key: the mesh rotates to a new CA"
                       + (f", made by {heirs[0].name}" if heirs else " once a member may hold it") +
                       "; once every member holds a certificate from it, the removed copy of the old key opens "
                       "nothing. Join tokens made before the rotation stop working.")
            log.warning("removing %s: %s", member.name, warning)
        async with self._membership:
            await self._settle_pending()
            await self._propose(SetMemberState(member.node_id, MemberState.GONE))
            if member.raft_address in raft.partners():
                try:
                    await asyncio.wait_for(asyncio.wrap_future(raft.remove_partner(member.raft_address)),
                                           MEMBERSHIP_CHANGE_TIMEOUT_S)
                except (ProposalFailed, TimeoutError) as exc:
                    raise unavailable(f"{member.name} is marked gone but Raft did not drop it yet ({exc}); "
                                      f"retry", 1, code="membership_change") from None
        log.info("%s removed from the mesh", member.name)
        return JSONResponse({"removed": member.name, **({"warning": warning} if warning else {})})

    async def transfer(self, request: Request) -> Response:
        """Leader only: hands Raft leadership to a caught-up member ("to": name or id). What pysyncobj's admin
        tool did over the Raft port, which no longer takes utility commands (raft/transport.py)."""
        body = await _body(request)
        raft = self.d.raft
        member = self._member(raft.state, _str(body, "to"))
        if not raft.is_leader():
            raise unavailable("This member is not the leader; ask the leader.", 1, code="not_leader")
        try:
            await asyncio.wait_for(asyncio.wrap_future(raft.transfer_leadership(member.raft_address)), 10.0)
        except (ProposalFailed, TimeoutError) as exc:  # REQUEST_DENIED: the member is not caught up yet
            raise unavailable(f"Leadership did not move to {member.name} ({exc or 'timeout'}); retry.", 1,
                              code="transfer_refused") from None
        return JSONResponse({"transferring_to": member.name})

    async def leave(self, request: Request) -> Response:
        """This node drains its shards, asks the leader to remove it, then stops."""
        try:
            result = await self.d.leave()
        except StartupError as exc:  # a step timed out (no quorum, nowhere to move the shards)
            raise unavailable(f"Leaving did not complete: {exc}.", 5, code="leave_incomplete") from None
        return JSONResponse(result)

    # -- helpers -----------------------------------------------------------------------------

    async def _propose(self, cmd: Command) -> dict:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.d.raft.propose(cmd)), 10.0)
        except Rejected as exc:
            raise ApiError(409, str(exc), code="rejected") from None
        except (ProposalFailed, TimeoutError) as exc:
            raise unavailable(f"The mesh could not commit the change ({exc or 'timeout'}): no majority "
                              f"reachable?", 1, code="no_quorum") from None

    async def _record_admin(self, admin: Any, name: str, node_id: str, now: float) -> None:
        """Records the admin credential a joiner minted for itself (its id and digest: the secret never
        leaves the joiner). Without one, or if it cannot be recorded, the member mints another once it
        runs (mesh/security/admin.py ensure_member_credential)."""
        if not isinstance(admin, dict) or not credential_fields_ok(admin.get("id"), admin.get("sha256")):
            return
        try:
            await self._propose(CreateAdminCredential(cred_id=admin["id"], name=f"member {name}",
                                                      secret_sha256=admin["sha256"], created_at=now, node_id=node_id))
        except ApiError as exc:  # the join stands; the member records another credential when it starts
            log.warning("could not record %s's admin credential: %s", name, exc.message)

    async def _spend(self, token_id: str, now: float) -> None:
        """Spends one use of a join token whose join was refused after the token was checked."""
        try:
            await self._propose(SpendToken(token_id, now))
        except ApiError as exc:  # the refusal stands either way; only the use may not be recorded
            log.warning("could not spend a use of join token %s: %s", token_id, exc.message)

    async def _settle_pending(self) -> None:
        """pysyncobj takes one membership change at a time: wait (bounded) for the previous one."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            await asyncio.wait_for(pending, MEMBERSHIP_CHANGE_TIMEOUT_S)
        except (ProposalFailed, TimeoutError) as exc:
            log.warning("the previous membership change did not complete: %s", exc or "timeout")

    @staticmethod
    def _member(state: MeshState, name_or_id: str) -> Member:
        member = state.members.get(name_or_id)
        if member is None or member.state == MemberState.GONE:
            member = state.member_by_name(name_or_id)
        if member is None:
            names = ", ".join(m.name for m in state.live_members()) or "none"
            raise not_found(f"No member named {name_or_id!r} (members: {names}).")
        return member


def new_node_id(state: MeshState) -> str:
    """A node id no member, live or gone, has had: the leader's choice, never the joiner's."""
    while True:
        node_id = uuid.uuid4().hex[:12]
        if node_id not in state.members:
            return node_id


def _model_for(state: MeshState, role: str) -> str:
    for model in sorted(state.models.values(), key=lambda m: m.name):
        if role in model.roles:
            return model.name
    raise bad_request(f"No model in the catalog serves role {role!r}.", "role")


_body, _str = body_of, required_str
