"""An in-process Raft cluster for tests (as in etcd-io/raft's tests): several RaftNode members in one process over
an in-memory network with cuts, delays and drops, on an injected clock, ticked by hand in a fixed order. The same
seed and script give the same history; nothing sleeps and nothing reads the wall clock. Test support only: no
production module imports it (tests/unit/test_raft_harness.py checks).

What is real: RaftNode and PreVoteSyncObj (pysyncobj 0.3.17's SyncObj with raft/prevote.py), raft/journal.py on
real files (a restart reads them back), raft/state.py's apply, raft/codec.py (every message is encoded and
decoded as on the wire, so no object is shared between members) and raft/wire.py's schema (a message outside it
fails the test: every member here is honest, so it is a bug). What is not: sockets, TLS, framing and the
transport's caps (tests/unit/test_raft_transport.py, test_raft_tls.py, test_raft_hostile.py cover them over TCP);
the journal's fdatasync, off unless `durable=True` (a restart here is a process restart and the page cache
survives it; power loss is tests/unit/test_raft_journal.py's); tick threads (every member runs auto_tick=False).

Connections follow pysyncobj's TCP transport, because SyncObj acts on them (a member connected to nobody starts
no election; a leader sends nothing to a member it is not connected to):
- the higher address dials the lower, and again every `connectionRetryTime` while down; a dial succeeds when the
  peer runs, knows the dialler as a member, and the link is not cut;
- a member closes a connection when it sends on it after hearing nothing on it for `connectionTimeout`
  (pysyncobj's TcpConnection checks its timeout on send only); the peer hears of the close unless the link is cut;
- a stopped member's connections close at once (its peers see the reset, unless cut);
- messages on a link arrive in order, even with jitter, and only on the connection they were sent on; one that
  comes on a connection the receiver has closed is lost and answered with a close (TCP's reset), and a close sent
  across a cut arrives when the cut heals (TCP retransmits its FIN), so no half-open connection outlives a heal.
`cut(a, b)` is a pulled cable: every message and dial between a and b is lost, and connections notice only by
their timeout. `drop(a, b, p)` loses each message with probability p from a random source seeded per link, so
one link's draws do not depend on the order members send to others in.

The clock: SyncObj reads time through the module global `pysyncobj.syncobj.monotonicTime` and raft/prevote.py
through `raft.prevote.monotonic_time`; while a Cluster is open both are its FakeClock, `pysyncobj.syncobj.random`
(election timeouts) is a `random.Random` seeded from the cluster's seed, and (unless `durable`)
`raft.journal._datasync` does nothing. `close()` puts all four back. One Cluster at a time, and no real-time
RaftNode may run in the process meanwhile. Keep runs short of `logCompactionMinTime` (300 fake seconds) and of
`compaction_min_entries`: a compaction writes the dump on a background thread, which the clock does not drive.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pysyncobj.syncobj as pso_syncobj
from pysyncobj.transport import Transport

import raft.journal as raft_journal
import raft.prevote as raft_prevote
from raft import codec
from raft.commands import Command
from raft.node import RaftNode, RaftTiming, TransportFactory
from raft.wire import check_message

CONNECT, CLOSE, MESSAGE = "connect", "close", "message"
START_S = 1000.0  # the fake clock's first reading: far from 0, which SyncObj uses as "never"


class FakeClock:
    """Seconds that move only when told to, counted in whole microseconds (no drift over many small steps)."""

    def __init__(self, start: float = START_S) -> None:
        self._start = start
        self._us = 0

    def __call__(self) -> float:
        return self._start + self._us / 1e6

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"the clock does not go back ({seconds} s)")
        self._us += round(seconds * 1e6)


@dataclass
class _Link:
    """One direction between two addresses: its faults and its own random source."""
    rng: random.Random
    delay_s: float = 0.0
    jitter_s: float = 0.0
    drop: float = 0.0
    cut: bool = False
    last_at: float = -math.inf  # when its latest message arrives: later ones never overtake it
    held: list = field(default_factory=list)  # closes sent while cut: TCP retransmits a FIN, so they arrive on heal


class MemoryNetwork:
    """Queues between MemoryTransports: an inbox per address, ordered by arrival time, then by sending order."""

    def __init__(self, clock: FakeClock, seed: int = 0) -> None:
        self.clock = clock
        self.seed = seed
        self._members: dict[str, MemoryTransport] = {}
        self._links: dict[tuple[str, str], _Link] = {}
        self._inbox: dict[str, list] = {}
        self._order = itertools.count()
        self._epochs = itertools.count(1)
        self.sent = 0  # messages handed to the network
        self.lost = 0  # messages lost to a cut, a drop, or a connection closed before they arrived

    def _link(self, src: str, dst: str) -> _Link:
        link = self._links.get((src, dst))
        if link is None:
            link = self._links[(src, dst)] = _Link(random.Random(f"{self.seed}:{src}>{dst}"))
        return link

    # ---- faults (each applies to both directions) -------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        self._link(a, b).cut = self._link(b, a).cut = True

    def isolate(self, a: str, others: list[str]) -> None:
        for b in others:
            if b != a:
                self.cut(a, b)

    def heal(self, a: str | None = None, b: str | None = None) -> None:
        """Mends the cut between a and b, every cut of a (b None), or every cut (both None)."""
        for (src, dst), link in list(self._links.items()):
            if link.cut and (a is None or (b is None and a in (src, dst)) or {src, dst} == {a, b}):
                link.cut = False
                held, link.held = link.held, []
                for epoch in held:
                    self.post(src, dst, epoch, CLOSE)

    def delay(self, a: str, b: str, seconds: float, jitter_s: float = 0.0) -> None:
        for link in (self._link(a, b), self._link(b, a)):
            link.delay_s, link.jitter_s = seconds, jitter_s

    def drop(self, a: str, b: str, probability: float) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"a probability, not {probability}")
        self._link(a, b).drop = self._link(b, a).drop = probability

    def is_cut(self, a: str, b: str) -> bool:
        return self._link(a, b).cut

    # ---- what the transports use ------------------------------------------------------------------------------

    def attach(self, transport: MemoryTransport) -> None:
        self._members[transport.address] = transport
        self._inbox[transport.address] = []

    def detach(self, transport: MemoryTransport) -> None:
        if self._members.get(transport.address) is transport:
            del self._members[transport.address]
            self.lost += sum(1 for event in self._inbox.pop(transport.address, []) if event[4] == MESSAGE)

    def dial(self, src: str, dst: str) -> int | None:
        """A new connection's number, announced to `dst`; None when the dial fails (not running, unknown, cut)."""
        peer = self._members.get(dst)
        if peer is None or not peer.knows(src) or self.is_cut(src, dst) or self.is_cut(dst, src):
            return None
        epoch = next(self._epochs)
        self.post(src, dst, epoch, CONNECT)
        return epoch

    def post(self, src: str, dst: str, epoch: int, kind: str, data: bytes | None = None) -> None:
        link = self._link(src, dst)
        if kind == MESSAGE:
            self.sent += 1
            if link.drop and link.rng.random() < link.drop:
                self.lost += 1
                return
        if link.cut and kind == CLOSE:
            link.held.append(epoch)
            return
        if link.cut or dst not in self._members:
            self.lost += kind == MESSAGE
            return
        jitter = link.jitter_s * link.rng.random() if link.jitter_s else 0.0
        link.last_at = at = max(self.clock() + link.delay_s + jitter, link.last_at)
        heapq.heappush(self._inbox[dst], (at, next(self._order), src, epoch, kind, data))

    def due(self, dst: str) -> Iterator[tuple[str, int, str, bytes | None]]:
        """Pops what has arrived at `dst` by now, in order; what arrives while this runs waits for the next call."""
        inbox = self._inbox.get(dst, [])
        now = self.clock()
        ready = []
        while inbox and inbox[0][0] <= now:
            ready.append(heapq.heappop(inbox))
        for _at, _order, src, epoch, kind, data in ready:
            yield src, epoch, kind, data


class MemoryTransport(Transport):
    """pysyncobj's Transport over a MemoryNetwork (see the module docstring for the connection model). It reads
    its inbox in an on-tick callback, as TCPTransport reads its sockets during SyncObj's tick."""

    def __init__(self, syncObj, selfNode, otherNodes, network: MemoryNetwork,
                 barrier: Callable[[], None] | None = None) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        if selfNode is None:
            raise ValueError("the harness models voting members only (no read-only nodes)")
        self._syncObj = syncObj
        self.address: str = selfNode.address
        self._nodes = {node.address: node for node in otherNodes}
        self._links: dict[str, int] = {}  # peer address -> the connection (epoch) this side holds
        self._heard: dict[str, float] = {}  # peer address -> when something last came on that connection
        self._next_dial: dict[str, float] = {}
        self._network = network
        self._barrier = barrier
        network.attach(self)
        syncObj.addOnTickCallback(self._on_tick)

    @classmethod
    def factory(cls, network: MemoryNetwork) -> TransportFactory:
        """What RaftNode's `transport` takes."""
        return lambda barrier: functools.partial(cls, network=network, barrier=barrier)

    def knows(self, address: str) -> bool:
        return address in self._nodes

    def connected(self) -> set[str]:
        return set(self._links)

    # ---- Transport ----------------------------------------------------------------------------------------------

    def addNode(self, node) -> None:
        self._nodes[node.address] = node

    def dropNode(self, node) -> None:
        if node.address in self._links:
            self._close(node.address, tell_peer=True)
        self._nodes.pop(node.address, None)

    def send(self, node, message) -> bool:
        peer = node.address
        epoch = self._links.get(peer)
        if epoch is None:
            return False
        if self._network.clock() - self._heard[peer] > self._syncObj.conf.connectionTimeout:
            self._close(peer, tell_peer=True)
            return False
        if self._barrier is not None:
            self._barrier()  # as BoundedTransport: nothing leaves before the journal's entries are written
        self._network.post(self.address, peer, epoch, MESSAGE, codec.dumps(message))
        return True

    def destroy(self) -> None:
        for peer, epoch in sorted(self._links.items()):
            self._network.post(self.address, peer, epoch, CLOSE)
        self._links.clear()
        self._network.detach(self)

    # ---- the tick -----------------------------------------------------------------------------------------------

    def _on_tick(self) -> None:
        if self._barrier is not None:
            self._barrier()  # once a tick, as BoundedTransport: a one-member group commits without sending
        now = self._network.clock()
        for peer in sorted(self._nodes):
            if peer in self._links or peer > self.address or now < self._next_dial.get(peer, -math.inf):
                continue
            self._next_dial[peer] = now + self._syncObj.conf.connectionRetryTime
            epoch = self._network.dial(self.address, peer)
            if epoch is not None:
                self._open(peer, epoch)
        for src, epoch, kind, data in self._network.due(self.address):
            self._receive(src, epoch, kind, data)

    def _receive(self, src: str, epoch: int, kind: str, data: bytes | None) -> None:
        if kind == CONNECT:
            if src in self._nodes:
                self._open(src, epoch)
            else:  # no longer a member here (BoundedTransport refuses the handshake)
                self._network.post(self.address, src, epoch, CLOSE)
        elif kind == CLOSE:
            if self._links.get(src) == epoch:
                self._close(src, tell_peer=False)
        elif self._links.get(src) != epoch:
            self._network.lost += 1  # sent on a connection this side has closed since: TCP answers with a reset
            self._network.post(self.address, src, epoch, CLOSE)
        else:
            self._heard[src] = self._network.clock()
            message = codec.loads(data)
            check_message(message, self._syncObj._idToMethod)  # raises: an honest member sent what TCP would refuse
            self._onMessageReceived(self._nodes[src], message)

    def _open(self, peer: str, epoch: int) -> None:
        self._links[peer] = epoch
        self._heard[peer] = self._network.clock()
        self._onNodeConnected(self._nodes[peer])

    def _close(self, peer: str, tell_peer: bool) -> None:
        epoch = self._links.pop(peer)
        if tell_peer:
            self._network.post(self.address, peer, epoch, CLOSE)
        self._onNodeDisconnected(self._nodes[peer])


def _no_datasync(fd: int) -> None:
    """raft.journal's fdatasync while a non-durable Cluster is open: the records are written, not synced."""


class Cluster:
    """`size` RaftNode members over one MemoryNetwork, data under `root`/n<i>. Use as a context manager (or call
    close()). Members are ticked in address order, all at the same fake time, once per `step_s`."""

    _open: Cluster | None = None

    def __init__(self, root: Path, size: int = 3, *, seed: int = 0, timing: RaftTiming = RaftTiming(),
                 prevote: bool = True, step_s: float = 0.01, durable: bool = False, start: bool = True) -> None:
        if Cluster._open is not None:
            raise RuntimeError("another Cluster is open: the clock it installs is process-wide")
        if step_s <= 0:
            raise ValueError("step_s must be positive")
        self.root = root
        self.addresses = [f"n{i}:{7000 + i}" for i in range(size)]  # "n0" < "n1" < ...: n1 dials n0
        self.timing = timing
        self.prevote = prevote
        self.step_s = step_s
        self.clock = FakeClock()
        self.network = MemoryNetwork(self.clock, seed)
        self.nodes: dict[str, RaftNode | None] = dict.fromkeys(self.addresses)
        self.steps = 0
        self.history: list[tuple[float, str, int, str | None]] = []  # (time, member, term, leader) on each change
        self._seen: dict[str, tuple[int, str | None]] = {}
        self._hooks: list[Callable[[], None]] = []
        self._saved = (pso_syncobj.monotonicTime, raft_prevote.monotonic_time, pso_syncobj.random,
                       raft_journal._datasync)
        Cluster._open = self
        pso_syncobj.monotonicTime = self.clock
        raft_prevote.monotonic_time = self.clock
        pso_syncobj.random = random.Random(f"{seed}:elections")
        if not durable:
            raft_journal._datasync = _no_datasync
        try:
            if start:
                for address in self.addresses:
                    self.start(address)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stops every member and gives the process its clock back; safe to call twice."""
        if Cluster._open is not self:
            return
        try:
            for address in self.addresses:
                if self.nodes[address] is not None:
                    self.stop(address)
        finally:
            (pso_syncobj.monotonicTime, raft_prevote.monotonic_time, pso_syncobj.random,
             raft_journal._datasync) = self._saved
            Cluster._open = None

    # ---- members ------------------------------------------------------------------------------------------------

    def address(self, which: int | str | RaftNode) -> str:
        if isinstance(which, RaftNode):
            return which.address
        return self.addresses[which] if isinstance(which, int) else which

    def __getitem__(self, which: int | str) -> RaftNode:
        node = self.nodes[self.address(which)]
        if node is None:
            raise KeyError(f"{self.address(which)} is stopped")
        return node

    def start(self, which: int | str, **kwargs: Any) -> RaftNode:
        """Starts a member on its data dir (a restart reads its journal back); kwargs go to RaftNode."""
        address = self.address(which)
        if self.nodes[address] is not None:
            raise RuntimeError(f"{address} is running")
        index = self.addresses.index(address)
        node = RaftNode(address, [a for a in self.addresses if a != address], self.root / f"n{index}", "",
                        self.timing, auto_tick=False, prevote=self.prevote,
                        transport=MemoryTransport.factory(self.network), **kwargs)
        self.nodes[address] = node
        return node

    def stop(self, which: int | str | RaftNode) -> None:
        """Stops a member as a killed process would go: its peers see its connections close."""
        address = self.address(which)
        node, self.nodes[address] = self.nodes[address], None
        if node is None:
            raise RuntimeError(f"{address} is not running")
        node.close()
        self._seen.pop(address, None)

    def restart(self, which: int | str | RaftNode, **kwargs: Any) -> RaftNode:
        address = self.address(which)
        self.stop(address)
        return self.start(address, **kwargs)

    @property
    def running(self) -> list[RaftNode]:
        return [n for n in self.nodes.values() if n is not None]

    def others(self, node: RaftNode) -> list[RaftNode]:
        return [n for n in self.running if n is not node]

    # ---- time ---------------------------------------------------------------------------------------------------

    def on_step(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Runs `hook` after every step (a load generator); returns it, for remove_hook."""
        self._hooks.append(hook)
        return hook

    def remove_hook(self, hook: Callable[[], None]) -> None:
        self._hooks.remove(hook)

    def step(self) -> None:
        """Moves the clock one step on and ticks every running member once, in address order."""
        self.clock.advance(self.step_s)
        self.steps += 1
        for node in self.running:
            node.tick(0.0)
        for node in self.running:
            status = node.status()
            seen = (status["term"], status["leader"])
            if self._seen.get(node.address) != seen:
                self._seen[node.address] = seen
                self.history.append((self.elapsed_s, node.address, *seen))
        for hook in list(self._hooks):
            hook()

    def run_for(self, seconds: float) -> None:
        for _ in range(math.ceil(round(seconds / self.step_s, 9))):
            self.step()

    def run_until(self, condition: Callable[[], Any], what: str, limit_s: float = 30.0) -> Any:
        """Steps until `condition()` is truthy (checked before each step) and returns its value; fails after
        `limit_s` fake seconds."""
        for _ in range(math.ceil(round(limit_s / self.step_s, 9)) + 1):
            value = condition()
            if value:
                return value
            self.step()
        raise AssertionError(f"not within {limit_s} fake seconds: {what}; members: {self.describe()}")

    @property
    def elapsed_s(self) -> float:
        return self.clock() - START_S

    # ---- what tests ask ---------------------------------------------------------------------------------------

    def describe(self) -> list[dict]:
        return [{**n.status(), "connected": sorted(a for a, up in n.partners().items() if up)} for n in self.running]

    def terms(self) -> list[int]:
        return [n.status()["term"] for n in self.running]

    def leaders(self) -> list[RaftNode]:
        return [n for n in self.running if n.is_leader()]

    def settled(self, nodes: list[RaftNode] | None = None) -> RaftNode | None:
        """The leader, when exactly one of `nodes` (default: the running members) leads, all are ready and follow
        it, and all are connected to each other; else None."""
        nodes = self.running if nodes is None else nodes
        leaders = [n for n in nodes if n.is_leader()]
        if len(leaders) != 1:
            return None
        lead = leaders[0]
        if not all(n.is_ready() and n.leader() == lead.address for n in nodes):
            return None
        if not all(n.partners().get(m.address) for n in nodes for m in nodes if m is not n):
            return None
        return lead

    def stable_leader(self, nodes: list[RaftNode] | None = None, limit_s: float = 30.0) -> RaftNode:
        return self.run_until(lambda: self.settled(nodes), "one leader that every member follows", limit_s)

    def commit(self, cmd: Command, via: RaftNode | None = None, limit_s: float = 10.0) -> dict:
        """Proposes `cmd` (to the leader unless `via`) and runs until it is applied there; its result or error."""
        if via is None:
            via = self.stable_leader()
        future = via.propose(cmd)
        self.settle(future, limit_s)
        return future.result(timeout=0)

    def settle(self, future: Future, limit_s: float = 10.0) -> Future:
        self.run_until(future.done, "the proposal to resolve", limit_s)
        return future
