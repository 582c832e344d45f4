"""Fitting a long conversation into the reasoning model's window: the gateway's side.

When a reasoning replica refuses a chat with ContextLengthExceeded (it carries the window n_ctx
and the prompt's token count; a replica on another node sends them in trailing metadata), the
gateway, instead of answering 400:

1. estimates reasoning-model tokens per character from that refusal (the prompt's tokens less the
   template's per-message overhead, over the characters of the messages), so a text costs
   ceil(characters x rate) tokens;
2. sets the budget: the window less room for the answer (max_tokens when the request sets it, else
   a quarter of the window up to ANSWER_RESERVE) less SAFETY of it for the estimate's error;
3. has a ready context replica embed the newest user message and every sentence that fitting may
   drop, in one Embed call;
4. runs shards.context.fit (system messages and the newest exchanges verbatim, the earlier
   exchanges most similar to the new message verbatim, an extractive summary of the rest) and
   opens the shortened conversation on a reasoning replica;
5. if that is still too long, scales the budget by (window - answer room) / the prompt tokens the
   replica reported and fits again with the same vectors, MAX_ATTEMPTS times in all; then the
   original 400 stands.

Without a ready context replica, or when the system messages and the newest message alone are
too long, the original 400 stands, with a note saying why. Each fitting is logged (INFO) with
what was kept; the shortened conversation itself at DEBUG.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Awaitable, Callable

from mesh.core.errors import ApiError, bad_request
from mesh.gateway.embeddings import embed
from raft.vocab import Role
from shards.context import MESSAGE_OVERHEAD, CannotFit, fit, fit_inputs
from shards.types import ContextLengthExceeded, GenerateRequest, Opened

log = logging.getLogger("quorum.context")

MAX_ATTEMPTS = 3
ANSWER_RESERVE = 512  # tokens kept for the answer when the request does not set max_tokens
SAFETY = 0.1  # of the budget, for the error of a characters-based estimate
MIN_RATE = 0.05  # tokens per character: never assume text is cheaper than this
_COUNTS = re.compile(r"maximum context length is (\d+) tokens.*?\((\d+) in the prompt", re.S)

Admit = Callable[[GenerateRequest], Awaitable[tuple[str, Opened]]]


async def fit_and_admit(gateway, request: GenerateRequest, refused: ContextLengthExceeded,
                        admit: Admit) -> tuple[GenerateRequest, str, Opened]:
    """(the shortened request, node id, its Opened) or the ApiError to answer.

    `admit` opens a request on a reasoning replica and raises ContextLengthExceeded when it does
    not fit (Admission.admit, asked to let that through)."""
    messages = request.messages
    n_ctx, prompt = _counts(refused)
    encoders = gateway.picker.ready_models(Role.CONTEXT)
    if not encoders or n_ctx <= 0 or len(messages) < 2:
        why = "no context replica is ready to shorten the conversation" if not encoders \
            else "the conversation cannot be shortened"
        raise _too_long(refused, why)
    answer = request.sampling.max_tokens or min(ANSWER_RESERVE, n_ctx // 4)
    room = n_ctx - answer
    chars = sum(len(m.content) for m in messages)
    rate = max(MIN_RATE, (prompt - MESSAGE_OVERHEAD * len(messages)) / max(chars, 1))

    def cost(text: str) -> int:
        return math.ceil(len(text) * rate)

    sents, texts = fit_inputs(messages)
    embedded = await embed(gateway, encoders[0], texts)
    budget = int(room * (1 - SAFETY))
    last: ContextLengthExceeded = refused
    for attempt in range(1, MAX_ATTEMPTS + 1):
        if budget <= 0:
            break
        try:
            fitted = fit(messages, budget, cost, sents, embedded.vectors)
        except CannotFit as exc:
            raise _too_long(refused, f"it cannot be shortened enough: {exc}") from None
        shorter = dataclasses.replace(request, messages=fitted.messages)
        try:
            node_id, opened = await admit(shorter)
        except ContextLengthExceeded as exc:
            last = exc
            reported = _counts(exc)[1]
            log.info("fitted conversation still too long (attempt %d: %d tokens, budget %d); shrinking",
                     attempt, reported, budget)
            budget = int(budget * room / max(reported, 1) * (1 - SAFETY)) if reported else budget // 2
            continue
        log.info("fitted a conversation of %d messages (%d prompt tokens, window %d) into %d tokens with %s "
                 "(attempt %d): %d newest and %d relevant messages verbatim, %d summarised in %d sentences",
                 len(messages), prompt, n_ctx, opened.prompt_tokens, encoders[0], attempt, len(fitted.recent),
                 len(fitted.relevant), len(fitted.summarised), fitted.summary_sentences)
        if log.isEnabledFor(logging.DEBUG):
            for m in fitted.messages:
                log.debug("fitted %s: %s", m.role, m.content)
        return shorter, node_id, opened
    raise _too_long(last, f"shortening it {MAX_ATTEMPTS} times did not make it fit")


def _counts(exc: ContextLengthExceeded) -> tuple[int, int]:
    """(n_ctx, prompt tokens) from a refusal: its fields, else its message (an older peer's)."""
    n_ctx, prompt = getattr(exc, "n_ctx", 0) or 0, getattr(exc, "prompt", 0) or 0
    if n_ctx and prompt:
        return n_ctx, prompt
    found = _COUNTS.search(str(exc))
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def _too_long(exc: ContextLengthExceeded, why: str) -> ApiError:
    return bad_request(f"{exc} (The mesh could not fit the conversation into the window: {why}.)", "messages",
                       "context_length_exceeded")
