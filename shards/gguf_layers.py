"""What a GGUF file says about its layers, read from its header: how many transformer blocks it has, what their
weights weigh, and what one block's KV cache costs per token. The placer splits a model across members by these
figures (mesh/cluster/split_planning.py); they are recorded with the model when it is registered.

A GGUF file (llama.cpp's gguf.h, version 2 or 3, little-endian) opens with a header: the magic, the version,
the tensor count, the metadata count; then the metadata (key, typed value), then each tensor's name, shape,
type and offset into the data section, which starts at the next multiple of `general.alignment` (32 by
default). A tensor's size is the distance to the next tensor's offset (the last one's, to the end of the file),
so no table of ggml's quantisation types is needed. Every count and length is bounded: a damaged or hostile
header raises GgufError, never allocates gigabytes or loops for long.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"
MAX_TENSORS = 1 << 16
MAX_METADATA = 1 << 16
MAX_ARRAY = 1 << 24  # a tokenizer's vocabulary is some 262k strings
MAX_STRING = 1 << 20
MAX_DIMS = 8
KV_CACHE_BYTES = 2  # llama.cpp's default KV cache type is f16
_BLOCK = re.compile(r"^blk\.(\d+)\.")
# value types (gguf.h gguf_type): size of the fixed-width ones
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GgufError(ValueError):
    """Not a GGUF file this reader understands (names the file and what was wrong)."""


@dataclass(frozen=True)
class LayerFacts:
    architecture: str
    layers: int  # transformer blocks (`{arch}.block_count`)
    layer_weights: tuple[int, ...]  # bytes of each block's tensors, block order
    other_weights: int  # bytes of every other tensor (embeddings, output, norms)
    kv_bytes_per_token_layer: int  # one block's K and V for one token, in an f16 cache

    @property
    def mean_layer_weights(self) -> int:
        return -(-sum(self.layer_weights) // self.layers) if self.layers else 0

    def layer_bytes(self, context_length: int) -> int:
        """What one block costs the member holding it: its weights (the mean, rounded up) and its KV cache for
        one sequence of `context_length` tokens."""
        return self.mean_layer_weights + context_length * self.kv_bytes_per_token_layer


class _Reader:
    def __init__(self, f: BinaryIO, where: str) -> None:
        self.f, self.where = f, where

    def fixed(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise GgufError(f"{self.where}: truncated header")
        return struct.unpack(fmt, raw)[0]

    def string(self) -> str:
        n = self.fixed("<Q")
        if n > MAX_STRING:
            raise GgufError(f"{self.where}: a string of {n} bytes in the header")
        raw = self.f.read(n)
        if len(raw) != n:
            raise GgufError(f"{self.where}: truncated header")
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.fixed("<Q")
        if n > MAX_STRING:
            raise GgufError(f"{self.where}: a string of {n} bytes in the header")
        self.f.seek(n, 1)

    def value(self, kind: int, keep: bool) -> Any:
        if kind in _FIXED:
            return self.fixed(_FIXED[kind])
        if kind == _STRING:
            return self.string() if keep else self.skip_string()
        if kind == _ARRAY:
            item, count = self.fixed("<I"), self.fixed("<Q")
            if count > MAX_ARRAY or item == _ARRAY:
                raise GgufError(f"{self.where}: an array of {count} items of type {item}")
            if item in _FIXED:  # a fixed-width array is skipped whole
                self.f.seek(count * struct.calcsize(_FIXED[item]), 1)
            else:
                for _ in range(count):
                    self.value(item, False)
            return None
        raise GgufError(f"{self.where}: unknown metadata type {kind}")


def read_layer_facts(path: Path) -> LayerFacts:
    """The layer figures of the GGUF at `path` (GgufError when it is not one, or has no block count)."""
    path = Path(path)
    where = str(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        r = _Reader(f, where)
        if f.read(4) != MAGIC:
            raise GgufError(f"{where}: not a GGUF file")
        version = r.fixed("<I")
        if version not in (2, 3):
            raise GgufError(f"{where}: GGUF version {version} (this reader knows 2 and 3)")
        tensors, entries = r.fixed("<Q"), r.fixed("<Q")
        if tensors > MAX_TENSORS or entries > MAX_METADATA:
            raise GgufError(f"{where}: {tensors} tensors and {entries} metadata entries")
        meta: dict[str, Any] = {}
        for _ in range(entries):
            key = r.string()
            meta[key] = r.value(r.fixed("<I"), keep=True)
        infos: list[tuple[str, int]] = []
        for _ in range(tensors):
            name = r.string()
            dims = r.fixed("<I")
            if dims > MAX_DIMS:
                raise GgufError(f"{where}: tensor {name!r} has {dims} dimensions")
            f.seek(8 * dims + 4, 1)  # the shape and the type: sizes come from the offsets
            infos.append((name, r.fixed("<Q")))
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0:
            raise GgufError(f"{where}: general.alignment is {align!r}")
        data_start = -(-f.tell() // align) * align
    return _facts(where, meta, infos, size - data_start)


def _facts(where: str, meta: dict[str, Any], infos: list[tuple[str, int]], data_bytes: int) -> LayerFacts:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GgufError(f"{where}: no general.architecture")
    layers = meta.get(f"{arch}.block_count")
    if not isinstance(layers, int) or not 0 < layers <= 4096:
        raise GgufError(f"{where}: no usable {arch}.block_count ({layers!r})")
    ordered = sorted(infos, key=lambda t: t[1])
    per_block = [0] * layers
    other = 0
    for i, (name, offset) in enumerate(ordered):
        end = ordered[i + 1][1] if i + 1 < len(ordered) else data_bytes
        if not 0 <= offset <= end <= data_bytes:
            raise GgufError(f"{where}: tensor {name!r} lies outside the data section")
        match = _BLOCK.match(name)
        if match and int(match.group(1)) < layers:
            per_block[int(match.group(1))] += end - offset
        else:
            other += end - offset
    heads = meta.get(f"{arch}.attention.head_count")
    heads_kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    embedding = meta.get(f"{arch}.embedding_length")
    head_dim = embedding // heads if isinstance(embedding, int) and isinstance(heads, int) and heads > 0 else 0
    key_length = meta.get(f"{arch}.attention.key_length", head_dim)
    value_length = meta.get(f"{arch}.attention.value_length", head_dim)
    if not all(isinstance(n, int) and n >= 0 for n in (heads_kv, key_length, value_length)):
        heads_kv = key_length = value_length = 0  # per-layer head counts (an array): KV left uncounted here
    kv = (key_length + value_length) * heads_kv * KV_CACHE_BYTES
    return LayerFacts(arch, layers, tuple(per_block), other, kv)
