"""Whole-batch sampling through the Hugging Face decoder (fallback for architectures the fast
path in `fast_decoder` does not know).

Each distinct prompt is prefilled once with a DynamicCache, its cache rows are copied for the
num_samples continuations, and all rows decode together until the last one finishes. Prompts are
left-padded with position ids counted from each prompt's first real token, so results match
unpadded runs. No prefix cache and no joining mid-batch on this path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..lora import LoraWeights, per_row_active, shared_active, use_lora
from ..types import SampledSequence, SampleResult, SamplingConfig
from .ops import StopRule, fill_prompt_logprobs, request_generator, shape_logits, stop_rule, topk_lists
from .request import SampleRequest, SamplerHost


@dataclass
class _Row:
    req: int  # index of the request in the batch
    stop: StopRule
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[list[tuple[int, float]]] | None = None  # when the request set extras.topk_sample
    stop_reason: str = "length"


def _active(weights: list[LoraWeights | None], device: torch.device):
    first = weights[0]
    if all(w is first for w in weights):
        return shared_active(first)
    return per_row_active(weights, device)


def _choose(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """Draw one token per row from logits shaped by temperature, top-k and top-p."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    x = shape_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _prompt_logprobs(engine: SamplerHost, req: SampleRequest, h: torch.Tensor, res: SampleResult) -> None:
    """h: (L, H) final hidden states of the prompt (no padding)."""
    with use_lora(shared_active(req.weights)):
        logits = engine.model.get_output_embeddings()(h[:-1]).float()
    fill_prompt_logprobs(req, logits, res)


@torch.inference_mode()
def run_batch(engine: SamplerHost, reqs: list[SampleRequest]) -> list[SampleResult]:
    dev = engine.device
    model = engine.model
    decoder = model.get_decoder()
    unembed = model.get_output_embeddings()
    lengths = [len(r.prompt) for r in reqs]
    t_max = max(lengths)
    ids = torch.zeros(len(reqs), t_max, dtype=torch.long)
    mask = torch.zeros(len(reqs), t_max, dtype=torch.long)
    for j, r in enumerate(reqs):
        ids[j, t_max - lengths[j]:] = torch.tensor(r.prompt)
        mask[j, t_max - lengths[j]:] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = not bool(mask.all())
    results = [SampleResult(sequences=[]) for _ in reqs]

    cache = DynamicCache()
    with engine.compute_lock, use_lora(_active([r.weights for r in reqs], dev)):
        h = decoder(input_ids=ids, attention_mask=mask if padded else None, position_ids=pos,
                    cache=cache, use_cache=True).last_hidden_state
    for j, r in enumerate(reqs):
        if r.wants_prompt_logits:
            with engine.compute_lock:
                _prompt_logprobs(engine, r, h[j, t_max - lengths[j]:], results[j])

    # One row per sample; rows of a request share its prefilled cache.
    rows: list[_Row] = []
    gens: list[torch.Generator] = []
    src: list[int] = []
    for j, r in enumerate(reqs):
        stop = stop_rule(engine, r.cfg, lengths[j])
        gens.append(request_generator(r.cfg, dev))
        for _ in range(r.n):
            rows.append(_Row(j, stop, topk=[] if r.extras.topk_sample else None))
            src.append(j)
    alive = [i for i, row in enumerate(rows) if row.stop.max_new > 0]
    if alive:
        sel = torch.tensor([src[i] for i in alive], device=dev)
        cache.batch_select_indices(sel)
        last_h = h[sel, -1]
        mask = mask[sel]
        next_pos = pos[sel, -1] + 1
        weights = [reqs[src[i]].weights for i in alive]
        active = _active(weights, dev)
        with engine.compute_lock, use_lora(active):
            logits = unembed(last_h).float()
    while alive:
        logp = torch.log_softmax(logits, dim=-1)
        chosen = torch.empty(len(alive), dtype=torch.long, device=dev)
        by_req: dict[int, list[int]] = {}
        for k, i in enumerate(alive):
            by_req.setdefault(rows[i].req, []).append(k)
        for j, ks in by_req.items():
            kt = torch.tensor(ks, device=dev)
            chosen[kt] = _choose(logits[kt], reqs[j].cfg, gens[j])
        chosen_lp = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        chosen_l = chosen.tolist()
        for k, i in enumerate(alive):  # top-k sampled logprobs, only for rows that asked
            if rows[i].topk is not None:
                rows[i].topk.append(topk_lists(logp[k : k + 1], reqs[rows[i].req].extras.topk_sample)[0])
        keep: list[int] = []
        for k, i in enumerate(alive):
            row = rows[i]
            tok = chosen_l[k]
            row.tokens.append(tok)
            row.logprobs.append(chosen_lp[k])
            reason = row.stop.reason(engine.tokenizer, row.tokens)
            if reason is None:
                keep.append(k)
            else:
                row.stop_reason = reason
        if not keep:
            break
        if len(keep) < len(alive):
            kt = torch.tensor(keep, device=dev)
            cache.batch_select_indices(kt)
            mask, next_pos, chosen = mask[kt], next_pos[kt], chosen[kt]
            alive = [alive[k] for k in keep]
            active = _active([reqs[src[i]].weights for i in alive], dev)
        mask = torch.cat([mask, torch.ones(len(alive), 1, dtype=mask.dtype, device=dev)], dim=1)
        with engine.compute_lock, use_lora(active):
            h = decoder(input_ids=chosen.unsqueeze(1), attention_mask=mask if padded else None,
                        position_ids=next_pos.unsqueeze(1), cache=cache, use_cache=True).last_hidden_state
            logits = unembed(h[:, -1]).float()
        next_pos = next_pos + 1

    for row in rows:
        results[row.req].sequences.append(
            SampledSequence(row.tokens, row.logprobs, row.stop_reason, row.topk))  # type: ignore[arg-type]
    return results
