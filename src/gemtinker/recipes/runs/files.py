"""The files of a run's log directory and how they are written and read: one JSON object per line,
appended as the run goes, so a killed run leaves every complete line intact.

Below both `logger` (which writes them) and `plotting` (which reads them).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
CONFIG_FILE = "config.json"
EVAL_FILE = "eval.jsonl"
BEST_CHECK_FILE = "best_check.json"  # keep_best runs: the policy the run chose (BestCheck below)


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(jsonable(record)) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill; everything before it is intact
    return out


def truncate_steps(path: Path, first_dropped_step: int) -> None:
    """Drop records of steps >= first_dropped_step (they are redone after a resume)."""
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if int(r.get("step", -1)) < first_dropped_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def iter_numeric(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


@dataclass(frozen=True)
class BestCheck:
    """A keep_best run's chosen policy (recipes/rebn/best.py), kept in BEST_CHECK_FILE."""

    step: int  # updates behind the policy
    success_rate: float  # on the validation episodes
    sampler_path: str  # tinker:// path of its sampler weights


def load_best(log_dir: Path) -> BestCheck | None:
    """The run's best check so far (None if it keeps none): read on resume and by `gemtinker eval`."""
    path = log_dir / BEST_CHECK_FILE
    if not path.is_file():
        return None
    return BestCheck(**json.loads(path.read_text()))


def save_best(log_dir: Path, best: BestCheck) -> None:
    tmp = log_dir / (BEST_CHECK_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(best)) + "\n")
    os.replace(tmp, log_dir / BEST_CHECK_FILE)
