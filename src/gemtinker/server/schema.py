"""The SQLite schema of `store.Store`, versioned by `PRAGMA user_version`, and its migrations.

The database persists under ~/.cache, so a schema change must carry existing files forward:
each change is a numbered `Migration`, applied in order, in one transaction together with the
new `user_version`. A database from a newer gemtinker (a version this code does not know) is
refused before anything is written to it, rather than used with columns this code would miss.

Databases written before the version existed all read `user_version` 0; `_detect_unversioned`
places them by the columns their tables already have (the ad-hoc migrations of those releases
added them one by one, in the order of `MIGRATIONS`).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("gemtinker.server")


class SchemaError(RuntimeError):
    """The database cannot be used by this version of gemtinker (the message says why)."""


@dataclass(frozen=True)
class Migration:
    version: int  # the schema version once applied
    statements: tuple[str, ...]
    added_column: tuple[str, str] | None = None  # (table, column): places a pre-versioned database


# Never edit a released migration: add a new one at the end (a new table, a column, an index).
MIGRATIONS: tuple[Migration, ...] = (
    # The first release's tables. IF NOT EXISTS: a pre-versioned database may already hold them.
    Migration(1, (
        "CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, created REAL, tags TEXT, "
        "user_metadata TEXT, sdk_version TEXT, last_heartbeat REAL, finished REAL, finish_reason TEXT)",
        "CREATE TABLE IF NOT EXISTS runs (model_id TEXT PRIMARY KEY, session_id TEXT, base_model TEXT, lora TEXT, "
        "user_metadata TEXT, created REAL, last_request REAL, unloaded INTEGER DEFAULT 0)",
        "CREATE TABLE IF NOT EXISTS checkpoints (tinker_path TEXT PRIMARY KEY, model_id TEXT, kind TEXT, name TEXT, "
        "dir TEXT, created REAL, size_bytes INTEGER, user_metadata TEXT, expires_at REAL)",
        "CREATE TABLE IF NOT EXISTS samplers (sampler_id TEXT PRIMARY KEY, session_id TEXT, base_model TEXT, "
        "model_path TEXT, created REAL)",
        "CREATE TABLE IF NOT EXISTS futures (request_id TEXT PRIMARY KEY, kind TEXT, payload BLOB, created REAL)",
    )),
    # Hash of the API key that made the run; NULL = anyone's (runs made before owners).
    Migration(2, ("ALTER TABLE runs ADD COLUMN owner TEXT",), ("runs", "owner")),
    # Published checkpoints (publish_checkpoint_from_tinker_path); old ones start private.
    Migration(3, ("ALTER TABLE checkpoints ADD COLUMN public INTEGER DEFAULT 0",), ("checkpoints", "public")),
    Migration(4, ("ALTER TABLE sessions ADD COLUMN owner TEXT",), ("sessions", "owner")),  # as runs.owner
    Migration(5, ("ALTER TABLE sessions ADD COLUMN display_name TEXT",), ("sessions", "display_name")),
    # save_weights_external: an export's files (JSON {file name: size in bytes}) and its signed
    # download URLs (only a hash of each URL's token is stored).
    Migration(6, (
        "ALTER TABLE checkpoints ADD COLUMN files TEXT",
        "CREATE TABLE IF NOT EXISTS download_urls (token_hash TEXT PRIMARY KEY, tinker_path TEXT, file TEXT, "
        "checkpoint_created REAL, expires_at REAL)",
    ), ("checkpoints", "files")),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def _version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def check_not_newer(db: sqlite3.Connection, path: Path) -> None:
    """Refuse a database written by a newer gemtinker; call before writing anything to it."""
    found = _version(db)
    if found > SCHEMA_VERSION:
        raise SchemaError(
            f"{path} has schema version {found}, but this gemtinker knows versions up to {SCHEMA_VERSION}: "
            "it was written by a newer gemtinker. Upgrade gemtinker, or serve from another state dir (--root); "
            "the file was left unchanged")


def _detect_unversioned(db: sqlite3.Connection, path: Path) -> int:
    """The version a user_version-0 database is at: 0 if it has none of our tables, else the
    last migration whose column it has (after creating any first-release table it lacks)."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables & {"sessions", "runs", "checkpoints", "samplers", "futures"}:
        return 0
    for sql in MIGRATIONS[0].statements:  # the old code created all five with IF NOT EXISTS, too
        db.execute(sql)
    present = [m.added_column is not None and m.added_column[1] in _columns(db, m.added_column[0])
               for m in MIGRATIONS[1:]]
    at = 1 + (present.index(False) if False in present else len(present))
    later = [m.added_column for m, p in zip(MIGRATIONS[at:], present[at - 1:]) if p]
    if later:
        raise SchemaError(f"{path} has no schema version and an unexpected mix of columns (it has "
                          f"{', '.join('.'.join(c) for c in later if c)} but lacks "
                          f"{'.'.join(MIGRATIONS[at].added_column or ())}): it was not written by gemtinker; "
                          "serve from another state dir (--root)")
    return at


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Bring the database (autocommit connection) to SCHEMA_VERSION; returns the version it
    had. One transaction: a failed or interrupted migration leaves the file as it was."""
    if _version(db) == SCHEMA_VERSION:  # the common case: no write lock taken
        return SCHEMA_VERSION
    db.execute("BEGIN IMMEDIATE")  # another process opening the same file waits for us
    try:
        check_not_newer(db, path)  # again, now under the write lock
        found = _version(db)
        start = found or _detect_unversioned(db, path)
        for m in MIGRATIONS[start:]:
            for sql in m.statements:
                db.execute(sql)
        if _version(db) != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    if start:  # 0: a new file
        log.info("migrated %s from schema version %d%s to %d", path, start,
                 "" if found else " (unversioned, placed by its columns)", SCHEMA_VERSION)
    return start
