"""The fast path's admission plan (`engine/sampling/prefill.py`), without a model."""

from __future__ import annotations

import torch

from gemtinker.engine import SamplingConfig
from gemtinker.engine.sampling.prefill import PrefillLead, chunk_leads, group_requests, lead_for, shared_starts
from gemtinker.engine.sampling.prefix_cache import PrefixCache
from gemtinker.engine.sampling.request import SampleRequest


def _req(prompt: list[int], key: str = "s", prompt_logprobs: bool = False) -> SampleRequest:
    return SampleRequest(key, None, prompt, 1, SamplingConfig(max_tokens=4), prompt_logprobs, 0)


def test_identical_prompts_of_one_sampler_share_a_lead_unless_they_need_prompt_logits():
    a, b = _req([1, 2, 3]), _req([1, 2, 3])
    other_key, logits = _req([1, 2, 3], key="t"), _req([1, 2, 3], prompt_logprobs=True)
    groups = group_requests([a, other_key, b, logits])
    assert [[id(r) for r in g] for g in groups] == [[id(a), id(b)], [id(other_key)], [id(logits)]]


def test_lead_takes_the_cached_start_but_never_the_last_prompt_token():
    cache = PrefixCache(1000)
    cache.insert("s", [1, 2, 3, 4], torch.zeros(1, 2, 1, 4, 1))
    ld = lead_for([_req([1, 2, 3, 4])], cache)
    assert (ld.cached, ld.suffix) == (3, [])  # the last token goes through decode
    ld = lead_for([_req([1, 2, 9, 9, 9])], cache)
    assert (ld.cached, ld.suffix) == (2, [9, 9])
    solo = lead_for([_req([1, 2, 3, 4], prompt_logprobs=True)], cache)
    assert (solo.cached, solo.entry, solo.solo) == (0, None, True)


def test_chunks_stay_within_the_padded_token_budget_and_solo_leads_run_alone():
    leads = [PrefillLead((_req(list(range(n + 1))),), None, 0, False) for n in (5, 3, 4, 6)]
    solo = PrefillLead((_req([1, 2, 3], prompt_logprobs=True),), None, 0, True)
    chunks = chunk_leads(leads + [solo], max_prefill_tokens=12)
    # shortest suffix first: 2 (solo), 3, 4 | 5, 6 -> padded 2*4=8 <= 12, 3*5=15 > 12
    assert [[len(ld.suffix) for ld in ch.leads] for ch in chunks] == [[2], [3, 4], [5, 6]]
    assert chunks[0].solo and not chunks[1].solo
    assert all(len(ch.leads) * max(len(ld.suffix) for ld in ch.leads) <= 12 for ch in chunks)
    assert chunks[2].positions == 6


def test_shared_starts_finds_families_of_one_sampler_only():
    system = list(range(100, 120))  # 20 tokens, above min_shared_start
    reqs = [_req(system + [1, 2]), _req(system + [3]), _req(system + [4, 5], key="t"), _req([7] * 30)]
    starts = shared_starts(reqs, min_shared_start=16)
    assert [(s.key, s.tokens) for s in starts] == [("s", system)]
    assert shared_starts(reqs, min_shared_start=21) == []
