"""The Engine facade: everything a Tinker-compatible service does, in-process.

CONTRACT (keep it stable; the server codes against the subset typed as the `EngineAPI` Protocol in
server/engine_api.py, and tests/server/test_server_engine_api.py checks this class against it):

    engine = Engine(base_model=None, device=None, dtype=None)   # None -> bundled default model
    engine.base_model           -> str   (name as given / hub id of the default)
    engine.tokenizer            -> transformers tokenizer of the base model
    engine.vocab_size           -> int
    engine.max_len              -> int | None   (context length, from the model config)

    # LoRA adapters, one per training client, all over the one frozen base model
    engine.create_adapter(adapter_id, LoraSpec, metadata=None) -> AdapterInfo
    engine.remove_adapter(adapter_id)
    engine.adapter_info(adapter_id) -> AdapterInfo

    # training (gradients accumulate over forward_backward calls until optim_step)
    engine.forward_backward(adapter_id, list[TrainDatum], loss_fn: str, loss_fn_config: dict|None) -> ForwardResult
    engine.forward(adapter_id, list[TrainDatum], loss_fn, loss_fn_config) -> ForwardResult   # no grad
    engine.optim_step(adapter_id, AdamConfig) -> dict[str, float]     # metrics, e.g. grad_norm

    # checkpoints: directories written atomically (safetensors + JSON metadata)
    engine.save_state(adapter_id, path, include_optimizer=True, metadata=None)
    engine.load_state(adapter_id, path, with_optimizer: bool) -> AdapterInfo
        # creates adapter `adapter_id` (must not exist) with the LoRA config stored in the checkpoint
    engine.save_sampler_weights(adapter_id, path, metadata=None)
    engine.read_checkpoint_metadata(path) -> dict

    # samplers: frozen weight snapshots; later training never changes an existing sampler
    engine.snapshot_sampler(adapter_id) -> sampler_id   (in memory)
    engine.load_sampler(path) -> sampler_id             (from save_sampler_weights / save_state dir)
    engine.base_sampler() -> sampler_id                 (base model, no adapter)
    engine.release_sampler(sampler_id)

    # sampling: thread-safe; concurrent callers are batched together by the engine
    engine.sample(sampler_id, prompt_tokens: list[int], num_samples: int, SamplingConfig,
                  prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
                  extras: SampleExtras | None = None) -> SampleResult   # top-k sampled, target ids, draws

Every input error raises EngineError (subclass) with a message naming the datum/field, and
leaves state unchanged. All methods are safe to call from several threads.

Additions beyond the contract: `Engine.from_model(model, tokenizer, name)` wraps an already
loaded model (tests, benchmarks); `engine.close()` stops the sampling thread;
`prefix_cache=False` turns the sampler's prefix KV cache off (benchmarks), `prefix_cache_tokens`
bounds it; `engine.sampler_stats()` reports prompt / prefilled / cache-hit token counts;
`train_dtype` picks the learner's compute dtype (see `resolve_train_dtype`); `learner="unpacked"`
selects the plain reference learner (`unpacked.py`) instead of the prefix-shared one (`learner.py`).

Concurrency: each adapter has its own lock (its ops run one at a time, in call order per
thread); `compute_lock` serialises use of the model between training calls and sampler decode
steps, so training and sampling interleave step by step instead of oversubscribing the CPU.
Locks are always taken adapter-lock first, then compute_lock, so they cannot deadlock.

The file runs a little over 400 lines because this docstring is the contract; the facade itself
only validates and dispatches (the work is in learner.py, lora.py, optim.py, checkpoint.py,
sampling/).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checkpoint as ckpt
from .attention import use_grouped_sdpa
from .learner import Learner, LearnerLimits
from .mlp import use_lean_swiglu
from .lora import (
    LoraLinear,
    LoraWeights,
    LowPrecisionCopies,
    init_weights,
    inject_lora,
    select_targets,
    shared_active,
    use_lora,
)
from .devices import resolve_device, resolve_dtype, resolve_train_dtype
from .losses import get_loss, resolve_config
from .memory import MappedWeights, configure_allocator, release_free_memory
from .optim import AdamState, adamw_step, validate_config
from .sampling.prompt_extras import validate_extras
from .sampling.scheduler import SamplingScheduler
from .unpacked import run_unpacked
from .types import (
    AdamConfig,
    AdapterInfo,
    EngineError,
    ForwardResult,
    LoraSpec,
    SampleExtras,
    SampleResult,
    SamplingConfig,
    TrainDatum,
)
from .validation import validate_datums, validate_prompt, validate_sampling

log = logging.getLogger(__name__)


@dataclass
class _Adapter:
    info: AdapterInfo
    weights: LoraWeights
    opt: AdamState
    lock: threading.RLock = field(default_factory=threading.RLock)

    def params(self) -> dict[str, torch.Tensor]:
        return self.weights.named_tensors()


class Engine:
    # Padded tokens per micro-batch of the unpacked reference learner. Bounds its peak memory: for
    # SmolLM2-135M a 2048-token micro-batch held ~8 GB of activations and logits (30 layers, 49k
    # vocab, fp32). The packed learner has its own limits (learner.LearnerLimits).
    max_tokens_per_batch = 1024

    def __init__(
        self,
        base_model: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        prefix_cache: bool = True,
        prefix_cache_tokens: int | None = None,
        train_dtype: str | torch.dtype | None = None,
        learner: str = "packed",
    ):
        from .models import load_causal_lm  # heavy import only when loading by name

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        model, tokenizer, resolved = load_causal_lm(base_model, dtype=dt, device=dev)
        tdt = resolve_train_dtype(train_dtype, dtype is not None, dt, dev)
        self._setup(model, tokenizer, base_model or resolved.name, dev, dt, prefix_cache, prefix_cache_tokens,
                    tdt, learner)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer,
        name: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        prefix_cache: bool = True,
        prefix_cache_tokens: int | None = None,
        train_dtype: str | torch.dtype | None = None,
        learner: str = "packed",
    ) -> Engine:
        """Wrap an already loaded HF causal LM (it is modified in place: LoRA wrappers, the
        attention function of `attention.py`, the MLP forward of `mlp.py`)."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        eng = cls.__new__(cls)
        tdt = resolve_train_dtype(train_dtype, dtype is not None, dt, dev)
        eng._setup(model.to(device=dev, dtype=dt), tokenizer, name, dev, dt, prefix_cache, prefix_cache_tokens,
                   tdt, learner)
        return eng

    def _setup(
        self, model: nn.Module, tokenizer, name: str, device: torch.device, dtype: torch.dtype,
        prefix_cache: bool = True, prefix_cache_tokens: int | None = None,
        train_dtype: torch.dtype | None = None, learner: str = "packed",
    ):
        if learner not in ("packed", "unpacked"):
            raise EngineError(f"unknown learner {learner!r}; use 'packed' or 'unpacked'")
        configure_allocator()
        model.eval()  # no dropout: logprobs must be deterministic
        use_grouped_sdpa(model)  # masked grouped-query attention without per-head copies of keys/values
        use_lean_swiglu(model)  # MLPs keep two (tokens x intermediate) tensors for the backward, not three
        self.model = model
        self.tokenizer = tokenizer
        self.base_model = name
        self.device = device
        self.dtype = dtype
        self.vocab_size = int(model.get_output_embeddings().out_features)
        self.max_len: int | None = getattr(model.config, "max_position_embeddings", None)
        self._modules: dict[str, tuple[LoraLinear, str]] = inject_lora(model)
        # A learner in another dtype (bf16) gets low-precision copies of the frozen linear weights
        # (stored once, instead of autocast re-casting every weight on every call); embeddings,
        # norms and the residual stream stay in the model's dtype, LoRA masters and Adam in fp32.
        self.train_dtype = train_dtype or dtype
        low = self.train_dtype if self.train_dtype != dtype else None
        self._low_copies = None if low is None else LowPrecisionCopies(self._modules, low)
        # The frozen weights as views of the model file (memory.MappedWeights): all of them, which
        # the sampler's packed copies replace, and the linears, which a bf16 learner's copies do.
        self._mapped_all = MappedWeights(list(model.parameters()))
        self._mapped_linears = MappedWeights(
            [mod.base.weight for mod, category in self._modules.values() if category != "unembed"])
        self._mapped_warned = False
        self.learner = None if learner == "unpacked" else Learner(model, device, LearnerLimits(), compute_dtype=low)
        self.compute_lock = threading.RLock()
        self.train_seconds = 0.0  # time forward/forward_backward held the model (see sampler_stats)
        self._registry_lock = threading.Lock()
        self._adapters: dict[str, _Adapter] = {}
        self._samplers: dict[str, LoraWeights | None] = {}
        self._sampler_ids = itertools.count()
        self._scheduler = SamplingScheduler(self, prefix_cache, prefix_cache_tokens)

    # ------------------------------------------------------------------ adapters
    def create_adapter(self, adapter_id: str, spec: LoraSpec, metadata: dict | None = None) -> AdapterInfo:
        self._check_spec(spec)
        seed = spec.seed if spec.seed is not None else secrets.randbits(31)
        weights = init_weights(self._modules, spec, seed, self.device)
        return self._register(adapter_id, weights, AdamState(), metadata)

    def _check_spec(self, spec: LoraSpec) -> None:
        if not isinstance(spec.rank, int) or spec.rank < 1:
            raise EngineError(f"lora rank must be a positive integer, got {spec.rank!r}")
        if not select_targets(self._modules, spec):
            raise EngineError("lora config trains nothing: enable train_attn, train_mlp or train_unembed")
        if spec.alpha is not None and not (spec.alpha > 0):
            raise EngineError(f"lora alpha must be > 0, got {spec.alpha!r}")

    def _register(self, adapter_id: str, weights: LoraWeights, opt: AdamState, metadata: dict | None) -> AdapterInfo:
        info = AdapterInfo(adapter_id, self.base_model, weights.spec, weights.num_params(), dict(metadata or {}))
        with self._registry_lock:
            if adapter_id in self._adapters:
                raise EngineError(f"adapter {adapter_id!r} already exists")
            self._adapters[adapter_id] = _Adapter(info, weights, opt)
        return info

    def remove_adapter(self, adapter_id: str) -> None:
        with self._registry_lock:
            if self._adapters.pop(adapter_id, None) is None:
                raise EngineError(f"unknown adapter {adapter_id!r}")

    def adapter_info(self, adapter_id: str) -> AdapterInfo:
        return self._get(adapter_id).info

    def _get(self, adapter_id: str) -> _Adapter:
        with self._registry_lock:
            a = self._adapters.get(adapter_id)
        if a is None:
            raise EngineError(f"unknown adapter {adapter_id!r}")
        return a

    def release_training_memory(self) -> None:
        """Called by the sampler before it builds packed weights: drops the learner's
        low-precision weight copies (the next training call makes them again)."""
        if self._low_copies is not None:
            with self.compute_lock:
                self._low_copies.release()

    def release_model_weights(self) -> None:
        """Called by the sampler after it built packed weights: hands back the memory of the
        model's own weights (pages of the model file, read back on the next training call)."""
        self._release_mapped(self._mapped_all)

    def _release_mapped(self, mapped: MappedWeights) -> None:
        if mapped.drop() == 0 and mapped.refused and not self._mapped_warned:
            self._mapped_warned = True
            log.warning("model weights stay resident: %s", mapped.refused)

    # ------------------------------------------------------------------ training
    def forward_backward(
        self, adapter_id: str, datums: list[TrainDatum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> ForwardResult:
        return self._run(adapter_id, datums, loss_fn, loss_fn_config, backward=True)

    def forward(
        self, adapter_id: str, datums: list[TrainDatum], loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> ForwardResult:
        return self._run(adapter_id, datums, loss_fn, loss_fn_config, backward=False)

    def _run(
        self, adapter_id: str, datums: list[TrainDatum], loss_fn: str, loss_fn_config: Mapping | None, backward: bool
    ) -> ForwardResult:
        adapter = self._get(adapter_id)
        loss = get_loss(loss_fn)
        cfg = resolve_config(loss, loss_fn, loss_fn_config)
        checked = validate_datums(list(datums), loss, loss_fn, self.vocab_size, self.max_len)
        # A backward keeps every layer's activations: the idle sampler's memory makes room for
        # them (a forward's transient memory is small, and tests/clients score between turns).
        if backward and self._scheduler.release_idle_memory():
            release_free_memory()
        with adapter.lock, self.compute_lock:
            t_start = time.perf_counter()
            params = adapter.params()
            saved = {k: None if p.grad is None else p.grad.clone() for k, p in params.items()} if backward else {}
            try:
                with use_lora(shared_active(adapter.weights)):
                    if self.learner is None:
                        outputs, metrics = run_unpacked(
                            self.model, self.device, self.max_tokens_per_batch, checked, loss, loss_fn, cfg,
                            backward,
                        )
                    else:
                        if self._low_copies is not None and self._low_copies.ensure():
                            self._release_mapped(self._mapped_linears)  # the learner reads the copies
                        outputs, metrics = self.learner.run(checked, loss, loss_fn, cfg, backward)
            except BaseException:
                for k, p in params.items():  # leave accumulated grads exactly as they were
                    p.grad = saved.get(k)
                raise
            finally:
                self.train_seconds += time.perf_counter() - t_start
        release_free_memory()
        return ForwardResult([{"logprobs": lp} for lp in outputs], metrics)

    def optim_step(self, adapter_id: str, adam: AdamConfig) -> dict[str, float]:
        validate_config(adam)
        adapter = self._get(adapter_id)
        with adapter.lock:
            return adamw_step(adapter.params(), adapter.opt, adam)

    # ------------------------------------------------------------------ checkpoints
    def save_state(
        self, adapter_id: str, path: str | os.PathLike, include_optimizer: bool = True, metadata: dict | None = None
    ) -> None:
        adapter = self._get(adapter_id)
        with adapter.lock:
            w = adapter.weights
            ckpt.write_checkpoint(
                path, kind="state", base_model=self.base_model, spec=w.spec, seed=w.seed,
                step=adapter.opt.step, adapter=w.named_tensors(),
                optimizer=adapter.opt.tensors() if include_optimizer else None,
                metadata={**adapter.info.metadata, **(metadata or {})},
            )

    def save_sampler_weights(self, adapter_id: str, path: str | os.PathLike, metadata: dict | None = None) -> None:
        adapter = self._get(adapter_id)
        with adapter.lock:
            w = adapter.weights
            ckpt.write_checkpoint(
                path, kind="sampler", base_model=self.base_model, spec=w.spec, seed=w.seed,
                step=adapter.opt.step, adapter=w.named_tensors(), optimizer=None,
                metadata={**adapter.info.metadata, **(metadata or {})},
            )

    def read_checkpoint_metadata(self, path: str | os.PathLike) -> dict:
        return ckpt.read_metadata(path)

    def _read_weights(self, path: str | os.PathLike, trainable: bool) -> tuple[dict, LoraWeights]:
        meta = ckpt.read_metadata(path)
        if meta["base_model"] != self.base_model:
            raise EngineError(
                f"checkpoint {str(path)!r} was trained on base model {meta['base_model']!r}, "
                f"but this engine serves {self.base_model!r}"
            )
        spec = ckpt.spec_from_metadata(meta)
        self._check_spec(spec)
        flat = ckpt.read_tensors(path, ckpt.ADAPTER_FILE, meta)
        expected = select_targets(self._modules, spec)
        tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in expected:
            a, b = flat.get(f"{name}.lora_A"), flat.get(f"{name}.lora_B")
            mod = self._modules[name][0]
            if a is None or b is None or a.shape != (spec.rank, mod.in_features) or b.shape != (mod.out_features, spec.rank):
                raise EngineError(f"checkpoint {str(path)!r} lacks or misshapes the LoRA weights of {name!r}")
            a, b = a.to(self.device, torch.float32), b.to(self.device, torch.float32)
            if trainable:
                a, b = nn.Parameter(a), nn.Parameter(b)
            tensors[name] = (a, b)
        if len(flat) != 2 * len(expected):
            raise EngineError(f"checkpoint {str(path)!r} holds LoRA weights this model does not have")
        return meta, LoraWeights(spec, int(meta["seed"]), tensors)

    def load_state(self, adapter_id: str, path: str | os.PathLike, with_optimizer: bool) -> AdapterInfo:
        meta, weights = self._read_weights(path, trainable=True)
        opt = AdamState(step=int(meta["step"]) if with_optimizer else 0)
        if with_optimizer:
            if not meta.get("has_optimizer"):
                raise EngineError(f"checkpoint {str(path)!r} has no optimizer state (a sampler checkpoint?)")
            tensors = ckpt.read_tensors(path, ckpt.OPTIMIZER_FILE, meta)
            opt = AdamState.from_tensors(opt.step, {k: v.to(self.device) for k, v in tensors.items()})
            names = set(weights.named_tensors())
            unknown = (set(opt.exp_avg) | set(opt.exp_avg_sq)) - names
            if unknown:
                raise EngineError(f"checkpoint {str(path)!r} has optimizer state for unknown params {sorted(unknown)[:3]}")
        return self._register(adapter_id, weights, opt, meta.get("metadata"))

    # ------------------------------------------------------------------ samplers
    def _add_sampler(self, weights: LoraWeights | None) -> str:
        # A new policy to sample: in a synchronous loop the idle sampler's KV buffer, packed
        # weights and prefix cache belong to one that is not sampled again. forward_backward
        # frees them too, but an update skipped for want of non-zero advantages did not, and
        # the step after one peaked 0.5 GB higher on `make run` (nothing is freed while busy).
        if self._scheduler.release_idle_memory():
            release_free_memory()
        with self._registry_lock:
            sid = f"sampler-{next(self._sampler_ids)}"
            self._samplers[sid] = weights
        return sid

    def snapshot_sampler(self, adapter_id: str) -> str:
        adapter = self._get(adapter_id)
        with adapter.lock:
            frozen = adapter.weights.frozen_copy()
        return self._add_sampler(frozen)

    def load_sampler(self, path: str | os.PathLike) -> str:
        _, weights = self._read_weights(path, trainable=False)
        return self._add_sampler(weights)

    def base_sampler(self) -> str:
        return self._add_sampler(None)

    def release_sampler(self, sampler_id: str) -> None:
        with self._registry_lock:
            if sampler_id not in self._samplers:
                raise EngineError(f"unknown sampler {sampler_id!r}")
            weights = self._samplers.pop(sampler_id)
        if weights is not None:  # base-model samplers share cache entries; those age out by LRU
            self._scheduler.drop_sampler(sampler_id)

    def sampler_weights(self, sampler_id: str) -> LoraWeights | None:
        with self._registry_lock:
            if sampler_id not in self._samplers:
                raise EngineError(f"unknown sampler {sampler_id!r}")
            return self._samplers[sampler_id]

    def sample(
        self,
        sampler_id: str,
        prompt_tokens: list[int],
        num_samples: int,
        config: SamplingConfig,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        extras: SampleExtras | None = None,
    ) -> SampleResult:
        weights = self.sampler_weights(sampler_id)
        prompt = validate_prompt(prompt_tokens, self.vocab_size, self.max_len)
        validate_sampling(config, num_samples, self.vocab_size)
        if not isinstance(topk_prompt_logprobs, int) or topk_prompt_logprobs < 0:
            raise EngineError(f"topk_prompt_logprobs must be >= 0, got {topk_prompt_logprobs!r}")
        if extras is not None:
            validate_extras(extras, len(prompt), self.vocab_size)
        # Prefix-cache key: the sampler id (a new save_weights_for_sampler is a new id, so K/V of
        # other weights are never reused); every base-model sampler has the same weights.
        key = sampler_id if weights is not None else "__base__"
        return self._scheduler.submit(key, weights, prompt, num_samples, config, prompt_logprobs, topk_prompt_logprobs,
                                      extras)

    def sampler_stats(self) -> dict[str, float]:
        """Sampler counters (tokens, steps, cache) and the seconds the sampler and the trainer
        held the model (`prefill_seconds`, `decode_seconds`, `train_seconds`)."""
        s = self._scheduler
        out = dict(s.stats)
        out["train_seconds"] = self.train_seconds
        if s.cache is not None:
            out.update(cache_entries=len(s.cache), cache_tokens=s.cache.tokens, cache_evictions=s.cache.evictions)
        return out

    def close(self) -> None:
        self._scheduler.close()
