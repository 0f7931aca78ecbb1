"""Request bodies (JSON) parsed into the engine's types, with the checks that make a bad field
the caller's error.

Typed field access: a wrong type is a `UserError` (category "user") naming the field, never a
TypeError deep inside an op that would be reported as a server fault. Ranges the engine does not
know (this server's limits) are checked here, before anything is queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gemtinker.engine.types import AdamConfig, LoraSpec, SamplingConfig

from . import sample_options as extras_options
from .errors import UserError
from .limits import check_seed

# LoRA ranks above this are a caller's bug (the adapter would outweigh the model).
MAX_LORA_RANK = 4096


def int_field(body: dict, key: str, default: Any = None) -> Any:
    v = body.get(key, default)
    if v is default and default is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise UserError(f"{key} must be an integer, got {v!r}")
    return v


def dict_field(body: dict, key: str) -> dict:
    v = body.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise UserError(f"{key} must be an object, got {v!r}")
    return v


def number(owner: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{owner}.{key} must be a number, got {v!r}")
    try:
        return float(v)
    except OverflowError:
        raise UserError(f"{owner}.{key} is out of range: {v!r}") from None


# ---------------------------------------------------------------- create_model
def lora_spec(body: dict) -> LoraSpec:
    """create_model's `lora_config` (Tinker's LoraConfig)."""
    lora = dict_field(body, "lora_config")
    spec = LoraSpec(
        rank=int_field(lora, "rank", 32), seed=check_seed("lora_config.seed", lora.get("seed")),
        train_attn=bool(lora.get("train_attn", True)), train_mlp=bool(lora.get("train_mlp", True)),
        train_unembed=bool(lora.get("train_unembed", True)),
    )
    if spec.rank > MAX_LORA_RANK:
        raise UserError(f"lora rank {spec.rank} is absurd (at most {MAX_LORA_RANK})")
    if spec.rank <= 0:
        raise UserError(f"lora rank must be positive, got {spec.rank}")
    return spec


def lora_dict(spec: LoraSpec) -> dict:
    """A LoraSpec as the run record stores it (REST listings read `rank`)."""
    return {"rank": spec.rank, "seed": spec.seed, "train_attn": spec.train_attn,
            "train_mlp": spec.train_mlp, "train_unembed": spec.train_unembed}


# ---------------------------------------------------------------- optim_step
def adam_config(params: Any) -> AdamConfig:
    """optim_step's `adam_params` (Tinker's AdamParams); unknown keys are ignored."""
    if params is None or (isinstance(params, dict) and params.get("type", "adam") not in ("adam", "adamw")):
        raise UserError("only Adam optimizer parameters (AdamParams) are supported by this server")
    if not isinstance(params, dict):
        raise UserError(f"adam_params must be an object, got {params!r}")
    fields = {k: number("adam_params", k, v) for k, v in params.items() if k in AdamConfig.__dataclass_fields__}
    bad = [k for k, v in fields.items() if not math.isfinite(v) or v < 0]
    if bad:
        raise UserError(f"adam_params {bad} must be finite and non-negative, got {params}")
    return AdamConfig(**fields)


# ---------------------------------------------------------------- asample
@dataclass(frozen=True)
class SampleOptions:
    cfg: SamplingConfig
    prompt_logprobs: bool
    topk: int
    last_n: Any  # checked against the prompt's length once the prompt is parsed
    extras: extras_options.ExtrasSpec  # topk_sample_logprobs, target_prompt_logprobs, prompt_alt_tokens_k


def sample_options(body: dict) -> SampleOptions:
    cfg = sampling_config(dict_field(body, "sampling_params"))
    topk = body.get("topk_prompt_logprobs") or 0
    if not isinstance(topk, int) or isinstance(topk, bool) or not 0 <= topk <= 100:
        raise UserError(f"topk_prompt_logprobs must be an integer in 0..100, got {topk!r}")
    if body.get("record_stability_info"):
        # SDK 0.38: samples record stability data for StableReinforce training requests to
        # reference; nothing here would ever read it, so accepting the flag would be a silent no-op.
        raise UserError("record_stability_info is not offered by this server: it keeps no stability records "
                        "(StableReinforce); create the sampling client without record_stability_info")
    extras = extras_options.parse(body)
    return SampleOptions(cfg, bool(body.get("prompt_logprobs")), topk, body.get("prompt_logprobs_last_n"), extras)


def sampling_config(p: dict) -> SamplingConfig:
    stop = p.get("stop")
    if stop is None:
        stop_t = None
    elif isinstance(stop, str):
        stop_t = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop_t = tuple(stop)
    elif isinstance(stop, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
        stop_t = tuple(stop)
    else:
        raise UserError(f"sampling_params.stop must be a string, a list of strings or a list of token ids, got {stop!r}")
    max_tokens = p.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
        raise UserError(f"sampling_params.max_tokens must be a non-negative integer, got {max_tokens!r}")
    temperature = number("sampling_params", "temperature", p.get("temperature", 1.0))
    top_p = number("sampling_params", "top_p", p.get("top_p", 1.0))
    top_k = int_field(p, "top_k", -1)
    seed = check_seed("sampling_params.seed", p.get("seed"))
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"sampling_params.temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"sampling_params.top_p must be in (0, 1], got {top_p}")
    return SamplingConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, seed=seed, stop=stop_t)
