"""What pysyncobj 0.3.17 may send, receive and log, checked and encoded with raft/codec.py instead of pickle.

pysyncobj pickles in three places besides the transport (which raft/bounded_connection.py owns):
- pysyncobj/syncobj.py: a log entry's command is one type byte (_COMMAND_TYPE: REGULAR 0, NO_OP 1,
  MEMBERSHIP 2, VERSION 3) and `pickle.dumps` of the replicated call ((funcID, args) or (funcID, args,
  kwargs) or funcID), of ['add'|'rem', node id, TCPNode], or of a version int; it `pickle.loads` them to apply
  them, to parse membership changes, and to rebuild an entry sent in 'transmission' pieces.
- pysyncobj/serializer.py: the full dump (RaftNode replaces it with raft/snapshot.py through
  SyncObjConf.serializer/deserializer; its in-memory fallback still names `pickle`).
- pysyncobj/journal.py: the stock FileJournal's term/vote file (read once, when raft/journal.py migrates it).

`install()` points those modules' `pickle`/`loads` names at CodecPickle, so every such byte string is the typed
codec (profile NODES: membership entries carry a TCPNode). `check_message` is the schema of every message a
member may send once its connection is set up; `check_command` the shape of a log entry's command.
"""

from __future__ import annotations

from typing import Any

import pysyncobj.journal as pso_journal
import pysyncobj.serializer as pso_serializer
import pysyncobj.syncobj as pso_syncobj
from pysyncobj.node import TCPNode
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

from raft import codec

PINNED_PYSYNCOBJ = "0.3.17"
REGULAR, NO_OP, MEMBERSHIP, VERSION = 0, 1, 2, 3
KEY_BYTES = 32  # pysyncobj's per-connection random key: os.urandom(32)


class MessageRefused(ValueError):
    """A message or log entry outside what pysyncobj sends: the connection that carried it is closed."""


class CodecPickle:
    """Stands in for the `pysyncobj.pickle` module inside pysyncobj.syncobj and pysyncobj.serializer."""

    @staticmethod
    def dumps(obj: Any, protocol: Any = None) -> bytes:
        return codec.dumps(obj, codec.NODES)

    @staticmethod
    def loads(data: Any) -> Any:
        return codec.loads(pso_journal.to_bytes(data), codec.NODES)

    @staticmethod
    def dump(obj: Any, file: Any, protocol: Any = None) -> None:
        file.write(codec.dumps(obj, codec.NODES))

    @staticmethod
    def load(file: Any) -> Any:
        return codec.loads(file.read(), codec.NODES)

    to_bytes = staticmethod(pso_journal.to_bytes)


def _legacy_meta_loads(data: bytes) -> Any:
    return codec.legacy_loads(pso_journal.to_bytes(data), codec.LEGACY_NODE_CLASSES)


def install() -> None:
    """Idempotent. Replaces module globals of exactly pysyncobj 0.3.17 (tests/unit/test_raft_codec.py pins
    the call sites)."""
    if PYSYNCOBJ_VERSION != PINNED_PYSYNCOBJ:
        raise RuntimeError(f"raft.wire replaces pickle inside pysyncobj {PINNED_PYSYNCOBJ}; found {PYSYNCOBJ_VERSION}:"
                           " re-check every pickle call in syncobj.py, serializer.py and journal.py")
    pso_syncobj.pickle = CodecPickle
    pso_serializer.pickle = CodecPickle
    pso_journal.loads = _legacy_meta_loads  # only MetaStorer.getMeta: the stock journal's term and vote


# ---- log entries ----------------------------------------------------------------------------------------

def check_command(command: Any, method_ids: Any = None, regular_only: bool = False) -> None:
    """Raises MessageRefused unless `command` is a log entry's command as pysyncobj builds it: NO_OP alone,
    REGULAR with a call of a known method (`method_ids`, when given), MEMBERSHIP naming a TCPNode, VERSION."""
    if not isinstance(command, bytes) or not command:
        raise MessageRefused(f"a command is non-empty bytes, not {type(command).__name__}")
    kind = command[0]
    if regular_only and kind != REGULAR:
        raise MessageRefused(f"command type {kind} is not accepted from a peer (only replicated calls are)")
    if kind == NO_OP:
        if len(command) != 1:
            raise MessageRefused("a no-op carries nothing")
        return
    try:
        body = codec.loads(command[1:], codec.NODES)
    except codec.CodecError as exc:
        raise MessageRefused(f"command type {kind}: {exc}") from None
    if kind == REGULAR:
        if type(body) is int:
            func, args, kwargs = body, (), {}
        elif type(body) is tuple and len(body) == 2:
            (func, args), kwargs = body, {}
        elif type(body) is tuple and len(body) == 3:
            func, args, kwargs = body
        else:
            raise MessageRefused("a replicated call is funcID, (funcID, args) or (funcID, args, kwargs)")
        if type(func) is not int or type(args) is not tuple or type(kwargs) is not dict \
                or not all(type(k) is str and not k.startswith("_") for k in kwargs):
            raise MessageRefused("a replicated call has an int id, a tuple of arguments and named arguments")
        if method_ids is not None and func not in method_ids:
            raise MessageRefused(f"no replicated method {func}")
    elif kind == MEMBERSHIP:
        if not (type(body) is list and len(body) == 3 and body[0] in ("add", "rem") and type(body[1]) is str
                and type(body[2]) is TCPNode and body[2].address == body[1]):
            raise MessageRefused("a membership change is ['add'|'rem', address, node]")
    elif kind == VERSION:
        if type(body) is not int or body < 0:
            raise MessageRefused("a code version is a non-negative int")
    else:
        raise MessageRefused(f"unknown command type {kind}")


def check_entry(entry: Any, method_ids: Any = None) -> None:
    if type(entry) not in (tuple, list) or len(entry) != 3 or type(entry[1]) is not int \
            or type(entry[2]) is not int or entry[1] < 1 or entry[2] < 0:
        raise MessageRefused("a log entry is (command bytes, index, term)")
    check_command(entry[0], method_ids)


# ---- messages -------------------------------------------------------------------------------------------

_INT = (int,)
_BOOL = (bool,)
_OPT_INT = (int, type(None))
# type -> {field: (allowed types, required)}; every other field is refused.
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "request_vote": {"term": (_INT, True), "last_log_index": (_INT, True), "last_log_term": (_INT, True)},
    "response_vote": {"term": (_INT, True)},
    "timeout_now": {"term": (_INT, True)},
    # raft/prevote.py's round (not pysyncobj's): asks for a term without taking it; the answer carries the
    # answerer's term.
    "pre_vote": {"term": (_INT, True), "round": (_INT, True), "last_log_index": (_INT, True),
                 "last_log_term": (_INT, True)},
    "pre_vote_response": {"round": (_INT, True), "term": (_INT, True), "granted": (_BOOL, True)},
    "append_entries": {"term": (_INT, True), "commit_index": (_INT, True), "entries": ((list,), False),
                       "prevLogIdx": (_INT, False), "prevLogTerm": (_INT, False), "transmission": ((str,), False),
                       "data": ((bytes,), False), "serialized": ((tuple, type(None), bool), False)},
    "next_node_idx": {"next_node_idx": (_INT, True), "reset": (_BOOL, True), "success": (_BOOL, True)},
    "apply_command": {"command": ((bytes,), True), "request_id": (_INT, False)},
    "apply_command_response": {"request_id": (_INT, True), "error": (_OPT_INT, False), "log_idx": (_INT, False),
                               "log_term": (_INT, False)},
}


def check_message(message: Any, method_ids: Any = None) -> None:
    """Raises MessageRefused unless `message` is one pysyncobj 0.3.17 (or raft/prevote.py) sends between voting
    members.
    Entries are checked (check_entry); a peer's apply_command may only carry a replicated call."""
    if type(message) is not dict or type(message.get("type")) is not str:
        raise MessageRefused(f"not a Raft message: {type(message).__name__}")
    kind = message["type"]
    schema = _SCHEMA.get(kind)
    if schema is None:
        raise MessageRefused(f"unknown message type {kind[:40]!r}")
    for name, value in message.items():
        if name == "type":
            continue
        spec = schema.get(name) if type(name) is str else None
        if spec is None:
            raise MessageRefused(f"{kind}: unexpected field {str(name)[:40]!r}")
        types, _ = spec
        if type(value) not in types or (type(value) is int and value < 0):
            raise MessageRefused(f"{kind}.{name}: {type(value).__name__} not allowed")
    missing = [n for n, (_, required) in schema.items() if required and n not in message]
    if missing:
        raise MessageRefused(f"{kind}: missing {missing}")
    if kind == "append_entries":
        _check_append_entries(message, method_ids)
    elif kind == "apply_command":
        check_command(message["command"], method_ids, regular_only=True)


def _check_append_entries(message: dict, method_ids: Any) -> None:
    has_prev = ("prevLogIdx" in message, "prevLogTerm" in message)
    if has_prev[0] != has_prev[1]:
        raise MessageRefused("append_entries: prevLogIdx and prevLogTerm go together")
    transmission = message.get("transmission")
    if transmission is not None:
        if transmission not in ("start", "process", "finish") or "data" not in message or not has_prev[0] \
                or "entries" in message:
            raise MessageRefused("append_entries: a transmission piece is start/process/finish with data")
    elif "data" in message:
        raise MessageRefused("append_entries: data outside a transmission")
    for entry in message.get("entries", ()):
        check_entry(entry, method_ids)
    serialized = message.get("serialized")
    if type(serialized) is tuple:
        if len(serialized) != 3 or type(serialized[0]) is not bytes or type(serialized[1]) is not bool \
                or type(serialized[2]) is not bool:
            raise MessageRefused("append_entries: a snapshot piece is (bytes, is first, is last)")
    elif serialized is True:
        raise MessageRefused("append_entries: serialized is a piece, None or False")


# Commands about one member that only that member proposes (a re-announce of its addresses and profile,
# its profile's changing facts, the state of its stage of a split model, the CA it made, its certificate's CA,
# whether it holds the CA key: else a member could clear another authority's flag, and that one's removal would
# owe no CA rotation). A join's AddMember (it carries a token) is the leader's own proposal and is never forwarded
# by a member either; so is the authority a joiner receives with the CA key (AddMember.authority).
_OWN_RECORD = frozenset({"add_member", "update_profile", "set_stage_state", "rotate_ca", "set_member_ca",
                         "set_authority"})


def proposer_may_send(peer_id: str, wire: dict) -> bool:
    """Whether member `peer_id` may forward the command `wire` (a command dict, raft/commands.py encode) to the
    leader: a member changes only its own record (issue 14: a member's addresses change only over a
    connection authenticated by that member's certificate)."""
    if wire.get("kind") not in _OWN_RECORD:
        return True
    return wire.get("node_id") == peer_id and wire.get("token_id") is None
