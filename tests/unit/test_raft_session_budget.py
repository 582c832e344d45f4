"""raft/session_budget.py through raft/state.py's apply: byte budgets for the session log, per session (oldest
turns first) and in total (least recently used sessions first), counted in MeshState. Pure: no sockets."""

from __future__ import annotations

import pytest

import raft.apply_sessions as st
from raft import codec, snapshot
from raft.commands import InitMesh, SessionAppend, SessionTurnEnd, SessionTurnStart
from raft.session_budget import MESSAGE_OVERHEAD, TOKEN_BYTES, TURN_OVERHEAD, turn_bytes
from raft.state import MeshState, Turn, apply, session_metrics


def fresh() -> MeshState:
    return apply(MeshState(), InitMesh("m", "budget", 1.0))


def next_turn(state: MeshState, sid: str) -> int:
    """What the mesh sends (mesh/cluster/sessions.py): the number of finished turns the state holds."""
    session = state.sessions.get(sid)
    return 0 if session is None else sum(t.finish_reason is not None for t in session.turns)


def turn(state: MeshState, sid: str, at: float, text: str = "", answer: str = "",
         ids: tuple[int, ...] = ()) -> MeshState:
    n = next_turn(state, sid)
    state = apply(state, SessionTurnStart(sid, n, (("user", text),), len(ids), at, ids))
    if answer:
        state = apply(state, SessionAppend(sid, n, (1, 2, 3), answer))
    return apply(state, SessionTurnEnd(sid, n, "stop", at))


@pytest.fixture
def small(monkeypatch):
    """Budgets small enough to reach with a few turns: 1000 bytes a session, 3000 in all."""
    monkeypatch.setattr(st, "SESSION_BYTES", 1000)
    monkeypatch.setattr(st, "SESSIONS_BYTES", 3000)


def test_a_turns_size_is_its_text_token_ids_and_overheads():
    t = Turn(messages=(("user", "héllo"),), prompt_tokens=2, answer_tokens=(1, 2, 3), answer_text="ok",
             prompt_token_ids=(5, 6))
    assert t.size == turn_bytes(t) == TURN_OVERHEAD + 2 + TOKEN_BYTES * 5 + MESSAGE_OVERHEAD + 4 + 6
    assert "size" not in {f.name for f in st.dataclasses.fields(Turn)}  # never logged, dumped nor compared


def test_a_session_over_its_budget_loses_its_oldest_turns_first(small):
    state = fresh()
    for n in range(6):
        state = turn(state, "s", 10.0 + n, text=f"turn {n} " + "x" * 200)
    session = state.sessions["s"]
    assert session.size <= 1000
    kept = [t.messages[0][1][:6] for t in session.turns]
    assert kept == [f"turn {n}" for n in range(6 - len(kept), 6)] and len(kept) < 6
    assert state.session_turns_evicted == 6 - len(kept)
    assert state.session_bytes_evicted > 0 and state.sessions_evicted == 0


def test_the_open_turn_keeps_its_number_and_the_newest_turn_stays_alone_over_budget(small):
    state = turn(fresh(), "s", 10.0, text="x" * 100)
    state = apply(state, SessionTurnStart("s", 1, (("user", "y" * 200),), 400, 11.0, tuple(range(400))))
    # Over the budget with its ids: they go at once; the older turn stays while this one is open (its number is
    # its position, which the appends and the end name).
    assert [len(t.prompt_token_ids) for t in state.sessions["s"].turns] == [0, 0]
    state = apply(state, SessionAppend("s", 1, tuple(range(300)), "z" * 50))
    state = apply(state, SessionAppend("s", 1, (1,), "z"))
    state = apply(state, SessionTurnEnd("s", 1, "stop", 12.0))
    session = state.sessions["s"]
    assert len(session.turns) == 1 and session.turns[0].messages[0][1] == "y" * 200
    assert session.turns[0].answer_tokens == (*range(300), 1) and state.session_turns_evicted == 1
    assert next_turn(state, "s") == 1  # and the next turn is numbered from what is kept
    state = turn(state, "s", 13.0, text="again")
    assert state.sessions["s"].turns[-1].messages[0][1] == "again"


def test_max_turns_is_kept_when_a_turn_ends_so_the_65th_turn_records(monkeypatch):
    monkeypatch.setattr(st, "MAX_TURNS", 3)
    state = fresh()
    for n in range(5):
        state = turn(state, "s", 10.0 + n, text=f"t{n}", answer="a")
    assert [t.messages[0][1] for t in state.sessions["s"].turns] == ["t2", "t3", "t4"]
    assert state.session_turns_evicted == 2


def test_over_the_total_the_least_recently_used_sessions_go_first_never_the_one_written(small):
    state = fresh()
    for k in range(8):
        state = turn(state, f"s{k}", 100.0 + k, text="x" * 500)
    assert state.session_bytes <= 3000
    assert sorted(state.sessions) == [f"s{k}" for k in range(8 - len(state.sessions), 8)]
    assert state.sessions_evicted == 8 - len(state.sessions) > 0
    # Touching the oldest keeps it: the next eviction takes the next oldest.
    oldest = min(state.sessions, key=lambda k: state.sessions[k].last_used)
    second = sorted(state.sessions, key=lambda k: state.sessions[k].last_used)[1]
    state = turn(state, oldest, 200.0, text="x" * 10)
    state = turn(state, "new", 201.0, text="x" * 500)
    assert oldest in state.sessions and second not in state.sessions and "new" in state.sessions


def test_appends_grow_a_session_into_the_budgets_too(small):
    state = turn(fresh(), "old", 1.0, text="x" * 800)
    state = apply(state, SessionTurnStart("s", 0, (("user", "hi"),), 1, 2.0))
    for _ in range(10):
        state = apply(state, SessionAppend("s", 0, (7,) * 20, "w" * 200))
    assert state.session_bytes <= 3000 and "old" not in state.sessions
    assert state.sessions["s"].turns[-1].finish_reason is None  # the open turn is whole
    assert len(state.sessions["s"].turns[-1].answer_text) == 2000


def test_budgets_are_a_function_of_content_so_a_dump_and_a_replay_evict_alike(small):
    state = fresh()
    for k in range(5):
        state = turn(state, f"s{k}", 10.0 + k, text="x" * 400, answer="a" * 100)
    raw = snapshot.encode_dump(state, (b"\x01", 9, 1), (b"\x01", 8, 1), [])
    loaded = snapshot.decode_dump(raw)[0]
    assert loaded == state and loaded.session_bytes == state.session_bytes
    cmd = SessionTurnStart("s9", 0, (("user", "x" * 900),), 0, 50.0)
    assert apply(loaded, cmd) == apply(state, cmd)
    counters = codec.loads(codec.dumps(state, snapshot.STATE), snapshot.STATE)
    assert (counters.sessions_evicted, counters.session_bytes_evicted) == (state.sessions_evicted,
                                                                          state.session_bytes_evicted)


def test_the_count_cap_is_counted_as_evictions(monkeypatch):
    monkeypatch.setattr(st, "MAX_SESSIONS", 3)
    state = fresh()
    for k in range(5):
        state = turn(state, f"s{k}", 10.0 + k, text="x")
    assert sorted(state.sessions) == ["s2", "s3", "s4"] and state.sessions_evicted == 2


def test_session_metrics_reads_the_counters_and_the_size():
    state = turn(fresh(), "s", 1.0, text="hello")
    metrics = session_metrics(state)
    assert metrics == {"session_bytes": state.sessions["s"].size, "session_bytes_budget": st.SESSIONS_BYTES,
                       "session_bytes_budget_per_session": st.SESSION_BYTES, "sessions": 1, "sessions_evicted": 0,
                       "session_turns_evicted": 0, "session_bytes_evicted": 0}


def test_the_default_budgets_bound_the_worst_case_of_the_count_caps():
    # Before: 1000 sessions x 2 turns x 8192 ids (64 MB of ids alone). Now at most SESSIONS_BYTES in all.
    assert st.SESSION_BYTES == 1024 * 1024 and st.SESSIONS_BYTES == 16 * 1024 * 1024
    assert st.MAX_SESSIONS * st.PROMPT_IDS_TURNS * st.MAX_PROMPT_IDS * TOKEN_BYTES > st.SESSIONS_BYTES


def test_the_gateway_metrics_show_the_session_log_and_its_evictions(small):
    from mesh.core.metrics import Metrics

    state = fresh()
    for k in range(8):
        state = turn(state, f"s{k}", 100.0 + k, text="x" * 500)
    metrics = Metrics()
    metrics.watch_sessions(lambda: state)
    lines = dict(line.rsplit(" ", 1) for line in metrics.render().decode().splitlines() if not line.startswith("#"))
    assert float(lines["quorum_session_log_bytes"]) == state.session_bytes > 0
    assert float(lines["quorum_sessions_evicted_total"]) == state.sessions_evicted > 0
    assert float(lines["quorum_session_log_budget_bytes"]) == 3000
