"""Checkpoint directories: safetensors files + metadata.json with sha256 checksums.

A checkpoint is built in a hidden temporary sibling directory and moved into place with
os.replace, so a crash leaves either the old checkpoint or the new one, never a half-written one
that loads. Loading verifies every file's checksum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .types import EngineError, LoraSpec

FORMAT = "gemtinker-lora-v1"
METADATA = "metadata.json"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str,
    base_model: str,
    spec: LoraSpec,
    seed: int,
    step: int,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, torch.Tensor] | None,
    metadata: dict | None,
) -> Path:
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {ADAPTER_FILE: adapter}
        if optimizer is not None:
            files[OPTIMIZER_FILE] = optimizer
        checksums = {}
        for fname, tensors in files.items():
            save_file(_contiguous_cpu(tensors), str(tmp / fname))
            checksums[fname] = _sha256(tmp / fname)
        meta = {
            "format": FORMAT,
            "kind": kind,
            "base_model": base_model,
            "lora": dataclasses.asdict(spec),
            "seed": seed,
            "step": step,
            "has_optimizer": optimizer is not None,
            "sha256": checksums,
            "metadata": metadata or {},
        }
        with open(tmp / METADATA, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    """os.replace cannot replace a non-empty directory: move the old one aside first."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def read_metadata(path: str | os.PathLike) -> dict:
    p = Path(path)
    meta_path = p / METADATA
    if not meta_path.is_file():
        raise EngineError(f"no checkpoint at {str(p)!r} ({METADATA} missing)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"checkpoint {str(p)!r} has an unreadable {METADATA}: {e}") from None
    if meta.get("format") != FORMAT:
        raise EngineError(f"checkpoint {str(p)!r} has unknown format {meta.get('format')!r}")
    return meta


def spec_from_metadata(meta: dict) -> LoraSpec:
    return LoraSpec(**meta["lora"])


def read_tensors(path: str | os.PathLike, fname: str, meta: dict) -> dict[str, torch.Tensor]:
    """Load one file of a checkpoint after checking its sha256 against the metadata."""
    p = Path(path) / fname
    expected = meta.get("sha256", {}).get(fname)
    if expected is None or not p.is_file():
        raise EngineError(f"checkpoint {str(p.parent)!r} has no {fname}")
    actual = _sha256(p)
    if actual != expected:
        raise EngineError(
            f"checkpoint file {str(p)!r} is corrupted: sha256 {actual[:12]}… != recorded {expected[:12]}…"
        )
    return load_file(str(p))
