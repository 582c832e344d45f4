"""The full dump (`raft.dump`) in raft/codec.py's typed encoding, through SyncObjConf.serializer/deserializer.

pysyncobj 0.3.17 writes the dump as gzip(pickle((consumers' data, last entry, entry before it, cluster))) and
unpickles it at start and whenever a snapshot arrives from the leader (pysyncobj/serializer.py). With a
custom serializer it calls `serializer(tmp_path, (last entry, entry before it, cluster nodes))` on the tick
thread after applying the last entry (so the consumer's state is the state at that entry) and
`deserializer(path)` for the same three values; consumers' data is then left to the serializer, and RaftNode's
_Log hands its MeshState over itself. The serializer is raft/dump_writer.py's, which encodes and writes in a
background thread (encode_dump, write_file here).

File: DUMP_MAGIC, u32 crc32 of the body, body = zlib(codec.dumps({"state", "last", "prev", "cluster"},
STATE)). The state is rebuilt only into the dataclasses of raft/records.py (STATE's registry).

A dump written by an earlier version (gzip of a pickle) is converted once, at start (`migrate_legacy_dump`,
before SyncObj reads it), with an unpickler that allows only raft.state's classes, set/frozenset and
pysyncobj's TCPNode; the old file is kept next to it as `<path>.pre-codec`. A legacy dump arriving later (from
the network) is refused like any other foreign file.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from typing import Any

from pysyncobj.node import TCPNode

from raft import codec
from raft import state as st
from raft.journal import convert_legacy_command, durable_replace, write_durably
from raft.profile import Battery, Gpu, MemberProfile
from raft.wire import check_entry

log = logging.getLogger("quorum.raft.snapshot")

DUMP_MAGIC = b"QRMDUMP1"
MAX_DUMP_BYTES = 1024 * 1024 * 1024  # inflated; a state this size would not fit a member's memory anyway
_CRC = struct.Struct("<I")

STATE_CLASSES: tuple[type, ...] = (st.MeshState, st.Member, st.Model, st.Shard, st.JoinToken, st.ApiKey,
                                   st.AdminCredential, st.Pin, st.Unplaced, st.Turn, st.Session, st.Split,
                                   MemberProfile, Gpu, Battery)
STATE = codec.Profile("state", records={cls.__name__: cls for cls in STATE_CLASSES})


class DumpCorrupt(RuntimeError):
    """A dump file that cannot be read as one (names the file)."""


def encode_dump(state: st.MeshState, last: Any, prev: Any, cluster: list[str]) -> bytes:
    payload = codec.dumps({"state": state, "last": tuple(last), "prev": tuple(prev), "cluster": sorted(cluster)},
                          STATE)
    body = zlib.compress(payload, 3)
    return DUMP_MAGIC + _CRC.pack(zlib.crc32(body)) + body


def decode_dump(raw: bytes, where: str = "dump") -> tuple[st.MeshState, tuple, tuple, list[str]]:
    if not raw.startswith(DUMP_MAGIC):
        kind = "an old pickled dump (converted only at start)" if raw[:2] == b"\x1f\x8b" else f"header {raw[:8]!r}"
        raise DumpCorrupt(f"{where}: not a Quorum dump ({kind})")
    try:
        (crc,) = _CRC.unpack_from(raw, len(DUMP_MAGIC))
        body = raw[len(DUMP_MAGIC) + _CRC.size:]
        if zlib.crc32(body) != crc:
            raise ValueError("bad CRC")
        inflate = zlib.decompressobj()
        payload = inflate.decompress(body, MAX_DUMP_BYTES)
        if inflate.unconsumed_tail:
            raise ValueError(f"inflates beyond {MAX_DUMP_BYTES} bytes")
        value = codec.loads(payload, STATE)
        if type(value) is not dict or set(value) != {"state", "last", "prev", "cluster"}:
            raise ValueError("not a dump record")
        check_state(value["state"])
        check_entry(value["last"])
        check_entry(value["prev"])
        cluster = value["cluster"]
        if type(cluster) is not list or not all(type(a) is str and ":" in a for a in cluster):
            raise ValueError("cluster is a list of addresses")
    except (ValueError, struct.error) as exc:
        raise DumpCorrupt(f"{where}: {exc}") from None
    return value["state"], value["last"], value["prev"], cluster


def write_file(path: str, raw: bytes) -> None:
    """Writes `raw` to `path` (created 0600 or truncated); the caller makes it durable (durable_replace)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read_dump(path: str) -> tuple[st.MeshState, tuple, tuple, list[TCPNode]]:
    with open(path, "rb") as f:
        raw = f.read(MAX_DUMP_BYTES + 1)
    state, last, prev, cluster = decode_dump(raw, path)
    return state, last, prev, [TCPNode(a) for a in cluster]


def check_state(state: Any) -> None:
    """The decoded MeshState holds what raft/state.py builds: maps of the right dataclasses."""
    if type(state) is not st.MeshState:
        raise ValueError(f"the state is a {type(state).__name__}, not a MeshState")
    maps = {"members": st.Member, "models": st.Model, "shards": st.Shard, "tokens": st.JoinToken,
            "api_keys": st.ApiKey, "admins": st.AdminCredential, "pins": st.Pin, "sessions": st.Session,
            "splits": st.Split}
    for name, cls in maps.items():
        value = getattr(state, name)
        if type(value) is not dict or not all(type(v) is cls for v in value.values()):
            raise ValueError(f"MeshState.{name} is a map to {cls.__name__}")
    if not all(type(s.turns) is tuple and all(type(t) is st.Turn for t in s.turns) for s in state.sessions.values()):
        raise ValueError("a session's turns are Turns")
    if not all(type(s.stages) is tuple and all(type(x) is tuple and len(x) == 2 for x in s.stages)
               for s in state.splits.values()):
        raise ValueError("a split's stages are (node id, layers) pairs")
    if not all(type(s.stage_states) is tuple and all(type(x) is tuple and len(x) == 3 for x in s.stage_states)
               for s in state.splits.values()):
        raise ValueError("a split's stage states are (node id, state, detail) triples")
    if type(state.unplaced) is not tuple or not all(type(u) is st.Unplaced for u in state.unplaced):
        raise ValueError("MeshState.unplaced is a tuple of Unplaced")
    if type(state.model_files) is not dict or not all(type(v) is frozenset for v in state.model_files.values()):
        raise ValueError("MeshState.model_files maps to frozensets")
    if type(state.replicas) is not dict or type(state.applied) is not int:
        raise ValueError("MeshState.replicas is a map and applied an int")
    counters = (state.sessions_evicted, state.session_turns_evicted, state.session_bytes_evicted)
    if not all(type(c) is int and c >= 0 for c in counters):
        raise ValueError("MeshState's eviction counters are non-negative ints")


# ---- the one-time conversion of an earlier version's dump -----------------------------------------------

LEGACY_DUMP_CLASSES: dict[tuple[str, str], Any] = {
    **{("raft.state", cls.__name__): cls for cls in STATE_CLASSES},  # pickles from before raft/records.py
    **{("raft.records", cls.__name__): cls for cls in STATE_CLASSES},
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **codec.LEGACY_NODE_CLASSES,
}


def migrate_legacy_dump(path: str | os.PathLike) -> bool:
    """Converts a dump written by an earlier version (gzip of a pickle) into this format, keeping the old file
    as `<path>.pre-codec`. Returns whether there was one. Raises DumpCorrupt (naming the file) when it cannot
    be read with the allowed classes or holds something else."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except FileNotFoundError:
        return False
    if head != b"\x1f\x8b":
        return False
    try:
        with gzip.open(path, "rb") as g:
            raw = g.read(MAX_DUMP_BYTES + 1)
        if len(raw) > MAX_DUMP_BYTES:
            raise ValueError(f"inflates beyond {MAX_DUMP_BYTES} bytes")
        data, last, prev, cluster = codec.legacy_loads(raw, LEGACY_DUMP_CLASSES)
        consumers = data[1:] if isinstance(data, list) else None
        if not consumers or not isinstance(consumers[0], dict) or "state" not in consumers[0]:
            raise ValueError("no consumer state in it")
        # Through the codec and back: only the known dataclasses, rebuilt by their constructors.
        state = codec.loads(codec.dumps(consumers[0]["state"], STATE), STATE)
        check_state(state)
        last = (convert_legacy_command(last[0]), last[1], last[2])
        prev = (convert_legacy_command(prev[0]), prev[1], prev[2])
        check_entry(last)
        check_entry(prev)
        addresses = [n.address if isinstance(n, TCPNode) else str(n) for n in cluster]
        new = encode_dump(state, last, prev, addresses)
    except Exception as exc:  # whatever an old or damaged pickle raises: a person decides, with the file named
        raise DumpCorrupt(f"{path}: an old (pickled) Raft dump that cannot be converted: {exc!r}; move it away to "
                          f"let this member fetch the state from its peers") from exc
    backup = path + ".pre-codec"
    os.replace(path, backup)
    try:
        write_durably(path, new)
    except BaseException:
        durable_replace(backup, path)
        raise
    log.warning("raft dump %s: converted from the old pickle format (state at entry %d); the old file is %s",
                path, last[1], backup)
    return True
