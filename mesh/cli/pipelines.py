"""meshctl's view of pipelines (models split across members, issue #17): the status table's rows, the stages that
reported a failure, and the split that `meshctl assign reasoning --node HEAD --node STAGE ...` pins."""

from __future__ import annotations

from typing import Any

from mesh.cluster.placement import NodeInfo, member_memory
from mesh.cluster.split_planning import SplitModel, pinned_pipeline
from mesh.core.config import PlacementConfig
from raft.profile import MemberProfile
from raft.records import memory_for_slots
from raft.vocab import MemberState


def pipeline_rows(st: dict, names: dict[str, str]) -> list[list[Any]]:
    """Each split model: its head member (and the layers it keeps, when the catalog knows the model's), its stages
    in pipeline order with their layers and reported state, who planned it, and the head's shard state."""
    rows = []
    for split in st.get("splits", []):
        head = next((s for s in st["shards"] if s["role"] == "reasoning" and s["model"] == split["model"]
                     and s["node_id"] == split["head"]), None)
        stages = " -> ".join(f"{names.get(s['node_id'], s['node_id'])} ({s['layers']}"
                             f"{', ' + s['state'] if s.get('state') else ''})" for s in split["stages"])
        kept = (split.get("layers") or 0) - sum(s["layers"] for s in split["stages"])
        rows.append([split["model"], names.get(split["head"], split["head"]) + (f" ({kept})" if kept > 0 else ""),
                     stages, "auto" if split.get("auto") else "pinned", head["state"] if head else "not placed"])
    return rows


def stage_failures(st: dict, names: dict[str, str]) -> list[str]:
    """One line per stage that reported a failure, with what it said."""
    return [f"{split['model']}: the stage on {names.get(s['node_id'], s['node_id'])} failed: {s.get('detail') or '?'}"
            for split in st.get("splits", []) for s in split["stages"] if s.get("state") == "failed"]


def pinned_split(st: dict, models: list[dict], nodes: list[str], model_name: str | None) -> tuple[dict, str]:
    """The /control/v1/split body for `meshctl assign reasoning --node HEAD --node STAGE ...` (layer shares by
    each member's memory, mesh/cluster/split_planning.py, less the placement reserve of the member that answered
    `st`, as the placer counts it), and a warning ("" when none). ValueError: no such member or model, or no
    pipeline of those members."""
    serving = [m for m in models if "reasoning" in m["roles"]]
    if model_name is None and len(serving) != 1:
        raise ValueError("name the model to split with --model (" + (", ".join(m["name"] for m in serving)
                                                                  or "no model serves reasoning") + ")")
    model = next((m for m in serving if m["name"] == (model_name or serving[0]["name"])), None)
    if model is None:
        raise ValueError(f"no model {model_name!r} serves reasoning")
    live = [m for m in st["members"] if m["state"] != MemberState.GONE]
    reserve = placement_reserve(st)
    members = []
    for name in nodes:
        member = next((m for m in live if name in (m["name"], m["node_id"])), None)
        if member is None:
            raise ValueError(f"no member {name!r}")
        free = member_memory(MemberProfile.from_wire(member.get("profile")), reserve)
        members.append(NodeInfo(member["node_id"], "", free, 0.0))
    one_slot = memory_for_slots(model["memory_bytes"], model.get("slots", 0), model.get("slot_bytes", 0), 1)
    split_model = SplitModel(model["name"], one_slot, model.get("layers", 0), model.get("layer_bytes", 0))
    pipeline, warning = pinned_pipeline(split_model, members)
    names = {m["node_id"]: m["name"] for m in live}
    return ({"model": model["name"], "head": names[pipeline.head],
             "stages": [{"node": names[n], "layers": k} for n, k in pipeline.stages]}, warning)


def placement_reserve(st: dict) -> int:
    """Bytes placement keeps free on a member that reports no memory figure of its own: the `placement.reserve_mib`
    of the member that answered the status (its mesh.toml), the default where an older member does not say."""
    reserve = (st.get("node") or {}).get("reserve_mib")
    if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
        reserve = PlacementConfig().reserve_mib
    return reserve << 20
