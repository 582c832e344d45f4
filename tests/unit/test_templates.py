"""shards/templates.py: named templates render exactly; GGUF Jinja templates render in a sandbox."""

from __future__ import annotations

import pytest

from shards.templates import NAMED, Message, Rendered, TemplateError, render, render_jinja

CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "Hi there"),
    Message("assistant", "Hello!"),
    Message("user", "What is 2+2?"),
]

# A simplified Jinja chat template in the style GGUF files carry.
JINJA = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
    "[{{ m['role'] }}]{{ m['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_gemma_renders_exact_prompt():
    out = render(CONVERSATION, gguf_template=None, named="gemma")
    assert out.text == (
        "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "<end_of_turn>" in out.stop_texts
    assert out.has_bos is False


def test_gemma_treats_developer_as_system_and_strips_turn_ends():
    out = render([Message("developer", "Rules."), Message("user", "question  ")], gguf_template=None,
                 named="gemma")
    assert out.text == "<start_of_turn>user\nRules.\n\nquestion<end_of_turn>\n<start_of_turn>model\n"
    out = render([Message("user", "  padded  ")], gguf_template=None, named="gemma")
    assert out.text == "<start_of_turn>user\npadded<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_system_only_becomes_a_user_turn():
    out = render([Message("system", "Only a system.")], gguf_template=None, named="gemma")
    assert out.text == "<start_of_turn>user\nOnly a system.<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_conversation_starting_with_assistant_gets_empty_user_turn_first():
    out = render([Message("assistant", "I speak first."), Message("user", "ok")], gguf_template=None,
                 named="gemma")
    assert out.text.startswith("<start_of_turn>user\n<end_of_turn>\n<start_of_turn>model\nI speak first.")
    assert out.text.endswith("<start_of_turn>model\n")


def test_chatml_renders_exact_prompt():
    out = render(CONVERSATION, gguf_template=None, named="chatml")
    assert out.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert out.stop_texts == ("<|im_end|>",)
    assert out.has_bos is False


def test_chatml_maps_developer_to_system():
    out = render([Message("developer", "d")], gguf_template=None, named="chatml")
    assert out.text.startswith("<|im_start|>system\nd<|im_end|>\n")


def test_named_templates_are_gemma_and_chatml():
    assert set(NAMED) == {"gemma", "chatml"}


def test_gguf_template_wins_over_named_and_gets_bos():
    out = render(CONVERSATION[1:2], gguf_template=JINJA, named="gemma", bos="<s>", eos="</s>")
    assert out == Rendered("<s>[user]Hi there\n[assistant]", has_bos=True)


def test_gguf_template_without_bos_in_output_has_no_bos():
    out = render(CONVERSATION[1:2], gguf_template="{% for m in messages %}{{ m.content }}{% endfor %}",
                 named=None, bos="<s>")
    assert out.text == "Hi there" and out.has_bos is False


def test_gguf_template_with_empty_bos_has_no_bos():
    out = render(CONVERSATION[1:2], gguf_template=JINJA, named=None, bos="")
    assert out.text.startswith("[user]") and out.has_bos is False


def test_gguf_template_sees_eos_token():
    out = render(CONVERSATION[1:2], gguf_template="{{ messages[0].content }}{{ eos_token }}", named=None,
                 bos="<s>", eos="</s>")
    assert out.text == "Hi there</s>"


def test_raise_exception_in_template_is_template_error():
    source = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        render(CONVERSATION, gguf_template=source, named=None)


def test_template_syntax_error_is_template_error():
    with pytest.raises(TemplateError, match="chat template failed"):
        render(CONVERSATION, gguf_template="{% for m in messages %}", named=None)


def test_dunder_attribute_renders_as_nothing():
    """The sandbox turns a first step into Python internals into an undefined value (empty text)."""
    out = render_jinja("[{{ ''.__class__ }}]", CONVERSATION, "", "")
    assert out.text == "[]"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
])
def test_reaching_python_internals_is_template_error(source):
    with pytest.raises(TemplateError, match="unsafe"):
        render_jinja(source, CONVERSATION, "", "")


@pytest.mark.parametrize("source", [
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{{ messages.pop() }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{{ messages[0].clear() }}",
])
def test_mutating_messages_is_template_error(source):
    messages = [Message("user", "hi")]
    with pytest.raises(TemplateError, match="unsafe"):
        render_jinja(source, messages, "", "")
    assert messages == [Message("user", "hi")]


def test_format_string_cannot_read_attributes():
    out = render_jinja("{{ '{0.__class__}'.format(bos_token) }}", CONVERSATION, "<s>", "")
    assert "class" not in out.text


def test_no_template_at_all_is_template_error():
    with pytest.raises(TemplateError, match="no chat template"):
        render(CONVERSATION, gguf_template=None, named=None)


def test_empty_gguf_template_falls_back_to_named():
    out = render(CONVERSATION, gguf_template="", named="chatml")
    assert out.text.startswith("<|im_start|>system")


def test_unknown_named_template_is_template_error():
    with pytest.raises(TemplateError, match="unknown chat template 'llama-99'"):
        render(CONVERSATION, gguf_template=None, named="llama-99")


def test_template_error_is_a_value_error():
    assert issubclass(TemplateError, ValueError)
