"""The learning-curve PNG of a run: episode return and success rate against the step.

`gemtinker plot LOG_DIR [OUT.png]` (gemtinker.cli.plot) redraws it from metrics.jsonl (and
eval.jsonl when held-out evaluations were run during training).
"""

from __future__ import annotations

import os
from pathlib import Path

from gemtinker.recipes.runs.files import EVAL_FILE, METRICS_FILE, iter_numeric, read_jsonl

PLOT_FILE = "learning_curve.png"

# (title, training-batch keys, held-out keys): the first key a run logged is drawn. The first
# names are the low-level trainer's; the others are what tinker-cookbook's RL loop logs.
PANELS = (
    ("episode return", ("sampler/episode_return", "env/all/reward/total"),
     ("eval/return_mean", "test/env/all/reward/total")),
    ("success rate", ("sampler/success_rate", "env/all/success"),
     ("eval/success_rate", "test/env/all/success")),
)


def _first_logged(records: list[dict], keys: tuple[str, ...]) -> tuple[list, list]:
    for key in keys:
        xs, ys = iter_numeric(records, key)
        if xs:
            return xs, ys
    return [], []


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_log_dir(log_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_dir = Path(log_dir)
    records = read_jsonl(log_dir / METRICS_FILE)
    if not records:
        raise FileNotFoundError(f"no metrics in {log_dir / METRICS_FILE}")
    evals = read_jsonl(log_dir / EVAL_FILE)
    out_path = Path(out) if out else log_dir / PLOT_FILE

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    window = max(1, len(records) // 10)
    for ax, (title, train_keys, eval_keys) in zip(axes, PANELS):
        xs, ys = _first_logged(records, train_keys)
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="training batch")
        if window > 1:
            ax.plot(xs, _smooth(ys, window), color="tab:blue", lw=2, label=f"moving mean ({window})")
        # The low-level trainer writes held-out evals to their own file; the cookbook puts its
        # test/ metrics into metrics.jsonl.
        # keep_best runs also log validation checks there (eval/validation = 1): their own series.
        heldout = [r for r in evals if not r.get("eval/validation")]
        validation = [r for r in evals if r.get("eval/validation")]
        ex, ey = _first_logged(heldout, eval_keys) if evals else _first_logged(records, eval_keys)
        if ex:
            ax.plot(ex, ey, "o-", color="tab:orange", lw=2, label="held-out eval")
        vx, vy = _first_logged(validation, eval_keys)
        if vx:
            ax.plot(vx, vy, "s--", color="tab:green", lw=1, label="validation checks")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title == "success rate":
            ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(str(log_dir.name), fontsize=10)
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)  # a viewer never sees a half-written file
    return out_path
