"""The sampler: continuous batching over a preallocated KV buffer, with a prefix KV cache.

`SamplingScheduler.submit` queues a request and blocks; one background thread owns the model
for sampling. Each loop iteration it
  1. admits waiting requests (up to `max_batch_rows` rows): identical prompts of one sampler are
     prefilled once; different prompts that share a long start (system prompt, env
     instructions) prefill that start once; a prompt that extends a cached sequence (an earlier
     turn's prompt + completion, another sample's prompt) copies the cached K/V and prefills
     only the rest;
  2. decodes one token for every running row, newcomers included (continuous batching: a
     request never waits for the running batch to finish);
  3. retires finished rows: results go back to their callers, their K/V go into the prefix
     cache, and the last rows move into the holes so the batch stays dense.

Returned logprobs are log-softmax of the model's logits at temperature 1 (what the trainer's
forward computes, so importance ratios start at 1), whatever temperature/top-k/top-p shaped
the sampling distribution. Sampling draws come from one CPU generator per request, so a seeded
request gives the same tokens whatever else shares its batch.

Models outside the Llama family fall back to `sampler_generic` (whole batches, no prefix cache).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..lora import LoraWeights
from ..memory import release_free_memory
from ..types import SampledSequence, SampleExtras, SampleResult, SamplingConfig
from .fast_decoder import FastDecoder, unsupported_reason
from .generic import run_batch, stop_sets
from .prefix_cache import PrefixCache
from .prompt_extras import fill_prompt_extras, topk_lists
from .request import SampleRequest as _Request  # its name here and in tests (shared with generic)
from .request import SamplerHost

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512  # when max_tokens is None
# The prefix cache's default budget in bytes of K/V, turned into tokens per model. 384 MiB holds
# about 8k tokens of SmolLM2-135M in fp32: a step's worth of multi-turn episodes, while keeping
# the whole `make run` process under 3 GB (the former 32k tokens took up to 1.5 GB).
DEFAULT_PREFIX_CACHE_BYTES = 384 << 20


@dataclass
class _Row:
    req: _Request
    sample: int  # which of the request's num_samples
    max_new: int
    stop_ids: frozenset[int]
    stop_strs: tuple[str, ...]
    length: int  # K/V positions written for this row
    next_token: int = -1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[list[tuple[int, float]]] = field(default_factory=list)  # only when extras.topk_sample
    stop_reason: str = "length"
    finished: bool = False


class SamplingScheduler:
    max_batch_rows = 64
    gather_seconds = 0.002  # when idle, let concurrent submitters arrive together
    max_prefill_tokens = 4096  # padded tokens per prefill forward (bounds activation memory)
    min_shared_start = 16  # prompts sharing at least this many leading tokens prefill them once

    def __init__(self, engine: SamplerHost, prefix_cache: bool = True, prefix_cache_tokens: int | None = None):
        self.engine = engine
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.cache = PrefixCache(prefix_cache_tokens or self._default_cache_tokens(engine)) if prefix_cache else None
        self.fast_reason = unsupported_reason(engine.model)
        self.use_fast = self.fast_reason is None
        if not self.use_fast:
            log.info("sampler: generic path (no prefix cache / continuous batching): %s", self.fast_reason)
        self._fast: FastDecoder | None = None
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Row | None] = []
        self._buf: torch.Tensor | None = None
        self._plan_key: tuple | None = None
        self._plan = None
        self._closing = False
        # Held by the loop while it has rows in flight (admission, decode, retirement), so that
        # `release_idle_memory` never frees what a running batch still uses.
        self._busy = threading.Lock()
        # Counters for tests, benchmarks and monitoring.
        self.batches_run = 0  # admission rounds (one prefill pass over the newcomers)
        self.max_requests_in_batch = 0
        self.stats: dict[str, float] = {
            "prompt_tokens": 0, "prefill_tokens": 0, "cache_hit_tokens": 0, "decode_steps": 0,
            "shared_start_tokens": 0,
            "prefill_seconds": 0.0, "decode_seconds": 0.0,  # time holding the model (not waiting for it)
        }

    # ------------------------------------------------------------------ API
    def submit(
        self, key: str, weights: LoraWeights | None, prompt: list[int], n: int, cfg: SamplingConfig,
        prompt_logprobs: bool, topk: int, extras: SampleExtras | None = None,
    ) -> SampleResult:
        req = _Request(key, weights, prompt, n, cfg, prompt_logprobs, topk, extras or SampleExtras())
        self._ensure_thread()
        self._queue.put(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def drop_sampler(self, key: str) -> None:
        """Forget cached K/V and merged weights of a released sampler."""
        if self.cache is not None:
            self.cache.drop_key(key)
        if self._fast is not None:
            with self.engine.compute_lock:
                self._fast.drop(key)

    def release_idle_memory(self) -> bool:
        """Free the sampler's working memory if no sequence is in flight: the KV buffer, the
        packed (merged) weight sets and the prefix cache. The learner calls this before a
        training call: in a synchronous RL loop all three belong to a policy that is never
        sampled again (the next sampler is a new id), and on `make run` they were 1.3 GB beside
        the learner's activations, i.e. most of the process's peak. A later sample rebuilds what
        it needs (one pass over the weights, a zeroed buffer); a busy sampler (sampling beside
        training) is left alone. Returns whether anything was freed."""
        if not self._busy.acquire(blocking=False):
            return False
        try:
            if self._rows or self._waiting or not self._queue.empty():
                return False
            self._buf = None
            self._plan_key, self._plan = None, None
            if self._fast is not None:
                with self.engine.compute_lock:
                    self._fast.drop_all()
            if self.cache is not None:
                self.cache.clear()
            return True
        finally:
            self._busy.release()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._closing = False
                self._thread = threading.Thread(target=self._loop, name="gemtinker-sampler", daemon=True)
                self._thread.start()

    # ------------------------------------------------------------------ loop
    def _take(self, block: bool) -> None:
        """Move submitted requests into `_waiting`; block (then gather briefly) when idle."""
        try:
            if block:
                item = self._queue.get()
                self._put(item)
                while True:
                    self._put(self._queue.get(timeout=self.gather_seconds))
            while True:
                self._put(self._queue.get_nowait())
        except queue.Empty:
            pass

    def _put(self, item: _Request | None) -> None:
        if item is None:
            self._closing = True
        else:
            self._waiting.append(item)

    def _loop(self) -> None:
        while True:
            idle = not self._rows and not self._waiting and not self._closing
            if idle:
                release_free_memory()  # a batch's transient blocks go back before the next call
            self._take(block=idle)
            if self._closing and not self._rows and not self._waiting:
                return
            if not self.use_fast:
                self._run_generic()
                continue
            with self._busy:
                self._step()

    def _step(self) -> None:
        """One loop iteration of the fast path: admit newcomers, decode one token, retire."""
        admitted: list[_Request] = []
        try:
            if self._fast is None:
                with self.engine.compute_lock:
                    self._fast = FastDecoder(self.engine.model, self.engine.device, self.engine.dtype)
            room = self.max_batch_rows - len(self._rows)
            while self._waiting and self._admissible(self._waiting[0], admitted, room):
                r = self._waiting.popleft()
                admitted.append(r)
                room -= r.n
            if admitted:
                self._admit(admitted)
                self._retire()  # holes left by prefill rows that got no sample row
            if self._rows:
                self._decode_step()
                self._retire()
        except BaseException as e:  # noqa: BLE001 - the culprit is found by rerunning alone
            failed = {id(r.req): r.req for r in self._rows if r is not None}
            failed.update({id(r): r for r in admitted})
            self._rows, self._plan_key = [], None
            self._isolate([r for r in failed.values() if not r.done.is_set()], e)

    def _admissible(self, r: _Request, admitted: list[_Request], room: int) -> bool:
        """Whether the next waiting request joins this step. A request rerun after a failed
        batch runs alone: nothing joins it, and it joins nothing."""
        alone = not admitted and not self._rows
        if r.solo:
            return alone
        if (admitted and admitted[0].solo) or any(row is not None and row.req.solo for row in self._rows):
            return False
        return r.n <= room or alone

    def _isolate(self, reqs: list[_Request], e: BaseException) -> None:
        """After a batch failed: a request that ran alone gets the error; the others are rerun
        one at a time (in their order), so one bad request cannot fail its batch-mates."""
        if len(reqs) <= 1 or isinstance(e, (KeyboardInterrupt, SystemExit)):
            log.exception("sampler request failed", exc_info=e)
            for r in reqs:
                r.error = e
                r.done.set()
            return
        log.warning("sampler batch of %d requests failed (%s: %s); rerunning each alone",
                    len(reqs), type(e).__name__, e)
        for r in reversed(reqs):
            r.restart_alone()
            self._waiting.appendleft(r)

    def _run_generic(self) -> None:
        batch, rows = [], 0
        while self._waiting and (not batch or rows + self._waiting[0].n <= self.max_batch_rows):
            r = self._waiting.popleft()
            batch.append(r)
            rows += r.n
        self.batches_run += 1
        self.max_requests_in_batch = max(self.max_requests_in_batch, len(batch))
        try:
            for r, res in zip(batch, run_batch(self.engine, batch)):
                r.result = res
        except BaseException as e:  # noqa: BLE001 - rerun each alone so only the culprit fails
            if len(batch) == 1:
                log.exception("sampler request failed")
                batch[0].error = e
            else:
                log.warning("sampler batch of %d requests failed (%s); rerunning each alone", len(batch), e)
                for r in batch:
                    try:
                        r.result = run_batch(self.engine, [r])[0]
                    except BaseException as e1:  # noqa: BLE001
                        log.exception("sampler request failed")
                        r.error = e1
        for r in batch:
            r.done.set()

    @contextlib.contextmanager
    def _computing(self, stat: str) -> Iterator[None]:
        """Hold the model for a forward; the time it is held (not the wait) goes to stats[stat]."""
        with self.engine.compute_lock, torch.inference_mode():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.stats[stat] += time.perf_counter() - t0

    @staticmethod
    def _default_cache_tokens(engine: SamplerHost) -> int:
        cfg = engine.model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        per_token = cfg.num_hidden_layers * 2 * kv * head_dim * torch.finfo(engine.dtype).bits // 8
        return max(1024, DEFAULT_PREFIX_CACHE_BYTES // per_token)

    # ------------------------------------------------------------------ KV buffer
    def _ensure_capacity(self, rows: int, t: int) -> None:
        buf = self._buf
        if buf is not None and buf.shape[2] >= rows and buf.shape[4] >= t:
            return
        old_rows, old_t = (0, 0) if buf is None else (buf.shape[2], buf.shape[4])
        new_rows = max(rows, old_rows, min(self.max_batch_rows, 8))
        new_t = max(old_t, -(-(t + 128) // 256) * 256)  # headroom so decode rarely regrows
        if self.engine.max_len:
            new_t = min(new_t, max(t, self.engine.max_len))
        new = self._fast.new_buffer(new_rows, new_t)
        n = len(self._rows)
        if buf is not None and n:
            new[:, :, :n, :, :old_t] = buf[:, :, :n]
        self._buf = new

    def _plan_for(self, rows: list[_Row]):
        key = tuple(r.req.key for r in rows)
        if key != self._plan_key:
            with self.engine.compute_lock:  # drop_sampler edits the decoder's weight caches
                self._plan = self._fast.plan(list(key), [r.req.weights for r in rows])
            self._plan_key = key
        return self._plan

    # ------------------------------------------------------------------ admission (prefill)
    def _admit(self, reqs: list[_Request]) -> None:
        """Prefill newcomers' prompts, all but the last token, into fresh rows.

        The last prompt token is fed by the next decode step like any sampled token, so the
        first token's logits come from the same computation whether or not the prefix was
        cached: a repeated prompt gives bit-identical results.
        """
        eng, fd = self.engine, self._fast
        self.batches_run += 1
        if self.cache is not None:
            self._prefill_shared_starts(reqs)
        groups: dict[tuple, list[_Request]] = {}
        for r in reqs:
            seed = r.cfg.seed if r.cfg.seed is not None else secrets.randbits(63)
            r.gen = torch.Generator().manual_seed(seed)
            r.seqs = [None] * r.n
            r.result = SampleResult(sequences=[])
            self.stats["prompt_tokens"] += len(r.prompt)
            # Prompt logprobs (and target ids, draws) need every prompt position: no sharing, no cache.
            gkey = (id(r),) if r.wants_prompt_logits else (r.key, tuple(r.prompt))
            groups.setdefault(gkey, []).append(r)
        leads = []  # (group, cache entry, cached tokens, needs prompt logprobs)
        for g in groups.values():
            lead = g[0]
            solo = lead.wants_prompt_logits
            entry, c = None, 0
            if self.cache is not None and not solo:
                entry, c = self.cache.lookup(lead.key, lead.prompt)
                c = min(c, len(lead.prompt) - 1)
            lead.result.prompt_cache_hit_tokens = c
            for f in g[1:]:  # same prompt, same weights: nothing is computed for it
                f.result.prompt_cache_hit_tokens = len(f.prompt)
            self.stats["cache_hit_tokens"] += c + sum(len(f.prompt) for f in g[1:])
            leads.append((g, entry, c, solo))
        # Prefill chunks of similar suffix length; prompt-logprob leaders run alone.
        leads.sort(key=lambda x: len(x[0][0].prompt) - x[2])
        chunks: list[list] = []
        for ld in leads:
            s = len(ld[0][0].prompt) - 1 - ld[2]
            if chunks and not ld[3] and not chunks[-1][0][3] and (len(chunks[-1]) + 1) * s <= self.max_prefill_tokens:
                chunks[-1].append(ld)
            else:
                chunks.append([ld])
        n0 = len(self._rows)
        # Padded prefill positions reach max(cached) + longest suffix of the chunk.
        t_need = max([max(c for _, _, c, _ in ch) + max(len(g[0].prompt) - 1 - c for g, _, c, _ in ch) for ch in chunks]
                     + [len(g[0].prompt) + 1 for g, _, _, _ in leads] + [r.length + 1 for r in self._rows])
        self._ensure_capacity(n0 + len(leads) + sum(r.n for r in reqs), t_need)
        buf, dev = self._buf, eng.device

        lead_row: dict[int, int] = {}
        row = n0
        for ch in chunks:
            row0 = row
            suffix = [g[0].prompt[c:-1] for g, _, c, _ in ch]
            s = max(map(len, suffix))
            ids = torch.zeros(len(ch), s, dtype=torch.long)
            pos = torch.zeros(len(ch), s, dtype=torch.long)
            for i, ((g, entry, c, _), suf) in enumerate(zip(ch, suffix)):
                lead_row[id(g[0])] = row0 + i
                if suf:
                    ids[i, : len(suf)] = torch.tensor(suf)
                pos[i] = torch.arange(c, c + s)
                if c:
                    buf[:, :, row0 + i, :, :c] = entry.kv[:, :, :, :c]
                self.stats["prefill_tokens"] += len(suf)
            row += len(ch)
            if s == 0:  # whole prefix cached, or one-token prompts: nothing to prefill
                if ch[0][3]:
                    lead = ch[0][0][0]
                    lead.result.prompt_logprobs = [None] if lead.prompt_logprobs else None
                    lead.result.topk_prompt_logprobs = [None] if lead.topk else None
                    no_rows = torch.zeros(0, 0)  # a one-token prompt has no position to score or draw at
                    fill_prompt_extras(lead.extras, lead.cfg, no_rows, no_rows, lead.result)
                continue
            with self._computing("prefill_seconds"):
                plan = fd.plan([g[0].key for g, _, _, _ in ch], [g[0].weights for g, _, _, _ in ch])
                h = fd.forward(plan, buf, row0, ids.to(dev), pos.to(dev), int(pos[:, -1].max()) + 1)
                if ch[0][3]:
                    self._prompt_logprobs(ch[0][0][0], fd.logits(plan, h[0]))
            if self.cache is not None:
                for i, (g, _, _, _) in enumerate(ch):
                    n_tok = len(g[0].prompt) - 1
                    self.cache.insert(g[0].key, g[0].prompt[:n_tok], buf[:, :, row0 + i, :, :n_tok].clone())
        self._rows.extend([None] * (row - n0))  # prefill rows: become sample rows or holes

        # One row per sample: the group's first sample keeps the prefill row, the rest copy it.
        for g, _, _, _ in leads:
            src = lead_row[id(g[0])]
            n_ctx = len(g[0].prompt) - 1
            used_src = False
            for r in g:
                stop_ids, stop_strs = stop_sets(eng, r.cfg)
                room = (eng.max_len - len(r.prompt)) if eng.max_len else DEFAULT_MAX_TOKENS
                max_new = min(r.cfg.max_tokens if r.cfg.max_tokens is not None else DEFAULT_MAX_TOKENS, room)
                for k in range(r.n):
                    if max_new <= 0:
                        r.seqs[k] = SampledSequence([], [], "length", [] if r.extras.topk_sample else None)
                        continue
                    rw = _Row(r, k, max_new, stop_ids, stop_strs, n_ctx, next_token=r.prompt[-1])
                    if not used_src:
                        idx, used_src = src, True
                    else:
                        idx = len(self._rows)
                        self._rows.append(None)
                        if n_ctx:
                            buf[:, :, idx, :, :n_ctx] = buf[:, :, src, :, :n_ctx]
                    self._rows[idx] = rw
                    r.rows_left += 1
        for r in reqs:
            if r.rows_left == 0:
                self._finish(r)
        live = {id(r.req) for r in self._rows if r is not None}
        self.max_requests_in_batch = max(self.max_requests_in_batch, len(live))

    def _prefill_shared_starts(self, reqs: list[_Request]) -> None:
        """Different prompts of one sampler that start alike (a system prompt, an env's
        instructions, a few-shot header) get that common start prefilled once and put in the
        prefix cache, so each prompt then prefills only its own rest (via the normal lookup).

        Prompts are sorted per sampler; runs of neighbours sharing at least `min_shared_start`
        tokens form a family whose common start is computed once, on top of whatever the cache
        already holds of it."""
        by_key: dict[str, set[tuple[int, ...]]] = {}
        for r in reqs:
            if not r.wants_prompt_logits and len(r.prompt) > self.min_shared_start:
                by_key.setdefault(r.key, set()).add(tuple(r.prompt))
        for key, prompt_set in by_key.items():
            prompts = sorted(prompt_set)
            family_start, shared = 0, None
            for i in range(1, len(prompts) + 1):
                n = 0  # shared with the next prompt; never a prompt's last token (decode feeds it)
                if i < len(prompts):
                    a, b = prompts[i - 1], prompts[i]
                    n = min(_common_length(a, b), len(a) - 1, len(b) - 1)
                if n >= self.min_shared_start:
                    shared = n if shared is None else min(shared, n)
                    continue
                if shared is not None and i - family_start >= 2:
                    self._prefill_start(key, reqs, list(prompts[family_start][:shared]))
                family_start, shared = i, None

    def _prefill_start(self, key: str, reqs: list[_Request], start: list[int]) -> None:
        """Prefill `start` under sampler `key` (on top of its longest cached part) into the cache."""
        entry, hit = self.cache.lookup(key, start)
        if hit >= len(start):
            return
        weights = next(r.weights for r in reqs if r.key == key)
        row = len(self._rows)  # a free row: the newcomers' prefill overwrites it afterwards
        self._ensure_capacity(row + 1, len(start) + 1)
        buf, dev = self._buf, self.engine.device
        if hit:
            buf[:, :, row, :, :hit] = entry.kv[:, :, :, :hit]
        ids = torch.tensor([start[hit:]], dtype=torch.long, device=dev)
        pos = torch.arange(hit, len(start), device=dev).unsqueeze(0)
        with self._computing("prefill_seconds"):
            plan = self._fast.plan([key], [weights])
            self._fast.forward(plan, buf, row, ids, pos, len(start))
        self.stats["prefill_tokens"] += len(start) - hit
        self.stats["shared_start_tokens"] += len(start) - hit
        self.cache.insert(key, start, buf[:, :, row, :, : len(start)].clone())

    def _prompt_logprobs(self, req: _Request, logits: torch.Tensor) -> None:
        """logits: (L-1, V) fp32 at prompt positions 0..L-2 (each predicts the next token)."""
        res = req.result
        lp = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(req.prompt[1:], device=lp.device)
        if req.prompt_logprobs:
            res.prompt_logprobs = [None] + lp.gather(1, tgt.unsqueeze(1)).squeeze(1).tolist()
        if req.topk > 0:
            res.topk_prompt_logprobs = [None] + topk_lists(lp, req.topk)
        fill_prompt_extras(req.extras, req.cfg, logits, lp, res)

    # ------------------------------------------------------------------ decode
    def _decode_step(self) -> None:
        rows: list[_Row] = self._rows  # dense: _retire compacts after every step
        eng, fd = self.engine, self._fast
        t_used = max(r.length for r in rows) + 1
        self._ensure_capacity(len(rows), t_used)
        dev = eng.device
        ids = torch.tensor([[r.next_token] for r in rows], device=dev)
        pos = torch.tensor([[r.length] for r in rows], device=dev)
        plan = self._plan_for(rows)
        with self._computing("decode_seconds"):
            h = fd.forward(plan, self._buf, 0, ids, pos, t_used)
            logits = fd.logits(plan, h[:, 0])
        for r in rows:
            r.length += 1
        self.stats["decode_steps"] += 1
        self._sample(rows, logits)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token, record it and its logprob, and mark finished rows."""
        with torch.inference_mode():
            logp = torch.log_softmax(logits, dim=-1)
            vocab = logits.shape[-1]
            chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
            by_cfg: dict[tuple, list[int]] = {}
            by_req: dict[int, list[int]] = {}
            want_topk: list[int] = []  # rows whose request asked for top-k sampled logprobs
            for i, r in enumerate(rows):
                if r.req.extras.topk_sample:
                    want_topk.append(i)
                c = r.req.cfg
                by_cfg.setdefault((c.temperature, c.top_k, c.top_p), []).append(i)
                if c.temperature != 0:
                    by_req.setdefault(id(r.req), []).append(i)
            # Uniform draws from each request's own generator, in sample order.
            u = [0.0] * len(rows)
            for idxs in by_req.values():
                idxs.sort(key=lambda i: rows[i].sample)
                for i, v in zip(idxs, torch.rand(len(idxs), generator=rows[idxs[0]].req.gen).tolist()):
                    u[i] = v
            u_t = torch.tensor(u, dtype=torch.float32, device=logits.device)
            for (temp, top_k, top_p), idxs in by_cfg.items():
                whole = len(idxs) == len(rows)
                it = None if whole else torch.tensor(idxs, device=logits.device)
                x = logits if whole else logits[it]
                if temp == 0:
                    tok = x.argmax(dim=-1)
                else:
                    if temp == 1 and not (0 < top_k < vocab) and top_p >= 1.0:
                        probs = logp.exp() if whole else logp[it].exp()
                    else:
                        probs = torch.softmax(_shape(x, temp, top_k, top_p), dim=-1)
                    # Inverse-CDF sampling: one draw per row, batched over rows.
                    cdf = probs.cumsum(-1)
                    uu = u_t if whole else u_t[it]
                    tok = torch.searchsorted(cdf, (uu * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
                    tok = tok.clamp_(max=vocab - 1)
                if whole:
                    chosen = tok
                else:
                    chosen[it] = tok
            lps = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
            toks = chosen.tolist()
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
            if tok in r.stop_ids or _hit_stop_string(tokenizer, r):
                r.stop_reason, r.finished = "stop", True
            elif len(r.tokens) >= r.max_new:
                r.finished = True

    # ------------------------------------------------------------------ retire
    def _retire(self) -> None:
        rows = self._rows
        for i, r in enumerate(rows):
            if r is None or not r.finished:
                continue
            req = r.req
            req.seqs[r.sample] = SampledSequence(r.tokens, r.logprobs, r.stop_reason,  # type: ignore[arg-type]
                                                 r.topk if req.extras.topk_sample else None)
            if self.cache is not None and r.length > 0:
                # K/V exist for the prompt and every sampled token but the last (never fed back).
                seq = req.prompt + r.tokens[: r.length - len(req.prompt)]
                self.cache.insert(req.key, seq, self._buf[:, :, i, :, : r.length].clone())
            rows[i] = None
            req.rows_left -= 1
            if req.rows_left == 0:
                self._finish(req)
        # Compact: move the last live rows into the holes so rows 0..n-1 are all live.
        n_live = sum(r is not None for r in rows)
        holes = [i for i in range(n_live) if rows[i] is None]
        movers = [i for i in range(n_live, len(rows)) if rows[i] is not None]
        for d, s in zip(holes, movers):
            n = rows[s].length
            self._buf[:, :, d, :, :n] = self._buf[:, :, s, :, :n]
            rows[d] = rows[s]
        del rows[n_live:]

    def _finish(self, req: _Request) -> None:
        req.result.sequences = list(req.seqs)
        req.done.set()


def _common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _shape(x: torch.Tensor, temp: float, top_k: int, top_p: float) -> torch.Tensor:
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


def _hit_stop_string(tokenizer, row: _Row) -> bool:
    if not row.stop_strs:
        return False
    window = max(len(s) for s in row.stop_strs) + 8  # tokens; every token decodes to >= 0 chars
    text = tokenizer.decode(row.tokens[-window:])
    return any(s in text for s in row.stop_strs)
