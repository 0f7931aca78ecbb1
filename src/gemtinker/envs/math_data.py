"""Datasets for GEM's `math:*` envs, usable with no network.

GEM's math envs call `datasets.load_dataset("axon-rl/...")`, which needs the Hugging Face hub.
Here a math env's questions come from, in this order (`math_dataset=auto`):
  1. a local file named after the env under $GEMTINKER_MATH_DIR (`Math12K.jsonl`, `.parquet`, ...);
  2. the hub dataset GEM names, when huggingface.co answers within a second or two;
  3. a small generated arithmetic set (deterministic), with a warning saying how to supply
     the real data.
`math_dataset=PATH` forces a local file (jsonl, json or parquet with question/answer columns),
`math_dataset=hub` forces the hub (a clear error when offline), `math_dataset=generated` forces
the arithmetic set.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUESTION_COLUMNS = ("question", "problem", "prompt")
ANSWER_COLUMNS = ("answer", "final_answer", "solution")
DATA_DIR_ENV = "GEMTINKER_MATH_DIR"
GENERATED_SIZE = 2000


class MathDatasetError(RuntimeError):
    """A math env's dataset could not be found or read; the message says how to provide one."""


@dataclass(frozen=True)
class MathRows:
    rows: list[dict[str, str]]  # each {"problem": ..., "answer": ...}: the keys GEM's MathEnv reads
    source: str  # human-readable origin, logged in config.json


def generate_arithmetic(n: int = GENERATED_SIZE, seed: int = 1234) -> list[dict[str, str]]:
    """Small integer arithmetic word-free problems, answer as an integer string.

    Easy enough that a 135M chat model gets some right from the start (so RL has signal) and
    hard enough that it does not get them all right.
    """
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for _ in range(n):
        kind = rng.choice(("+", "+", "-", "*"))
        if kind == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            value = a * b
        elif kind == "-":
            a, b = rng.randint(5, 99), rng.randint(1, 60)
            a, b = max(a, b), min(a, b)
            value = a - b
        else:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            value = a + b
        symbol = "\\times" if kind == "*" else kind
        rows.append({"problem": f"Compute ${a} {symbol} {b}$.", "answer": str(value)})
    return rows


def _pick_column(columns: list[str], candidates: tuple[str, ...], what: str, origin: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise MathDatasetError(
        f"{origin}: no {what} column; expected one of {list(candidates)}, found {columns}"
    )


def _normalise(records: list[dict[str, Any]], origin: str) -> list[dict[str, str]]:
    if not records:
        raise MathDatasetError(f"{origin}: the dataset is empty")
    columns = list(records[0].keys())
    q = _pick_column(columns, QUESTION_COLUMNS, "question", origin)
    a = _pick_column(columns, ANSWER_COLUMNS, "answer", origin)
    return [{"problem": str(r[q]), "answer": r[a] if isinstance(r[a], list) else str(r[a])} for r in records]


def read_question_answer_file(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read a jsonl/json/parquet file of question/answer records."""
    p = Path(path)
    if not p.is_file():
        raise MathDatasetError(
            f"math dataset file {str(p)!r} does not exist. Give a .jsonl/.json/.parquet file with "
            f"a question column ({'/'.join(QUESTION_COLUMNS)}) and an answer column "
            f"({'/'.join(ANSWER_COLUMNS)})."
        )
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            records = pq.read_table(p).to_pylist()
        elif suffix == ".jsonl":
            with p.open() as f:
                records = [json.loads(line) for line in f if line.strip()]
        elif suffix == ".json":
            data = json.loads(p.read_text())
            records = data if isinstance(data, list) else data.get("data", [])
        else:
            raise MathDatasetError(f"{p}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    except (OSError, ValueError) as e:
        raise MathDatasetError(f"{p}: cannot read it: {e}") from e
    return _normalise(records, str(p))


def _hub_reachable(timeout_s: float = 1.5) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _load_hub(dataset_name: str, split: str | None) -> list[dict[str, str]]:
    from datasets import DatasetDict, load_dataset

    ds = load_dataset(dataset_name)
    if isinstance(ds, DatasetDict):
        ds = ds[split] if split else ds[list(ds.keys())[0]]
    return _normalise(ds.to_list(), dataset_name)


def _local_candidates(short_name: str) -> list[Path]:
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        return []
    return [Path(root) / f"{short_name}{ext}" for ext in (".jsonl", ".parquet", ".json")]


def resolve_math_rows(env_id: str, hub_name: str | None, source: str = "auto", split: str | None = None) -> MathRows:
    """Find the questions for math env `env_id` (see the module docstring for the order)."""
    short = env_id.split(":", 1)[-1]
    how_to = (
        f"Provide the data as a local file: math_dataset=/path/{short}.jsonl (or .parquet) with "
        f"question/answer columns, or put it at ${DATA_DIR_ENV}/{short}.jsonl; "
        "math_dataset=generated uses the bundled arithmetic set."
    )
    if source == "generated":
        return MathRows(generate_arithmetic(), "generated arithmetic")
    if source not in ("auto", "hub"):
        return MathRows(read_question_answer_file(source), source)
    if source == "auto":
        for candidate in _local_candidates(short):
            if candidate.is_file():
                return MathRows(read_question_answer_file(candidate), str(candidate))
    if hub_name and _hub_reachable():
        try:
            return MathRows(_load_hub(hub_name, split), f"hub:{hub_name}")
        except Exception as e:  # noqa: BLE001 - any hub failure falls back or is explained below
            if source == "hub":
                raise MathDatasetError(f"could not load {hub_name!r} from the hub: {e}. {how_to}") from e
    elif source == "hub":
        raise MathDatasetError(f"{env_id} needs the hub dataset {hub_name!r}, and the hub is unreachable. {how_to}")
    print(
        f"[gemtinker] {env_id}: dataset {hub_name!r} is not available offline; using the generated "
        f"arithmetic set ({GENERATED_SIZE} problems). {how_to}",
        file=sys.stderr,
    )
    return MathRows(generate_arithmetic(), "generated arithmetic (fallback)")
