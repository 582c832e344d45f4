"""The one interface every model backend implements; backends are found by file name.

A backend instance is used by one thread at a time (llama.cpp contexts are not thread-safe);
the engine in shards/engine.py owns that thread. `tokenize` and `token_bytes` read only the
vocabulary and may be called from any thread.
"""

from __future__ import annotations

import importlib
from typing import Iterator, Protocol

from shards.types import Sampling, TokenStep


class Backend(Protocol):
    n_ctx: int
    bos_text: str
    eos_text: str

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """Text to token ids; special-token text (like <start_of_turn>) becomes special tokens."""

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a piece of UTF-8, not always a whole character)."""

    def is_end(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, end of turn)."""

    def chat_template(self) -> str | None:
        """The model file's own Jinja chat template, if it carries one."""

    def generate(self, prompt: list[int], sampling: Sampling, seed: int, forced: tuple[int, ...] = (),
                 resume_kv: bytes = b"", resume_kv_tokens: int = 0, checkpoints: bool = False) -> Iterator[TokenStep]:
        """Samples tokens after `prompt` until the caller stops iterating or the window is full.

        The first steps yield the `forced` tokens instead of what they sample (a resumed
        generation replaying what another replica already sent); sampling still runs at those
        steps, so a deterministic request continues exactly as it would have. A backend with a
        KV cache may attach checkpoints to steps when `checkpoints` is asked for, and restore
        `resume_kv` (covering `resume_kv_tokens` of prompt + forced) instead of replaying those.
        """

    def close(self) -> None:
        """Frees the model."""


def load_backend(kind: str, **options) -> Backend:
    """`kind` names a file: shards/backend_<kind>.py, which defines `open_backend(**options)`."""
    if not kind.isidentifier():
        raise ValueError(f"bad backend name {kind!r}")
    try:
        module = importlib.import_module(f"shards.backend_{kind}")
    except ModuleNotFoundError as exc:
        if exc.name == f"shards.backend_{kind}":
            raise ValueError(f"unknown backend {kind!r}") from None
        raise
    return module.open_backend(**options)
