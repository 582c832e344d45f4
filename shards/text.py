"""Turning sampled tokens into client text: incremental UTF-8 and stop sequences.

A token may end in the middle of a UTF-8 character, and a stop sequence may span tokens, so text
is released only when it can no longer change: bytes that do not yet form a character and any
suffix that could still become a stop sequence are held back.
"""

from __future__ import annotations

import codecs
from typing import Callable

from shards.types import Piece, TokenLogprob, TokenStep


class TextStream:
    def __init__(self, token_bytes: Callable[[int], bytes], stops: tuple[str, ...] = (),
                 with_logprobs: bool = False) -> None:
        self._token_bytes = token_bytes
        self._stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._with_logprobs = with_logprobs
        self._held = ""
        # (step, start, end): where each held token's text lies in _held
        self._steps: list[tuple[TokenStep, int, int]] = []
        self.stopped = False
        self.text = ""  # everything released so far

    def push(self, step: TokenStep) -> Piece | None:
        """Adds one token; returns the text that is now final, if any."""
        if self.stopped:
            return None
        start = len(self._held)
        self._held += self._decoder.decode(self._token_bytes(step.token))
        self._steps.append((step, start, len(self._held)))
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            return self._release(cut, drop_rest=True)
        return self._release(len(self._held) - self._unsafe_suffix())

    def finish(self) -> Piece | None:
        """Releases everything still held (the generation ended without a stop sequence)."""
        if self.stopped:
            return None
        self._held += self._decoder.decode(b"", final=True)
        return self._release(len(self._held), drop_rest=True)

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _unsafe_suffix(self) -> int:
        """Length of the longest suffix of the held text that starts some stop sequence."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if self._held.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int, drop_rest: bool = False) -> Piece | None:
        text = self._held[:upto]
        released, kept = [], []
        for step, start, end in self._steps:
            if start < upto:  # the token's text starts before the cut: it goes out with it
                released.append(step)
            else:
                kept.append((step, start - upto, end - upto))
        self._held = "" if drop_rest else self._held[upto:]
        self._steps = [] if drop_rest else kept
        if not text:
            return None
        self.text += text
        logprobs = tuple(self.logprob_of(s) for s in released) if self._with_logprobs else ()
        return Piece(text=text, tokens=tuple(s.token for s in released), logprobs=logprobs)

    def logprob_of(self, step: TokenStep) -> TokenLogprob:
        def entry(token: int) -> tuple[str, tuple[int, ...]]:
            raw = self._token_bytes(token)
            return raw.decode("utf-8", errors="replace"), tuple(raw)

        text, raw = entry(step.token)
        top = tuple((*entry(t)[:1], lp, entry(t)[1]) for t, lp in step.top)
        return TokenLogprob(token=text, logprob=step.logprob if step.logprob is not None else 0.0,
                            bytes=raw, top=top)
