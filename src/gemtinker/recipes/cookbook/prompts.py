"""How a GEM observation becomes the cookbook's chat: prompt templates, the answer prefill, and
the renderer chosen for a model (including local models the cookbook does not know)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tinker_cookbook.tokenizer_utils import get_tokenizer

# GEM's tinker examples offer two ways to present the first observation: as-is ("no"), or as a
# question with an instruction to reason and box the answer ("general"; GEM's rg/math rewards
# read the last \boxed{} of the reply).


def _general_prompt(observation: str) -> str:
    return (
        f"Question: {observation}\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )


def _no_prompt(observation: str) -> str:
    return observation


PROMPT_TEMPLATES: dict[str, Callable[[str], str]] = {"general": _general_prompt, "no": _no_prompt}

# Answer prefill: text that starts every assistant reply as part of the prompt (the policy
# continues it; GEM sees prefix + reply). "boxed" is the low-level trainer's `chat_boxed`
# prefill, `\boxed{`, which lets a small model (SmolLM2-135M) answer in the only format GEM's
# games and math envs parse. Any other non-empty value is used literally.
def _boxed_prefix() -> str:
    from gemtinker.envs.templates import reply_prefix

    return reply_prefix("chat_boxed")


ANSWER_PREFIX_NAMES: dict[str, Callable[[], str]] = {"boxed": _boxed_prefix}


def resolve_answer_prefix(answer_prefix: str | None) -> str:
    """The literal prefill text for an `answer_prefix` setting ("" / None: no prefill)."""
    if not answer_prefix:
        return ""
    named = ANSWER_PREFIX_NAMES.get(answer_prefix)
    return named() if named else answer_prefix

# Renderers whose special tokens a tokenizer must have as single tokens, in order of preference.
# SmolLM2 (the default model) uses ChatML (<|im_start|>role\n...<|im_end|>), which is exactly what
# `qwen3_instruct` renders; it also has the extension property and no <think> block.
_CHATML_RENDERER = "qwen3_instruct"
_FALLBACK_RENDERER = "role_colon"


def default_renderer_name(model_name: str, tokenizer: Any | None = None) -> str:
    """Pick a renderer for `model_name`, including local and non-hub models.

    The cookbook's own table (`model_info`) knows hosted models only and raises for anything
    else; for those we look at the tokenizer: ChatML special tokens -> `qwen3_instruct`,
    otherwise the plain-text `role_colon` renderer (needs no special tokens).
    """
    from tinker_cookbook import model_info

    try:
        return model_info.get_recommended_renderer_name(model_name)
    except Exception:  # noqa: BLE001 - unknown model: decide from the tokenizer below
        pass
    if tokenizer is None:
        tokenizer = get_tokenizer(model_name)
    if _single_token(tokenizer, "<|im_start|>") and _single_token(tokenizer, "<|im_end|>"):
        return _CHATML_RENDERER
    return _FALLBACK_RENDERER


def _single_token(tokenizer: Any, text: str) -> bool:
    try:
        return len(tokenizer.encode(text, add_special_tokens=False)) == 1
    except Exception:  # noqa: BLE001
        return False
