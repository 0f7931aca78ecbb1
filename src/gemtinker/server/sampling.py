"""Samplers and sampling: the live samplers (engine snapshots named by their sampling session id)
and `asample`, with the cap on sequences admitted at once.

A sampler is the base model, a checkpoint (`model_path`, reloaded after a restart) or an
ephemeral snapshot of a training model (save_weights_and_get_sampling_client; lost in a restart).
Sampling runs on the large sampling pool: the engine batches concurrent `sample` calls.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from . import codec
from .checkpoints import Checkpoints
from .engine_api import EngineAPI
from .engines import Engines
from .errors import NotFoundError, UserError
from .futures import Result
from .ops import Ops
from .paths import check_component
from .requests import sample_options
from .store import ANYONE, Store

log = logging.getLogger("gemtinker.server")

# Cookbook group sizes are 2..64; a larger num_samples is almost surely a bug, and one request
# must always fit in the sampling queue below.
MAX_NUM_SAMPLES = 128
# Sequences admitted to sampling at once (queued + decoding). Beyond it /asample answers 429, which
# every SDK sampling path retries with backoff, so a burst of clients waits instead of growing
# the server's memory and latency without bound.
MAX_QUEUED_SEQUENCES = 2048
# (sampling_session_id, seq_id) of recent /asample requests, so a retried one gets its first answer.
MAX_SAMPLE_SEEN = 100_000
# Ephemeral samplers (save_weights_and_get_sampling_client) kept per model; older ones are freed.
# Each holds a frozen copy of the adapter (23 MB for SmolLM2-135M at rank 16, plus its sampler
# deltas): 16 of them were half a gigabyte of a `make run`'s peak. A synchronous RL loop samples
# only the newest; async loops (async_steps, the cookbook's max_steps_off_policy) a few steps back.
MAX_EPHEMERAL_SAMPLERS = 4


@dataclass
class LiveSampler:
    sampler_id: str
    base_model: str
    engine: EngineAPI
    engine_sampler_id: str
    model_path: str | None


class Samplers:
    def __init__(self, store: Store, engines: Engines, ops: Ops, checkpoints: Checkpoints,
                 max_num_samples: int = MAX_NUM_SAMPLES, max_queued_sequences: int = MAX_QUEUED_SEQUENCES):
        self.store = store
        self.engines = engines
        self.ops = ops
        self.checkpoints = checkpoints
        self.live: dict[str, LiveSampler] = {}
        self.lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, int], tuple[str, list[str]]] = OrderedDict()
        self.max_num_samples = max_num_samples
        self.queued_sequences = 0
        self.max_queued_sequences = max_queued_sequences

    # ---------------------------------------------------------------- registry
    def add(self, s: LiveSampler, session_id: str | None) -> None:
        with self.lock:
            self.live[s.sampler_id] = s
        self.store.add_sampler(s.sampler_id, session_id, s.base_model, s.model_path)

    def release(self, sampler_id: str) -> None:
        with self.lock:
            s = self.live.pop(sampler_id, None)
        if s is not None:
            try:
                s.engine.release_sampler(s.engine_sampler_id)
            except Exception as e:
                log.warning("release_sampler(%s): %s", sampler_id, e)

    def ids(self) -> list[str]:
        with self.lock:
            return list(self.live)

    def create_session(self, body: dict, owner: Any = ANYONE) -> dict:
        """Blocking (may load an engine or LoRA weights): call off the event loop."""
        session_id = check_component(body.get("session_id"), "session_id")
        seq = body.get("sampling_session_seq_id")
        if not isinstance(seq, int):
            raise UserError("sampling_session_seq_id must be an integer")
        sid = f"{session_id}:sample:{seq}"
        with self.lock:
            if sid in self.live:  # retried request
                return {"type": "create_sampling_session", "sampling_session_id": sid}
        model_path, base_model = body.get("model_path"), body.get("base_model")
        if model_path:
            self.add(self._load_path_sampler(sid, model_path, owner), session_id)
        elif base_model:
            engine = self.engines.get(base_model)
            self.add(LiveSampler(sid, base_model, engine, engine.base_sampler(), None), session_id)
        else:
            raise UserError("create_sampling_session needs model_path or base_model")
        log.info("%-26s %s <- %s", "create_sampling_session", sid, model_path or base_model)
        return {"type": "create_sampling_session", "sampling_session_id": sid}

    def _load_path_sampler(self, sid: str, model_path: str, reader: Any = ANYONE) -> LiveSampler:
        tp, directory, run = self.checkpoints.resolve(model_path, reader)
        if tp.kind == "external":
            raise UserError(f"{tp} holds exported files (save_weights_external), not weights to sample from; use a "
                            "sampler or training checkpoint (tinker://<run>/sampler_weights/<name>)")
        engine = self.engines.get(run["base_model"])
        return LiveSampler(sid, run["base_model"], engine, engine.load_sampler(str(directory)), str(tp))

    def info(self, sampler_id: str) -> dict:
        with self.lock:
            s = self.live.get(sampler_id)
        if s is not None:
            return {"sampler_id": sampler_id, "base_model": s.base_model, "model_path": s.model_path}
        row = self.store.get_sampler(sampler_id)
        if row is None:
            raise NotFoundError(f"unknown sampler {sampler_id!r}")
        return {"sampler_id": sampler_id, "base_model": row["base_model"], "model_path": row["model_path"]}

    def get(self, sampler_id: str) -> LiveSampler:
        with self.lock:
            s = self.live.get(sampler_id)
        if s is not None:
            return s
        row = self.store.get_sampler(sampler_id)
        if row is not None and row["model_path"]:  # made before a restart: reload from its checkpoint
            s = self._load_path_sampler(sampler_id, row["model_path"])
            with self.lock:
                s = self.live.setdefault(sampler_id, s)
            return s
        if row is not None:
            raise UserError(f"sampler {sampler_id!r} is no longer available (an in-memory snapshot that was "
                            f"released, since only the {MAX_EPHEMERAL_SAMPLERS} newest per model are kept, or lost in "
                            "a restart); create a new sampling client, or save_weights_for_sampler(name) for one "
                            "that lasts")
        raise UserError(f"unknown sampling session {sampler_id!r}")

    # ---------------------------------------------------------------- asample
    def asample(self, body: dict) -> tuple[str, list[str]] | None:
        """(request_id, sample_sequence_ids), or None when overloaded (the caller answers 429)."""
        sid, seq = body.get("sampling_session_id"), body.get("seq_id")
        n = body.get("num_samples", 1)
        key = (str(sid), seq if isinstance(seq, int) else -1)
        if isinstance(seq, int) and key in self._seen:
            return self._seen[key]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > self.max_num_samples:
            rid = self.ops.failed(f"num_samples must be an integer in 1..{self.max_num_samples} (this server's limit), "
                                  f"got {n!r}", "sample")
            return rid, []
        try:  # engine-independent options: a bad one is refused before it is queued
            opts = sample_options(body)
        except UserError as e:
            return self.ops.failed(str(e), "sample"), []
        # An empty queue admits any request, so a cap below num_samples delays but never refuses for good.
        if self.queued_sequences and self.queued_sequences + n > self.max_queued_sequences:
            return None
        rid = self.ops.futures.new()
        ids = [f"{rid}:{i}" for i in range(n)]
        if isinstance(seq, int):
            self._seen[key] = (rid, ids)
            while len(self._seen) > MAX_SAMPLE_SEEN:
                self._seen.popitem(last=False)

        def run() -> Result:
            if not isinstance(sid, str):
                raise UserError("sampling_session_id is required (this server samples through sampling sessions)")
            s = self.get(sid)
            # Parsed here, off the event loop: a prompt may hold a million tokens.
            tokens = codec.model_input_tokens(body.get("prompt"))
            codec.check_prompt(tokens, s.engine.vocab_size)
            cfg, want_plp, topk, last_n = opts.cfg, opts.prompt_logprobs, opts.topk, opts.last_n
            context = s.engine.max_len
            if isinstance(context, int) and cfg.max_tokens is not None and cfg.max_tokens > context:
                # prompt + max_tokens beyond the context is fine (decoding stops there, "length");
                # a max_tokens no prompt could ever reach is a caller bug worth naming.
                raise UserError(f"sampling_params.max_tokens={cfg.max_tokens} exceeds the model's context "
                                f"length of {context} tokens")
            extras = opts.extras.engine_extras(len(tokens), s.engine.vocab_size)
            res = s.engine.sample(s.engine_sampler_id, tokens, n, cfg, prompt_logprobs=want_plp or topk > 0,
                                  topk_prompt_logprobs=topk, **({"extras": extras} if extras else {}))
            if len(res.sequences) != n:
                raise RuntimeError(f"engine returned {len(res.sequences)} sequences for num_samples={n}")
            if last_n is not None and res.prompt_logprobs is not None:
                if not isinstance(last_n, int) or not 1 <= last_n <= len(tokens) - 1:
                    raise UserError(f"prompt_logprobs_last_n must be in 1..{len(tokens) - 1}, got {last_n!r}")
                res.prompt_logprobs = [None] * (len(tokens) - last_n) + list(res.prompt_logprobs[-last_n:])
                if res.topk_prompt_logprobs is not None:  # the SDK: it "also applies to topk_prompt_logprobs"
                    top = res.topk_prompt_logprobs
                    res.topk_prompt_logprobs = [None] * (len(tokens) - last_n) + list(top[-last_n:])
            return Result.proto(codec.encode_sample_result(res, len(tokens), want_plp, topk, opts.extras))

        # Counted now, not when the task starts, so a burst of submits sees the cap at once.
        self.queued_sequences += n

        async def go() -> None:
            try:
                await self.ops.run(rid, f"sample[n={n}]", str(sid), run, self.ops.sample_pool)
            finally:
                self.queued_sequences -= n

        asyncio.get_running_loop().create_task(go())
        return rid, ids
