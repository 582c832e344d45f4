"""TrustKeeper (mesh/security/ca_rotation.py) when things go wrong: a RotateCa whose outcome is unknown, a
rotation settled by another authority, the authority that made the CA away. The log is raft.state.apply, with
proposals that can be lost in flight; the data dirs and CAs are real, the clock is injected."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from mesh.security.ca_rotation import STAGGER_S, TrustKeeper
from mesh.security.datadir import DataDir
from mesh.security.pki import create_ca, fingerprint, issue_node_certificate
from mesh.security.renewal import LiveIdentity
from raft.commands import RequestCaRotation, RotateCa
from raft.records import Member
from raft.state import MeshState, Rejected, apply
from tests.unit.test_ca_rotation import Log, mesh


@pytest.fixture(scope="module")
def cas():
    return create_ca("t"), create_ca("t", "next")


class LossyLog(Log):
    """A log whose proposals can be lost in flight: `lose` keeps them (outcome unknown to the proposer) until
    `commit_late` applies them, as a new leader that had the entry would."""

    def __init__(self, state: MeshState) -> None:
        super().__init__(state)
        self.lose, self.in_flight, self.proposed = False, [], []

    async def propose(self, cmd) -> dict:
        self.proposed.append(cmd)
        if self.lose and isinstance(cmd, RotateCa):
            self.in_flight.append(cmd)
            raise TimeoutError
        return await super().propose(cmd)

    def commit_late(self) -> list[str]:
        """Applies the lost entries in order: "taken", or the reason the state refused each."""
        outcomes = []
        for cmd in self.in_flight:
            try:
                self.state = apply(self.state, cmd)
                outcomes.append("taken")
            except Rejected as exc:  # what the log does with an entry the state refuses: the caller checks which
                outcomes.append(str(exc))
        self.in_flight = []
        return outcomes


def keeper_for(node_id: str, dd: DataDir, log: Log, clock: list[float], fetch_key=None) -> TrustKeeper:
    async def no_key(member: Member) -> bytes:
        raise httpx.ConnectError(f"{member.name} is away")

    return TrustKeeper(node_id, dd, LiveIdentity(dd.identity()), lambda: log.state, lambda: log.leader, log.propose,
                       lambda m: True, fetch_key or no_key, lambda: None, clock=lambda: clock[0])


def authority_dir(cas, tmp_path, node_id: str) -> DataDir:
    (old, old_key), _ = cas
    dd = DataDir(tmp_path / node_id)
    dd.prepare()
    key, cert = issue_node_certificate(old, old_key, node_id)
    dd.write_identity(key, cert, old, old_key)
    return dd


def test_a_ca_whose_proposal_was_lost_keeps_its_key_until_the_log_rotates_past_it(cas, tmp_path):
    """A RotateCa whose outcome is unknown (no majority then) may still commit, however late: its key is never
    shredded on a timer (the mesh would sign with a CA nobody holds the key of). It is proposed again, the same
    CA, and installed when the log takes it; it goes only once the log rotated to another CA."""
    log = LossyLog(apply(mesh("a", "b", authorities=("a", "b")), RequestCaRotation("drill")))
    clock = [0.0]
    dd = authority_dir(cas, tmp_path, "a")
    keeper = keeper_for("a", dd, log, clock)
    log.lose = True
    asyncio.run(keeper.check())
    made, made_key = dd.next_ca()
    clock[0] = 3600.0  # an hour later, by the keeper's clock and the files' (far past any timer)
    os.utime(dd.path / "ca-next.key", (time.time() - 3600, time.time() - 3600))
    asyncio.run(keeper.check())
    assert dd.next_ca() == (made, made_key), "the key of a CA the log may still take was shredded"
    assert [c.ca_pem for c in log.proposed if isinstance(c, RotateCa)] == [made.decode()] * 2  # the same CA again
    taken, copy = log.commit_late()  # the lost entry commits after all (its copy is then refused)
    assert taken == "taken" and "no CA rotation is owed" in copy
    asyncio.run(keeper.check())
    assert log.state.signing_ca == fingerprint(made) and dd.ca_key() == made_key and dd.next_ca() is None

    # Another authority's CA rotated in instead: the pending one can never sign, and its key goes.
    log = LossyLog(apply(mesh("a", "b", authorities=("a", "b")), RequestCaRotation("drill")))
    dd = authority_dir(cas, tmp_path / "second", "a")
    keeper = keeper_for("a", dd, log, clock)
    log.lose = True
    asyncio.run(keeper.check())
    assert dd.next_ca() is not None
    (old, _), (new, _) = cas
    log.state = apply(log.state, RotateCa("b", new.decode(), (old.decode(),)))
    asyncio.run(keeper.check())
    assert dd.next_ca() is None and not (dd.path / "ca-next.key").exists()
    assert ["no CA rotation" in outcome for outcome in log.commit_late()] == [True]  # a late copy is refused
    assert log.state.signing_ca == fingerprint(new)


def test_an_authority_waits_its_turn_again_for_the_next_rotation(cas, tmp_path):
    """The stagger between authorities starts afresh for every rotation owed: one settled by another authority
    does not leave this one's clock running, so the next time it does not race the leader."""
    (old, _), (new, _) = cas
    log = Log(apply(mesh("a", "b", authorities=("a", "b")), RequestCaRotation("first")))
    clock = [0.0]
    dd = authority_dir(cas, tmp_path, "b")
    keeper = keeper_for("b", dd, log, clock)  # second in line after the leader, a
    asyncio.run(keeper.check())
    assert dd.next_ca() is None  # its turn comes STAGGER_S after it is owed
    log.state = apply(log.state, RotateCa("a", new.decode(), (old.decode(),)))  # the leader went first
    clock[0] = 100.0
    asyncio.run(keeper.check())
    log.state = apply(log.state, RequestCaRotation("second"))
    clock[0] = 200.0
    asyncio.run(keeper.check())
    assert dd.next_ca() is None and log.state.signing_ca == fingerprint(new), "it did not wait its turn"
    clock[0] = 200.0 + STAGGER_S
    asyncio.run(keeper.check())
    assert log.state.ca_made_by == "b" and log.state.signing_ca == fingerprint(dd.next_ca()[0])  # its turn


def test_with_the_maker_away_an_authority_fetches_the_new_key_from_another_that_holds_it(cas, tmp_path):
    (old, _), (new, new_key) = cas
    log = Log(apply(apply(mesh("a", "b", "d", authorities=("a", "b", "d")), RequestCaRotation("drill")),
                    RotateCa("a", new.decode(), (old.decode(),))))
    asked: list[str] = []

    async def fetch_key(member: Member) -> bytes:
        asked.append(member.node_id)
        if member.node_id == "a":
            raise httpx.ConnectError("a is away")  # the maker: asleep, or cut off
        return new_key  # d fetched it before a went away

    dd = authority_dir(cas, tmp_path, "b")
    asyncio.run(keeper_for("b", dd, log, [0.0], fetch_key).check())
    assert asked == ["a", "d"] and dd.ca_key() == new_key
