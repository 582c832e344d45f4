"""The one interface every model backend implements; backends are found by file name.

A backend instance is used by one thread at a time (llama.cpp contexts are not thread-safe);
the engine in shards/engine.py owns that thread. `tokenize` and `token_bytes` read only the
vocabulary and may be called from any thread.

A backend that decodes several sequences together is a BatchedBackend as well: the engine then
runs up to `slots` generations at once through start/step/release (shards/slots.py).
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


class BatchedBackend(Backend, Protocol):
    slots: int  # sequences decoded together; n_ctx is each one's window

    def start(self, prompt: list[int], sampling: Sampling, seed: int, forced: tuple[int, ...] = (),
              resume_kv: bytes = b"", resume_kv_tokens: int = 0, checkpoints: bool = False):
        """A sequence in a free slot, with generate()'s meaning of the arguments. The sequence has
        `out` (tokens produced and not yet taken), `done` (no more to come) and `error`."""

    def step(self, sequences: list) -> None:
        """Advances the sequences together by one decode; new tokens land in each one's `out`."""

    def release(self, sequence) -> None:
        """Ends a sequence and frees its slot."""


def load_backend(kind: str, **options) -> Backend:
    """`kind` names a file: shards/backend_<kind>.py, which defines `open_backend(**options)`; "llama"
    with `slots` > 1 is shards/backend_llama_batch.py."""
    if not kind.isidentifier():
        raise ValueError(f"bad backend name {kind!r}")
    if kind == "llama" and options.get("slots", 1) > 1:
        kind = "llama_batch"  # several sequences in one context (continuous batching)
    try:
        module = importlib.import_module(f"shards.backend_{kind}")
    except ModuleNotFoundError as exc:
        if exc.name == f"shards.backend_{kind}":
            raise ValueError(f"unknown backend {kind!r}") from None
        raise
    return module.open_backend(**options)
