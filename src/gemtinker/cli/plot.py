"""`gemtinker plot LOG_DIR [OUT.png]`: redraw a run's learning-curve PNG."""

from __future__ import annotations

import sys

from gemtinker.recipes.runs.plotting import plot_log_dir


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: gemtinker plot LOG_DIR [OUT.png]\n\nRedraws LOG_DIR/learning_curve.png from metrics.jsonl.")
        return 0 if argv else 2
    try:
        path = plot_log_dir(argv[0], argv[1] if len(argv) > 1 else None)
    except FileNotFoundError as e:
        print(f"gemtinker plot: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
