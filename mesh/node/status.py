"""The status view of one member and of the mesh as it sees it (`meshctl status`, /control/v1/status)."""

from __future__ import annotations

import dataclasses
from typing import Any

from mesh.cluster.witness import heavy_modules_loaded, on_demand_modules_loaded
from mesh.core.config import MeshConfig
from mesh.security.datadir import NodeRecord
from raft.node import RaftNode
from raft.state import MeshState
from raft.vocab import MemberState, Role, ShardState


def status_view(raft: RaftNode, record: NodeRecord, cfg: MeshConfig, reconciler) -> dict[str, Any]:
    state: MeshState = raft.state
    connected = raft.partners()
    leader = raft.leader()
    members = []
    for m in sorted(state.members.values(), key=lambda m: m.name):
        if m.state == MemberState.GONE:
            continue
        me = m.raft_address == raft.address
        members.append({**dataclasses.asdict(m), "leader": m.raft_address == leader,
                        "connected": me or connected.get(m.raft_address, False)})
    ready = any(s.state == ShardState.READY and s.role == Role.REASONING for s in state.shards.values())
    return {
        "mesh": {"id": state.mesh_id, "name": state.name, "created_at": state.created_at},
        "node": {"id": record.node_id, "name": record.name, "listen": cfg.node.listen,
                 "witness": record.witness, "heavy_modules": heavy_modules_loaded(),
                 "on_demand_modules": on_demand_modules_loaded(),
                 # what placement keeps free on a member that reports no figure of its own (meshctl's split shares)
                 "reserve_mib": cfg.placement.reserve_mib},
        "raft": raft.status(),
        "members": members,
        "models": [{**dataclasses.asdict(m), "holders": sorted(state.model_files.get(m.name, ()))}
                   for m in sorted(state.models.values(), key=lambda m: m.name)],
        "shards": [dataclasses.asdict(s) for s in sorted(state.shards.values(), key=lambda s: s.key)],
        "replicas": dict(state.replicas),
        "pins": [dataclasses.asdict(p) for p in state.pins.values()],
        "unplaced": [dataclasses.asdict(u) for u in state.unplaced],
        "local_shards": local_shard_status(reconciler),
        # This member's pipeline stages (mesh/replicas/splits.py): model, layers, pid, state, detail, restarts,
        # last_exit.
        "local_stages": splits.status() if (splits := getattr(reconciler, "splits", None)) is not None else [],
        "health": {"ready": ready, "detail": "ok" if ready else "no reasoning replica is ready"},
    }


def local_shard_status(rec) -> list[dict[str, Any]]:
    """This node's shard processes (`rec` the Reconciler, None on a witness): serving ones, and those
    that crash-looped here."""
    if rec is None:
        return []
    out = [{"role": role, "model": model, "state": ShardState.READY, "pid": shard.pid, "rss_bytes": shard.rss(),
            "busy": shard.busy, "waiting": shard.waiting, "restarts": rec.restarts[(role, model)],
            "detail": f"last crash at {rec.last_crash[(role, model)]}" if (role, model) in rec.last_crash else ""}
           for (role, model), shard in sorted(rec.local.items())]
    out += [{"role": role, "model": model, "state": ShardState.CRASHED, "pid": None, "rss_bytes": 0, "busy": False,
             "waiting": 0, "restarts": rec.restarts[(role, model)], "detail": reason}
            for (role, model), reason in sorted(rec.given_up.items())]
    return out
