"""The gateway's work between HTTP and the shards, by job:

- admission and retry: mesh/gateway/admission.py (fitting a long chat: context_window.py);
- a named session's history and recording: mesh/gateway/session_turns.py;
- the typed events of an admitted request: mesh/gateway/runs.py (resumed on another replica by
  mesh/replicas/failover.py, or through the next leader by mesh/gateway/leader_link.py);
- rendering them: a stream for every endpoint in mesh/gateway/stream_render.py, a whole answer here.

`Gateway` ties them together for the routes (mesh/gateway/app.py, anthropic.py, ollama.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mesh.cluster.sessions import SessionLog
from mesh.core.config import MeshConfig
from mesh.core.errors import bad_request, model_not_found
from mesh.core.metrics import Metrics
from mesh.gateway.admission import Admission
from mesh.gateway.responses import ChatFormat, ChoiceText, CompletionFormat
from mesh.gateway.runs import Run
from mesh.gateway.session_turns import SessionTurn
from mesh.gateway.stream_render import ChatStream, CompletionStream, ToolCallStream, render
from mesh.gateway.tools import ToolShaper, content_violation
from mesh.gateway.validation import ChatRequest, CompletionRequest
from mesh.replicas.failover import ResumeAt
from mesh.replicas.router import LocalPicker, Router
from raft.vocab import GENERATING_ROLES, Role
from shards.types import Finished, GenerateRequest, Piece

if TYPE_CHECKING:  # in-process shards are attached in tests only: a witness's gateway never loads the engine
    from shards.local import LocalShard

log = logging.getLogger("quorum.gateway")


class Gateway:
    """The OpenAI side of the mesh. `picker` chooses the replica for each request: a Router over
    the whole mesh in the daemon, or a LocalPicker holding in-process shards."""

    def __init__(self, config: MeshConfig, metrics: Metrics, picker: Router | LocalPicker | None = None,
                 sessions: SessionLog | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.sessions = sessions
        self.picker = picker if picker is not None else LocalPicker()
        self.admission = Admission(config, metrics, self.picker)

    @property
    def loading_detail(self) -> str:
        return self.admission.loading_detail

    @loading_detail.setter
    def loading_detail(self, detail: str) -> None:
        self.admission.loading_detail = detail

    def attach(self, shard: LocalShard) -> None:
        """Serves a shard held in this process (LocalPicker only)."""
        self.picker.shards[(shard.role, shard.model)] = shard
        self.metrics.watch_queue(shard.role, shard.model, lambda: shard.waiting)
        log.info("serving %s with a local %s shard (context %d)", shard.model, shard.role, shard.n_ctx)

    def detach_all(self) -> list[LocalShard]:
        shards, self.picker.shards = list(self.picker.shards.values()), {}
        return shards

    @property
    def ready(self) -> bool:
        return bool(self.picker.ready_models(Role.REASONING))

    def served_models(self) -> list[str]:
        return self.picker.ready_models(Role.REASONING)

    def unready_detail(self) -> str:
        """Why no reasoning replica serves (for /health): the reason for the catalog's first chat model."""
        model = next((m.name for m in self.config.models if Role.REASONING in m.roles), None)
        return self.admission.unready(model) if model is not None else self.loading_detail

    def known_models(self) -> list[str]:
        """Models this gateway answers for: its own catalog and the mesh's."""
        return sorted({m.name for m in self.config.models} | set(self.picker.known_models()))

    def check_model(self, model: str) -> None:
        """404 for a model the mesh does not know; 400 for one that cannot chat (an encoder)."""
        if model not in self.known_models():
            raise model_not_found(model)
        spec = self.config.model(model)
        roles = set(spec.roles if spec is not None else ()) | set(self.picker.model_roles(model))
        if roles and not roles & GENERATING_ROLES:
            raise bad_request(f"The model '{model}' makes embeddings and cannot generate text; use it with "
                              f"/v1/embeddings.", "model", "model_not_generative")

    # -- chat --------------------------------------------------------------------------------

    async def start_chat(self, req: ChatRequest, resume: ResumeAt | None = None) -> Run:
        """Admits a chat (with `resume`, only that choice, going on from its tokens: a stream a
        relaying member resumes here after the previous leader was lost)."""
        session = SessionTurn(self.sessions, req)
        self.check_model(req.model)
        named = (session.owner, req.session_id) if req.session_id is not None else None
        run = await self.admission.open(req.model, GenerateRequest(sampling=req.sampling, n=req.n,
                                                                   messages=session.messages), resume, named)
        if resume is None or resume.choice == 0:  # choice 0 is the session's answer
            run.recorder = session.recorder(run.prompt_tokens, run.resumable.prompt_token_ids)
        return run

    async def collect_chat(self, req: ChatRequest, run: Run) -> dict:
        fmt = ChatFormat(req.model, req.logprobs)
        choices = [ChoiceText() for _ in range(run.choices)]
        shapers = [ToolShaper(req.tool_use) for _ in choices] if req.tool_use and req.tool_use.calls else None
        completion = cached = 0
        async for index, event in run.events():
            if isinstance(event, Piece):
                choices[index].add(event)
                if shapers:
                    shapers[index].feed(event.text)
            elif isinstance(event, Finished):
                choices[index].finish_reason = event.reason
                completion += event.completion_tokens
                cached = max(cached, event.cached_tokens)
                if shapers:
                    shapers[index].finish()
                    choices[index].message = shapers[index].message()
                    choices[index].finish_reason = shapers[index].finish_reason(event.reason)
                elif (problem := content_violation(req.tool_use, choices[index].text)) is not None:
                    # A JSON answer the grammar could not hold to the whole schema: said, not hidden.
                    choices[index].message = {"role": "assistant", "content": choices[index].text, "refusal": problem}
        return fmt.completion(choices, run.prompt_tokens, completion, cached)

    def stream_chat(self, req: ChatRequest, run: Run):
        fmt = ChatFormat(req.model, req.logprobs)
        if req.tool_use is not None and req.tool_use.calls:
            return render(run, ToolCallStream(fmt, req.tool_use, req.include_usage), req.include_usage)
        return render(run, ChatStream(fmt, req.tool_use, req.include_usage), req.include_usage)

    # -- completions -------------------------------------------------------------------------

    async def start_completion(self, req: CompletionRequest, resume: ResumeAt | None = None) -> Run:
        self.check_model(req.model)
        return await self.admission.open(req.model, GenerateRequest(sampling=req.sampling, n=req.n,
                                                                    prompts=req.prompts), resume)

    async def collect_completion(self, req: CompletionRequest, run: Run) -> dict:
        fmt = CompletionFormat(req.model, req.sampling.top_logprobs is not None)
        choices = [ChoiceText() for _ in range(run.choices)]
        completion = 0
        async for index, event in run.events():
            if isinstance(event, Piece):
                choices[index].add(event)
            elif isinstance(event, Finished):
                choices[index].finish_reason = event.reason
                completion += event.completion_tokens
        prefixes = [req.prompts[i // req.n] if req.echo else "" for i in range(len(choices))]
        return fmt.completion(choices, run.prompt_tokens, completion, prefixes)

    def stream_completion(self, req: CompletionRequest, run: Run):
        fmt = CompletionFormat(req.model, req.sampling.top_logprobs is not None)
        renderer = CompletionStream(fmt, req.prompts, req.n, req.echo, req.include_usage)
        return render(run, renderer, req.include_usage)


def choices_of(req: ChatRequest | CompletionRequest) -> int:
    """How many choices a request asks for (n of each completion prompt)."""
    return req.n * len(req.prompts) if isinstance(req, CompletionRequest) else req.n
