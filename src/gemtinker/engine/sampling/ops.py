"""Token-level sampling steps shared by both decoders (`scheduler`'s fast path and `generic`):
when a sequence stops, how logits are shaped by temperature/top-k/top-p, and the logprob
summaries (prompt logprobs, top-k lists) a request can ask for.

Returned logprobs are always the log-softmax at temperature 1 (what the trainer's forward
computes); shaping only changes which token is drawn.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from ..types import SampleResult, SamplingConfig, StopReason
from .prompt_extras import fill_prompt_extras
from .request import SampleRequest, SamplerHost

DEFAULT_MAX_TOKENS = 512  # when max_tokens is None


@dataclass(frozen=True)
class StopRule:
    """When one sample of a request stops: a stop token, a stop string in the decoded tail, or
    `max_new` tokens."""

    ids: frozenset[int]
    strings: tuple[str, ...]
    max_new: int

    def reason(self, tokenizer, tokens: list[int]) -> StopReason | None:
        """Why the sequence ends after its last token (None: it goes on)."""
        if tokens[-1] in self.ids or self._hit_string(tokenizer, tokens):
            return "stop"
        if len(tokens) >= self.max_new:
            return "length"
        return None

    def _hit_string(self, tokenizer, tokens: list[int]) -> bool:
        if not self.strings:
            return False
        window = max(len(s) for s in self.strings) + 8  # tokens; every token decodes to >= 0 chars
        text = tokenizer.decode(tokens[-window:])
        return any(s in text for s in self.strings)


def stop_rule(engine: SamplerHost, cfg: SamplingConfig, prompt_len: int) -> StopRule:
    """The request's stop rule; no `stop` means the tokenizer's EOS, no `max_tokens` means
    DEFAULT_MAX_TOKENS, and the model's context length caps both."""
    if cfg.stop is None:
        eos = engine.tokenizer.eos_token_id if engine.tokenizer is not None else None
        ids, strings = (frozenset() if eos is None else frozenset([int(eos)])), ()
    else:
        ids = frozenset(int(s) for s in cfg.stop if not isinstance(s, str))
        strings = tuple(s for s in cfg.stop if isinstance(s, str))
    room = (engine.max_len - prompt_len) if engine.max_len else DEFAULT_MAX_TOKENS
    max_new = min(cfg.max_tokens if cfg.max_tokens is not None else DEFAULT_MAX_TOKENS, room)
    return StopRule(ids, strings, max_new)


def request_generator(cfg: SamplingConfig, device: torch.device | str = "cpu") -> torch.Generator:
    """The request's own generator: seeded requests repeat their draws whatever shares the batch."""
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def shape_logits(x: torch.Tensor, temp: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits shaped by temperature, top-k and top-p (masked entries -inf)."""
    x = x / temp
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        p = torch.softmax(sorted_x, dim=-1)
        drop = (p.cumsum(-1) - p) >= top_p  # keep the token crossing top_p
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x


def topk_lists(logp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Top-k (token, logprob) of each row of a log-softmax, best first."""
    vals, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    return [list(zip(i_row, v_row)) for i_row, v_row in zip(ids.tolist(), vals.tolist())]


def fill_prompt_logprobs(req: SampleRequest, logits: torch.Tensor, res: SampleResult) -> None:
    """Prompt logprobs, their top-k and the prompt extras of `req` into `res`.
    logits: (L-1, V) fp32 at prompt positions 0..L-2 (each predicts the next token)."""
    lp = torch.log_softmax(logits, dim=-1)
    tgt = torch.tensor(req.prompt[1:], device=lp.device)
    if req.prompt_logprobs:
        res.prompt_logprobs = [None] + lp.gather(1, tgt.unsqueeze(1)).squeeze(1).tolist()
    if req.topk > 0:
        res.topk_prompt_logprobs = [None] + topk_lists(lp, req.topk)
    fill_prompt_extras(req.extras, req.cfg, logits, lp, res)


def draw_tokens(logits: torch.Tensor, logp: torch.Tensor, cfgs: list[SamplingConfig], u: list[float]) -> torch.Tensor:
    """One token per row of `logits`, row i under cfgs[i], by inverse-CDF sampling with the
    uniform draw u[i] (temperature 0: argmax, u unused). Rows sharing a configuration are
    shaped and sampled together; logp is log_softmax(logits), reused when nothing shapes them.

    Drawing from a given u (rather than from a generator here) lets each request's draws come
    from its own generator, so a seeded request's tokens do not depend on its batch-mates."""
    vocab = logits.shape[-1]
    chosen = torch.empty(len(cfgs), dtype=torch.long, device=logits.device)
    by_cfg: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        by_cfg.setdefault((c.temperature, c.top_k, c.top_p), []).append(i)
    u_t = torch.tensor(u, dtype=torch.float32, device=logits.device)
    for (temp, top_k, top_p), idxs in by_cfg.items():
        whole = len(idxs) == len(cfgs)
        it = None if whole else torch.tensor(idxs, device=logits.device)
        x = logits if whole else logits[it]
        if temp == 0:
            tok = x.argmax(dim=-1)
        else:
            if temp == 1 and not (0 < top_k < vocab) and top_p >= 1.0:
                probs = logp.exp() if whole else logp[it].exp()
            else:
                probs = torch.softmax(shape_logits(x, temp, top_k, top_p), dim=-1)
            # Inverse-CDF sampling: one draw per row, batched over rows.
            cdf = probs.cumsum(-1)
            uu = u_t if whole else u_t[it]
            tok = torch.searchsorted(cdf, (uu * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            tok = tok.clamp_(max=vocab - 1)
        if whole:
            chosen = tok
        else:
            chosen[it] = tok
    return chosen
