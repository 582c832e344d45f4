"""Creating a mesh (`meshd init`) and joining one (`meshd join`): what happens before a node runs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import httpx

from mesh.core.config import MeshConfig
from mesh.core.errors import StartupError
from mesh.node.startup import bind, raft_limits, raft_timing, until
from mesh.security.admin import new_admin
from mesh.security.datadir import DataDir, NodeRecord
from mesh.security.keygen import key_and_request
from mesh.security.own_cert import holds_from
from mesh.security.peer_tls import JOIN_PATH
from mesh.security.pki import (
    PkiError,
    check_fingerprint,
    common_name,
    create_ca,
    fingerprint,
    issue_node_certificate,
    make_bundle,
    trusting,
)
from mesh.security.tokens import BadToken, new_token, split_token
from nodes.profile import local_profile
from raft.commands import AddMember, InitMesh, SetAuthority, SetReplicas
from raft.node import RaftNode
from raft.tls import RaftTls
from raft.vocab import Role

log = logging.getLogger("quorum.bootstrap")


async def init_mesh(dd: DataDir, cfg: MeshConfig, name: str | None) -> tuple[NodeRecord, str]:
    """Creates a one-member mesh in `dd`: CA and node certificate, Raft journal with the
    mesh's first entries. Returns the node's record and a join token for the next members."""
    dd.prepare()
    record = dd.record(name)
    if record.joined:
        raise StartupError(f"{dd.path} already belongs to mesh {record.mesh_id}; use `meshd start`")
    node = cfg.node
    host, _, port = node.raft_address.rpartition(":")
    bind(host, int(port)).close()  # a clear error now, rather than pysyncobj retrying its bind forever
    ca_pem, ca_key = create_ca(record.name)
    key, cert = issue_node_certificate(ca_pem, ca_key, record.node_id, cfg.security.node_cert_days)
    raft = RaftNode(node.raft_address, [], dd.raft_dir, "", raft_timing(cfg), limits=raft_limits(cfg),
                    journal_sync=cfg.raft.journal_sync, tls=RaftTls.from_pem(cert, key, ca_pem))
    try:
        await until(lambda: raft.is_leader() and raft.is_ready(), "Raft leadership of the new mesh", 30)
        mesh_id = uuid.uuid4().hex
        token = new_token(fingerprint(ca_pem))
        admin = new_admin(f"member {record.name}", record.node_id)
        now = time.time()
        commands = [InitMesh(mesh_id=mesh_id, name=record.name, created_at=now),
                    AddMember(node_id=record.node_id, name=record.name, http_address=node.http_address,
                              raft_address=node.raft_address, grpc_address=node.grpc_address,
                              profile=await asyncio.to_thread(local_profile, node.memory_budget_bytes), joined_at=now,
                              peer_address=node.peer_address),
                    SetAuthority(record.node_id, True),  # the CA is born here: the first authority
                    *(SetReplicas(role, count) for role, count in sorted(cfg.replicas.items()) if role != Role.WITNESS),
                    token.command, admin.command]
        for cmd in commands:
            await asyncio.wait_for(asyncio.wrap_future(raft.propose(cmd)), 10)
    finally:
        raft.close()
    dd.write_identity(key, cert, ca_pem, ca_key)
    dd.write_admin_token(admin.text)
    record = dataclasses.replace(record, mesh_id=mesh_id, listen=node.listen, advertise=node.advertise)
    dd.save(record)
    log.info("created mesh %s with %s as its first member", mesh_id[:12], record.name)
    return record, token.text


async def join_mesh(dd: DataDir, cfg: MeshConfig, peer: str, token: str, name: str | None,
                    witness: bool) -> NodeRecord:
    """Joins the mesh a member (`peer`, its HTTP address) belongs to; stores what the leader answers.

    1. The token names the mesh CA by fingerprint. The peer's CA certificate (public) must match it.
    2. The join (token, certificate request) goes to the leader's HTTPS peer port, whose certificate
       must be signed by that CA: the token's secret is never sent to anything but a member of the mesh.
    3. The leader answers with this node's certificate (signed by an authority member) and the CAs the mesh
       trusts, and with the CA key only when this node qualifies as an authority (security.authorities).
    A data dir that already belongs to a mesh is left as it is (joining twice is harmless).
    """
    dd.prepare()
    record = dd.record(name)
    if record.joined:
        log.info("%s already belongs to mesh %s: starting without a new join", dd.path, record.mesh_id[:12])
        return record
    try:
        _, ca_fingerprint = split_token(token or "")
    except BadToken as exc:
        raise StartupError(f"cannot join: {exc}") from None
    node = cfg.node
    # The leader names the certificate; the key is made in a child process (mesh/security/keygen.py: this one never
    # imports cryptography for it, which a witness would hold until it restarts).
    try:
        key, csr = await asyncio.to_thread(key_and_request, "joining")
    except PkiError as exc:
        raise StartupError(f"cannot join: {exc}") from None
    # This member's admin credential: minted here, only its digest travels; the leader records it.
    admin = new_admin(f"member {record.name}")
    body = {"token": token.strip(), "name": record.name,
            "admin": {"id": admin.command.cred_id, "sha256": admin.command.secret_sha256},
            "http_address": node.http_address, "grpc_address": node.grpc_address,
            "raft_address": node.raft_address, "peer_address": node.peer_address, "witness": witness,
            "profile": await asyncio.to_thread(local_profile, node.memory_budget_bytes),
            "csr": csr.decode()}
    answer, ca_pem = await _join_through(peer, ca_fingerprint, body)
    node_id = answer.get("node_id")
    cert = answer.get("certificate", "").encode()
    if not isinstance(node_id, str) or not node_id or not holds_from(cert, key, ca_pem) or common_name(cert) != node_id:
        raise StartupError("the leader answered the join without a certificate for the id it assigned")
    ca_key = answer.get("ca_key")
    # During a CA rotation the mesh trusts the older CA too (members not yet renewed): trust what it trusts.
    others = [c.encode() for c in answer.get("trusted") or () if isinstance(c, str) and c.strip()]
    dd.write_identity(key, cert, make_bundle(ca_pem, others), ca_key.encode() if isinstance(ca_key, str) else None)
    dd.write_admin_token(admin.text)
    record = dataclasses.replace(record, node_id=node_id, mesh_id=answer["mesh_id"], listen=node.listen,
                                 advertise=node.advertise, witness=witness, partners=tuple(answer["partners"]))
    dd.save(record)
    log.info("joined mesh %s (%s) through %s", answer.get("mesh_name"), answer["mesh_id"][:12], peer)
    return record


async def _join_through(peer: str, ca_fingerprint: str, body: dict, timeout: float = 60.0) -> tuple[dict, bytes]:
    """(the leader's answer, the verified CA certificate). Retries (bounded) while the mesh has no
    leader or the leader moves; any refusal ends it with a StartupError."""
    deadline = time.monotonic() + timeout
    why = "no leader answered"
    async with httpx.AsyncClient(timeout=30) as plain:
        while True:
            reply = await _fetch_ca(plain, peer)
            if reply.status_code != 200:
                raise StartupError(f"{peer} refused the join: HTTP {reply.status_code}: {_message(reply)}")
            info = reply.json()
            ca_pem = str(info.get("ca", "")).encode()
            try:
                check_fingerprint(ca_pem, ca_fingerprint)
            except PkiError as exc:
                raise StartupError(f"refusing to join through {peer}: {exc}") from None
            leader = info.get("leader_peer")
            while leader:
                async with httpx.AsyncClient(verify=trusting(ca_pem), timeout=30) as tls:
                    try:
                        reply = await tls.post(f"https://{leader}{JOIN_PATH}", json=body)
                    except httpx.HTTPError as exc:
                        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                            raise StartupError(f"refusing to join: {leader} presented a certificate that the "
                                               f"mesh CA did not sign") from None
                        log.warning("the leader's peer port %s did not take the join (%s); retrying", leader,
                                    type(exc).__name__)
                        break
                if reply.status_code == 200:
                    return reply.json(), ca_pem
                if reply.status_code == 421:  # leadership moved: go where it points
                    leader = reply.json().get("leader_peer")
                    continue
                if reply.status_code == 503:
                    why = _message(reply)
                    if _code(reply) == "no_authority":  # nobody holds the CA key now: say so at once
                        raise StartupError(f"{leader} could not admit this node: {why}")
                    break
                raise StartupError(f"{peer} refused the join: HTTP {reply.status_code}: {_message(reply)}")
            if time.monotonic() > deadline:
                raise StartupError(f"no leader of the mesh took the join within {timeout:.0f} s ({why})")
            await asyncio.sleep(0.5)


async def _fetch_ca(plain: httpx.AsyncClient, peer: str) -> httpx.Response:
    """GET /control/v1/ca from `peer`: over plain HTTP, or over HTTPS when its gateway serves only that
    (gateway.tls). Its certificate is not checked here on purpose: nothing secret is sent on this
    connection, and the CA it returns is checked against the token's fingerprint before anything is."""
    try:
        return await plain.get(f"http://{peer}/control/v1/ca")
    except httpx.HTTPError as exc:
        first = exc
    try:
        async with httpx.AsyncClient(timeout=30, verify=False) as unchecked:  # noqa: S501 (see above)
            return await unchecked.get(f"https://{peer}/control/v1/ca")
    except httpx.HTTPError:
        raise StartupError(f"cannot reach {peer} to join: {first}") from None


def _code(reply: httpx.Response) -> str | None:
    try:
        return reply.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _message(reply: httpx.Response) -> str:
    try:
        return reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return reply.text[:200]
