"""A tiny engine behind the server's `EngineAPI` Protocol, in numpy: no model, no torch compute.

For tests of the server's protocol, error and hardening paths, where what the engine computes
does not matter but its contract does: adapters and samplers must exist before use (else
`EngineError`, as the real engine answers), results have the shapes the codec encodes, and
checkpoints are directories that `load_state`/`load_sampler` read back.

Every logprob is that of a uniform distribution over the vocabulary; sampling counts up from
the last prompt token.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
from pathlib import Path

import numpy as np

from gemtinker.engine.types import (
    AdamConfig,
    AdapterInfo,
    EngineError,
    ForwardResult,
    LoraSpec,
    SampledSequence,
    SampleExtras,
    SampleResult,
    SamplingConfig,
    TrainDatum,
)

STATE_FILE = "fake_engine_state.json"
LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")


class FakeEngine:
    def __init__(self, base_model: str, vocab_size: int = 49152, max_len: int | None = 4096):
        self.base_model = base_model
        self.vocab_size = vocab_size
        self.max_len = max_len
        self._adapters: dict[str, tuple[AdapterInfo, int]] = {}  # id -> (info, optimizer steps)
        self._samplers: dict[str, str | None] = {}  # id -> adapter it snapshots (None: base model)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.calls: list[str] = []  # method names, in call order (for tests that check what ran)

    # ---- adapters
    def _get(self, adapter_id: str) -> tuple[AdapterInfo, int]:
        with self._lock:
            a = self._adapters.get(adapter_id)
        if a is None:
            raise EngineError(f"unknown adapter {adapter_id!r}")
        return a

    def _add(self, adapter_id: str, spec: LoraSpec, metadata: dict | None, step: int) -> AdapterInfo:
        info = AdapterInfo(adapter_id, self.base_model, spec, spec.rank * 8, dict(metadata or {}))
        with self._lock:
            if adapter_id in self._adapters:
                raise EngineError(f"adapter {adapter_id!r} already exists")
            self._adapters[adapter_id] = (info, step)
        return info

    def create_adapter(self, adapter_id: str, spec: LoraSpec, metadata: dict | None = None) -> AdapterInfo:
        self.calls.append("create_adapter")
        if not isinstance(spec.rank, int) or spec.rank < 1:
            raise EngineError(f"lora rank must be a positive integer, got {spec.rank!r}")
        return self._add(adapter_id, spec, metadata, 0)

    def remove_adapter(self, adapter_id: str) -> None:
        self.calls.append("remove_adapter")
        with self._lock:
            if self._adapters.pop(adapter_id, None) is None:
                raise EngineError(f"unknown adapter {adapter_id!r}")

    def _run(self, adapter_id: str, datums: list[TrainDatum], loss_fn: str) -> ForwardResult:
        self._get(adapter_id)
        if loss_fn not in LOSSES:
            raise EngineError(f"unknown loss_fn {loss_fn!r}; supported: {', '.join(LOSSES)}")
        uniform = -math.log(self.vocab_size)
        outputs, loss = [], 0.0
        for d in datums:
            targets = np.asarray(d.inputs["target_tokens"])
            lp = np.full(targets.shape, uniform, np.float32)
            weights = d.inputs.get("weights")
            loss -= float((lp * (weights if weights is not None else 1.0)).sum())
            outputs.append({"logprobs": lp})
        return ForwardResult(outputs, {"loss:sum": loss})

    def forward(self, adapter_id: str, datums: list[TrainDatum], loss_fn: str = "cross_entropy",
                loss_fn_config: dict | None = None) -> ForwardResult:
        self.calls.append("forward")
        return self._run(adapter_id, datums, loss_fn)

    def forward_backward(self, adapter_id: str, datums: list[TrainDatum], loss_fn: str,
                         loss_fn_config: dict | None = None) -> ForwardResult:
        self.calls.append("forward_backward")
        return self._run(adapter_id, datums, loss_fn)

    def optim_step(self, adapter_id: str, adam: AdamConfig) -> dict[str, float]:
        self.calls.append("optim_step")
        info, step = self._get(adapter_id)
        with self._lock:
            self._adapters[adapter_id] = (info, step + 1)
        return {"learning_rate": adam.learning_rate}

    # ---- checkpoints: one JSON file
    def _write(self, adapter_id: str, path: str | os.PathLike, kind: str, metadata: dict | None) -> None:
        info, step = self._get(adapter_id)
        Path(path).mkdir(parents=True, exist_ok=True)
        state = {"kind": kind, "base_model": self.base_model, "rank": info.lora.rank, "step": step,
                 "metadata": {**info.metadata, **(metadata or {})}}
        (Path(path) / STATE_FILE).write_text(json.dumps(state))

    def _read(self, path: str | os.PathLike) -> dict:
        f = Path(path) / STATE_FILE
        if not f.is_file():
            raise EngineError(f"{str(path)!r} is not a checkpoint (no {STATE_FILE})")
        state = json.loads(f.read_text())
        if state["base_model"] != self.base_model:
            raise EngineError(f"checkpoint {str(path)!r} was trained on base model {state['base_model']!r}")
        return state

    def save_state(self, adapter_id: str, path: str | os.PathLike, include_optimizer: bool = True,
                   metadata: dict | None = None) -> None:
        self.calls.append("save_state")
        self._write(adapter_id, path, "state", metadata)

    def save_sampler_weights(self, adapter_id: str, path: str | os.PathLike, metadata: dict | None = None) -> None:
        self.calls.append("save_sampler_weights")
        self._write(adapter_id, path, "sampler", metadata)

    def load_state(self, adapter_id: str, path: str | os.PathLike, with_optimizer: bool) -> AdapterInfo:
        self.calls.append("load_state")
        state = self._read(path)
        if with_optimizer and state["kind"] != "state":
            raise EngineError(f"checkpoint {str(path)!r} has no optimizer state (a sampler checkpoint?)")
        return self._add(adapter_id, LoraSpec(rank=state["rank"]), state["metadata"],
                         state["step"] if with_optimizer else 0)

    # ---- samplers
    def _new_sampler(self, adapter_id: str | None) -> str:
        with self._lock:
            sid = f"fake-sampler-{next(self._ids)}"
            self._samplers[sid] = adapter_id
        return sid

    def snapshot_sampler(self, adapter_id: str) -> str:
        self.calls.append("snapshot_sampler")
        self._get(adapter_id)
        return self._new_sampler(adapter_id)

    def load_sampler(self, path: str | os.PathLike) -> str:
        self.calls.append("load_sampler")
        self._read(path)
        return self._new_sampler(None)

    def base_sampler(self) -> str:
        self.calls.append("base_sampler")
        return self._new_sampler(None)

    def release_sampler(self, sampler_id: str) -> None:
        self.calls.append("release_sampler")
        with self._lock:
            if self._samplers.pop(sampler_id, "missing") == "missing":
                raise EngineError(f"unknown sampler {sampler_id!r}")

    def sample(self, sampler_id: str, prompt_tokens: list[int], num_samples: int, config: SamplingConfig,
               prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
               extras: SampleExtras | None = None) -> SampleResult:
        self.calls.append("sample")
        with self._lock:
            if sampler_id not in self._samplers:
                raise EngineError(f"unknown sampler {sampler_id!r}")
        if not prompt_tokens:
            raise EngineError("prompt is empty")
        if extras is not None and (extras.topk_sample or extras.needs_prompt_logits):
            raise EngineError("the fake engine computes no sample extras")  # tests of extras use the real one
        room = self.max_len - len(prompt_tokens) if self.max_len is not None else 16
        n = max(0, min(config.max_tokens if config.max_tokens is not None else 16, room))
        uniform = -math.log(self.vocab_size)
        tokens = [(prompt_tokens[-1] + 1 + i) % self.vocab_size for i in range(n)]
        seqs = [SampledSequence(list(tokens), [uniform] * n, "length") for _ in range(num_samples)]
        plp = [None] + [uniform] * (len(prompt_tokens) - 1) if prompt_logprobs else None
        topk = ([None] + [[(t, uniform) for t in range(topk_prompt_logprobs)]] * (len(prompt_tokens) - 1)
                if topk_prompt_logprobs else None)
        return SampleResult(seqs, plp, topk)

    def close(self) -> None:
        self.calls.append("close")
