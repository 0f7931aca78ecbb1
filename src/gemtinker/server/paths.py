"""`tinker://<training_run_id>/<weights|sampler_weights|external_weights>/<name>` paths <->
checkpoint dirs (external_weights: adapters exported by `save_weights_external`, see external.py).

Every component is checked against a strict character set and the resolved directory must lie
inside the checkpoint root, so a path like `tinker://../../etc` cannot reach other files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import UserError

CheckpointKind = Literal["training", "sampler", "external"]
KIND_BY_SEGMENT: dict[str, CheckpointKind] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
SEGMENT_BY_KIND = {v: k for k, v in KIND_BY_SEGMENT.items()}

# Model ids look like "<session>:train:<n>"; names are user-chosen ("000010", "state-1").
# fullmatch, not `$`: `$` also matches before a final newline, so "x\n" would pass.
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:=+-]{0,199}")


def check_component(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SAFE.fullmatch(value) or ".." in value:
        raise UserError(
            f"invalid {what} {value!r}: use letters, digits and . _ - : = + "
            "(no '/', no '..', at most 200 characters)"
        )
    return value


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: CheckpointKind
    name: str

    @property
    def segment(self) -> str:
        return SEGMENT_BY_KIND[self.kind]

    @property
    def checkpoint_id(self) -> str:
        return f"{self.segment}/{self.name}"

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.segment}/{self.name}"


def parse_tinker_path(path: str) -> TinkerPath:
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise UserError(f"invalid checkpoint path {path!r}: expected tinker://<run_id>/weights/<name>")
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3 or parts[1] not in KIND_BY_SEGMENT:
        raise UserError(
            f"invalid checkpoint path {path!r}: expected "
            "tinker://<run_id>/weights/<name>, tinker://<run_id>/sampler_weights/<name> or "
            "tinker://<run_id>/external_weights/<name>"
        )
    run_id = check_component(parts[0], f"training run id in {path!r}")
    name = check_component(parts[2], f"checkpoint name in {path!r}")
    return TinkerPath(run_id, KIND_BY_SEGMENT[parts[1]], name)


def checkpoint_dir(root: Path, tp: TinkerPath) -> Path:
    """Directory of a checkpoint; refuses anything that resolves outside `root`."""
    base = root.resolve()
    target = (base / tp.run_id / tp.segment / tp.name).resolve()
    if base not in target.parents:
        raise UserError(f"checkpoint path {str(tp)!r} escapes the checkpoint directory")
    return target
