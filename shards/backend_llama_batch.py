"""Continuous batching over llama.cpp: up to `slots` sequences decoded together in one context.

Each slot is one llama.cpp sequence (seq id = slot) with its own KV stream (`kv_unified = False`,
so a slot's cells sit in the same order as if it ran alone), its own sampler chain, grammar,
seed, logprobs, forced replay and KV checkpoints. One `step` decodes every active sequence (one token
per decoding sequence, a prompt chunk for prefilling ones) in as few llama_decode calls as exactness allows.

A sequence is a generator (`_sequence`) written like the single-context LlamaBackend.generate:
it yields `Feed` (tokens to decode next; the driver sends back the batch row of its logits) and
`TokenStep` (a token for the engine). Prompts are prefilled in CHUNK-token pieces aligned to
absolute positions, so a prompt is cut the same way whatever else is in the batch, and a step takes
one piece of a prompt per llama_decode call (at least PREFILLS prompts a step when that many wait,
so that prompts arriving together get their first token sooner): a long prompt delays running
streams by at most one piece per step, never freezes them.

Exactness (measured on this build, Gemma 3 270M, see tests/unit/test_batching_llama.py): with
llama.cpp's repacked CPU weights (`use_extra_bufts`, the default) a decode batch of 4 or more rows
runs the 4-row GEMM kernel and rows 0-2 of it get logits up to ~4.6 apart from the same row alone,
so greedy answers can differ. Without repacking (REPACK = False, here) rows are bit-identical to a
lone decode up to 7 decode rows, and with one prompt's piece beside them; pieces of two prompts in
one batch, or 8 or more decode rows, change some rows again (~0.04-2 in the logits). So a call holds
one prompt's piece at most, and a step decodes its sequences in llama_decode calls of at most EXACT_ROWS
(7) rows each, a prompt's piece beside each: with 8 or more slots a step is two or more calls,
each exact (measured: 12 concurrent greedy answers equal each run alone; in one call 6 of 12 differed).
Why 8: from 8 rows on, llama.cpp multiplies by the weights with llamafile's GEMM (tinyBLAS), which rounds
otherwise than the per-row dot products below 8. That GEMM is also what makes 8 rows cheap (measured on a
2-core x86 VM, 2 threads, one call: 1 row 11.4 ms, 4 rows 35 ms, 7 rows 63 ms, 8 rows 45 ms), so exactness
costs about 40% of the aggregate from 8 slots on; `exact = False` (node.batch_exact) decodes every
sequence in one call instead, and a greedy answer may then depend on what else runs beside it.

Order (measured): with one KV stream per slot, llama.cpp cuts a call into a separate pass over the weights
(a ubatch) wherever the sequence ids are not consecutive and ascending; slots 1..7 then 0 took 74 ms where
0..7 took 43. So each call lists its sequences by slot, and a new sequence takes the lowest free slot that
gives no less prefix reuse.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
from dataclasses import dataclass, field
from typing import Generator

import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp._logger import set_verbose

from shards.backend_llama import KV_EVERY, MAX_KV_BYTES, LlamaBackend, kv_cache_type
from shards.types import Sampling, TokenStep

log = logging.getLogger("quorum.llama")

CHUNK = 64  # prompt tokens per prefill piece, cut at multiples of CHUNK from position 0
N_BATCH = 512  # the most tokens one step decodes
REPACK = False  # repacked weights break batch invariance (see above)
EXACT_ROWS = 7  # decoding sequences per llama_decode call that keep batch invariance (see above)
PREFILLS = 4  # prompts a step takes a piece of, at least (one per call: never two prompts' pieces in one call)


@dataclass
class Feed:
    """Tokens a sequence needs decoded next; `logits`: it samples after the last of them."""
    tokens: list[int]
    logits: bool


@dataclass(eq=False)
class Sequence:
    slot: int
    gen: Generator
    feed: Feed | None = None
    pos: int = 0  # tokens of this sequence in its KV stream
    out: list[TokenStep] = field(default_factory=list)  # tokens produced since the last step
    done: bool = False  # it can produce no more (its window is full)
    error: Exception | None = None
    prompt: list[int] = field(default_factory=list)
    reused: int = 0  # prompt tokens whose KV was kept from the slot's previous prompt (not prefilled)


class LlamaBatchBackend(LlamaBackend):
    def __init__(self, path: str, n_ctx: int, threads: int, slots: int, kv_type: str = "f16",
                 exact: bool = True) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = REPACK
        set_verbose(False)  # llama.cpp's load and context logs off, as Llama(verbose=False) does
        self._model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = n_ctx * slots, slots, False
        cp.n_batch = cp.n_ubatch = N_BATCH
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = kv_cache_type(kv_type)  # q8_0: flash attention, on by default ("auto") on CPU
        self._context = _internals.LlamaContext(model=self._model, params=cp, verbose=False)
        self._ctx = self._context.ctx
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = _internals.LlamaBatch(n_tokens=N_BATCH, embd=0, n_seq_max=1, verbose=False)
        self.slots = slots
        self.exact = exact  # at most EXACT_ROWS decoding sequences a call (see the module doc)
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx) // slots  # each slot's own window
        self._row = -1
        self._free = list(range(slots))
        self._cached: dict[int, list[int]] = {}  # free slot -> the prompt tokens whose KV it still holds
        self.prefix_reuse = True
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to reuse (for tests and metrics)
        self._init_vocab(self._model)
        log.info("loaded %s (%d slots of %d tokens, %d threads)", path, slots, self.n_ctx, threads)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _logits(self) -> np.ndarray:
        raw = llama_cpp.llama_get_logits_ith(self._ctx, self._row)
        return np.ctypeslib.as_array(raw, shape=(self.n_vocab,))

    def generate(self, prompt, sampling, seed, forced=(), resume_kv=b"", resume_kv_tokens=0, checkpoints=False):
        """One sequence alone, through the batched path (the Backend interface)."""
        seq = self.start(prompt, sampling, seed, forced, resume_kv, resume_kv_tokens, checkpoints)
        try:
            while True:
                yield from seq.out
                seq.out = []
                if seq.done:
                    return
                self.step([seq])
                if seq.error is not None:
                    raise seq.error
        finally:
            self.release(seq)

    def start(self, prompt: list[int], sampling: Sampling, seed: int, forced: tuple[int, ...] = (),
              resume_kv: bytes = b"", resume_kv_tokens: int = 0, checkpoints: bool = False) -> Sequence:
        """A sequence in a free slot (raises when none is free: the engine admits at most `slots`).

        Prefix reuse: a free slot keeps the KV of the whole CHUNKs of its last prompt; a new prompt
        starting with the same tokens takes that slot and prefills only the rest. The kept chunks were
        computed exactly as a fresh prefill computes them (same boundaries from position 0, one prompt
        per step), so the answer is the same as without reuse."""
        slot, reuse = self._pick_slot(prompt) if not resume_kv else (self._lowest_free(), 0)
        self._free.remove(slot)
        self._cached.pop(slot, None)
        llama_cpp.llama_memory_seq_rm(self._mem, slot, reuse, -1)
        self.reused_tokens += reuse
        seq = Sequence(slot, self._sequence(slot, prompt, sampling, seed, forced, resume_kv, resume_kv_tokens,
                                            checkpoints, reuse), prompt=list(prompt), reused=reuse)
        try:
            self._advance(seq, None)
        except Exception:
            seq.error = RuntimeError("did not start")
            self.release(seq)
            raise
        seq.pos = llama_cpp.llama_memory_seq_pos_max(self._mem, slot) + 1  # reused or restored tokens
        return seq

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot whose kept prompt shares the most whole CHUNKs with `prompt` (leaving at least
        one token to prefill, for logits) and how many tokens that is; else _lowest_free()."""
        best, reuse = self._lowest_free(), 0
        if not self.prefix_reuse:
            return best, 0
        for slot in sorted(self._free):
            kept = self._cached.get(slot, ())
            common, limit = 0, min(len(kept), len(prompt) - 1)
            while common < limit and kept[common] == prompt[common]:
                common += 1
            common -= common % CHUNK
            if common > reuse:
                best, reuse = slot, common
        return best, reuse

    def _lowest_free(self) -> int:
        """The lowest free slot that keeps no prompt for reuse, else the lowest: running slots stay consecutive
        (one pass over the weights a call, see the module doc) while kept prompts live as long as they can."""
        return min(self._free, key=lambda slot: (slot in self._cached, slot))

    def release(self, seq: Sequence) -> None:
        """Ends a sequence and frees its slot, keeping the KV of its prompt's whole chunks for reuse."""
        seq.gen.close()
        keep = min(len(seq.prompt), seq.pos) if self.prefix_reuse and seq.error is None else 0
        keep -= keep % CHUNK
        llama_cpp.llama_memory_seq_rm(self._mem, seq.slot, keep, -1)
        if keep:
            self._cached[seq.slot] = seq.prompt[:keep]
        if seq.slot not in self._free:
            self._free.append(seq.slot)

    def step(self, seqs: list[Sequence]) -> None:
        """The sequences' next tokens, decoded; each sequence's new tokens land in its `out` (or `error`): every
        decoding sequence, in llama_decode calls of at most EXACT_ROWS decoding sequences each when `exact`, else
        in one call, and a piece of as many waiting prompts as there are calls (at least PREFILLS), one per call
        (beside that call's decoding sequences, or in a call of its own), each call listed by slot."""
        by_slot = sorted(range(len(seqs)), key=lambda i: seqs[i].slot)  # one ubatch per call (module doc)
        decoding = [i for i in by_slot if seqs[i].feed is not None and len(seqs[i].feed.tokens) == 1]
        filling = [i for i in by_slot if seqs[i].feed is not None and len(seqs[i].feed.tokens) > 1]
        calls = -(-len(decoding) // EXACT_ROWS) if self.exact else 1
        size = -(-len(decoding) // max(calls, 1))  # as even as it goes: 8 rows are 4 + 4, cheaper than 7 + 1
        groups = [decoding[k:k + size] for k in range(0, len(decoding), size)] if decoding else []
        # One prompt's piece per call: pieces of several prompts in one call change the numbers (measured).
        for k, i in enumerate(filling[:max(len(groups), PREFILLS)]):
            if k < len(groups):
                groups[k] = sorted(groups[k] + [i], key=lambda j: seqs[j].slot)
            else:
                groups.append([i])
        for group in groups:
            self._decode(seqs, group)

    def _decode(self, seqs: list[Sequence], group: list[int]) -> None:
        """One llama_decode over the next tokens of `seqs[i]` for i in `group`; each then samples from its row."""
        b = self._batch.batch
        b.n_tokens = 0
        rows: dict[int, int] = {}  # index in seqs -> batch row of its logits
        for i in group:
            seq = seqs[i]
            feed = seq.feed
            take = min(len(feed.tokens), CHUNK - seq.pos % CHUNK)
            for k in range(take):
                j = b.n_tokens
                b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = feed.tokens[k], seq.pos + k, 1, False
                b.seq_id[j][0] = seq.slot
                b.n_tokens += 1
            seq.pos += take
            feed.tokens = feed.tokens[take:]
            if not feed.tokens:
                if feed.logits:
                    b.logits[b.n_tokens - 1] = True
                    rows[i] = b.n_tokens - 1
                else:
                    rows[i] = -1
        if b.n_tokens == 0:
            return
        code = llama_cpp.llama_decode(self._ctx, b)
        if code != 0:
            error = RuntimeError(f"llama_decode returned {code}")
            for i in rows:
                seqs[i].error = error
            return
        for i, row in rows.items():  # before the next call: its logits replace these
            seqs[i].feed = None
            try:
                self._advance(seqs[i], None if row < 0 else row)
            except Exception as exc:  # a sequence's own failure (a grammar dead end) ends it alone
                seqs[i].error = exc

    def _advance(self, seq: Sequence, row: int | None) -> None:
        """Runs a sequence's generator to its next Feed, collecting the tokens it yields."""
        try:
            item = next(seq.gen) if row is None else seq.gen.send(row)
            while isinstance(item, TokenStep):
                seq.out.append(item)
                item = next(seq.gen)
        except StopIteration:
            seq.done = True
            return
        seq.feed = item

    def _sequence(self, slot: int, prompt: list[int], sampling: Sampling, seed: int, forced: tuple[int, ...],
                  resume_kv: bytes, resume_kv_tokens: int, checkpoints: bool, reuse: int = 0) -> Generator:
        """LlamaBackend.generate's steps for one slot (see its docstring for replay and checkpoints)."""
        chain = self._chain(sampling, seed)
        grammar = None
        want = sampling.top_logprobs
        try:
            if sampling.grammar:
                grammar = self._grammar(sampling.grammar)
            quick = sampling.temperature == 0 and grammar is None and want is None
            greedy = sampling.temperature == 0 and not sampling.presence_penalty and not sampling.frequency_penalty
            greedy_plain = quick and greedy
            checkpoints = checkpoints and greedy_plain
            restored = 0
            if greedy_plain and forced and resume_kv:
                restored = self._restore(slot, resume_kv, resume_kv_tokens, prompt, forced)
            if restored:
                n, row = resume_kv_tokens, None
            else:
                row = yield Feed(list(prompt[reuse:]), logits=not (quick and forced))
                n = len(prompt)
            for step in itertools.count():
                if n >= self.n_ctx:
                    return
                replay = forced[step] if step < len(forced) else None
                if replay is not None and quick:
                    llama_cpp.llama_sampler_accept(chain.sampler, replay)
                    yield TokenStep(replay)
                    if step >= restored:
                        row = yield Feed([replay], logits=step + 1 >= len(forced))
                        n += 1
                    continue
                self._row = row
                if greedy_plain and replay is None:
                    # The chain's pick without its pass over the vocabulary (a 262k-entry candidate array
                    # per sequence and step): greedy takes the highest logit, the lowest id on ties, as
                    # argmax does, and accepting the token changes nothing when there are no penalties.
                    token = int(np.argmax(self._logits()))
                elif grammar is None:
                    sampled = llama_cpp.llama_sampler_sample(chain.sampler, self._ctx, row)
                    token = sampled if replay is None else replay
                else:
                    token = self._sample_with(grammar, chain.sampler, replay, greedy)
                if checkpoints and (step + 1) % KV_EVERY == 0 and (kv := self._snapshot_slot(slot)):
                    yield TokenStep(token, kv=kv, kv_tokens=n)
                else:
                    yield TokenStep(token) if want is None else self._with_logprobs(token, want)
                row = yield Feed([token], logits=True)
                n += 1
        finally:
            chain.close()
            if grammar is not None:
                llama_cpp.llama_sampler_free(grammar)

    def _chain(self, s: Sampling, seed: int) -> _internals.LlamaSampler:
        """The chain Llama._init_sampler builds for LlamaBackend (same samplers, same order)."""
        chain = _internals.LlamaSampler()
        chain.add_penalties(n_vocab=self.n_vocab, penalty_last_n=64, penalty_repeat=1.0,
                            penalty_freq=s.frequency_penalty, penalty_present=s.presence_penalty)
        if s.temperature == 0:
            chain.add_greedy()
        else:
            chain.add_top_k(0)
            chain.add_typical(1.0, 1)
            chain.add_top_p(s.top_p, 1)
            chain.add_min_p(0.0, 1)
            chain.add_temp(s.temperature)
            chain.add_dist((seed % 0xFFFFFFFE) + 1)  # as LlamaBackend: clear of llama.cpp's "random" seeds
        return chain

    def _snapshot_slot(self, slot: int) -> bytes:
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot)
        if not 0 < size <= MAX_KV_BYTES:
            return b""
        buf = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, slot) != size:
            return b""
        return bytes(buf)

    def _restore(self, slot: int, kv: bytes, kv_tokens: int, prompt: list[int], forced: tuple[int, ...]) -> int:
        """LlamaBackend._restore into `slot`: how many forced tokens the checkpoint covers (0: none)."""
        covered = kv_tokens - len(prompt)
        if not 0 < covered < len(forced) or kv_tokens >= self.n_ctx:
            log.warning("ignored a KV checkpoint of %d tokens for %d prompt + %d resumed tokens",
                        kv_tokens, len(prompt), len(forced))
            return 0
        llama_cpp.llama_memory_seq_rm(self._mem, slot, 0, -1)
        src = (ctypes.c_uint8 * len(kv)).from_buffer_copy(kv)
        read = llama_cpp.llama_state_seq_set_data(self._ctx, src, len(kv), slot)
        top = llama_cpp.llama_memory_seq_pos_max(self._mem, slot)
        if read != len(kv) or top != kv_tokens - 1:
            log.warning("a KV checkpoint did not restore (read %d of %d bytes, last position %d of %d); "
                        "prefilling instead", read, len(kv), top, kv_tokens - 1)
            llama_cpp.llama_memory_seq_rm(self._mem, slot, 0, -1)
            return 0
        return covered

    def close(self) -> None:
        self._batch.close()
        self._context.close()
        self._model.close()


def open_backend(path: str, n_ctx: int, threads: int, slots: int = 4, kv_cache_type: str = "f16",
                 batch_exact: bool = True, **_unused) -> LlamaBatchBackend:
    """`slots` sequences decoded together in one context, each with its own window of n_ctx tokens."""
    return LlamaBatchBackend(path=path, n_ctx=n_ctx, threads=threads, slots=slots, kv_type=kv_cache_type,
                             exact=batch_exact)
