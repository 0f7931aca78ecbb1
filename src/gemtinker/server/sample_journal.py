"""An append-only record of the sampling completion queues (sample_sessions.py), so a restarted
server can still tell a client polling `retrieve_futures` how its samples ended: those that
finished before the restart as they did, and those the restart cut short as failed. Without
it such a client's futures would wait forever (its poller only learns of ids the queue lists).

One JSON object a line: {"w": request_id, "s": session, "c": clone} when a sample is watched,
{"d": request_id, "s": session, "c": clone, "k": cursor, "x": completion} when it is listed on
its queue, {"a": cursor, "s": session, "c": clone} when its client acknowledged the queue up to
`cursor` (those completions are then not restored). Written without fsync: a killed process loses nothing the OS already has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TextIO

Key = tuple[str, int]


class SampleJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self._file: TextIO | None = None

    def load(self) -> tuple[dict[str, Key], list[tuple[Key, int, dict]]]:
        """What the previous run left: requests still running (id -> queue), and completions
        listed but maybe not yet seen by their client, as (queue, cursor, completion)."""
        running: dict[str, Key] = {}
        done: dict[str, tuple[Key, int, dict]] = {}
        acked: dict[Key, int] = {}
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return running, []
        for line in text.splitlines():
            try:
                e = json.loads(line)
                key = (str(e["s"]), int(e["c"]))
                if "w" in e:
                    running[str(e["w"])] = key
                elif "a" in e:
                    acked[key] = max(acked.get(key, 0), int(e["a"]))
                else:
                    rid = str(e["d"])
                    running.pop(rid, None)
                    done[rid] = (key, int(e["k"]), dict(e["x"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line a kill cut short
        kept = [d for d in done.values() if d[1] > acked.get(d[0], 0)]
        return running, sorted(kept, key=lambda d: d[1])

    def rewrite(self, running: dict[str, Key], done: list[tuple[Key, int, dict]]) -> None:
        """Replace the file by just this state (at start, and when appends outgrow it)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for rid, (sid, clone) in running.items():
                f.write(json.dumps({"w": rid, "s": sid, "c": clone}) + "\n")
            for (sid, clone), cursor, completion in done:
                f.write(json.dumps({"d": completion["request_id"], "s": sid, "c": clone, "k": cursor,
                                    "x": completion}) + "\n")
        os.replace(tmp, self.path)
        if self._file is not None:
            self._file.close()
        self._file = open(self.path, "a", encoding="utf-8")
        self.lines = len(running) + len(done)

    def _append(self, entry: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        try:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()
            self.lines += 1
        except (OSError, ValueError):
            pass  # a full disk costs only the restart report, never the sample itself

    def watched(self, request_id: str, key: Key) -> None:
        self._append({"w": request_id, "s": key[0], "c": key[1]})

    def listed(self, key: Key, cursor: int, completion: dict) -> None:
        self._append({"d": completion["request_id"], "s": key[0], "c": key[1], "k": cursor, "x": completion})

    def acked(self, key: Key, cursor: int) -> None:
        self._append({"a": cursor, "s": key[0], "c": key[1]})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
