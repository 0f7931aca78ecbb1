"""Durable server state in one SQLite file: sessions, training runs, checkpoints, samplers and
finished futures (kept for a retention window so a client can re-poll after a reconnect or a
server restart).

All access goes through one connection guarded by a lock; every statement is small, so the
event loop may call these methods directly.

Durability: WAL journal, one autocommitted statement per change (each is its own transaction).
With synchronous=NORMAL a commit survives a killed process but not necessarily a power cut; the
rows a user cannot afford to lose (sessions, runs, checkpoints) are committed with a WAL fsync
(`durable=True`), which also makes every earlier cheap commit (futures) durable.

The tables and their migrations are in schema.py (`PRAGMA user_version`); every INSERT names its
columns, so a column added later never shifts the values of an older statement.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .schema import check_not_newer, migrate


class _Anyone:
    """The type of ANYONE: a filter value meaning "every owner" (None is the no-key owner)."""


ANYONE = _Anyone()


def _dumps(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


def _loads(v: str | None) -> Any:
    return None if v is None else json.loads(v)


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            try:
                check_not_newer(self._db, path)  # before the WAL switch below writes to the file
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                migrate(self._db, path)  # schema.py: versioned migrations
            except BaseException:
                self._db.close()
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = (), durable: bool = False) -> list[sqlite3.Row]:
        with self._lock:
            if not durable:
                return self._db.execute(sql, args).fetchall()
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                return self._db.execute(sql, args).fetchall()
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")

    # sessions
    def add_session(self, session_id: str, tags: list, user_metadata: dict, sdk_version: str,
                    owner: str | None = None, display_name: str | None = None) -> None:
        # Microseconds, as the ISO timestamps of search cursors carry them (sessions_before).
        now = round(time.time(), 6)
        self._exec(
            "INSERT INTO sessions (session_id, created, tags, user_metadata, sdk_version, last_heartbeat, owner, "
            "display_name) VALUES (?,?,?,?,?,?,?,?)",
            (session_id, now, _dumps(tags), _dumps(user_metadata), sdk_version, now, owner, display_name),
            durable=True,
        )

    def get_session(self, session_id: str) -> dict | None:
        rows = self._exec("SELECT * FROM sessions WHERE session_id=?", (session_id,))
        if not rows:
            return None
        return self._session_row(rows[0])

    def list_sessions(self, limit: int, offset: int, owner: str | None | _Anyone = ANYONE) -> list[str]:
        """Newest first; with `owner`, only sessions of that owner (and those made before owners)."""
        where, args = ("", ()) if owner is ANYONE else ("WHERE owner IS NULL OR owner IS ?", (owner,))
        rows = self._exec(
            f"SELECT session_id FROM sessions {where} ORDER BY created DESC, session_id DESC LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return [r[0] for r in rows]

    def sessions_before(self, created: float, session_id: str, limit: int) -> list[dict]:
        """Up to `limit` sessions older than (created, session_id) in (created, session_id) DESC
        order: the keyset page that session search filters. Times compare at microseconds, the
        precision of the ISO timestamps that carry a cursor."""
        created = round(created, 6) if created != float("inf") else created
        rows = self._exec(
            "SELECT * FROM sessions WHERE ROUND(created, 6) < ? OR (ROUND(created, 6) = ? AND session_id < ?) "
            "ORDER BY ROUND(created, 6) DESC, session_id DESC LIMIT ?", (created, created, session_id, limit),
        )
        return [self._session_row(r) for r in rows]

    @staticmethod
    def _session_row(row: sqlite3.Row) -> dict:
        d = dict(row)
        d["tags"], d["user_metadata"] = _loads(d["tags"]), _loads(d["user_metadata"])
        return d

    def heartbeat(self, session_id: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE sessions SET last_heartbeat=? WHERE session_id=?", (time.time(), session_id)
            )
            return cur.rowcount > 0

    def finish_session(self, session_id: str, reason: str) -> None:
        self._exec(
            "UPDATE sessions SET finished=?, finish_reason=? WHERE session_id=?",
            (time.time(), reason, session_id),
        )

    # training runs
    def add_run(self, model_id: str, session_id: str, base_model: str, lora: dict, user_metadata: dict | None,
                owner: str | None = None) -> None:
        now = time.time()
        self._exec(
            "INSERT OR REPLACE INTO runs (model_id, session_id, base_model, lora, user_metadata, created, "
            "last_request, unloaded, owner) VALUES (?,?,?,?,?,?,?,0,?)",
            (model_id, session_id, base_model, _dumps(lora), _dumps(user_metadata), now, now, owner),
            durable=True,
        )

    def touch_run(self, model_id: str) -> None:
        self._exec("UPDATE runs SET last_request=? WHERE model_id=?", (time.time(), model_id))

    def set_run_unloaded(self, model_id: str) -> None:
        self._exec("UPDATE runs SET unloaded=1 WHERE model_id=?", (model_id,))

    def get_run(self, model_id: str) -> dict | None:
        rows = self._exec("SELECT * FROM runs WHERE model_id=?", (model_id,))
        return self._run_row(rows[0]) if rows else None

    def list_runs(self, limit: int, offset: int) -> tuple[list[dict], int]:
        rows = self._exec("SELECT * FROM runs ORDER BY created DESC LIMIT ? OFFSET ?", (limit, offset))
        total = self._exec("SELECT COUNT(*) FROM runs")[0][0]
        return [self._run_row(r) for r in rows], total

    def runs_of_session(self, session_id: str) -> list[str]:
        return [r[0] for r in self._exec("SELECT model_id FROM runs WHERE session_id=?", (session_id,))]

    @staticmethod
    def _run_row(row: sqlite3.Row) -> dict:
        d = dict(row)
        d["lora"], d["user_metadata"] = _loads(d["lora"]), _loads(d["user_metadata"])
        return d

    # checkpoints
    def add_checkpoint(self, tinker_path: str, model_id: str, kind: str, name: str, dir: str,
                       size_bytes: int, user_metadata: dict | None, expires_at: float | None,
                       files: dict[str, int] | None = None) -> None:
        # A new or overwritten checkpoint starts private (public=0), like a fresh one on Tinker.
        self._exec(
            "INSERT OR REPLACE INTO checkpoints (tinker_path, model_id, kind, name, dir, created, size_bytes, "
            "user_metadata, expires_at, public, files) VALUES (?,?,?,?,?,?,?,?,?,0,?)",
            (tinker_path, model_id, kind, name, dir, time.time(), size_bytes, _dumps(user_metadata), expires_at,
             _dumps(files)),
            durable=True,
        )

    def get_checkpoint(self, tinker_path: str) -> dict | None:
        rows = self._exec("SELECT * FROM checkpoints WHERE tinker_path=?", (tinker_path,))
        return self._ckpt_row(rows[0]) if rows else None

    def list_checkpoints(self, model_id: str | None = None, limit: int = 1 << 30, offset: int = 0,
                         live_at: float | None = None) -> tuple[list[dict], int]:
        """Newest first. `live_at`: leave out checkpoints expired by then (their TTL ran out)."""
        conds, args = [], []
        if model_id:
            conds.append("model_id=?")
            args.append(model_id)
        if live_at is not None:
            conds.append("(expires_at IS NULL OR expires_at > ?)")
            args.append(live_at)
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        rows = self._exec(
            f"SELECT * FROM checkpoints {where} ORDER BY created DESC LIMIT ? OFFSET ?", (*args, limit, offset)
        )
        total = self._exec(f"SELECT COUNT(*) FROM checkpoints {where}", args)[0][0]
        return [self._ckpt_row(r) for r in rows], total

    def delete_checkpoint(self, tinker_path: str) -> None:
        self._exec("DELETE FROM checkpoints WHERE tinker_path=?", (tinker_path,), durable=True)

    def set_checkpoint_expiry(self, tinker_path: str, expires_at: float | None) -> None:
        self._exec("UPDATE checkpoints SET expires_at=? WHERE tinker_path=?", (expires_at, tinker_path), durable=True)

    def set_checkpoint_public(self, tinker_path: str, public: bool) -> None:
        self._exec("UPDATE checkpoints SET public=? WHERE tinker_path=?", (int(public), tinker_path), durable=True)

    def expired_checkpoints(self, now: float) -> list[dict]:
        rows = self._exec("SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
        return [self._ckpt_row(r) for r in rows]

    def delete_expired_checkpoint(self, tinker_path: str, now: float) -> bool:
        """Delete the row if it is still expired at `now` (its TTL may have been extended, or the
        name saved again, since it was listed); True if it was deleted."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM checkpoints WHERE tinker_path=? AND expires_at IS NOT NULL AND expires_at <= ?",
                (tinker_path, now),
            )
            return cur.rowcount > 0

    def checkpoints_of_owner(self, owner: str | None, live_at: float) -> list[dict]:
        """Unexpired checkpoints whose training run belongs to `owner` (or to anyone)."""
        rows = self._exec(
            "SELECT c.* FROM checkpoints c JOIN runs r ON r.model_id = c.model_id "
            "WHERE (r.owner IS NULL OR r.owner IS ?) AND (c.expires_at IS NULL OR c.expires_at > ?)",
            (owner, live_at),
        )
        return [self._ckpt_row(r) for r in rows]

    @staticmethod
    def _ckpt_row(row: sqlite3.Row) -> dict:
        d = dict(row)
        d["user_metadata"] = _loads(d["user_metadata"])
        d["public"] = bool(d.get("public"))
        d["files"] = _loads(d.get("files"))
        return d

    # download URLs of external weights (external.py): one row per file and signing
    def add_download_urls(self, rows: list[tuple[str, str, str, float, float]]) -> None:
        """Rows of (token hash, tinker path, file, the checkpoint's `created`, expiry time)."""
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO download_urls (token_hash, tinker_path, file, checkpoint_created, "
                "expires_at) VALUES (?,?,?,?,?)", rows)

    def get_download_url(self, token_hash: str) -> dict | None:
        rows = self._exec("SELECT * FROM download_urls WHERE token_hash=?", (token_hash,))
        return dict(rows[0]) if rows else None

    def purge_download_urls(self, expired_before: float) -> None:
        self._exec("DELETE FROM download_urls WHERE expires_at < ?", (expired_before,))

    # samplers
    def add_sampler(self, sampler_id: str, session_id: str | None, base_model: str, model_path: str | None) -> None:
        self._exec(
            "INSERT OR REPLACE INTO samplers (sampler_id, session_id, base_model, model_path, created) "
            "VALUES (?,?,?,?,?)",
            (sampler_id, session_id, base_model, model_path, time.time()),
        )

    def get_sampler(self, sampler_id: str) -> dict | None:
        rows = self._exec("SELECT * FROM samplers WHERE sampler_id=?", (sampler_id,))
        return dict(rows[0]) if rows else None

    def samplers_of_session(self, session_id: str) -> list[str]:
        return [r[0] for r in self._exec("SELECT sampler_id FROM samplers WHERE session_id=?", (session_id,))]

    # finished futures
    def put_future(self, request_id: str, kind: str, payload: bytes) -> None:
        self._exec("INSERT OR REPLACE INTO futures (request_id, kind, payload, created) VALUES (?,?,?,?)",
                   (request_id, kind, payload, time.time()))

    def get_future(self, request_id: str) -> tuple[str, bytes] | None:
        rows = self._exec("SELECT kind, payload FROM futures WHERE request_id=?", (request_id,))
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    def purge_futures(self, older_than: float) -> None:
        self._exec("DELETE FROM futures WHERE created < ?", (older_than,))
