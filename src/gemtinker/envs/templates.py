"""Prompt templates: how a GEM observation string becomes the text the policy continues.

The names follow GEM's own training script so its command lines run unchanged:
  qwen3_general  a `Question: ...` user turn asking for a \\boxed{} answer (math, reasoning-gym)
  qwen3_game     a "you are playing language games" user turn (game:* envs)
  no             the observation as is (use it when a wrapper such as concat_chat already
                 rendered the whole chat)
  chat           the model's own chat template around the observation (a user turn plus the
                 generation prompt); the natural choice for instruction-tuned non-Qwen models
  chat_boxed     `chat`, with the assistant's reply already begun with `\\boxed{` (a prefill):
                 the env sees that prefix + the sampled text. GEM parses answers only inside
                 \\boxed{}, which a 135M model almost never writes unprompted (0 of 48 samples
                 on GuessTheNumber); with the prefill most replies parse, so RL has a signal
                 from the first step. The policy still chooses every answer token.
  chat_multiturn, chat_multiturn_boxed
                 the episode as one growing chat: the first observation is the first user
                 message, every reply an assistant message, every later observation the next
                 user message. Turn t+1's prompt extends turn t's prompt and reply token for
                 token, so the learner computes an episode's shared history once. Use it with
                 env_wrappers=none: the chat already keeps the history a concat wrapper adds.

SmolLM2 uses the same `<|im_start|>`/`<|im_end|>` markers as Qwen, so the qwen3 templates
tokenise into its real special tokens.
"""

from __future__ import annotations

from typing import Any, Callable

TEMPLATE_NAMES = (
    "qwen3_general", "qwen3_game", "no", "chat", "chat_boxed", "chat_multiturn", "chat_multiturn_boxed",
)
MULTITURN_TEMPLATES = ("chat_multiturn", "chat_multiturn_boxed")
_CHAT_TEMPLATES = ("chat", "chat_boxed", *MULTITURN_TEMPLATES)

# Text a template puts at the start of the assistant reply (part of the prompt tokens; prepended
# to the sampled text before the env sees it).
_REPLY_PREFIX = {"chat_boxed": "\\boxed{", "chat_multiturn_boxed": "\\boxed{"}


def _qwen3_general(observation: str) -> str:
    return (
        f"<|im_start|>user\nQuestion: {observation}"
        "\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _qwen3_game(observation: str) -> str:
    return (
        "<|im_start|>user\nYou are playing language games. Make valid actions to win.\n"
        f"Observation: {observation}"
        "\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _no_template(observation: str) -> str:
    return observation


_STRING_TEMPLATES: dict[str, Callable[[str], str]] = {
    "qwen3_general": _qwen3_general,
    "qwen3_game": _qwen3_game,
    "no": _no_template,
}


def check_template(name: str) -> None:
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")


def reply_prefix(name: str) -> str:
    """The start of the assistant reply that template `name` writes itself ("" for most)."""
    check_template(name)
    return _REPLY_PREFIX.get(name, "")


def is_multiturn(name: str) -> bool:
    """Whether template `name` renders the whole episode as one chat (see `render_chat`)."""
    return name in MULTITURN_TEMPLATES


def render_chat(name: str, messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The prompt text of a chat template for `messages` (ending with the generation prompt and
    the template's reply prefix)."""
    check_template(name)
    if name not in _CHAT_TEMPLATES:
        raise ValueError(f"template={name} is not a chat template")
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"template={name} needs a tokenizer that has a chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + reply_prefix(name)


def apply_template(name: str, observation: str, tokenizer: Any = None) -> str:
    """Render `observation` with template `name` into the prompt text (ending with the
    template's reply prefix, if it has one). For a multi-turn template this is the first turn."""
    check_template(name)
    if name in _CHAT_TEMPLATES:
        return render_chat(name, [{"role": "user", "content": observation}], tokenizer)
    return _STRING_TEMPLATES[name](observation)


def encode_prompt(text: str, tokenizer: Any) -> list[int]:
    """Tokenise a rendered prompt.

    Special tokens are already spelled out in the text (`<|im_start|>` ...), so the tokenizer
    must not add its own BOS/EOS on top.
    """
    return list(tokenizer.encode(text, add_special_tokens=False))
