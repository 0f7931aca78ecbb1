"""`python -m gemtinker serve` as a child process that a test may SIGKILL (the crash tests of
test_faults and test_server_sample_restart; holds no tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from support.server import API_KEY, MODEL


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "TINKER_TELEMETRY": "0", "TINKER_API_KEY": API_KEY, **extra}
    env.pop("TINKER_BASE_URL", None)
    return env


class Server:
    """`python -m gemtinker serve` in a subprocess; `kill()` is a SIGKILL, no cleanup at all."""

    def __init__(self, root: Path, port: int, **env: str):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(root.parent / f"serve-{port}-{time.time_ns()}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gemtinker", "serve", "--model", MODEL, "--root", str(root), "--port", str(port),
             "--log-level", "warning"],
            env=child_env(**env), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(self.url + "/api/v1/healthz", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.kill()
                    raise RuntimeError(f"server did not start; log: {Path(self.log.name).read_text()[-2000:]}")
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()
