"""GGUF models through llama.cpp (llama-cpp-python).

Decoding follows llama.cpp's own pattern: the prompt is prefilled in batches, then each sampled
token is decoded one step at a time. Sampling is OpenAI's: temperature then top-p over the whole
vocabulary (no top-k or min-p), temperature 0 is greedy, and a seed makes sampling repeatable.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
from functools import lru_cache
from typing import Iterator

import llama_cpp
import numpy as np

from shards.types import Sampling, TokenStep

log = logging.getLogger("quorum.llama")

KV_EVERY = 8  # answer tokens between KV checkpoints (greedy path only)
# A checkpoint larger than this is not taken: it must ride in a gRPC message (shards/grpc_service.py
# caps them at 8 MiB) next to the piece or the resumed request. Gemma 3 270M: about 18 KB per token.
MAX_KV_BYTES = 4 * 1024 * 1024
# node.kv_cache_type: the KV cache's element type. q8_0 holds about 0.53x the bytes of f16 (Gemma 3 270M: 42 MB
# a 4096-token slot instead of 77 MB); llama.cpp needs flash attention for a quantized V cache.
KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
# Tokens llama.cpp computes at once within a batch of n_batch (its default: 512). The compute buffer's touched part
# grows with it (attention scores: context x ubatch per head): 64, the batched backend's prefill piece, holds
# 17 MB less after a 371-token prompt on the default model, and the greedy answers measured stayed the same.
N_UBATCH = 64


def kv_cache_type(name: str) -> int:
    if name not in KV_CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {name!r} (known: {', '.join(KV_CACHE_TYPES)})")
    return KV_CACHE_TYPES[name]


class LlamaBackend:
    def __init__(self, path: str, n_ctx: int, threads: int, kv_type: str = "f16") -> None:
        quantized = {} if kv_type == "f16" else {"type_k": kv_cache_type(kv_type), "type_v": kv_cache_type(kv_type),
                                                 "flash_attn": True}
        self._llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads,
                                    n_threads_batch=threads, n_batch=512, n_ubatch=N_UBATCH, logits_all=False,
                                    verbose=False, **quantized)
        self.n_ctx = self._llm.n_ctx()
        self._init_vocab(self._llm._model)
        log.info("loaded %s (context %d, %d threads)", path, self.n_ctx, threads)

    def _init_vocab(self, model) -> None:
        """What tokenizing and sampling need from a loaded model (llama_cpp._internals.LlamaModel)."""
        self._vocab = model.vocab
        self.n_vocab = model.n_vocab()
        self._template = model.metadata().get("tokenizer.chat_template") or None
        self.bos_text = self._special_text(model.token_bos())
        self.eos_text = self._special_text(model.token_eos())
        self.token_bytes = lru_cache(maxsize=65536)(self.token_bytes)  # type: ignore[method-assign]
        # Candidate buffer for grammar-constrained steps: llama_token_data {id, logit, p}, one per token.
        self._candidates = np.zeros(self.n_vocab, dtype=np.dtype([("id", np.int32), ("logit", np.float32),
                                                                  ("p", np.float32)], align=True))
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._one = llama_cpp.llama_token_data()
        self.greedy_shortcut = True  # see _greedy_pick (tests turn it off to compare with the full pass)

    def _logits(self) -> np.ndarray:
        """The logits the next token is sampled from (the last decoded position of seq 0)."""
        raw = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(raw, shape=(self.n_vocab,))

    def _special_text(self, token: int) -> str:
        return "" if token < 0 else llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self._llm._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # the piece is longer than the buffer: llama.cpp says how long it is
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def chat_template(self) -> str | None:
        return self._template

    def generate(self, prompt: list[int], sampling: Sampling, seed: int, forced: tuple[int, ...] = (),
                 resume_kv: bytes = b"", resume_kv_tokens: int = 0, checkpoints: bool = False) -> Iterator[TokenStep]:
        """Prefills `prompt` from an empty cache, then decodes one token per step.

        The same request always takes the same path through llama.cpp (no prefix-cache reuse,
        which would batch the prompt differently), so a generation resumed on another replica can
        be exact: `forced` tokens (already sent by a replica that died) are replayed one step
        each, sampling at every step as the original did so the sampler's random state and
        penalty history match, then sampling continues.

        With `sampling.grammar` every step samples only tokens the grammar allows, and the end
        of generation only once the grammar is complete; replayed tokens advance the grammar too.

        At temperature 0 (no grammar, no logprobs) replay is cheaper and still exact: greedy
        sampling has no random state, so a replayed step only feeds the token to the sampler chain
        (its penalty history) and decodes it without computing logits (the output layer over a
        262k vocabulary is over half of a step here), except the last one, whose logits the next
        step samples from; the prompt is prefilled in the same batches, without logits either.
        The KV cache is the same either way (checked: tests/integration/test_failover.py).

        On that greedy path without penalties, every KV_EVERY answer tokens a step carries a KV
        checkpoint (TokenStep.kv): the cache of seq 0 before the step's token is decoded, so a
        resume from it still decodes at least one token and gets logits. A resume given such a
        checkpoint (`resume_kv`, covering `resume_kv_tokens` tokens of prompt + forced) restores it
        instead of prefilling and replaying those tokens: the same cache, so the same continuation.
        A checkpoint that does not fit or does not restore falls back to prefill and replay.
        """
        llm = self._llm
        llm.set_seed((seed % 0xFFFFFFFE) + 1)  # llama.cpp treats some seeds as "random": stay clear
        # _init_sampler is private in llama-cpp-python 0.3.36 (pinned): it builds the same chain
        # generate() uses, which we need to keep across steps (its RNG and penalty history).
        llm._sampler = llm._init_sampler(temp=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0,
                                         typical_p=1.0, repeat_penalty=1.0,
                                         presence_penalty=sampling.presence_penalty,
                                         frequency_penalty=sampling.frequency_penalty)
        grammar = None
        want = sampling.top_logprobs
        try:
            if sampling.grammar:
                grammar = self._grammar(sampling.grammar)
            llm.reset()
            quick = sampling.temperature == 0 and grammar is None and want is None
            greedy_plain = quick and not sampling.presence_penalty and not sampling.frequency_penalty
            checkpoints = checkpoints and greedy_plain  # asked for, and a resume could use them
            restored = 0  # forced tokens already in the cache (restored from a checkpoint)
            if greedy_plain and forced and resume_kv:
                restored = self._restore(resume_kv, resume_kv_tokens, prompt, forced)
            if restored:
                pass  # the cache holds the prompt and the first `restored` forced tokens
            elif quick and forced:
                self._decode_without_logits(prompt)  # the first step replays: nobody samples after the prompt
            else:
                llm.eval(prompt)
            for step in itertools.count():
                if llm.n_tokens >= self.n_ctx:
                    return
                replay = forced[step] if step < len(forced) else None
                if replay is not None and quick:
                    llama_cpp.llama_sampler_accept(llm._sampler.sampler, replay)
                    yield TokenStep(replay)
                    if step < restored:
                        continue
                    if step + 1 < len(forced):
                        self._decode_without_logits([replay])
                    else:
                        llm.eval([replay])
                    continue
                if grammar is None:
                    sampled = llm.sample(temp=sampling.temperature, top_p=sampling.top_p)
                    token = sampled if replay is None else replay
                else:
                    greedy = (sampling.temperature == 0 and not sampling.presence_penalty
                              and not sampling.frequency_penalty)
                    token = self._sample_with(grammar, llm._sampler.sampler, replay, greedy)
                if checkpoints and (step + 1) % KV_EVERY == 0 and (kv := self._snapshot()):
                    yield TokenStep(token, kv=kv, kv_tokens=llm.n_tokens)
                else:
                    yield TokenStep(token) if want is None else self._with_logprobs(token, want)
                llm.eval([token])
        finally:
            llm._sampler = None
            if grammar is not None:
                llama_cpp.llama_sampler_free(grammar)

    def _snapshot(self) -> bytes:
        """The KV cache of seq 0 as llama.cpp serializes it; empty when larger than MAX_KV_BYTES."""
        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        if not 0 < size <= MAX_KV_BYTES:
            return b""
        buf = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0) != size:
            return b""
        return bytes(buf)

    def _restore(self, kv: bytes, kv_tokens: int, prompt: list[int], forced: tuple[int, ...]) -> int:
        """Restores a checkpoint covering the prompt and forced[:kv_tokens - len(prompt)], leaving
        at least one forced token to decode (for logits). Returns how many forced tokens it covers;
        0 when it does not fit this request or llama.cpp refuses it (the cache is then empty)."""
        llm = self._llm
        covered = kv_tokens - len(prompt)
        if not 0 < covered < len(forced) or kv_tokens >= self.n_ctx:
            log.warning("ignored a KV checkpoint of %d tokens for %d prompt + %d resumed tokens",
                        kv_tokens, len(prompt), len(forced))
            return 0
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        src = (ctypes.c_uint8 * len(kv)).from_buffer_copy(kv)
        read = llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, src, len(kv), 0)
        top = llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm._ctx.ctx), 0)
        if read != len(kv) or top != kv_tokens - 1:
            log.warning("a KV checkpoint did not restore (read %d of %d bytes, last position %d of %d); "
                        "prefilling instead", read, len(kv), top, kv_tokens - 1)
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            return 0
        llm.input_ids[:kv_tokens] = list(prompt) + list(forced[:covered])
        llm.n_tokens = kv_tokens
        return covered

    def _decode_without_logits(self, tokens: list[int]) -> None:
        """llm.eval(tokens) (same batches of n_batch) with no logits computed, not even the last
        token's (llama-cpp-python 0.3.36 internals, as eval uses them)."""
        llm = self._llm
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        for i in range(0, len(tokens), llm.n_batch):
            batch = tokens[i:i + llm.n_batch]
            llm._batch.set_batch(batch=batch, n_past=llm.n_tokens, logits_all=False)
            llm._batch.batch.logits[len(batch) - 1] = False
            llm._ctx.decode(llm._batch)
            llm.input_ids[llm.n_tokens:llm.n_tokens + len(batch)] = batch
            llm.n_tokens += len(batch)

    def _grammar(self, text: str) -> ctypes.c_void_p:
        grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, text.encode("utf-8"), b"root")
        if not grammar:
            raise ValueError("the grammar does not parse")
        return grammar

    def _sample_with(self, grammar: ctypes.c_void_p, chain: ctypes.c_void_p, replay: int | None,
                     greedy: bool = False) -> int:
        """One step of llama_sampler_sample under a grammar, the way llama.cpp's own sampler does
        it: the chain picks from every token; if the grammar does not allow that pick, the grammar
        rules out what it does not allow and the chain picks again from the rest (rejection
        sampling: same distribution, and one full grammar pass only when needed). The chosen
        token, or `replay`, is accepted by both. A replayed step takes the same path as the
        original, so the chain's random state stays in step. Greedy steps take a shortcut that
        picks the same token (_greedy_pick)."""
        token = self._greedy_pick(grammar, replay) if greedy and self.greedy_shortcut else None
        if token is not None:
            llama_cpp.llama_sampler_accept(grammar, token)
            llama_cpp.llama_sampler_accept(chain, token)
            return token
        cur = self._candidates_array()
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur))
        choice = self._selected(cur)
        if not self._allows(grammar, choice):
            cur = self._candidates_array()
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cur))
            if not np.isfinite(self._candidates["logit"]).any():  # only masked: still in id order
                raise ValueError("the grammar allows no token here")
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur))
            choice = self._selected(cur)
        if replay is not None and not self._allows(grammar, replay):
            raise ValueError(f"replayed token {replay} is not allowed by the grammar")
        token = choice if replay is None else replay
        llama_cpp.llama_sampler_accept(grammar, token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _greedy_pick(self, grammar: ctypes.c_void_p, replay: int | None, top: int = 256) -> int | None:
        """The greedy choice under the grammar without a grammar pass over the whole vocabulary
        (262k tokens for Gemma: the cost that made constrained decoding slow). Greedy takes the
        highest logit the grammar allows, lowest id first on ties; so the `top` highest logits are
        tried in that order, one grammar check each. None when the answer is not certainly among
        them (no allowed token there, or a tie at the cut): the caller takes the full pass."""
        if replay is not None:  # greedy has no random state to keep in step: check and accept
            if not self._allows(grammar, replay):
                raise ValueError(f"replayed token {replay} is not allowed by the grammar")
            return replay
        logits = self._logits()
        best = np.argpartition(-logits, top)[:top]
        order = best[np.lexsort((best, -logits[best]))]
        floor = logits[order[-1]]
        for token in order:
            if logits[token] <= floor:
                return None  # at the cut: an equal logit outside `best` might have a lower id
            if self._allows(grammar, int(token)):
                return int(token)
        return None

    def _candidates_array(self) -> llama_cpp.llama_token_data_array:
        """Every token with its logit at the last position, as llama_sampler_sample builds them."""
        cand = self._candidates
        cand["id"] = self._ids
        cand["logit"] = self._logits()
        cand["p"] = 0.0
        return llama_cpp.llama_token_data_array(data=cand.ctypes.data_as(llama_cpp.llama_token_data_p),
                                                size=self.n_vocab, selected=-1, sorted=False)

    @staticmethod
    def _selected(cur: llama_cpp.llama_token_data_array) -> int:
        if not 0 <= cur.selected < cur.size:
            raise ValueError("the sampler chain selected no token")
        return int(cur.data[cur.selected].id)  # samplers may point `data` elsewhere: read through it

    def _allows(self, grammar: ctypes.c_void_p, token: int) -> bool:
        one = self._one
        one.id, one.logit, one.p = token, 0.0, 0.0
        cur = llama_cpp.llama_token_data_array(data=ctypes.pointer(one), size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cur))
        return math.isfinite(one.logit)

    def _with_logprobs(self, token: int, top: int) -> TokenStep:
        """Log-probabilities of the model's distribution at the step that chose `token`."""
        logits = self._logits().astype(np.float64)
        peak = logits.max()
        logz = peak + np.log(np.exp(logits - peak).sum())
        best = np.argpartition(-logits, top)[:top] if top else np.array([], dtype=int)
        best = best[np.argsort(-logits[best])]
        return TokenStep(token, float(logits[token] - logz),
                         tuple((int(t), float(logits[t] - logz)) for t in best))

    def close(self) -> None:
        self._llm.close()


def open_backend(path: str, n_ctx: int, threads: int, slots: int = 1, kv_cache_type: str = "f16",
                 **_unused) -> LlamaBackend:
    """One generation at a time. `slots` > 1 is shards/backend_llama_batch.py's (shards/backend.py
    load_backend picks it): that module builds on this one, so this one never imports it."""
    if slots != 1:
        raise ValueError("the llama backend decodes one sequence; load 'llama' with slots > 1 for batching")
    return LlamaBackend(path=path, n_ctx=n_ctx, threads=threads, kv_type=kv_cache_type)
