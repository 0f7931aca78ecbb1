"""What a training run leaves behind in its log directory, and what it prints.

  config.json        the full configuration (plus the resolved dataset source etc.)
  metrics.jsonl      one JSON object per step (also sent to W&B when configured)
  rollouts.jsonl     a few episodes per step, text and rewards, for reading
  checkpoints.jsonl  one record per saved checkpoint (tinker:// paths), the resume point
  learning_curve.png return and success rate over steps, redrawn as the run goes
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from gemtinker.recipes.episodes import Episode
from gemtinker.recipes.runs.files import (
    CHECKPOINTS_FILE, CONFIG_FILE, EVAL_FILE, METRICS_FILE, ROLLOUTS_FILE, append_jsonl, jsonable, read_jsonl,
    truncate_steps,
)
from gemtinker.recipes.runs.plotting import plot_log_dir


def last_checkpoint(log_dir: Path) -> dict[str, Any] | None:
    records = [r for r in read_jsonl(log_dir / CHECKPOINTS_FILE) if r.get("state_path")]
    return records[-1] if records else None


def last_sampler_checkpoint(log_dir: Path) -> dict[str, Any] | None:
    records = [r for r in read_jsonl(log_dir / CHECKPOINTS_FILE) if r.get("sampler_path")]
    return records[-1] if records else None


def episode_record(step: int, episode: Episode, max_chars: int = 1500) -> dict[str, Any]:
    def tail(text: str) -> str:
        return text if len(text) <= max_chars else "..." + text[-max_chars:]

    return {
        "step": step,
        "env_index": episode.env_index,
        "seed": episode.seed,
        "return": episode.total_return,
        "success": episode.success,
        "turns": [
            {
                "prompt_tail": tail(t.prompt_text),
                "action": t.action_text,
                "reward": t.reward,
                "return": t.ret,
                "advantage": t.advantage,
                "action_tokens": len(t.act_tokens),
                "stop_reason": t.stop_reason,
            }
            for t in episode.transitions
        ],
    }


class RunLogger:
    """Files under log_dir, optional W&B, and the console view of each step."""

    def __init__(
        self,
        log_dir: Path,
        config: dict[str, Any],
        wandb_project: str | None = None,
        wandb_name: str | None = None,
        resume: bool = False,
        plot: bool = True,
    ) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / CONFIG_FILE).write_text(json.dumps(jsonable(config), indent=2) + "\n")
        self.plot = plot
        self._wandb: Any = None
        if wandb_project:
            self._wandb = _init_wandb(wandb_project, wandb_name, config, log_dir, resume)

    def truncate_after_resume(self, start_step: int) -> None:
        for name in (METRICS_FILE, ROLLOUTS_FILE, EVAL_FILE):
            truncate_steps(self.log_dir / name, start_step)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **metrics}
        append_jsonl(self.log_dir / METRICS_FILE, record)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.plot:
            try:
                plot_log_dir(self.log_dir)
            except Exception as e:  # noqa: BLE001 - a plotting hiccup must not stop training
                print(f"[gemtinker] could not redraw the learning curve: {e}", file=sys.stderr)

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        append_jsonl(self.log_dir / EVAL_FILE, {"step": step, **metrics})
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_rollouts(self, step: int, episodes: Sequence[Episode], limit: int) -> None:
        for episode in list(episodes)[: max(0, limit)]:
            append_jsonl(self.log_dir / ROLLOUTS_FILE, episode_record(step, episode))

    def log_checkpoint(self, record: dict[str, Any]) -> None:
        append_jsonl(self.log_dir / CHECKPOINTS_FILE, {"time": time.time(), **record})

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _init_wandb(project: str, name: str | None, config: dict[str, Any], log_dir: Path, resume: bool) -> Any:
    import wandb

    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        # No account on this machine: log locally; `wandb sync` can upload later.
        os.environ["WANDB_MODE"] = "offline"
    run_id_file = log_dir / "wandb_run_id"
    run_id = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
    run = wandb.init(
        project=project, name=name, config=jsonable(config), dir=str(log_dir),
        id=run_id, resume="allow" if run_id else None,
    )
    run_id_file.write_text(run.id)
    return run


def print_rollout(console: Any, step: int, episode: Episode, max_chars: int = 300) -> None:
    """A short colourised view of one episode: prompt tail, action, reward per turn."""
    from rich.text import Text

    def clip(text: str, head: bool = False) -> str:
        text = text.strip()
        if len(text) <= max_chars:
            return text
        return text[:max_chars] + " ..." if head else "... " + text[-max_chars:]

    header = Text(f"step {step} · env {episode.env_index} · seed {episode.seed} · return {episode.total_return:+.3f}"
                  f" · {'success' if episode.success else 'no success'}", style="bold")
    console.print(header)
    for i, t in enumerate(episode.transitions[:4]):
        console.print(Text(f"  turn {i + 1} prompt: ", style="dim") + Text(clip(t.prompt_text), style="blue"))
        console.print(Text("  action: ", style="dim") + Text(clip(t.action_text, head=True), style="bold red"))
        console.print(Text(f"  reward {t.reward:+.3f}  advantage {t.advantage:+.3f}", style="magenta"))
    if episode.num_turns > 4:
        console.print(Text(f"  ... {episode.num_turns - 4} more turns", style="dim"))


def summary_line(step: int, metrics: dict[str, Any]) -> str:
    def g(key: str, fmt: str = "{:.3f}") -> str:
        v = metrics.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    return (
        f"step {step}: return {g('sampler/episode_return')} success {g('sampler/success_rate')} "
        f"turns {g('sampler/num_turns_per_episode', '{:.2f}')} tokens {g('sampler/action_num_tokens', '{:.1f}')} "
        f"entropy {g('sampler/token_entropy')} kl_v1 {g('train/kl_sample_train_v1', '{:.2e}')} "
        f"errors {g('env/errors', '{:.0f}')} | sample {g('time/sample', '{:.1f}')}s train {g('time/train', '{:.1f}')}s "
        f"peak RSS {g('memory/peak_rss_gb', '{:.2f}')} GB"
    )


def memory_metrics() -> dict[str, float]:
    """This process's resident memory now and its peak so far, in GB (1e9 bytes). With the
    embedded server the engine runs in this process, so this is the whole run's footprint."""
    out: dict[str, float] = {}
    try:
        import resource

        out["memory/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    except (ImportError, OSError):  # not on this platform
        pass
    try:
        with open("/proc/self/statm") as f:
            out["memory/rss_gb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return out
