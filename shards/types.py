"""Plain data passed between the gateway and a shard (and, later, over gRPC)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Protocol

if TYPE_CHECKING:
    from shards.context import Embedded


@dataclass(frozen=True)
class Message:
    role: str  # system, developer, user, assistant (validated by the gateway)
    content: str


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None  # None: until the context window is full
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; 0..N: chosen token plus N alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # A llama.cpp GBNF grammar the output must follow (tool calls, JSON answers; see shards/tools.py).
    grammar: str | None = None


@dataclass(frozen=True)
class TokenStep:
    """One sampled token, as a backend reports it."""
    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    # A KV-cache checkpoint taken at this step (shards/backend_llama.py): the serialized KV of the
    # prompt and the answer so far minus this token, covering `kv_tokens` tokens; empty when none.
    kv: bytes = field(default=b"", repr=False)
    kv_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Piece:
    """Text released to the client, with the tokens it came from."""
    text: str
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    # The replica's latest KV checkpoint, riding on the next piece after it was taken (see TokenStep);
    # for the gateway's failover only (mesh/replicas/failover.py strips it), never for the client.
    kv: bytes = field(default=b"", repr=False)
    kv_tokens: int = 0


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    first_token_s: float | None = None  # seconds from start of generation to first token
    decode_s: float = 0.0  # seconds spent from first token to the end
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused, not prefilled (prefix reuse)


@dataclass(frozen=True)
class Failed:
    message: str
    retryable: bool = False  # the replica was lost (not the request's fault): resume elsewhere


Event = Piece | Finished | Failed


class ShardError(Exception):
    """Base of the errors a shard reports to the gateway."""


class QueueFull(ShardError):
    def __init__(self, depth: int) -> None:
        super().__init__(f"the shard's queue is full ({depth} requests waiting); retry shortly")
        self.depth = depth


class ContextLengthExceeded(ShardError):
    def __init__(self, n_ctx: int, prompt: int, completion: int | None) -> None:
        self.n_ctx, self.prompt, self.completion = n_ctx, prompt, completion  # for fitting (context role)
        asked = prompt + (completion or 0)
        detail = f"{prompt} in the prompt" + (f", {completion} in the completion" if completion else "")
        super().__init__(f"This model's maximum context length is {n_ctx} tokens. However, you "
                         f"requested {asked} tokens ({detail}). Please reduce the length of the "
                         f"messages or completion.")


class NotReady(ShardError):
    """The shard is still loading or has stopped."""


@dataclass(frozen=True)
class GenerateRequest:
    """What the gateway asks of a shard: a conversation or text prompts, n choices of each."""
    sampling: Sampling
    n: int = 1
    messages: tuple[Message, ...] = ()  # a chat; rendered with the model's template
    prompts: tuple[str, ...] = ()  # raw text prompts (completions); used when messages is empty
    # Resuming a choice another replica was generating: its index among the request's choices
    # (seeds follow it) and the tokens already sent, replayed before sampling goes on.
    first_choice: int = 0
    resume_tokens: tuple[int, ...] = ()
    # The lost replica's latest KV checkpoint (Piece.kv) covering the prompt and the first
    # resume_kv_tokens - len(prompt) resume tokens: restored instead of prefilling and replaying them.
    resume_kv: bytes = field(default=b"", repr=False)
    resume_kv_tokens: int = 0
    # Ask the replica to attach a KV checkpoint to a piece every few tokens (greedy only), so a
    # resume restores it instead of re-prefilling: the gateway's gateway.kv_checkpoints.
    kv_checkpoints: bool = False


@dataclass
class Opened:
    """A request a shard has admitted: its choices' events, in choice order, and a way to stop them.

    `events` yields (choice index, event): each choice's Pieces then its Finished (or Failed).
    `prompt_token_ids` is the prompt as the shard tokenized it (a chat: the rendered conversation;
    several raw prompts: one after the other); empty when unknown (a peer that predates it).
    """
    prompt_tokens: int
    choices: int
    events: AsyncIterator[tuple[int, "Event"]]
    cancel: Callable[[], None]
    prompt_token_ids: tuple[int, ...] = ()


class ShardKind(enum.Enum):
    """What a shard's model does: which of the two replica interfaces below it serves."""
    GENERATOR = "generator"  # a GGUF through llama.cpp (or the null backend): open() streams tokens
    ENCODER = "encoder"  # a sentence encoder (ONNX): embed() returns vectors

    @classmethod
    def of_file(cls, file: str) -> "ShardKind":
        """A model file's kind, by its format (.onnx files are encoders, GGUF files generate)."""
        return cls.ENCODER if file.endswith(".onnx") else cls.GENERATOR


class Replica(Protocol):
    """One shard replica as the gateway and the gRPC service use it, wherever it runs: in a child
    process of this node (mesh/replicas/shard_process.py), on another member (mesh/replicas/remote_shard.py), or in
    this process (LocalShard, ContextShard: inside the shard process, and in tests)."""
    role: str
    model: str
    kind: ShardKind
    n_ctx: int

    @property
    def waiting(self) -> int: ...

    @property
    def busy(self) -> bool: ...


class GeneratorReplica(Replica, Protocol):
    async def open(self, req: GenerateRequest) -> Opened:
        """Admits a request (or raises QueueFull, ContextLengthExceeded, TemplateError, NotReady)."""


class EncoderReplica(Replica, Protocol):
    async def embed(self, texts: list[str]) -> "Embedded":
        """Vectors for texts (or raises ValueError, QueueFull, NotReady)."""
