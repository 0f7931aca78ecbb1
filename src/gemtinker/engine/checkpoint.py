"""Checkpoint directories: safetensors files + metadata.json with sha256 checksums.

A checkpoint is built in a hidden temporary sibling directory, fsynced, and moved into place with
os.replace, so a crash leaves either the old checkpoint or the new one, never a half-written one
that loads. Loading verifies every file's checksum. `recover_checkpoint_tree` (run at server
start) finishes or undoes the directory swaps a crash interrupted and removes temporary dirs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .types import EngineError, LoraSpec

FORMAT = "gemtinker-lora-v1"
METADATA = "metadata.json"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
_TMP_TAG, _OLD_TAG = ".tmp-", ".old-"
# Fault injection for tests/server/test_faults.py only: seconds to pause after the files are written and
# before the checkpoint is moved into place, so a test can SIGKILL a server mid-save on purpose.
FAULT_DELAY_ENV = "GEMTINKER_FAULT_CHECKPOINT_DELAY_S"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    tmp = final.parent / f".{final.name}{_TMP_TAG}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {ADAPTER_FILE: adapter}
        if optimizer is not None:
            files[OPTIMIZER_FILE] = optimizer
        checksums = {}
        for fname, tensors in files.items():
            save_file(_contiguous_cpu(tensors), str(tmp / fname))
            _fsync_file(tmp / fname)
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
        _fsync_dir(tmp)
        delay = float(os.environ.get(FAULT_DELAY_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
        _replace_dir(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    """os.replace cannot replace a non-empty directory: move the old one aside first."""
    if final.exists():
        # A crash between these two renames leaves only `old`: recover_checkpoint_tree puts it back.
        old = final.parent / f".{final.name}{_OLD_TAG}{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def recover_checkpoint_tree(root: str | os.PathLike) -> list[str]:
    """Clean up after writes a crash interrupted, anywhere under `root`; returns what was done.

    `.NAME.tmp-*`: an unfinished new checkpoint, deleted (it was never in place, never loadable).
    `.NAME.old-*`: the previous checkpoint moved aside for an overwrite. If NAME exists the swap
    completed and it is deleted; otherwise the crash hit between the two renames and it is moved
    back, so the previous checkpoint is what NAME holds again.
    Call it only when no write can be running (at server start).
    """
    done: list[str] = []
    base = Path(root)
    if not base.is_dir():
        return done
    for p in sorted(base.rglob(".*"), key=lambda q: len(q.parts), reverse=True):
        if not p.is_dir():
            continue
        name = p.name[1:]
        if _TMP_TAG in name:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed unfinished {p}")
        elif _OLD_TAG in name:
            final = p.parent / name[: name.rindex(_OLD_TAG)]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed replaced {p}")
            else:
                os.replace(p, final)
                _fsync_dir(p.parent)
                done.append(f"restored {final} from {p}")
    return done


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
