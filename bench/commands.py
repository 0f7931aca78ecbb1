"""The README's five training commands, each run for 2 steps offline on this machine.

Each command runs as a user would start it (a fresh `python -m ...` process with its own embedded
server and the bundled SmolLM2-135M), with `max_steps=2` (the cookbook: `n_batches=2`) and, where
its full size would take an hour on a 2-core CPU, smaller batches that are printed beside it. The
table gives the seconds of the second step (the first also pays one-off warm-up) and the whole
process's wall time and peak RSS.

    python bench/commands.py [--only sudoku,cookbook] [--record docs/commands.json]

The command fails (exit 1) when any of them fails or writes fewer than 2 steps of metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    args: tuple[str, ...]  # as the README writes it
    fit: tuple[str, ...]  # what shrinks it to minutes on a 2-core CPU
    steps_key: str = "max_steps"


# Keep in step with the README's "Training on GEM" list.
COMMANDS = (
    Command("guess-the-number", "gemtinker.train",
            ("env_id=game:GuessTheNumber-v0-easy", "stop=}", "reward=success", "entropy_bonus=0.05"), ()),
    Command("sudoku", "gemtinker.train",
            ("env_id=game:Sudoku-v0-easy", "num_env=64", "max_tokens=1024", "template=qwen3_game", "env_wrappers=concat"),
            ("num_env=8", "max_tokens=128")),
    Command("math-python-tool", "gemtinker.train",
            ("env_id=math:Math12K", "template=no", "env_wrappers=python_tool_no_int_reward_last_line_error,concat_chat",
             "gamma=1"),
            ("num_env=8", "max_tokens=128")),
    Command("reasoning-gym", "gemtinker.train", ("env_id=rg:simple_equations", "template=qwen3_general"),
            ("num_env=8", "max_tokens=128")),
    Command("cookbook", "gemtinker.cookbook_train",
            ("env_id=rg:simple_equations", "group_size=8", "groups_per_batch=64"),
            ("groups_per_batch=4", "max_tokens=128"), steps_key="n_batches"),
)


def metrics_rows(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_seconds(row: dict) -> float | None:
    for key in ("time/step", "time/total"):  # gemtinker.train, tinker-cookbook
        if key in row:
            return float(row[key])
    return None


def run(cmd: Command, workdir: Path) -> dict:
    log_dir = workdir / cmd.name
    log_key = "log_path" if cmd.module == "gemtinker.cookbook_train" else "log_dir"
    argv = [sys.executable, "-m", cmd.module, *cmd.args, *cmd.fit, f"{cmd.steps_key}=2", f"{log_key}={log_dir}"]
    if cmd.module == "gemtinker.train":
        argv += ["progress=false", "print_rollouts=0", "eval_every=0"]
    print(f"[{cmd.name}] {' '.join(argv[2:])}", flush=True)
    t0 = time.perf_counter()
    output = workdir / f"{cmd.name}.out"
    with output.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    rows = metrics_rows(log_dir)
    result = {
        "name": cmd.name, "command": f"python -m {cmd.module} {' '.join(cmd.args)}", "fit": list(cmd.fit),
        "returncode": returncode, "steps": len(rows), "wall_s": round(wall, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2),
        "step_s": [round(s, 1) for s in map(step_seconds, rows) if s is not None],
    }
    if returncode != 0 or len(rows) < 2:
        result["error_tail"] = output.read_text()[-2000:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated names: " + ",".join(c.name for c in COMMANDS))
    parser.add_argument("--record", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    wanted = {n for n in args.only.split(",") if n}
    unknown = wanted - {c.name for c in COMMANDS}
    if unknown:
        parser.error(f"unknown command names: {', '.join(sorted(unknown))}")
    results = []
    with tempfile.TemporaryDirectory(prefix="gemtinker-commands-") as tmp:
        for cmd in COMMANDS:
            if wanted and cmd.name not in wanted:
                continue
            results.append(run(cmd, Path(tmp)))
            r = results[-1]
            print(f"[{cmd.name}] rc={r['returncode']} steps={r['steps']} step seconds {r['step_s']} "
                  f"wall {r['wall_s']} s", flush=True)
            if "error_tail" in r:
                print(r["error_tail"], file=sys.stderr)
    print("\n| command | CPU-fit overrides | s/step (step 2) | wall (2 steps, incl. start-up) | peak RSS |")
    print("|---|---|---|---|---|")
    for r in results:
        step2 = r["step_s"][1] if len(r["step_s"]) > 1 else None
        print(f"| `{r['command']}` | `{' '.join(r['fit']) or '-'}` | {step2 if step2 is not None else 'FAILED'} "
              f"| {r['wall_s']} s | {r['peak_rss_gb']} GB |")
    if args.record:
        Path(args.record).write_text(json.dumps(results, indent=1) + "\n")
    ok = all(r["returncode"] == 0 and r["steps"] >= 2 for r in results)
    print(f"commands: {sum(r['returncode'] == 0 and r['steps'] >= 2 for r in results)}/{len(results)} ran 2 steps")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
