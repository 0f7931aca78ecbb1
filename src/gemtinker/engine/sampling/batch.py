"""The fast path's running batch: admission (prefill), one decode step, retirement.

`SamplingScheduler` calls these from its loop, holding its busy lock:
  1. `admit` prefills newcomers by the plan of `prefill` (shared prompts once, shared starts
     once, cached prefixes copied) and gives every sample a row of the KV buffer (`kv`);
  2. `decode_step` feeds every row its last token and draws the next (`ops.draw_tokens`),
     newcomers included (continuous batching: a request never waits for the running batch);
  3. `retire` hands finished rows' sequences to their requests and their K/V to the prefix
     cache, and compacts the rows.

Sampling draws come from one CPU generator per request, so a seeded request gives the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from ..types import SampledSequence, SampleResult
from .fast_decoder import FastDecoder, Plan
from .kv import DecodeRow, KVRows
from .ops import draw_tokens, fill_prompt_logprobs, request_generator, stop_rule, topk_lists
from .prefill import PrefillChunk, PrefillLead, chunk_leads, group_requests, lead_for, shared_starts
from .prefix_cache import PrefixCache
from .prompt_extras import fill_prompt_extras
from .request import SampleRequest, SamplerHost


class FastBatch:
    """The rows decoding on the fast path, with the decoder, KV buffer and plan they use."""

    max_prefill_tokens = 4096  # padded tokens per prefill forward (bounds activation memory)
    min_shared_start = 16  # prompts sharing at least this many leading tokens prefill them once

    def __init__(self, engine: SamplerHost, cache: PrefixCache | None, stats: dict[str, float], max_rows: int):
        self.engine, self.cache, self.stats = engine, cache, stats
        self.decoder: FastDecoder | None = None  # built on first use (it packs every linear)
        self.kv = KVRows(max_rows, engine.max_len)
        self._plan_key: tuple | None = None
        self._plan: Plan | None = None

    @property
    def rows(self) -> list[DecodeRow | None]:
        return self.kv.rows

    def ensure_decoder(self) -> None:
        if self.decoder is None:
            with self.engine.compute_lock:
                self.decoder = FastDecoder(self.engine.model, self.engine.device, self.engine.dtype,
                                           on_build=getattr(self.engine, "release_training_memory", None),
                                           after_build=getattr(self.engine, "release_model_weights", None))

    def live_requests(self) -> int:
        return len({id(r.req) for r in self.kv.rows if r is not None})

    def abandon(self) -> list[SampleRequest]:
        """Drop every row (after a failed step); returns their requests, once each."""
        reqs = list({id(r.req): r.req for r in self.kv.rows if r is not None}.values())
        self.kv.rows, self._plan_key = [], None
        return reqs

    def drop(self, key: str) -> None:
        """Forget a released sampler's packed weights."""
        if self.decoder is not None:
            with self.engine.compute_lock:  # a running step may be reading the decoder's caches
                self.decoder.drop(key)

    def release(self) -> None:
        """Free the KV buffer, the plan and the packed weights (no row may be live)."""
        self.kv.buf = None
        self._plan_key, self._plan = None, None
        if self.decoder is not None:
            with self.engine.compute_lock:
                self.decoder.drop_all()

    @contextlib.contextmanager
    def _computing(self, stat: str) -> Iterator[None]:
        """Hold the model for a forward; the time it is held (not the wait) goes to stats[stat]."""
        with self.engine.compute_lock, torch.inference_mode():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.stats[stat] += time.perf_counter() - t0

    # ------------------------------------------------------------------ KV buffer
    def _ensure_capacity(self, rows: int, t: int) -> None:
        self.kv.ensure_capacity(self.decoder.new_buffer, rows, t)

    def _plan_for(self, rows: list[DecodeRow]) -> Plan:
        key = tuple(r.req.key for r in rows)
        if key != self._plan_key:
            with self.engine.compute_lock:  # drop_sampler edits the decoder's weight caches
                self._plan = self.decoder.plan(list(key), [r.req.weights for r in rows])
            self._plan_key = key
        return self._plan

    # ------------------------------------------------------------------ admission (prefill)
    def admit(self, reqs: list[SampleRequest]) -> None:
        """Prefill newcomers' prompts, all but the last token, into fresh rows (the plan:
        `prefill`), then give every sample a row.

        The last prompt token is fed by the next decode step like any sampled token, so the
        first token's logits come from the same computation whether or not the prefix was
        cached: a repeated prompt gives bit-identical results.
        """
        kv = self.kv
        if self.cache is not None:
            for start in shared_starts(reqs, self.min_shared_start):
                self._prefill_start(start.key, reqs, start.tokens)
        for r in reqs:
            r.gen = request_generator(r.cfg)
            r.seqs = [None] * r.n
            r.result = SampleResult(sequences=[])
            self.stats["prompt_tokens"] += len(r.prompt)
        leads: list[PrefillLead] = []
        for g in group_requests(reqs):
            ld = lead_for(g, self.cache)
            ld.req.result.prompt_cache_hit_tokens = ld.cached
            for f in g[1:]:  # same prompt, same weights: nothing is computed for it
                f.result.prompt_cache_hit_tokens = len(f.prompt)
            self.stats["cache_hit_tokens"] += ld.cached + sum(len(f.prompt) for f in g[1:])
            leads.append(ld)
        chunks = chunk_leads(leads, self.max_prefill_tokens)
        n0 = len(kv.rows)
        t_need = max([ch.positions for ch in chunks] + [len(ld.req.prompt) + 1 for ld in leads]
                     + [r.length + 1 for r in kv.rows])
        self._ensure_capacity(n0 + len(leads) + sum(r.n for r in reqs), t_need)
        lead_row: dict[int, int] = {}
        row = n0
        for ch in chunks:
            for i, ld in enumerate(ch.leads):
                lead_row[id(ld.req)] = row + i
            self._prefill_chunk(ch, row)
            row += len(ch.leads)
        kv.rows.extend([None] * (row - n0))  # prefill rows: become sample rows or holes
        for ld in leads:
            self._spawn_rows(ld, lead_row[id(ld.req)])
        for r in reqs:
            if r.rows_left == 0:
                _finish(r)

    def _prefill_chunk(self, ch: PrefillChunk, row0: int) -> None:
        """One forward over the chunk's suffixes into rows row0.., on top of their cached K/V."""
        kv, fd = self.kv, self.decoder
        s = max(len(ld.suffix) for ld in ch.leads)
        ids = torch.zeros(len(ch.leads), s, dtype=torch.long)
        pos = torch.zeros(len(ch.leads), s, dtype=torch.long)
        for i, ld in enumerate(ch.leads):
            suf = ld.suffix
            if suf:
                ids[i, : len(suf)] = torch.tensor(suf)
            pos[i] = torch.arange(ld.cached, ld.cached + s)
            if ld.cached:
                kv.load(row0 + i, ld.entry.kv, ld.cached)
            self.stats["prefill_tokens"] += len(suf)
        if s == 0:  # whole prefix cached, or one-token prompts: nothing to prefill
            if ch.solo:
                lead = ch.leads[0].req
                lead.result.prompt_logprobs = [None] if lead.prompt_logprobs else None
                lead.result.topk_prompt_logprobs = [None] if lead.topk else None
                no_rows = torch.zeros(0, 0)  # a one-token prompt has no position to score or draw at
                fill_prompt_extras(lead.extras, lead.cfg, no_rows, no_rows, lead.result)
            return
        dev = self.engine.device
        with self._computing("prefill_seconds"):
            plan = fd.plan([ld.req.key for ld in ch.leads], [ld.req.weights for ld in ch.leads])
            h = fd.forward(plan, kv.buf, row0, ids.to(dev), pos.to(dev), int(pos[:, -1].max()) + 1)
            if ch.solo:
                lead = ch.leads[0].req
                fill_prompt_logprobs(lead, fd.logits(plan, h[0]), lead.result)
        if self.cache is not None:
            for i, ld in enumerate(ch.leads):
                n_tok = len(ld.req.prompt) - 1
                self.cache.insert(ld.req.key, ld.req.prompt[:n_tok], kv.snapshot(row0 + i, n_tok))

    def _spawn_rows(self, ld: PrefillLead, src: int) -> None:
        """One row per sample of the lead's group: the first keeps the prefill row `src`, the
        rest copy its K/V."""
        kv, eng = self.kv, self.engine
        n_ctx = len(ld.req.prompt) - 1
        used_src = False
        for r in ld.group:
            stop = stop_rule(eng, r.cfg, len(r.prompt))
            for k in range(r.n):
                if stop.max_new <= 0:
                    r.seqs[k] = SampledSequence([], [], "length", [] if r.extras.topk_sample else None)
                    continue
                rw = DecodeRow(r, k, stop, n_ctx, next_token=r.prompt[-1])
                if not used_src:
                    idx, used_src = src, True
                else:
                    idx = len(kv.rows)
                    kv.rows.append(None)
                    if n_ctx:
                        kv.copy(idx, src, n_ctx)
                kv.rows[idx] = rw
                r.rows_left += 1

    def _prefill_start(self, key: str, reqs: list[SampleRequest], start: list[int]) -> None:
        """Prefill `start` under sampler `key` (on top of its longest cached part) into the cache."""
        entry, hit = self.cache.lookup(key, start)
        if hit >= len(start):
            return
        weights = next(r.weights for r in reqs if r.key == key)
        row = len(self.kv.rows)  # a free row: the newcomers' prefill overwrites it afterwards
        self._ensure_capacity(row + 1, len(start) + 1)
        dev = self.engine.device
        if hit:
            self.kv.load(row, entry.kv, hit)
        ids = torch.tensor([start[hit:]], dtype=torch.long, device=dev)
        pos = torch.arange(hit, len(start), device=dev).unsqueeze(0)
        with self._computing("prefill_seconds"):
            plan = self.decoder.plan([key], [weights])
            self.decoder.forward(plan, self.kv.buf, row, ids, pos, len(start))
        self.stats["prefill_tokens"] += len(start) - hit
        self.stats["shared_start_tokens"] += len(start) - hit
        self.cache.insert(key, start, self.kv.snapshot(row, len(start)))

    # ------------------------------------------------------------------ decode
    def decode_step(self) -> None:
        rows: list[DecodeRow] = self.kv.rows  # dense: retire compacts after every step
        fd = self.decoder
        t_used = max(r.length for r in rows) + 1
        self._ensure_capacity(len(rows), t_used)
        dev = self.engine.device
        ids = torch.tensor([[r.next_token] for r in rows], device=dev)
        pos = torch.tensor([[r.length] for r in rows], device=dev)
        plan = self._plan_for(rows)
        with self._computing("decode_seconds"):
            h = fd.forward(plan, self.kv.buf, 0, ids, pos, t_used)
            logits = fd.logits(plan, h[:, 0])
        for r in rows:
            r.length += 1
        self.stats["decode_steps"] += 1
        self._sample(rows, logits)

    def _sample(self, rows: list[DecodeRow], logits: torch.Tensor) -> None:
        """Choose each row's next token, record it and its logprob, and mark finished rows."""
        with torch.inference_mode():
            logp = torch.log_softmax(logits, dim=-1)
            # Uniform draws from each request's own generator, in sample order.
            by_req: dict[int, list[int]] = {}
            for i, r in enumerate(rows):
                if r.req.cfg.temperature != 0:
                    by_req.setdefault(id(r.req), []).append(i)
            u = [0.0] * len(rows)
            for idxs in by_req.values():
                idxs.sort(key=lambda i: rows[i].sample)
                for i, v in zip(idxs, torch.rand(len(idxs), generator=rows[idxs[0]].req.gen).tolist()):
                    u[i] = v
            chosen = draw_tokens(logits, logp, [r.req.cfg for r in rows], u)
            lps = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
            toks = chosen.tolist()
            want_topk = [i for i, r in enumerate(rows) if r.req.extras.topk_sample]
            if want_topk:  # one top-k over the rows that want it, at the widest k asked
                k_max = max(rows[i].req.extras.topk_sample for i in want_topk)
                it = torch.tensor(want_topk, device=logits.device)
                for i, top in zip(want_topk, topk_lists(logp[it], k_max)):
                    rows[i].topk.append(top[: rows[i].req.extras.topk_sample])
        tokenizer = self.engine.tokenizer
        for r, tok, lp in zip(rows, toks, lps):
            r.tokens.append(tok)
            r.logprobs.append(lp)
            r.next_token = tok
            reason = r.stop.reason(tokenizer, r.tokens)
            if reason is not None:
                r.stop_reason, r.finished = reason, True

    # ------------------------------------------------------------------ retire
    def retire(self) -> None:
        """Finished rows give their sequence to the request and their K/V to the prefix cache;
        the rows left are compacted."""
        rows = self.kv.rows
        for i, r in enumerate(rows):
            if r is None or not r.finished:
                continue
            req = r.req
            req.seqs[r.sample] = SampledSequence(r.tokens, r.logprobs, r.stop_reason,
                                                 r.topk if req.extras.topk_sample else None)
            if self.cache is not None and r.length > 0:
                # K/V exist for the prompt and every sampled token but the last (never fed back).
                seq = req.prompt + r.tokens[: r.length - len(req.prompt)]
                self.cache.insert(req.key, seq, self.kv.snapshot(i, r.length))
            rows[i] = None
            req.rows_left -= 1
            if req.rows_left == 0:
                _finish(req)
        self.kv.compact()


def _finish(req: SampleRequest) -> None:
    req.result.sequences = list(req.seqs)
    req.done.set()
