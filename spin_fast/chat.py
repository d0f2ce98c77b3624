"""Chat-template rendering: the ONE place the sampler and the trainer turn messages into token ids.

Both sides must see the same prompt tokens, or the opponent's samples are conditioned on a prompt the
trainer never scores. So: render to text with the tokenizer's (or a given) Jinja chat template, then
tokenize that text with add_special_tokens=False (the template itself writes BOS and turn markers).
Templates run in template.py's sandbox with a time and size limit (they are code from the model folder);
the text is what `tokenizer.apply_chat_template(..., tokenize=False)` renders.
"""
from __future__ import annotations

from .errors import InputError
from .template import TemplateLimitError, render


class RenderError(ValueError):
    """The chat template fails on, or cannot split, one conversation (a property of the row: the readers turn it
    into a BadRow naming file:row)."""


def _template(tokenizer, chat_template: str | None) -> str:
    tpl = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):                         # named templates: the default one
        tpl = tpl.get("default")
    if not tpl or not isinstance(tpl, str):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise InputError(f"tokenizer {name!r} has no chat template: pass one (--chat-template STR / "
                         f"chat_template=...), e.g. \"{{% for m in messages %}}{{{{ m['role'] }}}}: "
                         f"{{{{ m['content'] }}}}\\n{{% endfor %}}{{% if add_generation_prompt %}}assistant: {{% endif %}}\"")
    return tpl


def render_text(tokenizer, messages: list[dict], chat_template: str | None = None,
                add_generation_prompt: bool = True) -> str:
    """The template's text for `messages`, with the variables transformers passes: the special tokens
    (bos_token, eos_token, ...), messages, tools / documents (None) and add_generation_prompt."""
    template = _template(tokenizer, chat_template)
    tokens = {k: v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items() if isinstance(v, str)}
    try:
        return render(template, **tokens, messages=[dict(m) for m in messages], tools=None, documents=None,
                      add_generation_prompt=add_generation_prompt)
    except TemplateLimitError:
        raise
    except Exception as e:  # jinja2 TemplateError / SecurityError / raise_exception() in the template, e.g. role order
        raise RenderError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(tokenizer, messages: list[dict], chat_template: str | None = None) -> list[int]:
    """Token ids of `messages` (ending on a user turn) followed by the assistant generation prompt."""
    return encode(tokenizer, render_text(tokenizer, messages, chat_template, add_generation_prompt=True))


def render_texts(tokenizer, messages: list[dict], response: str, chat_template: str | None = None) -> tuple[str, str]:
    """(text of the prompt + generation prompt, text of prompt + response): what render_prompt_response tokenizes,
    and all a row needs to render (RenderError otherwise)."""
    prompt_text = render_text(tokenizer, messages, chat_template, add_generation_prompt=True)
    full_text = render_text(tokenizer, list(messages) + [{"role": "assistant", "content": response}],
                            chat_template, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise RenderError("chat template renders prompt+response with a different prefix than the prompt alone "
                          "(generation prompt not a prefix); cannot split prompt and response tokens")
    return prompt_text, full_text


def render_prompt_response(tokenizer, messages: list[dict], response: str,
                           chat_template: str | None = None) -> tuple[list[int], int]:
    """(ids of prompt + assistant `response` as the template closes a turn, number of prompt tokens).

    The prompt part is exactly render_prompt(...), so response tokens are scored in the same context the
    sampler generated them in; the response part is what the template adds after it (content + end of turn).
    """
    prompt_text, full_text = render_texts(tokenizer, messages, response, chat_template)
    prompt_ids = encode(tokenizer, prompt_text)
    # tokenized separately: BPE merges across the boundary would otherwise shift the split point
    return prompt_ids + encode(tokenizer, full_text[len(prompt_text):]), len(prompt_ids)
