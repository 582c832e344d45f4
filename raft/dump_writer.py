"""The full dump written off the tick thread: pysyncobj 0.3.17's asynchronous-serializer hook.

pysyncobj compacts its log by calling `SyncObjConf.serializer(tmp_path, (last entry, entry before it, cluster))`
on the tick thread, right after applying the last entry, then renaming tmp_path over the dump; with
`serializeChecker` set it asks that checker every tick whether the dump is done (SERIALIZING, then SUCCESS or
FAILED once, then NOT_SERIALIZING), deletes the journal's entries up to the dump only on SUCCESS, starts no other
dump meanwhile, and sends no snapshot to a lagging follower meanwhile (pysyncobj/serializer.py, syncobj.py
__tryLogCompaction and __sendAppendEntries).

DumpWriter is both hooks. On the tick thread `serialize` only takes a reference to the state (MeshState is
immutable: apply() builds new objects, so the reference is a copy at that entry) and starts a thread, which
encodes, compresses, writes `<dump>.writing`, fsyncs and renames it over the dump (raft/journal.durable_replace)
and reports SUCCESS to the checker. pysyncobj's own rename of `<dump>.tmp` (which this writer never creates) is
handed to the writer by raft/journal.py's `replace_dump` and skipped. A snapshot arriving from the leader is
renamed over the dump through the same owner, under the writer's lock, and makes a dump still being written
obsolete (FAILED: pysyncobj keeps its journal and dumps again later), so an older state never replaces it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from pysyncobj.config import SERIALIZER_STATE

from raft import journal as raft_journal
from raft import snapshot
from raft.state import MeshState

log = logging.getLogger("quorum.raft.dump")


class DumpWriter:
    def __init__(self, dump_path: str, get_state: Callable[[], MeshState]) -> None:
        self.path = dump_path
        self._get_state = get_state
        self._lock = threading.Lock()
        self._generation = 0  # bumped whenever a snapshot from the leader replaces the dump
        self._thread: threading.Thread | None = None
        self._ok = False
        self.written = 0  # dumps written (tests, metrics)
        self.failed = 0
        self.last_write_s = 0.0  # how long the last dump took in the background
        raft_journal.own_dump(dump_path, self._replace)

    @property
    def busy(self) -> bool:
        """A dump is being written (or written and not yet reported to pysyncobj)."""
        return self._thread is not None

    # ---- SyncObjConf.serializer and .serializeChecker (tick thread) ---------------------------------------

    def serialize(self, tmp_path: str, data: tuple) -> None:
        last, prev, cluster = data
        if self._thread is not None:
            raise RuntimeError("a dump is already being written: pysyncobj asked for another before SUCCESS")
        state = self._get_state()
        addresses = [getattr(n, "address", None) or str(n) for n in cluster]
        self._ok = False
        self._thread = threading.Thread(target=self._write, args=(state, tuple(last), tuple(prev), addresses,
                                                                  self._generation),
                                        name=f"raft-dump {os.path.basename(self.path)}", daemon=True)
        self._thread.start()

    def check(self) -> int:
        thread = self._thread
        if thread is None:
            return SERIALIZER_STATE.NOT_SERIALIZING
        if thread.is_alive():
            return SERIALIZER_STATE.SERIALIZING
        thread.join()
        self._thread = None
        return SERIALIZER_STATE.SUCCESS if self._ok else SERIALIZER_STATE.FAILED

    # ---- the background thread ---------------------------------------------------------------------------

    def _write(self, state: MeshState, last: Any, prev: Any, cluster: list[str], generation: int) -> None:
        started = time.monotonic()
        tmp = self.path + ".writing"
        try:
            raw = snapshot.encode_dump(state, last, prev, cluster)
            snapshot.write_file(tmp, raw)
            with self._lock:
                if generation != self._generation:
                    os.unlink(tmp)
                    log.info("raft dump at entry %d dropped: a newer snapshot arrived meanwhile", last[1])
                    self.failed += 1
                    return
                raft_journal.durable_replace(tmp, self.path)
        except Exception:  # disk full, EIO, a state the codec refuses: logged; pysyncobj keeps its journal
            log.exception("raft dump at entry %d failed; the journal is kept and the dump retried later", last[1])
            self.failed += 1
            return
        self.last_write_s = time.monotonic() - started
        self.written += 1
        self._ok = True
        log.info("raft dump at entry %d written in the background: %d bytes in %.2f s", last[1], len(raw),
                 self.last_write_s)

    # ---- renames of the dump (raft/journal.replace_dump hands them here) ------------------------------------

    def _replace(self, src: str, dst: str) -> None:
        if src == dst + ".tmp":
            return  # pysyncobj's rename after `serialize`: the background thread renames its own file when done
        with self._lock:  # a snapshot from the leader (pysyncobj's `<dump>.1.tmp`)
            self._generation += 1
            raft_journal.durable_replace(src, dst)

    def close(self, timeout_s: float = 60.0) -> None:
        """Waits for a dump being written (bounded) and hands the dump's renames back to plain durable_replace."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("raft dump %s still being written after %.0f s at close", self.path, timeout_s)
        raft_journal.disown_dump(self.path, self._replace)


def finish_compaction(journal: Any, prev: Any, last: Any) -> int:
    """Completes a compaction a stop interrupted: drops the journal's entries before the dump's `prev` when the
    journal still holds the dump's two entries later on. Returns how many were dropped.

    pysyncobj truncates the journal only when the checker reports SUCCESS, a tick after the dump is in place; a
    member stopped (or crashed) in between restarts with the new dump and the old journal, and pysyncobj's
    __loadDumpFile clears a journal whose first two entries are not the dump's, losing every entry after the
    dump. Called by the deserializer, before pysyncobj compares them."""
    prev, last = tuple(prev), tuple(last)
    first = journal[0][1] if len(journal) else None
    if first is None or not first < prev[1] or len(journal) < prev[1] - first + 2:
        return 0  # the journal already starts at the dump (or before nothing of it): pysyncobj decides
    at = prev[1] - first
    if tuple(journal[at]) != prev or tuple(journal[at + 1]) != last:
        return 0  # other entries at those indexes: not this member's log of that dump; pysyncobj clears it
    journal.deleteEntriesTo(at)
    log.warning("raft journal: a compaction interrupted by a stop is completed (%d entries before the dump at "
                "entry %d dropped)", at, last[1])
    return at
