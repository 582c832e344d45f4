"""The gateway's work between HTTP and the shards: pick a replica, build the prompt, check it
fits, queue the generations, and turn their events into OpenAI answers or streams."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from mesh.config import MeshConfig
from mesh.gateway.errors import ApiError, bad_request, model_not_found, queue_full, unavailable
from mesh.gateway.metrics import Metrics
from mesh.gateway.responses import ChatFormat, ChoiceText, CompletionFormat, sse
from mesh.gateway.validation import ChatRequest, CompletionRequest
from shards.local import Generation, LocalShard
from shards.templates import TemplateError
from shards.types import ContextLengthExceeded, Event, Failed, Finished, Piece, QueueFull, Sampling

log = logging.getLogger("quorum.gateway")


@dataclass
class Run:
    """Generations queued for one request, in choice order."""
    model: str
    gens: list[Generation]
    prompt_tokens: int
    started: float

    def cancel(self) -> None:
        for g in self.gens:
            g.cancel()


class Gateway:
    def __init__(self, config: MeshConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._shards: dict[str, LocalShard] = {}
        self.loading_detail = "starting"

    def attach(self, shard: LocalShard) -> None:
        self._shards[shard.model] = shard
        self.metrics.watch_queue(shard.role, shard.model, lambda: shard.waiting)
        log.info("serving %s with a local %s shard (context %d)", shard.model, shard.role, shard.n_ctx)

    def detach_all(self) -> list[LocalShard]:
        shards, self._shards = list(self._shards.values()), {}
        return shards

    @property
    def ready(self) -> bool:
        return bool(self._shards)

    def served_models(self) -> list[str]:
        return sorted(self._shards)

    def shard_for(self, model: str) -> LocalShard:
        if self.config.model(model) is None and model not in self._shards:
            raise model_not_found(model)
        shard = self._shards.get(model)
        if shard is None:
            raise unavailable(f"No replica of '{model}' is ready yet ({self.loading_detail}).",
                              self.config.gateway.retry_after_s, code="loading")
        return shard

    # -- chat --------------------------------------------------------------------------------

    async def start_chat(self, req: ChatRequest) -> Run:
        started = time.perf_counter()
        shard = self.shard_for(req.model)
        try:
            prompt, stop_texts = await shard.chat_prompt(list(req.messages))
        except TemplateError as exc:
            raise bad_request(str(exc), "messages") from None
        return self._submit(shard, [prompt], req.sampling, req.n, stop_texts, started)

    async def collect_chat(self, req: ChatRequest, run: Run) -> dict:
        fmt = ChatFormat(req.model, req.logprobs)
        choices = [ChoiceText() for _ in run.gens]
        completion = 0
        async for index, event in self._events(run):
            if isinstance(event, Piece):
                choices[index].add(event)
            elif isinstance(event, Finished):
                choices[index].finish_reason = event.reason
                completion += event.completion_tokens
        return fmt.completion(choices, run.prompt_tokens, completion)

    async def stream_chat(self, req: ChatRequest, run: Run) -> AsyncIterator[bytes]:
        fmt = ChatFormat(req.model, req.logprobs)
        started: set[int] = set()
        completion = 0
        try:
            async for index, event in self._events(run, stream=True):
                if isinstance(event, Failed):
                    yield sse(ApiError(500, event.message, type="server_error").body())
                    return
                if index not in started:
                    started.add(index)
                    yield sse(fmt.chunk(index, {"role": "assistant", "content": "", "refusal": None},
                                        with_usage_field=req.include_usage))
                if isinstance(event, Piece):
                    yield sse(fmt.chunk(index, {"content": event.text}, logprobs=event.logprobs,
                                        with_usage_field=req.include_usage))
                elif isinstance(event, Finished):
                    completion += event.completion_tokens
                    yield sse(fmt.chunk(index, {}, finish_reason=event.reason,
                                        with_usage_field=req.include_usage))
            if req.include_usage:
                yield sse(fmt.usage_chunk(run.prompt_tokens, completion))
            yield sse("[DONE]")
        finally:
            run.cancel()

    # -- completions -------------------------------------------------------------------------

    async def start_completion(self, req: CompletionRequest) -> Run:
        started = time.perf_counter()
        shard = self.shard_for(req.model)
        prompts = [await shard.text_prompt(p) for p in req.prompts]
        return self._submit(shard, prompts, req.sampling, req.n, (), started)

    async def collect_completion(self, req: CompletionRequest, run: Run) -> dict:
        fmt = CompletionFormat(req.model, req.sampling.top_logprobs is not None)
        choices = [ChoiceText() for _ in run.gens]
        completion = 0
        async for index, event in self._events(run):
            if isinstance(event, Piece):
                choices[index].add(event)
            elif isinstance(event, Finished):
                choices[index].finish_reason = event.reason
                completion += event.completion_tokens
        prefixes = [req.prompts[i // req.n] if req.echo else "" for i in range(len(choices))]
        return fmt.completion(choices, run.prompt_tokens, completion, prefixes)

    async def stream_completion(self, req: CompletionRequest, run: Run) -> AsyncIterator[bytes]:
        fmt = CompletionFormat(req.model, req.sampling.top_logprobs is not None)
        offsets = [0] * len(run.gens)
        echoed: set[int] = set()
        completion = 0
        try:
            async for index, event in self._events(run, stream=True):
                if isinstance(event, Failed):
                    yield sse(ApiError(500, event.message, type="server_error").body())
                    return
                if req.echo and index not in echoed:
                    echoed.add(index)
                    prompt = req.prompts[index // req.n]
                    offsets[index] = len(prompt)
                    yield sse(fmt.chunk(index, prompt, None, None, req.include_usage))
                if isinstance(event, Piece):
                    lp = fmt.legacy_logprobs(event.logprobs, offsets[index])
                    offsets[index] += len(event.text)
                    yield sse(fmt.chunk(index, event.text, None, lp, req.include_usage))
                elif isinstance(event, Finished):
                    completion += event.completion_tokens
                    yield sse(fmt.chunk(index, "", event.reason, None, req.include_usage))
            if req.include_usage:
                yield sse(fmt.usage_chunk(run.prompt_tokens, completion))
            yield sse("[DONE]")
        finally:
            run.cancel()

    # -- shared ------------------------------------------------------------------------------

    def _submit(self, shard: LocalShard, prompts: list[list[int]], sampling: Sampling, n: int,
                stop_texts: tuple[str, ...], started: float) -> Run:
        for prompt in prompts:
            try:
                shard.check_fits(len(prompt), sampling.max_tokens)
            except ContextLengthExceeded as exc:
                raise bad_request(str(exc), "messages", "context_length_exceeded") from None
        work = [(prompt, _choice_sampling(sampling, i)) for prompt in prompts for i in range(n)]
        try:
            gens = shard.submit(work, stop_texts)
        except QueueFull as exc:
            raise queue_full(str(exc), self.config.gateway.retry_after_s) from None
        run = Run(model=shard.model, gens=gens, prompt_tokens=sum(len(p) for p in prompts), started=started)
        self.metrics.prompt_tokens.labels(run.model).inc(run.prompt_tokens)
        return run

    async def _events(self, run: Run, stream: bool = False) -> AsyncIterator[tuple[int, Event]]:
        """Each choice's events in turn; records metrics; a Failed event ends a non-streamed answer."""
        first_seen = False
        try:
            for index, gen in enumerate(run.gens):
                async for event in gen.events():
                    if not first_seen and isinstance(event, (Piece, Finished)):
                        first_seen = True
                        self.metrics.ttft.labels(run.model).observe(time.perf_counter() - run.started)
                    if isinstance(event, Failed) and not stream:
                        raise ApiError(500, event.message, type="server_error")
                    yield index, event
        finally:
            run.cancel()


def _choice_sampling(sampling: Sampling, index: int) -> Sampling:
    """Choice i of n uses seed + i, so a seeded request with n > 1 still gives distinct choices."""
    if sampling.seed is None or index == 0:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + index)
