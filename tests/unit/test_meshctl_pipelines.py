"""meshctl's pinned split (`meshctl assign reasoning --node HEAD --node STAGE ...`) shares the layers by what each
member can hold as placement counts it: for a member that reports no memory figure of its own, its free RAM less
the placement reserve (placement.reserve_mib) of the member that answered meshctl's status, not a fixed figure."""

from __future__ import annotations

from mesh.cli.pipelines import pinned_split, placement_reserve
from mesh.core.config import PlacementConfig

MIB = 1 << 20
MEMORY, LAYER = 485_896_896, 7_990_272  # the default model's figures (test_split_planning.py)
MODELS = [{"name": "gemma", "roles": ["reasoning"], "memory_bytes": MEMORY, "layers": 18, "layer_bytes": LAYER}]


def status(reserve_mib: int | None) -> dict:
    """Three members that report only their free RAM (no memory_available_for_models), as old members do."""
    members = [{"node_id": n, "name": n, "state": "active", "profile": {"ram_available": mib * MIB}}
               for n, mib in (("alpha", 900), ("beta", 500), ("gamma", 420))]
    return {"node": {} if reserve_mib is None else {"reserve_mib": reserve_mib}, "members": members}


def stage_layers(reserve_mib: int | None) -> dict[str, int]:
    body, _ = pinned_split(status(reserve_mib), MODELS, ["alpha", "beta", "gamma"], None)
    return {s["node"]: s["layers"] for s in body["stages"]}


def test_the_reserve_is_the_one_the_status_reports():
    assert placement_reserve({"node": {"reserve_mib": 64}}) == 64 * MIB
    default = PlacementConfig().reserve_mib * MIB
    for odd in ({}, {"node": {}}, {"node": {"reserve_mib": -1}}, {"node": {"reserve_mib": "lots"}},
                {"node": {"reserve_mib": True}}):
        assert placement_reserve(odd) == default, odd  # an older member, or nonsense: the default


def test_a_larger_reserve_leaves_less_to_the_member_with_the_least_ram():
    none, default, large = stage_layers(0), stage_layers(None), stage_layers(300)
    assert default == stage_layers(PlacementConfig().reserve_mib)
    # gamma (420 MiB) keeps 420, 164 or 120 MiB against beta's 500, 244 or 200: its share falls as the reserve grows.
    assert none["gamma"] / none["beta"] > default["gamma"] / default["beta"] > large["gamma"] / large["beta"]
