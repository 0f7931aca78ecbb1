"""The learning-curve PNG draws both trainers' metric names."""

import json
from pathlib import Path

from gemtinker.recipes.runs import plotting


def _write_metrics(log_dir: Path, rows: list[dict]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cookbook_metric_names_are_plotted(tmp_path: Path) -> None:
    rows = [{"step": i, "env/all/reward/total": 0.1 * i, "env/all/success": i / 4} for i in range(4)]
    rows[-1]["test/env/all/success"] = 0.9
    _write_metrics(tmp_path, rows)
    xs, ys = plotting._first_logged(rows, plotting.PANELS[1][1])
    assert xs == [0, 1, 2, 3] and ys == [0.0, 0.25, 0.5, 0.75]
    assert plotting._first_logged(rows, plotting.PANELS[1][2]) == ([3], [0.9])
    out = plotting.plot_log_dir(tmp_path)
    assert out.is_file() and out.stat().st_size > 1000


def test_low_level_names_take_precedence(tmp_path: Path) -> None:
    rows = [{"step": 0, "sampler/success_rate": 0.5, "env/all/success": 0.1}]
    assert plotting._first_logged(rows, plotting.PANELS[1][1]) == ([0], [0.5])


def test_validation_checks_are_their_own_series(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.axes

    _write_metrics(tmp_path, [{"step": i, "sampler/success_rate": 0.1 * i} for i in range(4)])
    evals = [{"step": 0, "eval/success_rate": 0.15}, {"step": 2, "eval/success_rate": 0.4, "eval/validation": 1.0},
             {"step": 4, "eval/success_rate": 0.3, "eval/validation": 1.0}, {"step": 4, "eval/success_rate": 0.38}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    drawn: dict[str, tuple[list, list]] = {}
    original = matplotlib.axes.Axes.plot

    def spy(self, xs, ys, *args, **kwargs):
        drawn[kwargs.get("label", "")] = (list(xs), list(ys))
        return original(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plotting.plot_log_dir(tmp_path)
    assert drawn["held-out eval"] == ([0, 4], [0.15, 0.38])  # the success panel is drawn last
    assert drawn["validation checks"] == ([2, 4], [0.4, 0.3])
