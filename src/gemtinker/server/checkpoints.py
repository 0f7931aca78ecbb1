"""Checkpoints by `tinker://` path, shared by the running server and the offline commands
(`gemtinker export`, `gemtinker import-peft`), which open the same state directory.

The store and the directories stay consistent the same way the server keeps them: a directory is
complete before its row is written, so every listed checkpoint is loadable.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from pathlib import Path

from gemtinker.engine.types import LoraSpec

from .errors import NotFoundError
from .paths import TinkerPath, checkpoint_dir, parse_tinker_path
from .store import Store

STORE_FILE = "server.sqlite"
CHECKPOINTS_DIR = "checkpoints"
# Training runs made by `gemtinker import-peft` (no live session ever owned them).
IMPORT_SESSION = "import"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def resolve_checkpoint(store: Store, ckpt_root: Path, path: object) -> tuple[TinkerPath, Path, dict]:
    """(parsed path, directory, training run row) of an existing checkpoint, or NotFoundError."""
    tp = parse_tinker_path(path)  # type: ignore[arg-type]
    directory = checkpoint_dir(ckpt_root, tp)
    row = store.get_checkpoint(str(tp))
    if row is None or not directory.is_dir():
        raise NotFoundError(f"checkpoint {path!r} not found on this server")
    run = store.get_run(tp.run_id)
    if run is None:
        raise NotFoundError(f"checkpoint {path!r} belongs to unknown training run {tp.run_id!r}")
    return tp, directory, run


def new_import_run(store: Store, base_model: str, spec: LoraSpec, user_metadata: dict) -> str:
    """A training run row for imported weights; returns its id (the `tinker://` run id)."""
    run_id = f"{IMPORT_SESSION}-{time.strftime('%Y%m%d')}-{uuid.uuid4().hex[:8]}"
    lora = {k: v for k, v in asdict(spec).items() if k != "alpha"}
    store.add_run(run_id, IMPORT_SESSION, base_model, lora, user_metadata)
    return run_id


def record_checkpoint(store: Store, tp: TinkerPath, directory: Path, user_metadata: dict | None) -> None:
    store.add_checkpoint(str(tp), tp.run_id, tp.kind, tp.name, str(directory), dir_size(directory),
                         user_metadata, None)
