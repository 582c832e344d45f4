"""A backend with no weights, for fast tests of everything around a model.

Tokens are bytes (ids 0-255) plus BOS (256) and EOS (257). It "generates" words from a fixed
list, chosen by a random generator seeded from the seed and the prompt, and ends with EOS after
`reply_tokens` tokens. `delay_s` slows each token down so tests can catch a generation mid-way.
`reply` replaces the words with a fixed text (say, a tool call for tests of what the gateway
makes of one). It has no vocabulary to apply a grammar to: Sampling.grammar is ignored.
`slots` > 1 lets the engine run that many generations at once, one token each per step in turn
(shards/slots.py): a stand-in for batching, for tests of admission and interleaving.
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Iterator

from shards.types import Sampling, TokenStep

BOS, EOS = 256, 257
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


class NullBackend:
    bos_text = "<bos>"
    eos_text = "<eos>"

    def __init__(self, n_ctx: int = 512, reply_tokens: int = 24, delay_s: float = 0.0,
                 reply: str | None = None, slots: int = 1) -> None:
        self.n_ctx = n_ctx
        self.slots = slots
        self.reply_tokens = reply_tokens if reply is None else len(reply.encode())
        self.delay_s = delay_s
        self.reply = reply

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return ([BOS] if add_bos else []) + list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def is_end(self, token: int) -> bool:
        return token == EOS

    def chat_template(self) -> str | None:
        return None

    def generate(self, prompt: list[int], sampling: Sampling, seed: int, forced: tuple[int, ...] = (),
                 resume_kv: bytes = b"", resume_kv_tokens: int = 0, checkpoints: bool = False) -> Iterator[TokenStep]:
        """(No KV cache here: checkpoints are never taken and a resume always replays.)"""
        rng = random.Random(f"{seed}:{len(prompt)}:{sum(prompt)}" if sampling.temperature > 0 else "greedy")
        text = self.reply.encode() if self.reply is not None else \
            " ".join(rng.choice(_WORDS) for _ in range(self.reply_tokens)).encode()
        for i in range(len(prompt), self.n_ctx):
            if self.delay_s:
                time.sleep(self.delay_s)
            k = i - len(prompt)
            token = forced[k] if k < len(forced) else text[k] if k < self.reply_tokens else EOS
            top = tuple((t, math.log(0.5 / (j + 1))) for j, t in enumerate((token, 32, 46)))
            yield TokenStep(token=token, logprob=math.log(0.5), top=top[: (sampling.top_logprobs or 0)])

    def close(self) -> None:
        """Nothing to free: there are no weights."""


def open_backend(n_ctx: int = 512, reply_tokens: int = 24, delay_s: float = 0.0, reply: str | None = None,
                 slots: int = 1, **_ignored) -> NullBackend:
    # A shard process's tests slow it down from outside (it is started by meshd with a HostSpec, which
    # carries no test knobs): QUORUM_NULL_DELAY_S seconds per token.
    delay_s = delay_s or float(os.environ.get("QUORUM_NULL_DELAY_S", "0") or 0)
    return NullBackend(n_ctx=n_ctx, reply_tokens=reply_tokens, delay_s=delay_s, reply=reply, slots=slots)
