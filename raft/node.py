"""pysyncobj carrying our commands: journal, full dumps, password, membership.

The node is a thin driver around the pure state in raft/state.py. pysyncobj runs replicated
methods on its own tick thread; `propose` returns a concurrent Future that callers on an asyncio
loop wrap with asyncio.wrap_future (never a blocking call from the loop or from the tick thread).

Storage and network are ours, plugged into pysyncobj 0.3.17: the journal is raft/journal.py
(`raft.wal`: CRC per record, fsynced before anything depending on it is sent) and the transport is
raft/transport.py (frame cap, handshake deadline, per-address caps, EMFILE back-off). Nothing from the
network or the disk is unpickled: frames, log entries and the full dump (`raft.dump`, raft/snapshot.py) are
raft/codec.py's typed encoding (raft/wire.py replaces pysyncobj's pickle calls), every message is checked
against what pysyncobj sends, and pysyncobj's utility commands (status, add, remove, set_version, transfer)
and read-only peers are refused on the Raft port: membership changes are this class's methods, called on
the member itself.

Elections and compaction stay off the group's back: a member runs a pre-vote round before it raises its term
(raft/prevote.py, PreVoteSyncObj), so a restarted or partitioned member never deposes a healthy leader; and the
full dump is encoded and written in a background thread (raft/dump_writer.py), not on the tick thread that
sends heartbeats. Both subclass or hook private parts of pysyncobj 0.3.17 and refuse any other version.

With `tls` (raft/tls.py) the Raft port is mutual TLS with member certificates and pysyncobj's password (Fernet)
is off: who may connect is decided per connection from the node id in the peer's certificate and this node's
own replicated state (`member_authorizer`, unless the caller passes its own `authorize`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from raft import codec, snapshot
from raft import journal as raft_journal
from raft import wire as raft_wire
from raft.commands import BadCommand, Command, decode, encode
from raft.dump_writer import DumpWriter, finish_compaction
from raft.journal import SYNC_BATCH, DurableJournal, JournalPath, migrate_stock_journal
from raft.prevote import PreVoteSyncObj
from raft.state import MeshState, Rejected, apply
from raft.tls import RaftTls, member_authorizer
from raft.transport import BoundedTransport, TransportLimits

log = logging.getLogger("quorum.raft")

_FAIL_NAMES = {getattr(FAIL_REASON, n): n.lower() for n in dir(FAIL_REASON) if n.isupper()}


# Makes SyncObj's `transportClass` from the journal's barrier (its sync in batch mode, else None).
TransportFactory = Callable[[Callable[[], None] | None], Callable]


class ProposalFailed(RuntimeError):
    """The log did not take the command (no leader, queue full, dropped, not leader)."""


class CommandTooLarge(ValueError):
    """A command bigger than the transport carries (TransportLimits.max_command_bytes): never retryable."""


@dataclass(frozen=True)
class RaftTiming:
    heartbeat_s: float = 0.05
    election_min_s: float = 0.3
    election_max_s: float = 0.6
    connection_retry_s: float = 0.5
    leader_fallback_s: float = 0.6
    compaction_min_entries: int = 5000


class _Log(SyncObjConsumer):
    """The replicated object. Its `state` goes into the full dump through raft/dump_writer.py (written in the
    background) and comes back through `read_dump` (SyncObjConf.deserializer, raft/snapshot.py), never through
    pysyncobj's pickle."""

    def __init__(self, on_applied: Callable[[MeshState], None] | None) -> None:
        super().__init__()
        self.state = MeshState()
        self._on_applied_hook = on_applied

    def read_dump(self, path: str) -> tuple:
        state, last, prev, cluster = snapshot.read_dump(path)
        self.state = state
        return last, prev, cluster

    @replicated
    def submit(self, wire: dict) -> dict:
        try:
            self.state = apply(self.state, decode(wire))
        except (BadCommand, Rejected) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            # A command whose fields have the wrong types (a dict where a name belongs): apply is pure,
            # so every node fails alike; rejecting keeps the copies equal. Escaping would stop pysyncobj
            # applying anything after this entry (it retries it on every tick, on every node, forever).
            log.error("command %s rejected: applying it raised %r", str(wire)[:200], exc)
            return {"ok": False, "error": f"malformed command: {exc!r}"}
        if self._on_applied_hook is not None:
            self._on_applied_hook(self.state)
        return {"ok": True, "applied": self.state.applied}


class RaftNode:
    def __init__(self, self_address: str, partners: list[str], data_dir: Path, password: str,
                 timing: RaftTiming = RaftTiming(), auto_tick: bool = True,
                 on_applied: Callable[[MeshState], None] | None = None,
                 limits: TransportLimits = TransportLimits(), journal_sync: str = SYNC_BATCH,
                 prevote: bool = True, tls: RaftTls | None = None,
                 transport: TransportFactory | None = None) -> None:
        """`journal_sync`: "batch" (one fsync per tick and before any send) or "add" (one per write).
        `prevote=False` runs pysyncobj's stock elections (raft/prevote.py; benchmarks compare the two).
        `tls`: mutual TLS on the Raft port instead of the password's Fernet (then `password` is not used).
        `transport`: a network other than TCP (tests/raft_harness.py's in-memory one; never in production): called
        with the journal's barrier, which it must run before anything leaves, it returns SyncObj's
        `transportClass`. That network decides who is a member, so `password` may be empty and `tls` is refused."""
        if transport is not None and tls is not None:
            raise ValueError("`tls` configures the TCP transport; a custom `transport` brings its own network")
        if not password and tls is None and transport is None:
            raise ValueError("the Raft port needs TLS or a password: without either anyone may join the group")
        data_dir.mkdir(parents=True, exist_ok=True)
        raft_journal.install()
        raft_wire.install()
        self._ready = threading.Event()
        self._limits = limits
        self._prevote = prevote
        if tls is not None and tls.authorize is None:
            tls = dataclasses.replace(tls, authorize=member_authorizer(lambda: self._log.state, self._ready.is_set))
        self._tls = tls
        self._transport = transport
        self.dumps: DumpWriter | None = None  # the full dump's background writer, made in _start
        self.journal = DurableJournal(data_dir / "raft.wal", journal_sync)
        try:
            migrate_stock_journal(data_dir / "raft.journal", self.journal)
            snapshot.migrate_legacy_dump(data_dir / "raft.dump")
            self._obj = self._start(self_address, partners, data_dir, password, timing, auto_tick, on_applied)
        except BaseException:
            self.journal._destroy()
            if self.dumps is not None:
                self.dumps.close()
            raise
        self._on_tick: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._obj.addOnTickCallback(self._run_on_tick)
        log.info("raft node %s started (partners: %s)", self_address, ", ".join(partners) or "none")

    def _start(self, self_address: str, partners: list[str], data_dir: Path, password: str, timing: RaftTiming,
               auto_tick: bool, on_applied: Callable[[MeshState], None] | None) -> SyncObj:
        batch = self.journal.sync_mode == SYNC_BATCH
        barrier = self.journal.sync if batch else None
        if self._transport is not None:
            transport = self._transport(barrier)
        else:
            transport = BoundedTransport.factory(limits=self._limits, barrier=barrier, defer_writes=batch,
                                                 tls=self._tls)
        self._log = _Log(on_applied)
        conf = self._conf(data_dir, password, timing, auto_tick)
        conf.journalFile = JournalPath(self.journal)
        self.dumps = DumpWriter(conf.fullDumpFile, lambda: self._log.state)
        conf.serializer = self.dumps.serialize
        conf.serializeChecker = self.dumps.check
        conf.deserializer = self._read_dump
        self.address = self_address
        return PreVoteSyncObj(self_address, partners, conf=conf, consumers=[self._log], transportClass=transport,
                              prevote=self._prevote)

    def _read_dump(self, path: str) -> tuple:
        last, prev, cluster = self._log.read_dump(path)
        finish_compaction(self.journal, prev, last)
        return last, prev, cluster

    def _conf(self, data_dir: Path, password: str, timing: RaftTiming, auto_tick: bool) -> SyncObjConf:
        return SyncObjConf(
            password=None if self._tls is not None or not password else password,
            fullDumpFile=str(data_dir / "raft.dump"),
            dynamicMembershipChange=True,
            useFork=False,
            autoTick=auto_tick,
            appendEntriesUseBatch=False,
            appendEntriesPeriod=timing.heartbeat_s,
            raftMinTimeout=timing.election_min_s,
            raftMaxTimeout=timing.election_max_s,
            connectionTimeout=max(3.5, timing.election_max_s),
            connectionRetryTime=timing.connection_retry_s,
            leaderFallbackTimeout=timing.leader_fallback_s,
            logCompactionMinEntries=timing.compaction_min_entries,
            onReady=self._ready.set,
            maxBindRetries=0,
        )

    @property
    def state(self) -> MeshState:
        return self._log.state

    def tick(self, seconds: float = 0.0) -> None:
        """Drives the node by hand when auto_tick is off (tests)."""
        self._obj.doTick(seconds)

    def is_ready(self) -> bool:
        """True once this node has caught up with the log it found on disk or from the leader."""
        return self._ready.is_set()

    def is_leader(self) -> bool:
        return self._obj._isLeader()

    def leader(self) -> str | None:
        leader = self._obj._getLeader()
        return None if leader is None else str(leader.address if hasattr(leader, "address") else leader)

    def status(self) -> dict[str, Any]:
        raw = self._obj.getStatus()
        return {
            "self": self.address,
            "leader": self.leader(),
            "is_leader": self.is_leader(),
            "has_quorum": bool(raw.get("has_quorum")),
            "term": raw.get("raft_term"),
            "commit_index": raw.get("commit_idx"),
            "last_applied": raw.get("last_applied"),
            "log_length": raw.get("log_len"),
            "ready": self.is_ready(),
        }

    def propose(self, cmd: Command) -> Future:
        """Appends `cmd` to the log; the future resolves once it is committed and applied here."""
        future: Future = Future()

        def done(result: Any, error: int) -> None:
            if error != FAIL_REASON.SUCCESS:
                future.set_exception(ProposalFailed(_FAIL_NAMES.get(error, str(error))))
            elif not result.get("ok"):
                future.set_exception(Rejected(result.get("error", "rejected")))
            else:
                future.set_result(result)

        wire = encode(cmd)
        try:
            size = len(codec.dumps(wire))
        except codec.CodecError as exc:  # a field of a type the log does not carry (a bug of the caller)
            future.set_exception(Rejected(f"{type(cmd).__name__} cannot be logged: {exc}"))
            return future
        if size > self._limits.max_command_bytes:
            future.set_exception(CommandTooLarge(f"{type(cmd).__name__} is {size} bytes encoded; the Raft transport "
                                                 f"carries at most {self._limits.max_command_bytes}"))
            return future
        self._log.submit(wire, callback=done)
        return future

    def partners(self) -> dict[str, bool]:
        """The other voting members' Raft addresses, and whether this node is connected to each."""
        obj = self._obj
        return {node.address: obj.isNodeConnected(node) for node in obj.otherNodes}

    def add_partner(self, address: str) -> Future:
        """Adds a voting member (leader only, one change at a time); resolves when committed."""
        return self._membership(self._obj.addNodeToCluster, address)

    def remove_partner(self, address: str) -> Future:
        return self._membership(self._obj.removeNodeFromCluster, address)

    def transfer_leadership(self, address: str | None = None) -> Future:
        """Asks `address` (None: the most caught-up follower) to take over. Runs on the tick thread:
        pysyncobj's transferLeadership writes to the peer connection directly, unlike the calls
        above, which queue a command."""
        future: Future = Future()
        obj = self._obj

        def transfer() -> None:
            try:
                self._membership(obj.transferLeadership, address, future)
            except Exception as exc:  # a malformed address: the caller hears of it, the tick thread goes on
                future.set_exception(ProposalFailed(f"transfer to {address}: {exc!r}"))

        self._on_tick.put(transfer)
        return future

    def _run_on_tick(self) -> None:
        while True:
            try:
                call = self._on_tick.get_nowait()
            except queue.Empty:
                return
            call()

    def _membership(self, call: Callable, address: str | None, future: Future | None = None) -> Future:
        future = Future() if future is None else future

        def done(result: Any, error: int) -> None:
            if error == FAIL_REASON.SUCCESS:
                future.set_result(True)
            else:
                future.set_exception(ProposalFailed(_FAIL_NAMES.get(error, str(error))))

        call(address, callback=done)
        return future

    def close(self) -> None:
        """Stops the tick thread and closes the journal; safe to call twice."""
        if self._obj is None:
            return
        obj, self._obj = self._obj, None
        if obj.tick_thread_alive():
            obj.destroy_synchronous()
        else:
            obj.destroy()
        self.dumps.close()
        log.info("raft node %s stopped", self.address)
