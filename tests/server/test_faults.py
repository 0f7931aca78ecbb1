"""Crash safety (issue 7): SIGKILL a real server mid-save and a real trainer at random points.

Both run as subprocesses of the installed CLI on the tiny model, over 127.0.0.1:
(a) `gemtinker serve` killed while a save_state is half written restarts with the previous
    checkpoint intact, listed and loadable (same weights), and the half-written one neither
    listed nor loadable, nor left on disk;
(b) `python -m gemtinker.train ... save_every=1` killed at seeded random moments and resumed with
    resume=true ends with a metrics history holding every step exactly once, and each resume
    lost at most the steps since the last checkpoint.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tinker

from support.killable import Server, child_env
from support.server import API_KEY, MODEL, SEQ_A, datum_ce, forward_logprobs, free_port
from support.waiting import wait_until

from gemtinker.engine.checkpoint import FAULT_DELAY_ENV

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

SAVE_DELAY_S = 2.0


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
def test_server_killed_mid_save_state_keeps_previous_checkpoint(tmp_path):
    root, port = tmp_path / "srv", free_port()
    # Every checkpoint write pauses (files written, not yet moved into place) so the kill lands there.
    srv = Server(root, port, **{FAULT_DELAY_ENV: str(SAVE_DELAY_S)})
    try:
        sc = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY)
        tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
        tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result()
        tc.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
        good = tc.save_state("good").result().path
        lp_good = forward_logprobs(tc, SEQ_A)
        tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result()
        tc.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
        assert not np.allclose(forward_logprobs(tc, SEQ_A), lp_good)  # the weights moved on

        run_dir = root / "checkpoints" / tc.model_id
        pending = [p for p in run_dir.rglob(".*tmp-*")]
        assert not pending
        # Kill while overwriting "good" (new weights half-way to replacing it) and while writing "half".
        tc.save_state("good", overwrite=True)
        tc.save_state("half")
        wait_until(lambda: any(run_dir.rglob(".good.tmp-*")), "the overwrite of 'good' to be half written", timeout_s=30)
        srv.kill()
        assert any(run_dir.rglob(".good.tmp-*"))  # the kill really hit mid-save
    finally:
        srv.kill()

    srv = Server(root, port)
    try:
        assert not list(run_dir.rglob(".*tmp-*")) and not list(run_dir.rglob(".*old-*"))  # cleaned at start
        rest = tinker.RestClient(base_url=srv.url, api_key=API_KEY)
        listed = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
        assert listed == [good]
        sc = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY)
        with pytest.raises(tinker.RequestFailedError, match="not found on this server"):
            sc.create_training_client_from_state(good.replace("/good", "/half")).result()
        restored = sc.create_training_client_from_state_with_optimizer(good).result()
        np.testing.assert_allclose(forward_logprobs(restored, SEQ_A), lp_good, atol=1e-6)
        # Training goes on from it, and the server saves again.
        restored.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result()
        assert restored.save_state("after").result().path.endswith("/weights/after")
    finally:
        srv.kill()


# --------------------------------------------------------------------------- trainer kills
MAX_STEPS, KILLS, SEED = 14, 5, 1234


def _steps(log_dir: Path, name: str) -> list[int]:
    out = []
    path = log_dir / name
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                pass  # a line the kill cut short
    return out


@pytest.mark.slow  # a whole run (or subprocesses) for several seconds: `make test` only
def test_trainer_killed_at_random_points_resumes_without_gaps(tmp_path):
    rng = random.Random(SEED)
    root, port = tmp_path / "srv", free_port()
    log_dir = tmp_path / "run"
    srv = Server(root, port)
    cmd = [sys.executable, "-m", "gemtinker.train", f"model_name={MODEL}", "num_env=2", "batch_size=4", "max_tokens=8",
           f"max_steps={MAX_STEPS}", "save_every=1", f"log_dir={log_dir}", "lora_rank=4", "plot=false",
           "progress=false", "print_rollouts=0", "learning_rate=1e-2",
           # The random tiny model earns the same reward every episode, so ReBN would zero every
           # advantage and skip every update; raw returns keep forward_backward/optim_step in the loop.
           "use_rebn=false"]
    env = child_env(TINKER_BASE_URL=srv.url, COLUMNS="400")
    history = []
    try:
        for attempt in range(KILLS + 1):
            ckpt_steps = _steps(log_dir, "checkpoints.jsonl")
            start = ckpt_steps[-1] if ckpt_steps else 0
            args = cmd + ["resume=true"] if attempt else cmd
            with open(tmp_path / f"train-{attempt}.log", "w") as out:
                proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
                if attempt < KILLS:
                    # A random moment: once the run has logged 0..2 more steps, plus 0..0.8 s, so it
                    # lands in sampling, training, saving or logging.
                    # (Steps are counted once the trainer is up: until it truncates the metrics on resume,
                    # the file still holds the steps the previous attempt lost.)
                    target = min(start + rng.randint(0, 2), MAX_STEPS - 3)  # leave room to die in
                    log_path = tmp_path / f"train-{attempt}.log"
                    wait_until(lambda: proc.poll() is not None or "gemtinker rebn" in log_path.read_text(),
                               f"attempt {attempt} to start", timeout_s=120)
                    wait_until(lambda: proc.poll() is not None or any(s >= target for s in _steps(log_dir, "metrics.jsonl")),
                               f"step {target} of attempt {attempt}", timeout_s=120)
                    time.sleep(rng.uniform(0.0, 0.8))
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                rc = proc.wait(timeout=180)
            log = (tmp_path / f"train-{attempt}.log").read_text()
            logged, saved = _steps(log_dir, "metrics.jsonl"), _steps(log_dir, "checkpoints.jsonl")
            history.append({"attempt": attempt, "rc": rc, "resumed_at": start, "last_logged": max(logged, default=-1),
                            "last_checkpoint": max(saved, default=0)})
            if attempt:
                assert f"at step {start} from" in " ".join(log.split()) or start == 0, log[-3000:]
            if rc == 0:
                break
            assert rc == -signal.SIGKILL, f"attempt {attempt} failed on its own (rc {rc}):\n{log[-3000:]}"
            # What a kill may lose: the steps after the last checkpoint (save_every=1: at most one).
            assert max(logged, default=-1) + 1 - max(saved, default=0) <= 1, history
        else:
            pytest.fail(f"the run did not finish after {KILLS} kills: {history}")
        assert sum(h["rc"] == -signal.SIGKILL for h in history) == KILLS, history
        steps = _steps(log_dir, "metrics.jsonl")
        assert steps == list(range(MAX_STEPS)), (steps, history)  # every step once, in order: no gap
        assert _steps(log_dir, "checkpoints.jsonl")[-1] == MAX_STEPS
    finally:
        srv.kill()
    print("trainer kill history:", history)
