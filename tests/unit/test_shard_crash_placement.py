"""A shard whose process crash-looped on a node ("crashed" in the state) moves to another node that
can hold it, and stays recorded where it crashed while no other node can (so it is not put back)."""

from __future__ import annotations

from mesh.cluster.placement import Assignment, ModelInfo, NodeInfo, Plan, Unplaced, place
from mesh.cluster.placer import keep_crashed_until_replaced

MIB = 1 << 20
FAST = NodeInfo("desktop-1", "desktop", 8000 * MIB, speed=10.0)
SLOW = NodeInfo("pi-1", "raspberry-pi", 1500 * MIB, speed=2.0)
GEMMA = ModelInfo("gemma", ("reasoning",), 400 * MIB)
CRASHED = Assignment("reasoning", "gemma", "desktop-1")


def test_a_crashed_shard_moves_to_the_next_node_that_fits():
    plan = place([FAST, SLOW], [GEMMA], {"reasoning": 1}, [], [CRASHED], avoid=[CRASHED])
    assert plan.assignments == (Assignment("reasoning", "gemma", "pi-1"),)
    assert plan.unplaced == ()
    assert keep_crashed_until_replaced(plan, [CRASHED]) == plan  # replaced: the crashed record goes


def test_with_no_other_node_it_is_unplaced_with_the_reason_and_its_record_kept():
    plan = place([FAST], [GEMMA], {"reasoning": 1}, [], [CRASHED], avoid=[CRASHED])
    assert plan.assignments == ()
    [short] = plan.unplaced
    assert short.missing == 1 and "crash-looped on desktop-1" in short.reason
    kept = keep_crashed_until_replaced(plan, [CRASHED])
    assert kept.assignments == (CRASHED,) and kept.unplaced == plan.unplaced
    # The next round plans the same from that state: no back and forth.
    again = place([FAST], [GEMMA], {"reasoning": 1}, [], kept.assignments, avoid=[CRASHED])
    assert keep_crashed_until_replaced(again, [CRASHED]) == kept


def test_a_pin_still_wins():
    plan = place([FAST, SLOW], [GEMMA], {"reasoning": 1}, [CRASHED], [CRASHED], avoid=[CRASHED])
    assert plan.assignments == (CRASHED,)


def test_without_crashes_nothing_changes():
    plain = place([FAST, SLOW], [GEMMA], {"reasoning": 2}, [], [])
    assert place([FAST, SLOW], [GEMMA], {"reasoning": 2}, [], [], avoid=[]) == plain
    assert keep_crashed_until_replaced(plain, []) is plain
    assert keep_crashed_until_replaced(Plan((), (Unplaced("reasoning", "gemma", 1, "x"),)), []).assignments == ()
