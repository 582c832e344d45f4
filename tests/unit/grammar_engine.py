"""llama.cpp's own grammar engine, for tests: does a GBNF grammar accept a text?

The engine is llama.cpp's grammar sampler (`llama_sampler_init_grammar`) over the default model's
vocabulary, loaded vocab-only from a small GGUF holding just the model's metadata (copied from the
head of the model package's first chunk: no weights, so it loads in a blink). A text is fed one
byte at a time through the vocabulary's byte tokens (<0x00>..<0xFF>), so the check does not depend
on how a tokenizer would split it; the text is accepted when every byte is allowed and the
grammar may then end (an end-of-generation token is allowed).
"""

from __future__ import annotations

import ctypes
import importlib
import math
import struct
from pathlib import Path

from mesh.core.config import MeshConfig

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar types
_STRING, _ARRAY = 8, 9


def vocab_gguf(out: Path) -> Path:
    """A GGUF with the default model's metadata and no tensors, at `out`."""
    model = MeshConfig().models[0]
    module = importlib.import_module(model.package)
    if hasattr(module, "chunk_paths"):
        chunks = [Path(p) for p in module.chunk_paths()]
    else:
        from importlib import resources
        chunks = [Path(str(resources.files(model.package).joinpath(model.file)))]
    data = b""
    for chunk in chunks:  # the metadata is at the head of the file: a few MB
        data += chunk.read_bytes()
        if len(data) >= 64 * 1024 * 1024:
            break
    magic, version, _tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF", chunks[0]
    pos = 24
    for _ in range(n_kv):
        pos = _skip_string(data, pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        pos = _skip_value(data, pos + 4, kind)
    body = struct.pack("<4sIQQ", b"GGUF", version, 0, n_kv) + data[24:pos]
    body += b"\0" * (-len(body) % 32)
    out.write_bytes(body)
    return out


def _skip_string(data: bytes, pos: int) -> int:
    (n,) = struct.unpack_from("<Q", data, pos)
    return pos + 8 + n


def _skip_value(data: bytes, pos: int, kind: int) -> int:
    if kind == _STRING:
        return _skip_string(data, pos)
    if kind == _ARRAY:
        item, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item in _SIZES:
            return pos + n * _SIZES[item]
        for _ in range(n):
            pos = _skip_value(data, pos, item)
        return pos
    return pos + _SIZES[kind]


class GrammarEngine:
    def __init__(self, gguf: Path) -> None:
        import llama_cpp

        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
        assert self.model, "the vocabulary did not load"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.byte_token: dict[int, int] = {}
        for token in range(llama_cpp.llama_vocab_n_tokens(self.vocab)):
            text = llama_cpp.llama_vocab_get_text(self.vocab, token)
            if len(text) == 6 and text.startswith(b"<0x") and text.endswith(b">"):
                self.byte_token[int(text[3:5], 16)] = token
                if len(self.byte_token) == 256:
                    break
        assert len(self.byte_token) == 256, "the vocabulary has no byte tokens"
        self._one = llama_cpp.llama_token_data()

    def parses(self, grammar: str) -> bool:
        sampler = self.ll.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        self.ll.llama_sampler_free(sampler)
        return True

    def accepts(self, grammar: str, text: str) -> bool:
        sampler = self.ll.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert sampler, f"llama.cpp does not parse the grammar:\n{grammar}"
        try:
            for byte in text.encode():
                token = self.byte_token[byte]
                if not self._allows(sampler, token):
                    return False
                self.ll.llama_sampler_accept(sampler, token)
            return self._allows(sampler, self.eos)
        finally:
            self.ll.llama_sampler_free(sampler)

    def _allows(self, sampler, token: int) -> bool:
        one = self._one
        one.id, one.logit, one.p = token, 0.0, 0.0
        cur = self.ll.llama_token_data_array(data=ctypes.pointer(one), size=1, selected=-1, sorted=False)
        self.ll.llama_sampler_apply(sampler, ctypes.byref(cur))
        return math.isfinite(one.logit)

    def close(self) -> None:
        self.ll.llama_model_free(self.model)
