"""Adapters in and out of gemtinker: PEFT adapter folders and merged Hugging Face models.

Our LoRA and PEFT's compute the same thing, `W x + (alpha / r) * B (A x)`, with the same factor
shapes (A: r x in, B: out x r), so a PEFT folder is our tensors under PEFT's key names
(`base_model.model.<module>.lora_A.weight`) and a config with the same `r` and `lora_alpha`.

The unembedding: we wrap `lm_head` even where it shares its weight with the input embedding
(SmolLM2, the tiny Llama), and the delta applies to the output side only. PEFT expresses exactly
that with `lm_head` in `target_modules` (it warns about the tied weight; do not pass
`ensure_weight_tying=True`, which would apply the delta to the input embedding too). For the
same reason a merged model with an unembedding delta is written with untied embeddings, and
PEFT's own `merge_and_unload` over such an adapter would be wrong (it changes the shared weight).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import checkpoint as ckpt
from .lora import DEFAULT_ALPHA, LoraLinear, inject_lora
from .models import builtin_name_of
from .types import EngineError, LoraSpec

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_PEFT_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}
# PEFT config fields whose non-default values change what the adapter computes in ways our
# LoRA has no counterpart for: refused by name rather than silently dropped.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                "modules_to_save": None, "trainable_token_indices": None}


@dataclass(frozen=True)
class Adapter:
    """One adapter, independent of where it came from: module name -> (A (r, in), B (out, r))."""

    base_model: str
    spec: LoraSpec
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def alpha(self) -> float:
        return self.spec.alpha if self.spec.alpha is not None else DEFAULT_ALPHA

    @property
    def scale(self) -> float:
        return self.alpha / self.spec.rank


# ------------------------------------------------------------------ gemtinker checkpoints

def read_checkpoint(path: str | os.PathLike) -> Adapter:
    """The adapter of a gemtinker checkpoint directory (checksums verified)."""
    meta = ckpt.read_metadata(path)
    flat = ckpt.read_tensors(path, ckpt.ADAPTER_FILE, meta)
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in flat:
        name, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B") or f"{name}.lora_A" not in flat or f"{name}.lora_B" not in flat:
            raise EngineError(f"checkpoint {str(path)!r} has an unexpected tensor {key!r}")
        tensors[name] = (flat[f"{name}.lora_A"].float(), flat[f"{name}.lora_B"].float())
    return Adapter(meta["base_model"], ckpt.spec_from_metadata(meta), tensors)


def write_checkpoint(adapter: Adapter, path: str | os.PathLike, kind: str, metadata: dict | None = None) -> Path:
    """A gemtinker checkpoint (no optimizer state) that `Engine.load_state`/`load_sampler` read."""
    flat: dict[str, torch.Tensor] = {}
    for name, (a, b) in adapter.tensors.items():
        flat[f"{name}.lora_A"], flat[f"{name}.lora_B"] = a, b
    return ckpt.write_checkpoint(path, kind=kind, base_model=adapter.base_model, spec=adapter.spec,
                                 seed=adapter.spec.seed or 0, step=0, adapter=flat, optimizer=None,
                                 metadata=metadata)


# ------------------------------------------------------------------ PEFT

def write_peft(adapter: Adapter, out: str | os.PathLike, rename: dict[str, str] | None = None) -> Path:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors). `rename`: module
    name -> the name written instead (hosted Tinker's exports call the unembedding
    `model.unembed_tokens`; server/external.py)."""
    names = {n: (rename or {}).get(n, n) for n in adapter.tensors}
    weights = {}
    for name, (a, b) in adapter.tensors.items():
        weights[f"{_PEFT_PREFIX}{names[name]}.lora_A.weight"] = a.detach().float().contiguous()
        weights[f"{_PEFT_PREFIX}{names[name]}.lora_B.weight"] = b.detach().float().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": adapter.spec.rank,
        "lora_alpha": _plain_number(adapter.alpha),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        # Leaf names, as PEFT and vLLM expect; every module with such a leaf is one we wrap.
        "target_modules": sorted({n.rpartition(".")[2] for n in names.values()}),
    }

    def build(tmp: Path) -> None:
        save_file(weights, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return _build_folder(Path(out), build)


def read_peft(folder: str | os.PathLike, base_model: str | None = None) -> Adapter:
    """A PEFT LoRA folder as an Adapter over `base_model` (default: the folder's
    base_model_name_or_path). Per-module ranks and alphas (rank_pattern, alpha_pattern) and
    rsLoRA are folded into one rank and scale, exactly; anything else PEFT can do that our LoRA
    cannot (DoRA, biases, fully trained modules_to_save, embedding LoRA) is refused by name."""
    folder = Path(folder)
    cfg_path, w_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise EngineError(f"{str(folder)!r} is not a PEFT adapter folder: it needs {PEFT_CONFIG} and {PEFT_WEIGHTS}")
    config = json.loads(cfg_path.read_text())
    _check_peft_config(config, folder)
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise EngineError(f"{cfg_path} names no base_model_name_or_path: pass the base model explicitly")
    base = builtin_name_of(base) or base  # PEFT records a model loaded from a folder by its path
    pairs = _peft_pairs(load_file(str(w_path)), folder)
    return _uniform_adapter(base, config, pairs)


def _check_peft_config(config: dict, folder: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise EngineError(f"{str(folder)!r} holds a {config.get('peft_type')} adapter; only LoRA can be imported")
    for key, default in _UNSUPPORTED.items():
        value = config.get(key, default)
        if value not in (default, [], {}):
            raise EngineError(f"{str(folder)!r}: PEFT option {key}={value!r} has no gemtinker counterpart "
                              f"(supported: {key}={default!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise EngineError(f"{str(folder)!r}: {PEFT_CONFIG} needs a positive {key}, got {config.get(key)!r}")


def _peft_pairs(flat: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    parts: dict[str, list[torch.Tensor | None]] = {}
    for key, tensor in flat.items():
        suffix = next((s for s in _PEFT_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PEFT_PREFIX):
            raise EngineError(f"{str(folder)!r}: tensor {key!r} is not a LoRA linear factor "
                              "(base_model.model.<module>.lora_A/lora_B.weight); embedding LoRA and "
                              "extra trained weights cannot be imported")
        name = key[len(_PEFT_PREFIX): -len(suffix)]
        parts.setdefault(name, [None, None])[_PEFT_SUFFIXES[suffix]] = tensor.float()
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (a, b) in sorted(parts.items()):
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise EngineError(f"{str(folder)!r}: module {name!r} lacks a factor or has mismatched ranks")
        out[name] = (a, b)
    if not out:
        raise EngineError(f"{str(folder)!r}: {PEFT_WEIGHTS} holds no LoRA weights")
    return out


def _module_scale(config: dict, name: str, rank: int) -> float:
    """PEFT's scaling of one module: alpha_pattern / rank_pattern keys match a name's end."""
    alpha = next((v for k, v in config.get("alpha_pattern", {}).items() if _matches(name, k)), config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _uniform_adapter(base: str, config: dict, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Adapter:
    """One rank and one scale for all modules: pad smaller ranks with zero rows of A and zero
    columns of B (they add nothing), and fold each module's scale into its B."""
    rank = max(a.shape[0] for a, _ in pairs.values())
    alpha = float(config["lora_alpha"]) * (rank / config["r"])  # keeps the default scale alpha/r
    if config.get("use_rslora"):
        alpha = float(config["lora_alpha"]) * rank / math.sqrt(config["r"])
    scale = alpha / rank
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (a, b) in pairs.items():
        r = a.shape[0]
        ratio = _module_scale(config, name, r) / scale
        a_full = torch.zeros(rank, a.shape[1])
        b_full = torch.zeros(b.shape[0], rank)
        a_full[:r] = a
        b_full[:, :r] = b * ratio
        tensors[name] = (a_full, b_full)
    spec = LoraSpec(rank=rank, alpha=alpha, train_attn=False, train_mlp=False, train_unembed=False)
    return Adapter(base, spec, tensors)


def fit_to_model(adapter: Adapter, modules: dict[str, tuple[LoraLinear, str]], seed: int = 0) -> Adapter:
    """The adapter in the engine's layout for this base model.

    The engine trains whole categories (attention, MLP, unembedding): a category the adapter
    touches gets every one of its modules; those the adapter lacks get a fresh LoRA init
    (A random, B zero), which adds nothing, so the function is unchanged and training can go on.
    """
    categories: set[str] = set()
    for name, (a, b) in adapter.tensors.items():
        if name not in modules:
            raise EngineError(f"the adapter targets {name!r}, which is not a linear gemtinker's LoRA wraps in "
                              f"{adapter.base_model} (wrapped: attention and MLP linears and the unembedding)")
        mod = modules[name][0]
        if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features:
            raise EngineError(f"the adapter's {name!r} has shape A {tuple(a.shape)}, B {tuple(b.shape)}, but "
                              f"{adapter.base_model}'s module is {mod.in_features} -> {mod.out_features}")
        categories.add(modules[name][1])
    spec = replace(adapter.spec, seed=seed, train_attn="attn" in categories, train_mlp="mlp" in categories,
                   train_unembed="unembed" in categories)
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(adapter.tensors)
    for name, (mod, cat) in sorted(modules.items()):
        if cat in categories and name not in tensors:
            bound = 1.0 / math.sqrt(mod.in_features)  # as lora.init_weights
            a = torch.empty(spec.rank, mod.in_features).uniform_(-bound, bound, generator=gen)
            tensors[name] = (a, torch.zeros(mod.out_features, spec.rank))
    return Adapter(adapter.base_model, spec, tensors)


def lora_modules_of(model_dir: Path) -> dict[str, tuple[LoraLinear, str]]:
    """The modules our LoRA wraps in a model, from its config alone (weights on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return inject_lora(model)


# ------------------------------------------------------------------ merged models

def write_merged(adapter: Adapter, model_dir: Path, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """The base model at `model_dir` with the adapter merged in, as a plain transformers folder.

    Merged in fp32 and saved in `dtype` (default: the base model's own dtype). A delta on a tied
    unembedding unties it: the input embedding keeps the base weight, as during training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    saved_dtype = dtype or _config_dtype(model_dir)
    out_emb = model.get_output_embeddings()
    out_name = next(n for n, m in model.named_modules() if m is out_emb)
    if out_name in adapter.tensors and out_emb.weight is model.get_input_embeddings().weight:
        out_emb.weight = nn.Parameter(out_emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
    with torch.no_grad():
        for name, (a, b) in adapter.tensors.items():
            weight = model.get_submodule(name).weight
            weight += adapter.scale * (b.to(weight) @ a.to(weight))
    model.to(saved_dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build_folder(Path(out), build)


def _config_dtype(model_dir: Path) -> torch.dtype:
    cfg = json.loads((model_dir / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32


# ------------------------------------------------------------------ helpers

def _plain_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _build_folder(out: Path, build: Callable[[Path], None]) -> Path:
    """Build in a temporary sibling, then rename into place: never a half-written folder.
    An existing non-empty `out` is refused (nothing a user made is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EngineError(f"{str(out)!r} already exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
