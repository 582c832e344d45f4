"""A typed binary codec with a closed set of types: what the Raft layer writes to the network and the disk
instead of pickle.

A value is one tag byte and its body:

    0x00 None    0x01 False    0x02 True
    0x03 int     zigzag varint (at most MAX_INT_BYTES bytes)
    0x04 float   8 bytes, IEEE 754 little-endian
    0x05 str     varint length, UTF-8
    0x06 bytes   varint length, raw
    0x07 list    varint count, values
    0x08 tuple   varint count, values
    0x09 dict    varint count, key and value pairs (keys: None, bool, int, float, str, bytes, tuple)
    0x0a node    a pysyncobj TCPNode, as its "host:port" address (profile NODES and STATE only)
    0x0b frozenset  varint count, values (profile STATE only)
    0x0c record  class name (str body), varint count, (field name, value) pairs: a dataclass of the
                 registry the STATE profile is given, rebuilt through its constructor (profile STATE only)
    0x0d ints    a list (0) or tuple (1) of 8 or more ints in 64 bits, packed: one byte 0/1, one byte width
                 (1, 2, 4 or 8), varint count, count x width bytes little-endian signed (token ids)

`dumps` starts with FORMAT (two bytes) so that a pickle (b"\\x80...") or anything else is told apart at once.
`loads` builds only the types above, never looks a name up anywhere but the registry it is handed, bounds the
nesting (MAX_DEPTH) and checks every announced length against the bytes that are left, and raises CodecError
(a ValueError) on anything else. Nothing is ever called but the constructors of the registry's dataclasses.

`legacy_loads` reads pickles written by earlier versions of Quorum (journal records and full dumps), only at
start-up, from this member's own disk, and only with the classes it is given: see raft/journal.py and
raft/snapshot.py, which rewrite what they read in this codec once.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import io
import pickle
import struct
from typing import Any

from pysyncobj.node import TCPNode

FORMAT = b"Q\x01"
MAX_DEPTH = 32
MAX_INT_BYTES = 20  # ~139 bits: far beyond any index, term, size or timestamp

_NONE, _FALSE, _TRUE, _INT, _FLOAT, _STR, _BYTES, _LIST, _TUPLE, _DICT, _NODE, _FROZENSET, _RECORD, _INTS = range(14)
_DOUBLE = struct.Struct("<d")
_PACKED = {1: "b", 2: "h", 4: "i", 8: "q"}
_PACK_MIN = 8


class CodecError(ValueError):
    """Bytes that are not a value of the codec, or a value the codec does not carry."""


class Profile:
    """Which optional tags a codec call accepts. PLAIN: frames and commands. NODES: pysyncobj's own
    commands (membership changes name a TCPNode). STATE: the full dump (dataclasses of `records`)."""

    def __init__(self, name: str, nodes: bool = False, records: dict[str, type] | None = None) -> None:
        self.name = name
        self.nodes = nodes
        self.records = records or {}
        self._by_type = {cls: key for key, cls in self.records.items()}
        for cls in self.records.values():
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls!r} is not a dataclass")

    def record_name(self, value: Any) -> str | None:
        return self._by_type.get(type(value))


PLAIN = Profile("plain")
NODES = Profile("nodes", nodes=True)


def dumps(value: Any, profile: Profile = PLAIN) -> bytes:
    out = bytearray(FORMAT)
    _encode(value, out, profile, 0)
    return bytes(out)


def loads(data: bytes | bytearray | memoryview, profile: Profile = PLAIN) -> Any:
    data = bytes(data)
    if not data.startswith(FORMAT):
        what = "a pickle" if data[:1] == b"\x80" else f"header {data[:2]!r}"
        raise CodecError(f"not a Quorum codec value ({what})")
    reader = _Reader(data, len(FORMAT), profile)
    value = reader.value(0)
    if reader.pos != len(data):
        raise CodecError(f"{len(data) - reader.pos} bytes after the value")
    return value


# ---- encoding -------------------------------------------------------------------------------------------

def _varint(n: int, out: bytearray) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _encode(value: Any, out: bytearray, profile: Profile, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CodecError(f"nested deeper than {MAX_DEPTH}")
    if value is None:
        out.append(_NONE)
    elif value is True:
        out.append(_TRUE)
    elif value is False:
        out.append(_FALSE)
    elif isinstance(value, int):
        zigzag = (value << 1) if value >= 0 else ((-value << 1) - 1)
        if zigzag.bit_length() > 7 * MAX_INT_BYTES:
            raise CodecError(f"integer too large ({value.bit_length()} bits)")
        out.append(_INT)
        _varint(zigzag, out)
    elif isinstance(value, float):
        out.append(_FLOAT)
        out += _DOUBLE.pack(value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(_STR)
        _varint(len(raw), out)
        out += raw
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        out.append(_BYTES)
        _varint(len(raw), out)
        out += raw
    elif isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        if len(value) >= _PACK_MIN and _pack_ints(value, out):
            return
        out.append(_LIST if type(value) is list else _TUPLE)
        _varint(len(value), out)
        for item in value:
            _encode(item, out, profile, depth + 1)
    elif type(value) is dict:
        out.append(_DICT)
        _varint(len(value), out)
        for key, item in value.items():
            _encode(key, out, profile, depth + 1)
            _encode(item, out, profile, depth + 1)
    elif profile.nodes and type(value) is TCPNode:
        raw = value.address.encode("utf-8")
        out.append(_NODE)
        _varint(len(raw), out)
        out += raw
    elif profile.records and type(value) is frozenset:
        out.append(_FROZENSET)
        _varint(len(value), out)
        for item in sorted(value, key=repr):  # the same set gives the same bytes
            _encode(item, out, profile, depth + 1)
    elif profile.records and profile.record_name(value) is not None:
        name = profile.record_name(value).encode()
        fields = dataclasses.fields(value)
        out.append(_RECORD)
        _varint(len(name), out)
        out += name
        _varint(len(fields), out)
        for f in fields:
            raw = f.name.encode()
            _varint(len(raw), out)
            out += raw
            _encode(getattr(value, f.name), out, profile, depth + 1)
    else:
        raise CodecError(f"the Raft codec does not carry {type(value).__module__}.{type(value).__qualname__} "
                         f"(profile {profile.name})")


def _pack_ints(value: list | tuple, out: bytearray) -> bool:
    if not all(type(i) is int for i in value):
        return False
    low, high = min(value), max(value)
    for width, code in _PACKED.items():
        bound = 1 << (8 * width - 1)
        if -bound <= low and high < bound:
            break
    else:
        return False
    out += bytes((_INTS, 0 if type(value) is list else 1, width))
    _varint(len(value), out)
    out += struct.pack(f"<{len(value)}{code}", *value)
    return True


# ---- decoding -------------------------------------------------------------------------------------------

class _Reader:
    __slots__ = ("data", "pos", "profile")

    def __init__(self, data: bytes, pos: int, profile: Profile) -> None:
        self.data = data
        self.pos = pos
        self.profile = profile

    def _byte(self) -> int:
        if self.pos >= len(self.data):
            raise CodecError("truncated value")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def _varint(self) -> int:
        n = shift = 0
        for _ in range(MAX_INT_BYTES):
            b = self._byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
        raise CodecError("varint too long")

    def _count(self) -> int:
        n = self._varint()
        if n > len(self.data) - self.pos:  # every item takes at least one byte
            raise CodecError(f"count {n} beyond the {len(self.data) - self.pos} bytes left")
        return n

    def _raw(self) -> bytes:
        n = self._count()
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        return raw

    def _text(self) -> str:
        try:
            return self._raw().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"bad UTF-8: {exc}") from None

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CodecError(f"nested deeper than {MAX_DEPTH}")
        tag = self._byte()
        if tag == _NONE:
            return None
        if tag == _FALSE:
            return False
        if tag == _TRUE:
            return True
        if tag == _INT:
            z = self._varint()
            return (z >> 1) if not z & 1 else -((z + 1) >> 1)
        if tag == _FLOAT:
            if len(self.data) - self.pos < 8:
                raise CodecError("truncated float")
            (f,) = _DOUBLE.unpack_from(self.data, self.pos)
            self.pos += 8
            return f
        if tag == _STR:
            return self._text()
        if tag == _BYTES:
            return self._raw()
        if tag in (_LIST, _TUPLE):
            items = [self.value(depth + 1) for _ in range(self._count())]
            return items if tag == _LIST else tuple(items)
        if tag == _INTS:
            kind, width = self._byte(), self._byte()
            code = _PACKED.get(width)
            if kind not in (0, 1) or code is None:
                raise CodecError(f"bad packed ints ({kind}, {width})")
            count = self._varint()
            if count * width > len(self.data) - self.pos:
                raise CodecError(f"{count} packed ints beyond the {len(self.data) - self.pos} bytes left")
            items = struct.unpack_from(f"<{count}{code}", self.data, self.pos)
            self.pos += count * width
            return list(items) if kind == 0 else items
        if tag == _DICT:
            out = {}
            for _ in range(self._count()):
                key = self.value(depth + 1)
                if not _hashable(key):
                    raise CodecError(f"a {type(key).__name__} as a dict key")
                out[key] = self.value(depth + 1)
            return out
        if tag == _NODE and self.profile.nodes:
            address = self._text()
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise CodecError(f"bad node address {address[:100]!r}")
            return TCPNode(address)
        if tag == _FROZENSET and self.profile.records:
            items = [self.value(depth + 1) for _ in range(self._count())]
            if not all(_hashable(i) for i in items):
                raise CodecError("an unhashable member of a frozenset")
            return frozenset(items)
        if tag == _RECORD and self.profile.records:
            return self._record(depth)
        raise CodecError(f"unknown tag 0x{tag:02x} at offset {self.pos - 1} (profile {self.profile.name})")

    def _record(self, depth: int) -> Any:
        name = self._text()
        cls = self.profile.records.get(name)
        if cls is None:
            raise CodecError(f"unknown record type {name[:100]!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for _ in range(self._count()):
            key = self._text()
            if key not in fields or key in values:
                raise CodecError(f"{name}: unknown or repeated field {key[:100]!r}")
            values[key] = self.value(depth + 1)
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise CodecError(f"{name}: missing fields {missing}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"{name}: {exc}") from None


def _hashable(value: Any) -> bool:
    if isinstance(value, (list, dict)):
        return False
    if isinstance(value, tuple):
        return all(_hashable(v) for v in value)
    return True


# ---- the one-time reader of earlier versions' pickles ---------------------------------------------------

def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """What a protocol-2 pickle of `bytes` calls (_codecs.encode(str, "latin1")); no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 writes Python 2 names (__builtin__.set); map them as pickle's own find_class does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name} in an old pickle") from None


def legacy_loads(data: bytes, allowed: dict[tuple[str, str], Any]) -> Any:
    """Unpickles `data` (written by an earlier version of this member) allowing only the classes in
    `allowed` ((module, name) -> object). Raises pickle.UnpicklingError or another Exception on the rest."""
    return _RestrictedUnpickler(io.BytesIO(data), allowed).load()


LEGACY_NODE_CLASSES: dict[tuple[str, str], Any] = {("pysyncobj.node", "TCPNode"): TCPNode}
