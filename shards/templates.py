"""Chat templating: messages -> the prompt text a model was trained on.

A GGUF's own template (its `tokenizer.chat_template`, Jinja) wins when it has one; otherwise the
model catalog names one of the templates below. Messages arrive validated by the gateway:
role is system/developer/user/assistant and content is a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from shards.types import Message


class TemplateError(ValueError):
    """The messages cannot be rendered with this model's template (the client's fault: 400)."""


@dataclass(frozen=True)
class Rendered:
    text: str
    has_bos: bool  # the text already starts with the BOS token text: do not add another
    stop_texts: tuple[str, ...] = ()  # turn-end markers to stop on when no stop token catches them


def _gemma(messages: list[Message]) -> Rendered:
    """Gemma: no system role (system text leads the first user turn); the assistant is 'model'."""
    system = "\n\n".join(m.content for m in messages if m.role in ("system", "developer"))
    turns = [m for m in messages if m.role not in ("system", "developer")]
    if not turns or turns[0].role != "user":
        turns.insert(0, Message("user", ""))
    if system:
        first = turns[0]
        turns[0] = Message("user", f"{system}\n\n{first.content}" if first.content else system)
    out = []
    for m in turns:
        role = "model" if m.role == "assistant" else "user"
        out.append(f"<start_of_turn>{role}\n{m.content.strip()}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return Rendered("".join(out), has_bos=False, stop_texts=("<end_of_turn>",))


def _chatml(messages: list[Message]) -> Rendered:
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        out.append(f"<|im_start|>{role}\n{m.content}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return Rendered("".join(out), has_bos=False, stop_texts=("<|im_end|>",))


NAMED: dict[str, Callable[[list[Message]], Rendered]] = {"gemma": _gemma, "chatml": _chatml}


def render_jinja(source: str, messages: list[Message], bos: str, eos: str) -> Rendered:
    """Renders a GGUF's own Jinja template in a sandbox (templates are data from the model file)."""
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(source).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True, bos_token=bos, eos_token=eos)
    except TemplateError:
        raise
    except (JinjaError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as exc:
        # The template is data from the model file: however it fails, the request gets a 400
        # naming the failure, not a 500.
        raise TemplateError(f"the model's chat template failed: {exc}") from None
    return Rendered(text, has_bos=bool(bos) and text.startswith(bos))


def render(messages: list[Message], *, gguf_template: str | None, named: str | None,
           bos: str = "", eos: str = "") -> Rendered:
    if gguf_template:
        return render_jinja(gguf_template, messages, bos, eos)
    if named is None:
        raise TemplateError("this model has no chat template; use /v1/completions or name one in mesh.toml")
    try:
        return NAMED[named](messages)
    except KeyError:
        raise TemplateError(f"unknown chat template {named!r} (known: {', '.join(NAMED)})") from None
