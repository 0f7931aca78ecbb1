"""A server database as gemtinker wrote it before schema versions (0.1.0 and the ad-hoc column
migrations after it), for the tests that open one with today's `Store`."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from support.server import MODEL

# The tables as the first release (0.1.0) created them, before any column was added.
FIRST_RELEASE = (
    "CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, created REAL, tags TEXT, user_metadata TEXT, "
    "sdk_version TEXT, last_heartbeat REAL, finished REAL, finish_reason TEXT)",
    "CREATE TABLE IF NOT EXISTS runs (model_id TEXT PRIMARY KEY, session_id TEXT, base_model TEXT, lora TEXT, "
    "user_metadata TEXT, created REAL, last_request REAL, unloaded INTEGER DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS checkpoints (tinker_path TEXT PRIMARY KEY, model_id TEXT, kind TEXT, name TEXT, "
    "dir TEXT, created REAL, size_bytes INTEGER, user_metadata TEXT, expires_at REAL)",
    "CREATE TABLE IF NOT EXISTS samplers (sampler_id TEXT PRIMARY KEY, session_id TEXT, base_model TEXT, "
    "model_path TEXT, created REAL)",
    "CREATE TABLE IF NOT EXISTS futures (request_id TEXT PRIMARY KEY, kind TEXT, payload BLOB, created REAL)",
)
# What the releases before the schema version added with ALTER TABLE, in order.
ADDED = ("ALTER TABLE runs ADD COLUMN owner TEXT", "ALTER TABLE checkpoints ADD COLUMN public INTEGER DEFAULT 0",
         "ALTER TABLE sessions ADD COLUMN owner TEXT", "ALTER TABLE sessions ADD COLUMN display_name TEXT")
RUN = "old0session:train:0"
CKPT = f"tinker://{RUN}/weights/000010"


def write_old_db(path: Path, added: int) -> None:
    """A database as a gemtinker without schema versions left it: the first release's tables, the
    first `added` ALTERs, and a row in each table, written with the positional INSERTs of then."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    for sql in FIRST_RELEASE + ADDED[:added]:
        db.execute(sql)
    db.execute("INSERT INTO sessions VALUES ('old0session', 1.5e9, '[\"t\"]', '{\"k\": \"v\"}', '0.38.0', 1.5e9, "
               "1.5e9, 'success'" + ", NULL" * (added >= 3) + ", NULL" * (added >= 4) + ")")
    db.execute(f"INSERT INTO runs VALUES ('{RUN}', 'old0session', '{MODEL}', '{{\"rank\": 4}}', "
               "'{\"renderer_name\": \"r\"}', 1.5e9, 1.5e9, 1" + ", NULL" * (added >= 1) + ")")
    db.execute(f"INSERT INTO checkpoints VALUES ('{CKPT}', '{RUN}', 'training', '000010', '/gone', 1.5e9, 123, "
               "NULL, NULL" + ", 0" * (added >= 2) + ")")
    db.execute("INSERT INTO samplers VALUES ('old0session:sample:0', 'old0session', 'm', NULL, 1.5e9)")
    db.execute("INSERT INTO futures VALUES ('req-1', 'json', x'7b7d', ?)", (time.time(),))
    db.commit()
    db.close()
