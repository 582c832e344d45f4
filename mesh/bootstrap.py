"""Creating a mesh (`meshd init`) and joining one (`meshd join`): what happens before a node runs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import httpx

from mesh.config import MeshConfig
from mesh.daemon import StartupError, bind, raft_timing, until
from mesh.datadir import DataDir, NodeRecord
from mesh.tokens import new_token
from nodes.profile import local_profile
from raft.commands import AddMember, InitMesh, SetReplicas
from raft.node import RaftNode

log = logging.getLogger("quorum.bootstrap")


async def init_mesh(dd: DataDir, cfg: MeshConfig, name: str | None) -> tuple[NodeRecord, str]:
    """Creates a one-member mesh in `dd`: secret, identity, Raft journal with the mesh's first
    entries. Returns the node's record and a join token for the next members."""
    dd.prepare()
    record = dd.record(name)
    if record.joined:
        raise StartupError(f"{dd.path} already belongs to mesh {record.mesh_id}; use `meshd start`")
    node = cfg.node
    host, _, port = node.raft_address.rpartition(":")
    bind(host, int(port)).close()  # a clear error now, rather than pysyncobj retrying its bind forever
    raft = RaftNode(node.raft_address, [], dd.raft_dir, dd.secret(), raft_timing(cfg))
    try:
        await until(lambda: raft.is_leader() and raft.is_ready(), "Raft leadership of the new mesh", 30)
        mesh_id = uuid.uuid4().hex
        token = new_token()
        now = time.time()
        commands = [InitMesh(mesh_id=mesh_id, name=record.name, created_at=now),
                    AddMember(node_id=record.node_id, name=record.name, http_address=node.http_address,
                              raft_address=node.raft_address, grpc_address=node.grpc_address,
                              profile=await asyncio.to_thread(local_profile), joined_at=now),
                    *(SetReplicas(role, count) for role, count in sorted(cfg.replicas.items()) if role != "witness"),
                    token.command]
        for cmd in commands:
            await asyncio.wait_for(asyncio.wrap_future(raft.propose(cmd)), 10)
    finally:
        raft.close()
    record = dataclasses.replace(record, mesh_id=mesh_id, listen=node.listen, advertise=node.advertise)
    dd.save(record)
    log.info("created mesh %s with %s as its first member", mesh_id[:12], record.name)
    return record, token.text


async def join_mesh(dd: DataDir, cfg: MeshConfig, peer: str, token: str, name: str | None,
                    witness: bool) -> NodeRecord:
    """Asks a member (any: followers relay to the leader) to admit this node; stores what it answers.

    A data dir that already belongs to a mesh is left as it is (joining twice is harmless).
    """
    dd.prepare()
    record = dd.record(name)
    if record.joined:
        log.info("%s already belongs to mesh %s: starting without a new join", dd.path, record.mesh_id[:12])
        return record
    node = cfg.node
    body = {"token": token, "node_id": record.node_id, "name": record.name, "http_address": node.http_address,
            "grpc_address": node.grpc_address, "raft_address": node.raft_address, "witness": witness,
            "profile": await asyncio.to_thread(local_profile)}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            reply = await client.post(f"http://{peer}/control/v1/join", json=body)
    except httpx.HTTPError as exc:
        raise StartupError(f"cannot reach {peer} to join: {exc}") from None
    if reply.status_code != 200:
        raise StartupError(f"{peer} refused the join: HTTP {reply.status_code}: {_message(reply)}")
    answer = reply.json()
    dd.write_secret(answer["secret"])
    record = dataclasses.replace(record, mesh_id=answer["mesh_id"], listen=node.listen, advertise=node.advertise,
                                 witness=witness, partners=tuple(answer["partners"]))
    dd.save(record)
    log.info("joined mesh %s (%s) through %s", answer.get("mesh_name"), answer["mesh_id"][:12], peer)
    return record


def _message(reply: httpx.Response) -> str:
    try:
        return reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return reply.text[:200]
