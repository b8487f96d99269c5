"""Prompt templates: the model's own chat template, or the paper's raw Alpaca templates.

The paper (Li et al., §3 and its code's ``templates/alpaca.json``) formats every query with
the Alpaca no-input template and no chat template; its App. A.3.2 reruns with each model's
chat template; its attention-score script uses alpaca-lora's shorter ``alpaca_short``.  All
three are offered here, selected by name, and ``adds_bos`` says, in one place, whether the
tokenizer's special tokens are added when a rendered prompt is tokenised: a chat template
already holds the ones it needs, a raw Alpaca prompt gets the tokenizer's usual BOS.
"""

from __future__ import annotations

from interp.errors import SafetyLayersError

TEMPLATES = ("chat", "alpaca", "alpaca_short")

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_SHORT = "### Instruction:\n{instruction}\n\n### Response:\n"
"""alpaca-lora's ``templates/alpaca_short.json``, used by the paper's attention-score script."""


class TemplateError(SafetyLayersError, ValueError):
    """An unknown template name, or a chat template the tokenizer does not have."""


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise TemplateError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return template


def adds_bos(template: str) -> bool:
    """Whether prompts of this template are tokenised with the tokenizer's special tokens."""
    return check_template(template) != "chat"


def format_prompt(tokenizer, query: str, template: str = "chat") -> str:
    """Render one user query as the text the model sees before its answer."""
    check_template(template)
    if template == "alpaca":
        return ALPACA.format(instruction=query)
    if template == "alpaca_short":
        return ALPACA_SHORT.format(instruction=query)
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "this tokenizer has no chat template; use template='alpaca' for a base model"
        )
    messages = [{"role": "user", "content": query}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def format_chat_example(tokenizer, query: str, answer: str, template: str = "chat") -> tuple[str, str]:
    """Return ``(prompt, completion)`` for a training pair: the prompt as ``format_prompt``
    renders it, the completion the answer followed by the end-of-turn marker."""
    prompt = format_prompt(tokenizer, query, template)
    if template != "chat":
        end = tokenizer.eos_token or ""
    else:
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": query}, {"role": "assistant", "content": answer}],
            tokenize=False,
        )
        # whatever the template appends after the answer (e.g. "<|im_end|>\n")
        end = full[full.rindex(answer) + len(answer):] if answer in full else (tokenizer.eos_token or "")
    return prompt, answer + end
