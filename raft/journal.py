"""A durable Raft journal for pysyncobj 0.3.17: a CRC and a length on every record, fsync before anything
that depends on a write is acknowledged, a torn or corrupt tail cut off at open.

pysyncobj's own FileJournal mmaps records without ever flushing them, saves term and vote without fsync and
carries no checksums (pysyncobj/journal.py). `DurableJournal` keeps its interface (the methods SyncObj calls:
add, clear, deleteEntriesFrom, deleteEntriesTo, __getitem__, __len__, _destroy, flush, setRaftCommitIndex,
getRaftCommitIndex, setCurrentTerm, getCurrentTerm, getVotedForNodeId, onOneSecondTimer) and reaches SyncObj
through `JournalPath` (see `install`).

Files, next to each other:
- `<path>`: MAGIC, then records `<u32 n><u32 crc32(n bytes + payload)><payload: u64 idx, u64 term, command>`.
  A command is pysyncobj's type byte and raft/codec.py's encoding of its body (raft/wire.py puts the codec
  where pysyncobj pickled). A journal of the previous format (LEGACY_MAGIC: pickled bodies) is converted once
  when it is opened, reading each body with an unpickler that allows only pysyncobj's TCPNode; the old file is
  kept as `<path>.pre-codec`.
  Appends are one pwrite each; deleting from the end is an ftruncate; deleting from the start (after a
  full dump) writes a new file, fsyncs it and renames it over the old one.
- `<path>.meta`: current term and vote, replaced atomically (tmp, fsync, rename, fsync dir) before
  setCurrentTerm returns, so before SyncObj sends a vote request or grant.
- `<path>.commit`: the commit index, rewritten at most once a second without fsync (a lost or corrupt
  one reads as 1: the member learns the commit index from the leader again).

Sync modes: "add" fsyncs inside every add/delete; "batch" only marks the journal dirty and relies on the
caller to run `sync()` before any acknowledgement leaves the process. RaftNode wires "batch" so: the
transport (raft/transport.py) calls `sync` before every socket write, and an on-tick callback calls it
once a tick (a one-member group commits without sending anything).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Callable

import pysyncobj.journal as pso_journal
import pysyncobj.serializer as pso_serializer
import pysyncobj.syncobj as pso_syncobj
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

from raft import codec
from raft import wire as raft_wire
from raft.wire import NO_OP, check_command

log = logging.getLogger("quorum.raft.journal")

PINNED_PYSYNCOBJ = "0.3.17"  # the hooks below replace module globals of exactly this version
MAGIC = b"QRMWAL02"  # command bodies in raft/codec.py's encoding
LEGACY_MAGIC = b"QRMWAL01"  # command bodies pickled (before raft/codec.py): converted once at open
_RECORD = struct.Struct("<II")  # payload length, crc32 over the length bytes and the payload
_ENTRY = struct.Struct("<QQ")  # idx, term
_META = struct.Struct("<I")  # crc32 of the JSON that follows
SYNC_EACH_ADD = "add"
SYNC_BATCH = "batch"


class JournalCorrupt(RuntimeError):
    """A file the journal cannot trust and must not guess about (term/vote, or a foreign header)."""


class JournalFailed(RuntimeError):
    """An fsync failed earlier. Linux may have dropped the dirty pages and would report the next fsync as a
    success, so this journal never confirms durability again: the member stops acknowledging (every send is
    behind `sync`) and needs a restart, which rereads what really is on disk."""


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: str, dst: str) -> None:
    """os.rename made durable: the new file's bytes, then the rename itself (its directory)."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def write_durably(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


_datasync = getattr(os, "fdatasync", os.fsync)


def encode_record(command: bytes, idx: int, term: int) -> bytes:
    payload = _ENTRY.pack(idx, term) + command
    length = struct.pack("<I", len(payload))
    return _RECORD.pack(len(payload), zlib.crc32(length + payload)) + payload


def scan(data: bytes) -> tuple[list[tuple[bytes, int, int]], list[int], int, str | None]:
    """Parses records after the header. Returns (entries, record offsets, end of the good prefix, why the
    rest was rejected or None). Indexes must run on by one and terms must not fall."""
    entries: list[tuple[bytes, int, int]] = []
    offsets: list[int] = []
    pos = len(MAGIC)
    while pos < len(data):
        if len(data) - pos < _RECORD.size:
            return entries, offsets, pos, f"short record header ({len(data) - pos} bytes)"
        length, crc = _RECORD.unpack_from(data, pos)
        body = pos + _RECORD.size
        if length < _ENTRY.size:
            return entries, offsets, pos, f"record length {length} too small"
        if length > len(data) - body:
            return entries, offsets, pos, f"short record ({len(data) - body} of {length} bytes)"
        payload = data[body:body + length]
        if zlib.crc32(data[pos:pos + 4] + payload) != crc:
            return entries, offsets, pos, "bad CRC"
        idx, term = _ENTRY.unpack_from(payload)
        if entries and (idx != entries[-1][1] + 1 or term < entries[-1][2]):
            return entries, offsets, pos, f"entry {idx} (term {term}) does not follow {entries[-1][1:]}"
        entries.append((payload[_ENTRY.size:], idx, term))
        offsets.append(pos)
        pos = body + length
    return entries, offsets, pos, None


def convert_legacy_command(command: bytes) -> bytes:
    """One pysyncobj command of an earlier version (type byte + pickle) in this format (type byte + codec)."""
    command = bytes(command)
    if command[:1] == bytes([NO_OP]):
        return command
    if command[1:2] != b"\x80":
        raise ValueError(f"not a pickled command (starts {command[:4]!r})")
    body = codec.legacy_loads(command[1:], codec.LEGACY_NODE_CLASSES)
    new = command[:1] + codec.dumps(body, codec.NODES)
    check_command(new)
    return new


class DurableJournal(pso_journal.Journal):
    def __init__(self, path: str | os.PathLike, sync_mode: str = SYNC_BATCH) -> None:
        if sync_mode not in (SYNC_EACH_ADD, SYNC_BATCH):
            raise ValueError(f"sync_mode must be {SYNC_EACH_ADD!r} or {SYNC_BATCH!r}, not {sync_mode!r}")
        self.path = os.fspath(path)
        self.sync_mode = sync_mode
        self.syncs = 0  # fsyncs of the record file, for tests and benchmarks
        self._dirty = False
        self._failed: OSError | None = None
        self._fd: int | None = None
        self._commit_index = self._load_commit_index()
        self._term, self._voted_for = self._load_meta()
        self._commit_saved = self._commit_index
        self._open()

    # ---- opening -----------------------------------------------------------------------------------

    def _open(self) -> None:
        self._convert_legacy()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            data = _read_all(fd)
            if len(data) < len(MAGIC) and MAGIC.startswith(data):  # new, or torn while being created
                os.ftruncate(fd, 0)
                _write_all(fd, MAGIC, 0)
                os.fsync(fd)
                fsync_dir(os.path.dirname(os.path.abspath(self.path)))
                data = MAGIC
            if not data.startswith(MAGIC):
                raise JournalCorrupt(f"{self.path}: not a Quorum Raft journal (header {data[:8]!r})")
            entries, offsets, end, why = scan(data)
            if why is not None:
                log.warning("journal %s: cut %d bytes at offset %d (%s); kept %d entries up to index %s; "
                            "the rest comes from the leader", self.path, len(data) - end, end, why, len(entries),
                            entries[-1][1] if entries else None)
                os.ftruncate(fd, end)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._entries = entries
        self._offsets = offsets
        self._end = end

    def _convert_legacy(self) -> None:
        """Rewrites a journal of pickled command bodies (LEGACY_MAGIC) in this format; keeps the old file."""
        try:
            with open(self.path, "rb") as f:
                if f.read(len(LEGACY_MAGIC)) != LEGACY_MAGIC:
                    return
                data = LEGACY_MAGIC + f.read()
        except FileNotFoundError:
            return
        entries, _offsets, end, why = scan(data)
        try:
            converted = [(convert_legacy_command(command), idx, term) for command, idx, term in entries]
        except Exception as exc:  # whatever an old or damaged pickle raises
            raise JournalCorrupt(f"{self.path}: an old (pickled) journal entry cannot be converted: {exc!r}; move "
                                 "the file away to let this member fetch the log from its peers") from exc
        new = MAGIC + b"".join(encode_record(*entry) for entry in converted)
        backup = self.path + ".pre-codec"
        with open(backup, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        write_durably(self.path, new)
        log.warning("journal %s: converted %d entries from the old pickle format%s; the old file is %s", self.path,
                    len(converted), f" (cut a bad tail at {end}: {why})" if why else "", backup)

    def _load_meta(self) -> tuple[int, str | None]:
        try:
            raw = Path(self.path + ".meta").read_bytes()
        except FileNotFoundError:
            return 0, None
        try:
            (crc,) = _META.unpack_from(raw)
            body = raw[_META.size:]
            if zlib.crc32(body) != crc:
                raise ValueError("bad CRC")
            meta = json.loads(body)
            term, voted_for = meta["term"], meta["voted_for"]
            if not isinstance(term, int) or term < 0 or not (voted_for is None or isinstance(voted_for, str)):
                raise ValueError(f"bad values {meta!r}")
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            # Guessing a term or a vote could let this member vote twice in one term: a person decides.
            raise JournalCorrupt(f"{self.path}.meta (current term and vote) is unreadable: {exc}") from exc
        return term, voted_for

    def _load_commit_index(self) -> int:
        try:
            raw = Path(self.path + ".commit").read_bytes()
            index, crc = struct.unpack("<QI", raw)
            if zlib.crc32(raw[:8]) == crc:
                return max(1, index)
            log.warning("journal %s: commit index file has a bad CRC; starting from 1", self.path)
        except FileNotFoundError:
            pass
        except struct.error:
            log.warning("journal %s: commit index file is %d bytes, not 12; starting from 1", self.path, len(raw))
        return 1

    # ---- writes ------------------------------------------------------------------------------------

    def add(self, command, idx: int, term: int) -> None:
        command = pso_journal.to_bytes(command)
        record = encode_record(command, idx, term)
        _write_all(self._fd, record, self._end)
        self._entries.append((command, idx, term))
        self._offsets.append(self._end)
        self._end += len(record)
        self._written()

    def clear(self) -> None:
        self._truncate(0)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if entryFrom < len(self._entries):
            self._truncate(max(0, entryFrom))

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drops the first `entryTo` entries (after a full dump holds them): a new file, fsynced, renamed over
        the old one. If that fails the journal keeps every entry (longer than SyncObj asked, never shorter)."""
        keep = self._entries[entryTo:]
        tmp = self.path + ".tmp"
        try:
            records = [encode_record(*entry) for entry in keep]
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            log.error("journal %s: could not compact (%r); keeping all %d entries", self.path, exc, len(self._entries))
            return
        try:
            offsets, pos = [], len(MAGIC)
            for record in records:
                offsets.append(pos)
                pos += len(record)
            _write_all(fd, MAGIC + b"".join(records), 0)
            os.fsync(fd)
            os.replace(tmp, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as exc:
            os.close(fd)
            log.error("journal %s: could not compact (%r); keeping all %d entries", self.path, exc, len(self._entries))
            return
        os.close(self._fd)
        self._fd = fd
        self._entries, self._offsets, self._end = keep, offsets, pos
        self._dirty = False

    def _truncate(self, entry: int) -> None:
        end = self._offsets[entry] if entry < len(self._offsets) else self._end
        os.ftruncate(self._fd, end)
        del self._entries[entry:]
        del self._offsets[entry:]
        self._end = end
        self._written()

    def _written(self) -> None:
        self._dirty = True
        if self.sync_mode == SYNC_EACH_ADD:
            self.sync()

    def sync(self) -> None:
        """Makes every record written so far durable; cheap when nothing was written since the last call."""
        if self._failed is not None:
            raise JournalFailed(f"{self.path}: an earlier fsync failed ({self._failed!r})") from self._failed
        if self._dirty and self._fd is not None:
            try:
                _datasync(self._fd)
            except OSError as exc:
                self._failed = exc
                log.critical("journal %s: fsync failed (%r); this member acknowledges nothing more until it is "
                             "restarted", self.path, exc)
                raise
            self.syncs += 1
            self._dirty = False

    @property
    def dirty(self) -> bool:
        return self._dirty

    def flush(self) -> None:
        self.sync()

    def _destroy(self) -> None:
        if self._fd is None:
            return
        try:
            self.sync()
        except (OSError, JournalFailed) as exc:  # already logged when it first failed
            log.error("journal %s: closing with unsynced records: %r", self.path, exc)
        self._save_commit_index()
        os.close(self._fd)
        self._fd = None

    # ---- reads -------------------------------------------------------------------------------------

    def __getitem__(self, item):
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    # ---- term, vote, commit index ------------------------------------------------------------------

    def setCurrentTerm(self, term: int, votedForNodeId) -> None:
        voted_for = None if votedForNodeId is None else str(votedForNodeId)
        if (term, voted_for) == (self._term, self._voted_for):
            return
        body = json.dumps({"term": term, "voted_for": voted_for}).encode()
        write_durably(self.path + ".meta", _META.pack(zlib.crc32(body)) + body)
        self._term, self._voted_for = term, voted_for

    def getCurrentTerm(self) -> int:
        return self._term

    def getVotedForNodeId(self) -> str | None:
        return self._voted_for

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        self._commit_index = raftCommitIndex

    def getRaftCommitIndex(self) -> int:
        last = self._entries[-1][1] if self._entries else 1
        return max(1, min(self._commit_index, last))

    def onOneSecondTimer(self) -> None:
        self._save_commit_index()

    def _save_commit_index(self) -> None:
        if self._commit_index == self._commit_saved:
            return
        raw = struct.pack("<Q", self._commit_index)
        tmp = self.path + ".commit.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(raw + struct.pack("<I", zlib.crc32(raw)))
            os.replace(tmp, self.path + ".commit")
        except OSError as exc:  # only a hint for the next start; the leader tells the real one
            log.warning("journal %s: could not save the commit index: %r", self.path, exc)
            return
        self._commit_saved = self._commit_index


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, pos = [], 0
    while pos < size:
        chunk = os.pread(fd, size - pos, pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    return b"".join(chunks)


def migrate_stock_journal(stock_path: str | os.PathLike, journal: DurableJournal) -> bool:
    """Copies a pysyncobj FileJournal (and its term/vote/commit meta) into an empty `journal` and renames the
    old files to `*.pre-wal`. Returns whether there was anything to migrate."""
    stock_path = os.fspath(stock_path)
    if len(journal) or not os.path.exists(stock_path):
        return False
    raft_wire.install()  # FileJournal reads its term/vote file with pysyncobj.journal.loads: restricted there
    old = pso_journal.FileJournal(stock_path)
    try:
        for i in range(len(old)):
            command, idx, term = old[i]
            journal.add(convert_legacy_command(command), idx, term)
        journal.sync()
        journal.setCurrentTerm(old.getCurrentTerm(), old.getVotedForNodeId())
        journal.setRaftCommitIndex(old.getRaftCommitIndex())
        journal._save_commit_index()
        count = len(old)
    finally:
        old._destroy()
    for suffix in ("", ".meta"):
        if os.path.exists(stock_path + suffix):
            os.replace(stock_path + suffix, stock_path + suffix + ".pre-wal")
    fsync_dir(os.path.dirname(os.path.abspath(stock_path)))
    log.info("journal: migrated %d entries from pysyncobj's %s to %s", count, stock_path, journal.path)
    return True


class JournalPath(str):
    """A `journalFile` value that carries the journal object SyncObj should use (see `install`)."""

    journal: DurableJournal

    def __new__(cls, journal: DurableJournal) -> JournalPath:
        value = super().__new__(cls, journal.path)
        value.journal = journal
        return value


_stock_create_journal = pso_journal.createJournal


def _create_journal(journalFile=None):
    if isinstance(journalFile, JournalPath):
        return journalFile.journal
    return _stock_create_journal(journalFile)


# Dump paths whose renames a background writer owns (raft/dump_writer.py): dump path -> its rename function.
_DUMP_OWNERS: dict[str, Callable[[str, str], None]] = {}
_DUMP_OWNERS_LOCK = threading.Lock()


def own_dump(dump_path: str, replace: Callable[[str, str], None]) -> None:
    with _DUMP_OWNERS_LOCK:
        _DUMP_OWNERS[os.path.abspath(dump_path)] = replace


def disown_dump(dump_path: str, replace: Callable[[str, str], None]) -> None:
    with _DUMP_OWNERS_LOCK:
        if _DUMP_OWNERS.get(os.path.abspath(dump_path)) == replace:  # bound methods: equal, not identical
            del _DUMP_OWNERS[os.path.abspath(dump_path)]


def replace_dump(src: str, dst: str) -> None:
    """pysyncobj's Serializer renames through this (`atomicReplace`): to the dump's owner when it has one (a
    background writer), else durable_replace."""
    with _DUMP_OWNERS_LOCK:
        owner = _DUMP_OWNERS.get(os.path.abspath(dst))
    if owner is None:
        durable_replace(src, dst)
    else:
        owner(src, dst)


def install() -> None:
    """Hooks this module into pysyncobj (idempotent): SyncObj builds its journal through
    `pysyncobj.syncobj.createJournal`, which now hands over the journal a JournalPath carries (any other
    journalFile gets pysyncobj's own journal), and the full-dump Serializer replaces its file through
    `pysyncobj.serializer.atomicReplace`, which is now `replace_dump`: the dump's background writer's
    (raft/dump_writer.py) or durable_replace, which fsyncs the file and its directory."""
    if PYSYNCOBJ_VERSION != PINNED_PYSYNCOBJ:
        raise RuntimeError(f"raft.journal hooks pysyncobj {PINNED_PYSYNCOBJ}; found {PYSYNCOBJ_VERSION}: re-check "
                           "syncobj.py (createJournal, journal calls before sends) and serializer.py (atomicReplace)")
    pso_syncobj.createJournal = _create_journal
    pso_serializer.atomicReplace = replace_dump
