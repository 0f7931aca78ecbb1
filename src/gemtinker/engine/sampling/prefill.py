"""The admission plan of the fast path: which prompts a step prefills, and in which forwards.

Newcomers are grouped (identical prompts of one sampler are prefilled once: a `PrefillLead`
per group), each lead takes what the prefix cache holds of its prompt, and leads of similar
suffix length are packed into `PrefillChunk`s of at most `max_prefill_tokens` padded tokens, one
forward each. A request that needs its prompt's logits (prompt logprobs, targets, alternative
draws) is a lead of its own and a chunk of its own: every prompt position must be computed.

Before that, different prompts of one sampler that start alike (a system prompt, an env's
instructions) get their common start prefilled once into the cache (`shared_starts`), so each
then prefills only its own rest.

Everything here is planning (no tensors); `scheduler` runs the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prefix_cache import CacheEntry, PrefixCache
from .request import SampleRequest


@dataclass(frozen=True)
class PrefillLead:
    """One prompt to prefill, for the requests that share it (same sampler and prompt)."""

    group: tuple[SampleRequest, ...]  # the first request leads: it gets the prefill row
    entry: CacheEntry | None  # the cached sequence its prompt starts with
    cached: int  # leading prompt tokens whose K/V come from `entry` (never the last token)
    solo: bool  # needs the prompt's logits: prefilled in a chunk of its own, no cache

    @property
    def req(self) -> SampleRequest:
        return self.group[0]

    @property
    def suffix(self) -> list[int]:
        """The tokens this lead prefills: the prompt after the cached part, but for the last
        token (the first decode step feeds it, so a cached prompt gives identical results)."""
        return self.req.prompt[self.cached:-1]


@dataclass(frozen=True)
class PrefillChunk:
    """Leads prefilled together in one forward, each in its own row, padded to the longest."""

    leads: tuple[PrefillLead, ...]

    @property
    def solo(self) -> bool:
        return self.leads[0].solo

    @property
    def positions(self) -> int:
        """Buffer positions the padded forward reaches: max(cached) + longest suffix."""
        return max(ld.cached for ld in self.leads) + max(len(ld.suffix) for ld in self.leads)


@dataclass(frozen=True)
class SharedStart:
    """A common start of several prompts of sampler `key`, to prefill once into the cache."""

    key: str
    tokens: list[int]


def group_requests(reqs: list[SampleRequest]) -> list[list[SampleRequest]]:
    """Requests with the same sampler and prompt, in arrival order; one needing prompt logits
    (and target ids, draws) is a group of its own."""
    groups: dict[tuple, list[SampleRequest]] = {}
    for r in reqs:
        gkey = (id(r),) if r.wants_prompt_logits else (r.key, tuple(r.prompt))
        groups.setdefault(gkey, []).append(r)
    return list(groups.values())


def lead_for(group: list[SampleRequest], cache: PrefixCache | None) -> PrefillLead:
    """The group's lead, with the longest cached start of its prompt (none when solo)."""
    lead = group[0]
    solo = lead.wants_prompt_logits
    entry, c = None, 0
    if cache is not None and not solo:
        entry, c = cache.lookup(lead.key, lead.prompt)
        c = min(c, len(lead.prompt) - 1)
    return PrefillLead(tuple(group), entry, c, solo)


def chunk_leads(leads: list[PrefillLead], max_prefill_tokens: int) -> list[PrefillChunk]:
    """Leads sorted by suffix length, packed into chunks of at most `max_prefill_tokens` padded
    tokens; solo leads run alone."""
    chunks: list[list[PrefillLead]] = []
    for ld in sorted(leads, key=lambda x: len(x.req.prompt) - x.cached):
        s = len(ld.suffix)  # the longest in its chunk so far: leads come shortest first
        if chunks and not ld.solo and not chunks[-1][0].solo and (len(chunks[-1]) + 1) * s <= max_prefill_tokens:
            chunks[-1].append(ld)
        else:
            chunks.append([ld])
    return [PrefillChunk(tuple(ch)) for ch in chunks]


def shared_starts(reqs: list[SampleRequest], min_shared_start: int) -> list[SharedStart]:
    """Common starts worth prefilling once. Prompts are sorted per sampler; runs of neighbours
    sharing at least `min_shared_start` tokens form a family, whose common start is one entry."""
    by_key: dict[str, set[tuple[int, ...]]] = {}
    for r in reqs:
        if not r.wants_prompt_logits and len(r.prompt) > min_shared_start:
            by_key.setdefault(r.key, set()).add(tuple(r.prompt))
    out: list[SharedStart] = []
    for key, prompt_set in by_key.items():
        prompts = sorted(prompt_set)
        family_start, shared = 0, None
        for i in range(1, len(prompts) + 1):
            n = 0  # shared with the next prompt; never a prompt's last token (decode feeds it)
            if i < len(prompts):
                a, b = prompts[i - 1], prompts[i]
                n = min(_common_length(a, b), len(a) - 1, len(b) - 1)
            if n >= min_shared_start:
                shared = n if shared is None else min(shared, n)
                continue
            if shared is not None and i - family_start >= 2:
                out.append(SharedStart(key, list(prompts[family_start][:shared])))
            family_start, shared = i, None
    return out


def _common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
