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
The steps themselves live in `batch.FastBatch`; this module decides who joins a step, and
recovers from a failed one (each request rerun alone, so only the culprit fails).

Returned logprobs are log-softmax of the model's logits at temperature 1 (what the trainer's
forward computes, so importance ratios start at 1), whatever temperature/top-k/top-p shaped
the sampling distribution (see `ops`).

Models outside the Llama family fall back to `generic` (whole batches, no prefix cache).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque

import torch

from ..lora import LoraWeights
from ..memory import release_free_memory
from ..types import SampleExtras, SampleResult, SamplingConfig
from .batch import FastBatch
from .fast_decoder import unsupported_reason
from .generic import run_batch
from .prefix_cache import PrefixCache
from .request import SampleRequest as _Request  # its name here and in tests (shared with generic)
from .request import SamplerHost

log = logging.getLogger(__name__)

# The prefix cache's default budget in bytes of K/V, turned into tokens per model. 192 MiB holds
# about 4.4k tokens of SmolLM2-135M in fp32: the histories of the 8 episodes a `make run` plays
# at once (about 130 MB), plus the shared instructions. With 384 MiB the cache filled during
# make run's 200-episode evaluation and set its peak RSS (3.28 GB); the former 32k tokens took
# up to 1.5 GB. A hit only saves prefill time: results are the same with or without it.
DEFAULT_PREFIX_CACHE_BYTES = 192 << 20


class SamplingScheduler:
    max_batch_rows = 64
    gather_seconds = 0.002  # when idle, let concurrent submitters arrive together

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
        self._waiting: deque[_Request] = deque()
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
        self._batch = FastBatch(engine, self.cache, self.stats, self.max_batch_rows)

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
        self._batch.drop(key)

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
            if self._batch.rows or self._waiting or not self._queue.empty():
                return False
            self._batch.release()
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
            idle = not self._batch.rows and not self._waiting and not self._closing
            if idle:
                release_free_memory()  # a batch's transient blocks go back before the next call
            self._take(block=idle)
            if self._closing and not self._batch.rows and not self._waiting:
                return
            if not self.use_fast:
                self._run_generic()
                continue
            with self._busy:
                self._step()

    def _step(self) -> None:
        """One loop iteration of the fast path: admit newcomers, decode one token, retire."""
        admitted: list[_Request] = []
        batch = self._batch
        try:
            batch.ensure_decoder()
            room = self.max_batch_rows - len(self._batch.rows)
            while self._waiting and self._admissible(self._waiting[0], admitted, room):
                r = self._waiting.popleft()
                admitted.append(r)
                room -= r.n
            if admitted:
                self.batches_run += 1
                batch.admit(admitted)
                self.max_requests_in_batch = max(self.max_requests_in_batch, batch.live_requests())
                batch.retire()  # holes left by prefill rows that got no sample row
            if batch.rows:
                batch.decode_step()
                batch.retire()
        except BaseException as e:  # noqa: BLE001 - the culprit is found by rerunning alone
            failed = {id(r): r for r in batch.abandon()}
            failed.update({id(r): r for r in admitted})
            self._isolate([r for r in failed.values() if not r.done.is_set()], e)

    def _admissible(self, r: _Request, admitted: list[_Request], room: int) -> bool:
        """Whether the next waiting request joins this step. A request rerun after a failed
        batch runs alone: nothing joins it, and it joins nothing."""
        alone = not admitted and not self._batch.rows
        if r.solo:
            return alone
        if (admitted and admitted[0].solo) or any(row is not None and row.req.solo for row in self._batch.rows):
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
        """One whole batch on the generic path (`generic.run_batch`)."""
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

    @staticmethod
    def _default_cache_tokens(engine: SamplerHost) -> int:
        cfg = engine.model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        per_token = cfg.num_hidden_layers * 2 * kv * head_dim * torch.finfo(engine.dtype).bits // 8
        return max(1024, DEFAULT_PREFIX_CACHE_BYTES // per_token)
