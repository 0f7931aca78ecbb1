"""Checkpoints by `tinker://` path, shared by the running server and the offline commands
(`gemtinker export`, `gemtinker import-peft`), which open the same state directory.

The store and the directories stay consistent the same way the server keeps them: a directory is
complete before its row is written, so every listed checkpoint is loadable.

Who may do what (`owner` is the hash of a request's API key, see app.owner_of): a training run
belongs to the key that made it (NULL: made before owners, or by `import-peft`: anyone's). Only
its owner may delete its checkpoints, change their TTL or publish them. Anyone may read (load,
sample from, copy) a checkpoint of their own or a published one.

Expiry: a checkpoint whose TTL ran out is gone at once for every reader (listings leave it out,
loads answer "expired"); `Checkpoints.purge_expired` later deletes its row and directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gemtinker.engine.types import LoraSpec

from .errors import Forbidden, NotFoundError, UserError
from .limits import check_ttl, iso, str_dict
from .paths import TinkerPath, check_component, checkpoint_dir, parse_tinker_path
from .store import ANYONE, Store

log = logging.getLogger("gemtinker.server")

STORE_FILE = "server.sqlite"
CHECKPOINTS_DIR = "checkpoints"
# Training runs made by `gemtinker import-peft` (no live session ever owned them).
IMPORT_SESSION = "import"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def is_expired(row: dict, now: float | None = None) -> bool:
    return row["expires_at"] is not None and row["expires_at"] <= (time.time() if now is None else now)


def _expired_error(tp: TinkerPath, row: dict) -> NotFoundError:
    return NotFoundError(f"checkpoint {tp} expired at {iso(row['expires_at'])} (its TTL ran out) and is no "
                         "longer available")


def resolve_checkpoint(store: Store, ckpt_root: Path, path: object, reader: Any = ANYONE) -> tuple[TinkerPath, Path, dict]:
    """(parsed path, directory, training run row) of an existing, unexpired checkpoint, or
    NotFoundError. `reader`: the owner who wants to read it (ANYONE: no check, for the offline
    commands and for samplers already admitted); Forbidden unless it is theirs or published."""
    tp = parse_tinker_path(path)  # type: ignore[arg-type]
    directory = checkpoint_dir(ckpt_root, tp)
    row = store.get_checkpoint(str(tp))
    if row is None or not directory.is_dir():
        raise NotFoundError(f"checkpoint {path!r} not found on this server")
    if is_expired(row):
        raise _expired_error(tp, row)
    run = store.get_run(tp.run_id)
    if run is None:
        raise NotFoundError(f"checkpoint {path!r} belongs to unknown training run {tp.run_id!r}")
    if reader is not ANYONE and run.get("owner") not in (None, reader) and not row["public"]:
        raise Forbidden(f"checkpoint {tp} belongs to another API key and is not published; its owner can "
                        "publish it (RestClient.publish_checkpoint_from_tinker_path)")
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


def checkpoint_json(row: dict) -> dict:
    """A store row as the SDK's `types.Checkpoint`."""
    tp = parse_tinker_path(row["tinker_path"])
    return {
        "checkpoint_id": tp.checkpoint_id, "checkpoint_type": row["kind"], "time": iso(row["created"]),
        "tinker_path": row["tinker_path"], "size_bytes": row["size_bytes"], "public": bool(row["public"]),
        "user_metadata": str_dict(row["user_metadata"]), "expires_at": iso(row["expires_at"]),
    }


# 1 GB in the SDK's storage unit (CurrentCheckpointStorageUsageItem.size_gigabytes).
BYTES_PER_GIGABYTE = 1e9
# Idempotency keys of copy_weights remembered (the SDK sends one per call, reused by its retries).
MAX_COPY_KEYS = 10_000


class Checkpoints:
    """Checkpoint management of the running server: TTLs and expiry, publishing, copies, storage.

    `lock` orders what creates and what removes a checkpoint directory: the purge of an expired
    checkpoint and a save under the same name never interleave (`writing`)."""

    def __init__(self, store: Store, root: Path):
        self.store = store
        self.root = root
        self.lock = threading.Lock()
        self._copies: dict[tuple[str | None, str], str] = {}  # (owner, X-Idempotency-Key) -> path of the copy
        self._writing: set[str] = set()  # tinker paths a save is writing now

    def resolve(self, path: object, reader: Any = ANYONE) -> tuple[TinkerPath, Path, dict]:
        return resolve_checkpoint(self.store, self.root, path, reader)

    def live_rows(self, model_id: str | None = None, limit: int = 1 << 30, offset: int = 0) -> tuple[list[dict], int]:
        return self.store.list_checkpoints(model_id, limit, offset, live_at=time.time())

    @contextlib.contextmanager
    def writing(self, tp: TinkerPath, overwrite: bool) -> Iterator[Path]:
        """The directory a save writes `tp` into, pinned while the save runs: the purge leaves it
        alone even if the checkpoint it overwrites expires meanwhile. Refuses an existing
        checkpoint unless `overwrite`; an expired one is removed first (its name is free again).

        The old directory (an overwritten checkpoint, or an unrecorded one left by a save a crash
        interrupted) stays in place until the new one is complete: the engine writes it aside and
        swaps it in, so a crash mid-save never loses the previous checkpoint."""
        path = checkpoint_dir(self.root, tp)
        key = str(tp)
        with self.lock:
            if key in self._writing:
                raise UserError(f"checkpoint {tp} is being saved by another request; choose another name")
            row = self.store.get_checkpoint(key)
            if row is not None and is_expired(row):
                self._remove(row)
            elif row is not None and path.exists() and not overwrite:
                raise UserError(f"checkpoint {tp} already exists; choose another name or pass overwrite=True")
            self._writing.add(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield path
        finally:
            with self.lock:
                self._writing.discard(key)

    def _owned(self, run_id: str, checkpoint_id: str, owner: str | None, action: str,
               allow_expired: bool = False) -> tuple[TinkerPath, dict]:
        """The row of checkpoint `<run_id>/<checkpoint_id>` if `owner` may change it."""
        tp = parse_tinker_path(f"tinker://{run_id}/{checkpoint_id}")
        row = self.store.get_checkpoint(str(tp))
        if row is None:
            raise NotFoundError(f"checkpoint {tp} not found on this server")
        run = self.store.get_run(tp.run_id)
        if run is not None and run.get("owner") not in (None, owner):
            raise Forbidden(f"checkpoint {tp} belongs to another API key; only the key that made it may {action}")
        if not allow_expired and is_expired(row):
            raise _expired_error(tp, row)
        return tp, row

    def set_ttl(self, run_id: str, checkpoint_id: str, owner: str | None, ttl: Any) -> float | None:
        """`ttl` seconds from now (None: keep forever); returns the new expiry time."""
        ttl_s = check_ttl(ttl)
        tp, _ = self._owned(run_id, checkpoint_id, owner, "change its TTL")
        expires = None if ttl_s is None else time.time() + ttl_s
        self.store.set_checkpoint_expiry(str(tp), expires)
        log.info("%-26s %s ttl=%s", "set_checkpoint_ttl", tp, ttl_s)
        return expires

    def set_public(self, run_id: str, checkpoint_id: str, owner: str | None, public: bool) -> None:
        tp, _ = self._owned(run_id, checkpoint_id, owner, "publish or unpublish it")
        self.store.set_checkpoint_public(str(tp), public)
        log.info("%-26s %s", "publish_checkpoint" if public else "unpublish_checkpoint", tp)

    def delete(self, run_id: str, checkpoint_id: str, owner: str | None) -> None:
        tp = parse_tinker_path(f"tinker://{run_id}/{checkpoint_id}")
        directory = checkpoint_dir(self.root, tp)
        if self.store.get_checkpoint(str(tp)) is None:
            if not directory.exists():
                raise NotFoundError(f"checkpoint {tp} not found")
            run = self.store.get_run(tp.run_id)  # an unrecorded directory (a save a crash interrupted)
            if run is not None and run.get("owner") not in (None, owner):
                raise Forbidden(f"checkpoint {tp} belongs to another API key; only the key that made it may delete it")
        else:
            self._owned(run_id, checkpoint_id, owner, "delete it", allow_expired=True)
        with self.lock:
            if str(tp) in self._writing:
                raise UserError(f"checkpoint {tp} is being saved right now; delete it once the save has finished")
            self.store.delete_checkpoint(str(tp))
            shutil.rmtree(directory, ignore_errors=True)
        log.info("%-26s %s", "delete_checkpoint", tp)

    def purge_expired(self) -> list[str]:
        """Delete the rows and directories of expired checkpoints; returns their paths. Blocking
        (directory removal): call off the event loop."""
        gone = []
        for row in self.store.expired_checkpoints(time.time()):
            with self.lock:
                if row["tinker_path"] in self._writing:
                    continue  # being overwritten: the save records its own expiry
                if self.store.delete_expired_checkpoint(row["tinker_path"], time.time()):
                    self._remove_dir(row)
                    gone.append(row["tinker_path"])
        if gone:
            log.info("%-26s %d: %s", "purge_expired_checkpoints", len(gone), ", ".join(gone[:5]))
        return gone

    def _remove(self, row: dict) -> None:
        self.store.delete_checkpoint(row["tinker_path"])
        self._remove_dir(row)

    def _remove_dir(self, row: dict) -> None:
        # The directory is derived from the path again, never taken from the row's `dir` column.
        shutil.rmtree(checkpoint_dir(self.root, parse_tinker_path(row["tinker_path"])), ignore_errors=True)

    def copy(self, body: dict, owner: str | None, idempotency_key: str | None,
             session_is_live: Any) -> str:
        """`copy_weights`: a copy of a readable checkpoint under a new training run owned by
        `owner`; returns its tinker path. Files are hard links where the filesystem allows (no
        bytes duplicated, as on Tinker): checkpoint files are never rewritten in place (a save
        writes a new directory and swaps it in), so the copy never sees later changes of the
        source. `session_is_live(session_id)` checks a session_id the request names."""
        from tinker import types

        done_key = None if idempotency_key is None else (owner, idempotency_key)
        if done_key is not None and done_key in self._copies:
            return self._copies[done_key]
        try:
            req = types.CopyWeightsRequest.model_validate(body)
        except ValueError as e:
            raise UserError(f"copy_weights: invalid request: {str(e)[:300]}") from None
        ttl = check_ttl(req.ttl_seconds)
        src, _, src_run = self.resolve(req.source_path, reader=owner)
        if req.session_id is not None:
            session_id = check_component(req.session_id, "session_id")
            if req.model_seq_id is None:
                raise UserError("copy_weights: session_id needs model_seq_id (the training run slot of the copy)")
            if not session_is_live(session_id):
                raise UserError(f"copy_weights: session {session_id!r} is unknown or finished")
            run_id = check_component(f"{session_id}:train:{req.model_seq_id}", "training run id")
            if self.store.get_run(run_id) is not None:
                raise UserError(f"copy_weights: training run {run_id!r} already exists; use another model_seq_id")
        else:
            # No projects here: destination_project_id (which the SDK requires) names none, and
            # the copy belongs to the calling API key, like every run it makes.
            session_id = COPY_SESSION
            run_id = f"{COPY_SESSION}-{time.strftime('%Y%m%d')}-{uuid.uuid4().hex[:8]}"
        dst = TinkerPath(run_id, src.kind, src.name)
        dst_dir = checkpoint_dir(self.root, dst)
        dst_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst_dir.with_name(f".copy-{uuid.uuid4().hex[:8]}")
        with self.lock:  # the source can be neither purged nor deleted meanwhile
            _, src_dir, _ = self.resolve(req.source_path, reader=owner)
            if str(src) in self._writing:
                raise UserError(f"copy_weights: checkpoint {src} is being saved right now; copy it once the save "
                                "has finished")
            shutil.copytree(src_dir, tmp, copy_function=_link_or_copy)
        tmp.rename(dst_dir)  # complete before any row names it
        self.store.add_run(run_id, session_id, src_run["base_model"], src_run["lora"], src_run["user_metadata"], owner)
        src_row = self.store.get_checkpoint(str(src)) or {}
        expires = None if ttl is None else time.time() + ttl
        self.store.add_checkpoint(str(dst), run_id, dst.kind, dst.name, str(dst_dir), dir_size(dst_dir),
                                  src_row.get("user_metadata"), expires, src_row.get("files"))
        if done_key is not None:
            self._copies[done_key] = str(dst)
            while len(self._copies) > MAX_COPY_KEYS:
                self._copies.pop(next(iter(self._copies)))
        log.info("%-26s %s -> %s", "copy_weights", src, dst)
        return str(dst)

    def storage_usage(self, owner: str | None, project_id: Any) -> dict:
        """`get_current_checkpoint_storage_usage`: the caller's unexpired checkpoints, one item
        (this server has no projects and no prices)."""
        if project_id is not None:
            raise UserError(f"get_current_checkpoint_storage_usage: project_id={project_id!r}, but this server has "
                            "no projects; call it without one for this API key's checkpoints")
        rows = self.store.checkpoints_of_owner(owner, time.time())
        size = sum(int(r["size_bytes"] or 0) for r in rows)
        return {"effective_rate_usd_per_gigabyte_month": None,
                "data": [{"checkpoint_count": len(rows), "size_bytes": size, "size_gigabytes": size / BYTES_PER_GIGABYTE}]}


# Session id recorded for copies made without a session (ServiceClient.copy_weights and
# RestClient.copy_weights send none).
COPY_SESSION = "copy"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
