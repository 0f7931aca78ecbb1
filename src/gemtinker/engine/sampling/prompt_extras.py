"""The rarer per-request outputs of sampling (`SampleExtras`), shared by both sampler paths.

All logprobs here are the model's log-softmax at temperature 1, like the sampled tokens'
`logprobs` and `prompt_logprobs`: the tinker SDK does not say which distribution its top-k and
target logprobs come from, and temperature 1 is what the trainer's forward computes. Only the
prompt alternative draws follow the request's temperature, as the SDK documents for
`prompt_alt_tokens_k` ("at the request's temperature"); top-k/top-p do not shape them.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

from ..types import EngineError, SampleExtras, SampleResult, SamplingConfig

# Decorrelates the alternative draws' generator from the sampling generator of the same seed.
_ALT_SEED_SALT = 0x5A17_A17E
# Prompt rows tempered at once for the draws: bounds the extra (rows, V) probabilities a long
# prompt would otherwise allocate beside its logits and log-softmax.
_DRAW_ROWS = 256


def fill_prompt_extras(extras: SampleExtras, cfg: SamplingConfig, logits: torch.Tensor, lp: torch.Tensor,
                       res: SampleResult) -> None:
    """logits: (L-1, V) fp32 at prompt positions 0..L-2 (row i predicts prompt token i + 1);
    lp: their log-softmax, which the caller has computed for prompt_logprobs already."""
    if not extras.needs_prompt_logits:
        return
    if extras.target_ids is not None:
        ids = torch.as_tensor(extras.target_ids, dtype=torch.long, device=lp.device)
        got = lp.gather(1, ids.clamp(min=0)).masked_fill_(ids < 0, 0.0)
        res.target_prompt_logprobs = got.cpu().numpy().astype(np.float32)
    if extras.alt_k > 0:
        tokens, alt_lp = draw_alternatives(logits, lp, cfg, extras.alt_k)
        res.prompt_alt_tokens, res.prompt_alt_logprobs = tokens, alt_lp


def draw_alternatives(logits: torch.Tensor, lp: torch.Tensor, cfg: SamplingConfig,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
    """k draws with replacement per row from softmax(logits / temperature) (argmax at 0),
    from a generator seeded by the request's seed, so a seeded request repeats its draws."""
    n, _ = lp.shape
    if n == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    if cfg.temperature == 0:
        draws = lp.argmax(dim=-1, keepdim=True).expand(n, k)
    else:
        seed = cfg.seed if cfg.seed is not None else secrets.randbits(62)
        gen = torch.Generator(device=lp.device).manual_seed((seed ^ _ALT_SEED_SALT) & (2**63 - 1))
        draws = torch.cat([
            torch.multinomial(torch.softmax(logits[i : i + _DRAW_ROWS].float() / cfg.temperature, dim=-1), k,
                              replacement=True, generator=gen)
            for i in range(0, n, _DRAW_ROWS)
        ])
    chosen = lp.gather(1, draws)
    return draws.cpu().numpy().astype(np.int64), chosen.cpu().numpy().astype(np.float32)


def validate_extras(extras: SampleExtras, prompt_len: int, vocab_size: int) -> None:
    """EngineError naming the field for a SampleExtras the sampler cannot serve."""
    for name, k in (("topk_sample_logprobs", extras.topk_sample), ("prompt_alt_tokens_k", extras.alt_k)):
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise EngineError(f"{name} must be an integer >= 0, got {k!r}")
    ids = extras.target_ids
    if ids is None:
        return
    if not isinstance(ids, np.ndarray) or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise EngineError("target_prompt_logprobs must be a 2-D integer array of token ids")
    if ids.shape[0] != prompt_len - 1:
        raise EngineError(f"target_prompt_logprobs has {ids.shape[0]} rows; the prompt of {prompt_len} tokens "
                          f"needs len(prompt) - 1 = {prompt_len - 1}")
    bad = (ids < -1) | (ids >= vocab_size)
    if bad.any():
        raise EngineError(f"target_prompt_logprobs has token id {int(ids[bad][0])} outside the vocabulary "
                          f"[0, {vocab_size}) (-1 asks for nothing)")
