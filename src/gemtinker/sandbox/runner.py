"""Run untrusted (model-written) Python in a contained, bounded, killable child process.

One concept in one file (over 400 lines): the parent side of a sandboxed call, from probing the
isolation to reading bounded output; the child side is `_bootstrap.py`.

`run_python(code)` never raises for anything the code does and never blocks longer than
`timeout_s` plus a small grace period; every way the code can misbehave ends as a
`SandboxResult` whose `error_text_for_agent` says what happened.

What is enforced, and how (see `_bootstrap.py` for the child side):

| limit                   | "root" mode (euid 0)          | "userns" (unprivileged)  | "rlimits" (no namespaces) |
|-------------------------|-------------------------------|--------------------------|---------------------------|
| wall clock              | parent killpg(SIGKILL)        | same                     | same                      |
| CPU / memory / file size| RLIMIT_CPU / RLIMIT_AS / FSIZE| same                     | same                      |
| processes (fork bomb)   | RLIMIT_NPROC on a fresh uid   | NPROC, per-userns count  | NPROC over the user's current count |
| stragglers              | pid namespace dies with pid 1 | same                     | seccomp denies setsid/setpgid, killpg |
| network                 | empty net namespace + seccomp | same                     | seccomp: only AF_UNIX sockets |
| disk writes             | all mounts read-only; workdir is a size-capped tmpfs | same | FSIZE only; uid can write where the trainer can |
| run's files             | tmpfs over forbid_paths, /root, /home, /tmp, /run, ...; fresh uid | tmpfs (caps dropped) | NOT enforced |
| host processes          | fresh /proc in own pid ns; other uid | same, /proc hidden if it cannot be mounted | NOT enforced (same uid) |
| output                  | parent reads incrementally, kills at `max_output_bytes` | same | same |
| environment             | scrubbed to a fixed allow-list | same                    | same                      |

`isolation="auto"` picks "root" when running as root, else "userns" when an unprivileged user
namespace can be created (probed once), else "rlimits" with a logged warning. Set
`GEMTINKER_SANDBOX_REQUIRE_ISOLATION=1` (or pass `require_isolation=True`) to refuse to run code
at all rather than fall back to "rlimits".
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal, Sequence

from gemtinker.sandbox._bootstrap import SETUP_ERROR_PREFIX, SETUP_EXIT_CODE

log = logging.getLogger(__name__)

Isolation = Literal["auto", "root", "userns", "rlimits"]

_BOOTSTRAP = str(Path(__file__).with_name("_bootstrap.py"))
# Home directories (keys, caches, shell history) are always hidden. Hiding them is also what
# makes an interpreter installed inside one (pyenv under a 0700 /root) reachable for the
# unprivileged sandbox uid: the Python prefix is bind-mounted back into a traversable tmpfs.
ALWAYS_HIDDEN_PATHS: tuple[str, ...] = ("/root", "/home")
# Hidden unless hide_default_paths=False: other processes' temporary files and runtime sockets.
DEFAULT_HIDDEN_PATHS: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm", "/run")
MAX_CODE_BYTES = 1_000_000
# After a kill, how long to keep reading what is already in the pipes.
_DRAIN_S = 1.0
# Large fixed offset so sandbox uids never collide with real accounts; one uid per call makes
# RLIMIT_NPROC count only that call's processes and keeps concurrent sandboxes apart.
_UID_BASE = 1_900_000_000
_uid_counter = itertools.count()
_mode_lock = threading.Lock()
_probed_mode: str | None = None
_default_forbid: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None when the process was killed by a signal
    timed_out: bool
    # None, or one of: "timeout", "cpu_limit", "memory_limit", "output_limit", "process_limit",
    # "file_size_limit", "filesystem", "network", "forbidden", "killed", "code_too_large",
    # "sandbox_error".
    violation: str | None
    error_text_for_agent: str  # what the agent sees: output + errors + the sandbox's explanation
    isolation: str  # the mode that actually ran the code
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.violation is None


def set_default_forbid_paths(paths: Sequence[str | os.PathLike[str]]) -> None:
    """Register paths (the run's log/checkpoint directory, the server's store) that every later
    `run_python` call hides, in addition to its own `forbid_paths`."""
    global _default_forbid
    _default_forbid = tuple(os.path.realpath(p) for p in paths)


def _env(workdir: str) -> dict[str, str]:
    # A fixed allow-list: nothing of the trainer's environment (API keys, tokens, proxy settings,
    # TINKER_*, HF_*) reaches the agent.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        # BLAS pools reserve address space per thread; one thread keeps numpy inside RLIMIT_AS.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMEXPR_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }


def _python_paths() -> list[str]:
    """Everything the worker interpreter must be able to read, even inside hidden directories."""
    paths = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    paths.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    return sorted(paths)


def _untraversable_ancestors(paths: Sequence[str], hidden: Sequence[str]) -> list[str]:
    """Directories on the way to `paths` that other users may not enter (no o+x), outside every
    hidden path. Root mode runs the code under a fresh uid, which could not reach the Python
    installation through them (a checkout in a private folder); hiding them re-exposes the
    installation inside through a traversable tmpfs, as for /root. The uid could not read them
    anyway, so hiding them takes nothing away."""

    def covered(d: str) -> bool:
        return any(d == h or d.startswith(h.rstrip("/") + "/") for h in hidden)

    found: set[str] = set()
    for path in paths:
        d = os.path.dirname(path)
        while d not in ("", "/"):
            try:
                if not covered(d) and not os.stat(d).st_mode & stat.S_IXOTH:
                    found.add(d)
            except OSError:
                pass
            d = os.path.dirname(d)
    return sorted(found)


def _probe_userns() -> bool:
    try:
        r = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "true"],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def resolve_isolation(requested: Isolation = "auto", require_isolation: bool | None = None) -> str:
    """The mode `run_python` will use. Raises RuntimeError if isolation is required but only the
    "rlimits" mode is possible."""
    global _probed_mode
    if require_isolation is None:
        require_isolation = os.environ.get("GEMTINKER_SANDBOX_REQUIRE_ISOLATION", "") == "1"
    mode = requested
    if mode == "auto":
        with _mode_lock:
            if _probed_mode is None:
                if os.geteuid() == 0:
                    _probed_mode = "root"
                elif _probe_userns():
                    _probed_mode = "userns"
                else:
                    _probed_mode = "rlimits"
                    log.warning(
                        "sandbox: neither root nor unprivileged user namespaces are available; "
                        "model-written code runs with rlimits + seccomp only (no filesystem or "
                        "process isolation)"
                    )
            mode = _probed_mode
    if mode == "rlimits" and require_isolation:
        raise RuntimeError(
            "sandbox isolation required (GEMTINKER_SANDBOX_REQUIRE_ISOLATION=1) but only the "
            "rlimits mode is available: run as root or enable unprivileged user namespaces"
        )
    return mode


def _count_user_tasks(uid: int) -> int:
    """Threads owned by `uid` right now: RLIMIT_NPROC counts them all (rlimits mode only)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _classify(rc: int | None, stderr: str, memory_mb: int, cpu_s: float, nproc: int) -> tuple[str | None, str | None]:  # fmt: skip
    """Violation name and explanation from how the process ended; None when it was an ordinary
    failure (an exception in the agent's own logic) or a success."""
    if rc is not None and rc < 0:
        sig = -rc
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            # We did not kill it (timeouts and output overflows are handled before this), so a
            # SIGKILL can only be the hard RLIMIT_CPU or the kernel's OOM killer.
            what = "CPU time limit" if sig == signal.SIGXCPU else "CPU time or memory limit"
            return "cpu_limit", f"Process killed: {what} exceeded ({cpu_s:g} s of CPU, {memory_mb} MB)."  # fmt: skip
        return "killed", f"Process killed by signal {signal.Signals(sig).name}."
    last = _last_line(stderr)
    if last.startswith("MemoryError") or "Cannot allocate memory" in last:
        return "memory_limit", f"Memory limit exceeded: the code may use at most {memory_mb} MB."
    if "[Errno 27]" in last or "File too large" in last:
        return "file_size_limit", "File size limit exceeded."
    if "[Errno 28]" in last:
        return "file_size_limit", "No space left in the working directory."
    if "[Errno 11]" in last and ("fork" in stderr or "Thread" in stderr or "spawn" in stderr):
        return "process_limit", f"Process limit exceeded: at most {nproc} processes/threads."
    if "[Errno 30]" in last:
        return "filesystem", "The file system is read-only: write files only in the current working directory."  # fmt: skip
    if "[Errno 101]" in last or "[Errno 97]" in last or (
        "[Errno 13]" in last and ("socket" in stderr or "connect" in stderr)
    ):
        return "network", "Network access is disabled in this sandbox."
    if "[Errno 13]" in last:
        return "filesystem", "Access denied: this path is not available in the sandbox."
    if "[Errno 1]" in last and "Operation not permitted" in last:
        return "forbidden", "Operation not permitted in the sandbox."
    return None, None


def _agent_text(stdout: str, stderr: str, note: str | None) -> str:
    parts = [stdout.rstrip("\n")] if stdout else []
    if stderr.strip():
        parts.append(stderr.strip("\n"))
    if note:
        # Last line on purpose: GEM's `keep_error_last_line` keeps only stderr's last line.
        parts.append(f"SandboxError: {note}")
    return "\n".join(parts)


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    cpu_s: float | None = None,
    max_output_bytes: int = 64_000,
    forbid_paths: Sequence[str | os.PathLike[str]] = (),
    nproc: int = 32,
    disk_mb: int = 64,
    fsize_mb: int = 16,
    stdin: str | None = None,
    isolation: Isolation = "auto",
    require_isolation: bool | None = None,
    hide_default_paths: bool = True,
) -> SandboxResult:
    """Execute `code` as a Python script in a sandbox and return what happened.

    `timeout_s` is wall clock; `cpu_s` (default: `timeout_s`, at least 1) is CPU seconds;
    `memory_mb` caps the address space of each process; `max_output_bytes` caps stdout+stderr
    together (the process is killed when it is reached); `forbid_paths` are directories or files
    that must be invisible to the code (the run's checkpoints, logs, database); `disk_mb` caps the
    temporary working directory, `fsize_mb` any single file written; `nproc` caps processes and
    threads.
    """
    start = time.monotonic()
    cpu_limit = max(1.0, float(cpu_s if cpu_s is not None else timeout_s))
    try:
        mode = resolve_isolation(isolation, require_isolation)
    except RuntimeError as e:
        return SandboxResult("", "", None, False, "sandbox_error", f"SandboxError: {e}", "none", 0.0)  # fmt: skip
    raw_code = code.encode("utf-8", errors="replace")
    if len(raw_code) > MAX_CODE_BYTES:
        note = f"The code is too large ({len(raw_code)} bytes; at most {MAX_CODE_BYTES})."
        return SandboxResult("", "", None, False, "code_too_large", f"SandboxError: {note}", mode, 0.0)  # fmt: skip

    workdir = tempfile.mkdtemp(prefix="gemtinker-sbx-")
    uid = _UID_BASE + (os.getpid() % 10_000) * 10_000 + next(_uid_counter) % 10_000
    hidden = [os.path.realpath(p) for p in (*_default_forbid, *forbid_paths)]
    hidden += list(ALWAYS_HIDDEN_PATHS)
    if hide_default_paths:
        hidden += list(DEFAULT_HIDDEN_PATHS)
    keep = _python_paths()
    if mode == "root":
        hidden += _untraversable_ancestors(keep, hidden)
    effective_nproc = nproc
    if mode == "rlimits":
        effective_nproc = _count_user_tasks(os.getuid()) + nproc
    cfg = {
        "mode": mode,
        "workdir": workdir,
        "uid": uid,
        "memory_mb": memory_mb,
        "cpu_s": cpu_limit,
        "fsize_mb": fsize_mb,
        "disk_mb": disk_mb,
        "nproc": effective_nproc,
        "hide_paths": sorted(set(hidden)),
        "keep_paths": keep,
        "python": sys.executable,
        "env": _env(workdir),
        "stdin": stdin or "",
    }
    out = bytearray()
    err = bytearray()
    timed_out = overflow = False
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", _BOOTSTRAP, json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=workdir, env={"PATH": "/usr/bin:/bin"}, close_fds=True,
            start_new_session=True,  # own process group: one killpg reaches every descendant
        )  # fmt: skip
    except OSError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        note = f"could not start the sandbox: {e}"
        return SandboxResult("", "", None, False, "sandbox_error", f"SandboxError: {note}", mode, 0.0)  # fmt: skip
    try:
        assert proc.stdin and proc.stdout and proc.stderr
        try:
            # The bootstrap reads all of stdin before doing anything, so this cannot deadlock.
            proc.stdin.write(raw_code)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        deadline = start + timeout_s
        sel = selectors.DefaultSelector()
        for stream, buf in ((proc.stdout, out), (proc.stderr, err)):
            os.set_blocking(stream.fileno(), False)
            sel.register(stream, selectors.EVENT_READ, buf)
        drain_until: float | None = None
        while sel.get_map():
            now = time.monotonic()
            if drain_until is None and now >= deadline:
                timed_out = True
                _kill_group(proc)
                drain_until = now + _DRAIN_S
            if drain_until is None and proc.poll() is not None:
                # The main process is gone; anything still holding the pipes is a straggler.
                _kill_group(proc)
                drain_until = now + _DRAIN_S
            if drain_until is not None and now >= drain_until:
                break
            limit = (drain_until if drain_until is not None else deadline) - now
            for key, _ in sel.select(timeout=min(0.05, max(0.0, limit))):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                room = max_output_bytes - len(out) - len(err)
                key.data.extend(chunk[: max(0, room)])
                if len(chunk) > room and not overflow:
                    overflow = True
                    _kill_group(proc)
                    drain_until = time.monotonic() + _DRAIN_S
        sel.close()
        _kill_group(proc)
        try:
            rc: int | None = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # unkillable (D state); do not hang the trainer on it
            rc = None
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        _remove_tree(workdir)

    duration = time.monotonic() - start
    stdout, stderr = _decode(bytes(out)), _decode(bytes(err))
    violation: str | None
    note: str | None
    if SETUP_ERROR_PREFIX in stderr and rc == SETUP_EXIT_CODE:
        violation, note = "sandbox_error", "the sandbox could not be set up; the code did not run."
        log.error("sandbox setup failed: %s", stderr.strip())
        stderr = ""
    elif overflow:
        violation, note = "output_limit", (
            f"Output limit exceeded: more than {max_output_bytes} bytes were printed; the process "
            "was stopped and the output truncated."
        )
    elif timed_out:
        violation, note = "timeout", f"Execution timed out after {timeout_s:g} seconds (wall-clock limit); the process was stopped."  # fmt: skip
    else:
        violation, note = _classify(rc, stderr, memory_mb, cpu_limit, nproc)
    exit_code = rc if rc is not None and rc >= 0 else None
    if timed_out or overflow:
        exit_code = None
    return SandboxResult(
        stdout=stdout,
        stderr=stderr,
        exit_code=exit_code,
        timed_out=timed_out,
        violation=violation,
        error_text_for_agent=_agent_text(stdout, stderr, note),
        isolation=mode,
        duration_s=duration,
    )


def _remove_tree(path: str) -> None:
    def fix_and_retry(func, p, _exc):  # type: ignore[no-untyped-def]
        # The code may have made its own files read-only or unlistable (rlimits mode).
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix_and_retry)
