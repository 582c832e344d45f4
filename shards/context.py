"""The context role: a sentence encoder shard (embed) and the pure algorithm that fits a long
conversation into the reasoning model's window.

ContextShard serves `embed(inputs)` for /v1/embeddings and for fitting, locally or over gRPC (the
Embed RPC). An input is a text or a sequence of token ids of the encoder's vocabulary (OpenAI's
token-array input; the encoder adds its [CLS]/[SEP] around them as around a text's tokens). The
encoder runs on one worker thread; requests beyond the queue depth get QueueFull.

Fitting (`fit`) is deterministic: the same conversation, budget, cost function and vectors always
give the same result (ties are broken by position). It works on *exchanges*: a user message and
the messages after it up to the next user message, so kept turns still alternate as chat
templates expect. Costs are estimated reasoning-model tokens: `cost(text)` plus MESSAGE_OVERHEAD
per message for the template's turn markers. In order:

1. Always kept: system/developer messages and the newest message (the one being answered). If they
   alone exceed the budget nothing can help: CannotFit.
2. The newest exchanges verbatim, newest first, while they take at most RECENT_SHARE of what is
   left (contiguous: the first that does not fit ends the run); the newest one alone may take
   all that is left.
3. Of the earlier exchanges, the most relevant verbatim: an exchange's relevance is the highest
   cosine between any of its sentences and the query (the newest user message). Most relevant
   first, each one that still fits within RELEVANT_SHARE of what is left (a large one is skipped,
   smaller ones after it may still fit).
4. An extractive summary of the exchanges left out: their sentences scored by
   (relevance to the query + centrality: cosine to the mean of those sentences) / 2, best first
   while they fit in what is left, then written in their original order, each with its speaker,
   as one system message that says it is a summary.

The result: system messages, the summary, then the kept exchanges and the newest message in their
original order. The caller embeds `[query] + sentences(messages)` once (see `fit_inputs`) and may
call `fit` again with a smaller budget when its estimate proved too low.
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from shards.types import Message, NotReady, QueueFull, ShardKind

if TYPE_CHECKING:  # numpy is imported where vectors are used: meshd imports this module for its types (~13 MB)
    import numpy as np

log = logging.getLogger("quorum.context")

MAX_TEXTS = 2048  # texts in one embed call (OpenAI's limit for one embeddings request)


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # [texts, dimensions] float32, L2-normalised: dot product = cosine
    tokens: tuple[int, ...]  # tokens in each text, uncut; texts over n_ctx were embedded cut
    n_ctx: int


class ContextShard:
    """A context replica on this node: an encoder behind an async `embed`."""
    kind = ShardKind.ENCODER
    ready = True

    def __init__(self, role: str, model: str, encoder, queue_depth: int) -> None:
        self.role = role
        self.model = model
        self.encoder = encoder  # shards/backend_onnx.Encoder or anything with embed/n_ctx/dimensions
        self.n_ctx = encoder.n_ctx
        self.dimensions = encoder.dimensions
        self.queue_depth = queue_depth
        self._in_flight = 0
        self._closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"encoder-{model}")

    @property
    def busy(self) -> bool:
        return self._in_flight > 0

    @property
    def waiting(self) -> int:
        return max(0, self._in_flight - 1)

    async def embed(self, texts: Sequence[str | Sequence[int]]) -> Embedded:
        """Vectors for `texts` (texts or token ids) in order. Raises ValueError for a bad request
        (a token id outside the vocabulary names its input), QueueFull, NotReady."""
        if not texts or len(texts) > MAX_TEXTS:
            raise ValueError(f"embed takes 1 to {MAX_TEXTS} inputs; got {len(texts)}")
        texts = [t if isinstance(t, str) else check_token_ids(t, i, self.encoder) for i, t in enumerate(texts)]
        if self._closed:
            raise NotReady(f"the {self.role} shard of {self.model} has stopped")
        if self.busy and self.waiting >= self.queue_depth:
            raise QueueFull(self.queue_depth)
        self._in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            vectors, counts = await loop.run_in_executor(self._pool, self.encoder.embed, list(texts))
        finally:
            self._in_flight -= 1
        return Embedded(vectors=vectors, tokens=tuple(counts), n_ctx=self.n_ctx)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.encoder.close()


def check_token_ids(ids: Sequence[int], index: int, encoder) -> tuple[int, ...]:
    """`ids` as a tuple if they are token ids of `encoder`'s vocabulary (`encoder.vocab_size`);
    ValueError naming input `index` otherwise."""
    vocab = getattr(encoder, "vocab_size", None)
    if vocab is None:
        raise ValueError(f"input[{index}]: this encoder takes text only, not token ids")
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"input[{index}] must be a string or a non-empty list of token ids")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"input[{index}] holds the token id {bad}, outside this encoder's vocabulary "
                         f"(ids 0 to {vocab - 1})")
    return tuple(ids)


# -- fitting a conversation into a window ---------------------------------------------------------

SYSTEM_ROLES = ("system", "developer")
MESSAGE_OVERHEAD = 8  # template tokens around one message (turn markers, role name, newlines)
RECENT_SHARE = 0.4  # of the budget left after the fixed messages: the newest exchanges verbatim
RELEVANT_SHARE = 0.5  # of what is left then: the earlier exchanges most relevant to the query
MAX_SENTENCE_CHARS = 300  # longer sentences are cut at word boundaries into pieces this long
MAX_SENTENCES = 1024  # sentences considered for relevance and the summary (the newest ones)
SUMMARY_HEADER = ("Summary of the earlier conversation (sentences selected from it, in their "
                  "original order; the full turns are not shown):")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


class CannotFit(ValueError):
    """The system messages and the newest message alone are over the budget."""


@dataclass(frozen=True)
class Sentence:
    message: int  # index of its message in the conversation
    text: str


@dataclass(frozen=True)
class Fitted:
    messages: tuple[Message, ...]
    recent: tuple[int, ...]  # indices of messages kept as the newest exchanges
    relevant: tuple[int, ...]  # indices of earlier messages kept because they are relevant
    summarised: tuple[int, ...]  # indices of messages only the summary speaks for
    summary_sentences: int
    estimated: int  # estimated tokens of the fitted conversation


def split_sentences(text: str) -> list[str]:
    """Sentences (and lines) of `text`, each at most MAX_SENTENCE_CHARS."""
    out = []
    for part in _SENTENCE_END.split(text):
        part = " ".join(part.split())
        while len(part) > MAX_SENTENCE_CHARS:
            cut = part.rfind(" ", 0, MAX_SENTENCE_CHARS)
            cut = cut if cut > 0 else MAX_SENTENCE_CHARS
            out.append(part[:cut])
            part = part[cut:].strip()
        if part:
            out.append(part)
    return out


def query_of(messages: Sequence[Message]) -> str:
    """What the conversation is asking now: the newest user message (else the newest message)."""
    return next((m.content for m in reversed(messages) if m.role == "user"), messages[-1].content if messages else "")


def sentences(messages: Sequence[Message]) -> list[Sentence]:
    """The sentences of every message that fitting may drop (not system, not the newest); the
    newest MAX_SENTENCES of them."""
    out = [Sentence(i, s) for i, m in enumerate(messages[:-1]) if m.role not in SYSTEM_ROLES
           for s in split_sentences(m.content)]
    return out[-MAX_SENTENCES:]


def fit_inputs(messages: Sequence[Message]) -> tuple[list[Sentence], list[str]]:
    """(sentences, texts to embed): texts are the query then each sentence's text."""
    sents = sentences(messages)
    return sents, [query_of(messages), *(s.text for s in sents)]


def fit(messages: Sequence[Message], budget: int, cost: Callable[[str], int], sents: Sequence[Sentence],
        vectors: np.ndarray) -> Fitted:
    """The conversation shortened to at most `budget` estimated tokens (see the module doc).

    `vectors` are the embeddings of fit_inputs' texts: the query's first, then one per sentence.
    """
    import numpy as np

    if not messages:
        raise CannotFit("no messages")
    last = len(messages) - 1

    def mcost(i: int) -> int:
        return cost(messages[i].content) + MESSAGE_OVERHEAD

    system = [i for i in range(last) if messages[i].role in SYSTEM_ROLES]
    fixed = sum(mcost(i) for i in system) + mcost(last)
    if fixed > budget:
        raise CannotFit(f"the system messages and the newest message take about {fixed} tokens; "
                        f"the budget is {budget}")
    left = budget - fixed
    groups = _exchanges(messages, last)
    gcost = [sum(mcost(i) for i in g) for g in groups]

    recent, spent, cap = [], 0, int(left * RECENT_SHARE)
    for g in range(len(groups) - 1, -1, -1):
        if spent + gcost[g] > (left if not recent else cap):  # the newest exchange may take all that is left
            break
        recent.append(g)
        spent += gcost[g]
    left -= spent
    older = list(range(len(groups) - len(recent)))

    query = vectors[0].astype(np.float64)
    sent_vecs = vectors[1:].astype(np.float64)
    sims = sent_vecs @ query if len(sents) else np.zeros(0)
    best = {}
    for k, s in enumerate(sents):
        best[s.message] = max(best.get(s.message, -1.0), float(sims[k]))
    relevance = [max((best.get(i, -1.0) for i in groups[g]), default=-1.0) for g in older]

    relevant, spent, cap = [], 0, int(left * RELEVANT_SHARE)
    for g in sorted(older, key=lambda g: (-relevance[g], g)):
        if spent + gcost[g] <= cap:
            relevant.append(g)
            spent += gcost[g]
    left -= spent

    dropped = sorted(i for g in older if g not in relevant for i in groups[g])
    summary, chosen = _summary(messages, set(dropped), sents, sent_vecs, sims, left, cost)
    kept = sorted([i for g in (*recent, *relevant) for i in groups[g]] + [last])
    out = [messages[i] for i in system]
    if summary is not None:
        out.append(Message("system", summary))
    out.extend(messages[i] for i in kept)
    used = budget - left + (cost(summary) + MESSAGE_OVERHEAD if summary is not None else 0)
    return Fitted(messages=tuple(out), recent=tuple(sorted(i for g in recent for i in groups[g])),
                  relevant=tuple(sorted(i for g in relevant for i in groups[g])), summarised=tuple(dropped),
                  summary_sentences=chosen, estimated=used)


def _exchanges(messages: Sequence[Message], last: int) -> list[list[int]]:
    """Non-system messages before `last`, grouped: each group starts at a user message."""
    groups: list[list[int]] = []
    for i in range(last):
        if messages[i].role in SYSTEM_ROLES:
            continue
        if messages[i].role == "user" or not groups:
            groups.append([])
        groups[-1].append(i)
    return groups


def _summary(messages: Sequence[Message], dropped: set[int], sents: Sequence[Sentence], vecs: np.ndarray,
             sims: np.ndarray, room: int, cost: Callable[[str], int]) -> tuple[str | None, int]:
    """(the summary text or None, sentences in it) from the sentences of `dropped` messages."""
    import numpy as np

    pool = [k for k, s in enumerate(sents) if s.message in dropped]
    room -= cost(SUMMARY_HEADER) + MESSAGE_OVERHEAD
    if not pool or room <= 0:
        return None, 0
    centre = vecs[pool].mean(axis=0)
    norm = np.linalg.norm(centre)
    central = vecs[pool] @ (centre / norm) if norm > 0 else np.zeros(len(pool))
    score = (central + sims[pool]) / 2
    chosen, spent = [], 0
    for j in sorted(range(len(pool)), key=lambda j: (-score[j], pool[j])):
        line_cost = cost(_line(messages, sents[pool[j]])) + 1
        if spent + line_cost <= room:
            chosen.append(pool[j])
            spent += line_cost
    if not chosen:
        return None, 0
    lines = [_line(messages, sents[k]) for k in sorted(chosen)]
    return SUMMARY_HEADER + "\n" + "\n".join(lines), len(lines)


def _line(messages: Sequence[Message], s: Sentence) -> str:
    return f"- {messages[s.message].role}: {s.text}"
