"""The SQLite store's schema version: databases written by earlier gemtinker releases migrate in
place and keep their rows (and a server starts on them); a database from a newer release is
refused, unchanged; `last_request_time` follows the run's requests."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest
import tinker
from tinker import types

from support.server import API_KEY, MODEL, SEQ_A, datum_ce
from gemtinker.server import start_local
from gemtinker.server.checkpoints import STORE_FILE
from gemtinker.server.cli import main as serve_main
from gemtinker.server import schema
from gemtinker.server.schema import SCHEMA_VERSION, Migration, SchemaError
from gemtinker.server.store import Store
from support.old_store import ADDED, CKPT, FIRST_RELEASE, RUN, write_old_db

def columns(path: Path) -> dict[str, list[tuple]]:
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: [tuple(r) for r in db.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        db.close()


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("added", range(len(ADDED) + 1))
def test_an_unversioned_database_migrates_and_keeps_its_rows(tmp_path, added):
    path = tmp_path / "old.sqlite"
    write_old_db(path, added)
    assert user_version(path) == 0
    store = Store(path)
    try:
        s = store.get_session("old0session")
        assert (s["tags"], s["user_metadata"], s["finish_reason"]) == (["t"], {"k": "v"}, "success")
        assert s["owner"] is None and s["display_name"] is None
        run = store.get_run(RUN)
        assert run["lora"] == {"rank": 4} and run["unloaded"] == 1 and run["owner"] is None
        assert store.get_checkpoint(CKPT)["size_bytes"] == 123 and store.get_checkpoint(CKPT)["public"] is False
        assert store.get_sampler("old0session:sample:0")["base_model"] == "m"
        assert store.get_future("req-1") == ("json", b"{}")
        # The new columns take writes.
        store.add_session("new", [], {}, "0.38.0", owner="abc", display_name="d")
        store.set_checkpoint_public(CKPT, True)
        assert store.get_session("new")["display_name"] == "d" and store.get_checkpoint(CKPT)["public"] is True
    finally:
        store.close()
    assert user_version(path) == SCHEMA_VERSION
    fresh = tmp_path / "fresh.sqlite"
    Store(fresh).close()
    assert columns(path) == columns(fresh)  # migrated == created new, column for column
    Store(path).close()  # opening a current database again changes nothing
    assert columns(path) == columns(fresh) and user_version(path) == SCHEMA_VERSION


def test_a_partial_old_database_gains_the_missing_tables(tmp_path):
    # Older tests (and hand-made files) hold only some tables; the rest are created.
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(FIRST_RELEASE[1])
    db.execute(f"INSERT INTO runs VALUES ('{RUN}', 's', 'm', NULL, NULL, 1, 1, 0)")
    db.commit()
    db.close()
    Store(path).close()
    fresh = tmp_path / "fresh.sqlite"
    Store(fresh).close()
    assert columns(path) == columns(fresh)


def file_state(path: Path) -> tuple[str, list[str]]:
    """The file's bytes, and its companions (-wal, -shm: present once SQLite wrote to it)."""
    return hashlib.sha256(path.read_bytes()).hexdigest(), sorted(p.name for p in path.parent.glob(f"{path.name}*"))


def test_a_database_from_a_newer_gemtinker_is_refused_unchanged(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    path = root / STORE_FILE
    write_old_db(path, len(ADDED))
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=DELETE")  # one file, so any write shows in its bytes
    db.execute("ALTER TABLE runs ADD COLUMN from_the_future TEXT")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    before = file_state(path)
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}.*newer gemtinker"):
        Store(path)
    with pytest.raises(SchemaError, match="--root"):
        start_local(models=[MODEL], root=root)
    assert serve_main(["--model", MODEL, "--root", str(root)]) == 2
    assert f"schema version {SCHEMA_VERSION + 1}" in capsys.readouterr().err
    assert file_state(path) == before


def test_an_unversioned_database_with_a_gap_in_its_columns_is_refused(tmp_path):
    path = tmp_path / "odd.sqlite"
    write_old_db(path, 1)
    db = sqlite3.connect(path)
    db.execute(ADDED[2])  # sessions.owner without checkpoints.public: no gemtinker wrote this
    db.commit()
    db.close()
    with pytest.raises(SchemaError, match="sessions.owner but lacks checkpoints.public"):
        Store(path)
    assert user_version(path) == 0


def test_a_later_migration_upgrades_a_current_database(tmp_path, monkeypatch):
    path = tmp_path / "db.sqlite"
    Store(path).close()
    later = Migration(SCHEMA_VERSION + 1, ("CREATE TABLE extra (k TEXT PRIMARY KEY)",
                                           "ALTER TABLE runs ADD COLUMN note TEXT"))
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS + (later,))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", later.version)
    Store(path).close()
    assert user_version(path) == later.version
    assert "extra" in columns(path) and "note" in [c[1] for c in columns(path)["runs"]]


def test_a_failed_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    write_old_db(path, 1)
    before = columns(path)
    broken = Migration(SCHEMA_VERSION + 1, ("CREATE TABLE extra (k TEXT)", "ALTER TABLE no_such_table ADD x TEXT"))
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS + (broken,))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", broken.version)
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        Store(path)
    assert columns(path) == before and user_version(path) == 0  # not even the earlier steps stayed
    monkeypatch.undo()
    store = Store(path)  # and the next open, by a working release, migrates it
    assert store.get_run(RUN)["unloaded"] == 1
    store.close()


def test_touch_run_moves_last_request():
    store = Store(Path(":memory:"))
    try:
        store.add_run("s:train:0", "s", "m", {}, None)
        created = store.get_run("s:train:0")["last_request"]
        time.sleep(0.01)  # time.time() must advance; not a timing measurement
        store.touch_run("s:train:0")
        assert store.get_run("s:train:0")["last_request"] > created
    finally:
        store.close()


def test_a_server_starts_on_an_old_database_and_tracks_requests(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    write_old_db(root / STORE_FILE, len(ADDED))  # the schema of the release just before versions
    with start_local(models=[MODEL], root=root) as srv:
        rc = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY)
        old = rc.get_training_run(RUN).result()
        assert old.base_model == MODEL and old.user_metadata == {"renderer_name": "r"} and old.lora_rank == 4
        sc = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
        tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
        first = rc.get_training_run(tc.model_id).result().last_request_time
        tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result()
        assert rc.get_training_run(tc.model_id).result().last_request_time > first
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        sc.close("success")
    assert user_version(root / STORE_FILE) == SCHEMA_VERSION
