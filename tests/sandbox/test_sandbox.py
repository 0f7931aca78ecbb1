"""Attacks on the Python tool sandbox: each must be stopped within its limit, explained to the
agent, and leave the sandbox working for the next call."""

from __future__ import annotations

import glob
import os
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from support.waiting import wait_until

from gemtinker.sandbox import resolve_isolation, run_python
from gemtinker.sandbox.runner import _UID_BASE

MODE = resolve_isolation()
ISOLATED = MODE in ("root", "userns")
needs_isolation = pytest.mark.skipif(
    not ISOLATED, reason=f"sandbox runs in {MODE!r} mode here: no filesystem isolation"
)
# Killing a process tree and draining its pipes takes a moment beyond the limit itself.
SLACK_S = 2.5


def assert_next_call_works() -> None:
    r = run_python("print(1+1)")
    assert r.ok, r.error_text_for_agent
    assert r.stdout.strip() == "2"
    assert r.error_text_for_agent == "2"


def assert_reported(r, violation: str | tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    allowed = (violation,) if isinstance(violation, str) else violation
    assert r.violation in allowed, (r.violation, r.error_text_for_agent[-500:])
    assert r.error_text_for_agent.rstrip().splitlines()[-1].startswith("SandboxError: ")
    assert not r.ok


def sandbox_processes() -> list[int]:
    """Processes still running under a sandbox uid (root mode gives every call its own uid)."""
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            if os.stat(d).st_uid >= _UID_BASE:
                pids.append(int(d.rsplit("/", 1)[1]))
        except OSError:
            pass
    return pids


def test_ordinary_code_output_and_errors() -> None:
    assert_next_call_works()
    r = run_python("import numpy as np\nprint(np.arange(4).sum())\nraise ValueError('boom')")
    assert r.stdout.strip() == "6"
    assert r.exit_code == 1 and r.violation is None
    assert r.error_text_for_agent.splitlines()[-1] == "ValueError: boom"
    assert "line 3" in r.stderr  # tracebacks point at the agent's own lines
    r = run_python("open('note.txt', 'w').write('kept'); print(open('note.txt').read())")
    assert r.ok and r.stdout.strip() == "kept"  # the working directory is writable


@pytest.mark.integration  # waits out a 2 s wall clock: `make test` only
def test_infinite_loop_is_stopped_by_the_wall_clock() -> None:
    r = run_python("while True:\n    pass", timeout_s=2)
    assert r.timed_out
    assert_reported(r, "timeout")
    assert "timed out after 2 seconds" in r.error_text_for_agent
    assert r.duration_s < 2 + SLACK_S
    assert_next_call_works()


@pytest.mark.integration  # burns a second of CPU: `make test` only
def test_cpu_limit_below_wall_clock() -> None:
    r = run_python("while True:\n    pass", timeout_s=10, cpu_s=1)
    assert_reported(r, "cpu_limit")
    assert r.duration_s < 1 + SLACK_S + 1  # soft limit at 1 s CPU, SIGKILL at 2 s at the latest
    assert_next_call_works()


@pytest.mark.integration  # runs a fork bomb to its limit: `make test` only
def test_fork_bomb_is_contained() -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_python(code, timeout_s=3)
    assert_reported(r, ("process_limit", "timeout"))
    assert r.duration_s < 3 + SLACK_S
    if MODE == "root":  # nothing the bomb forked survives (the kill may take a moment to land)
        wait_until(lambda: sandbox_processes() == [], "the fork bomb's processes are gone", timeout_s=10)
    assert_next_call_works()


def test_ten_gigabyte_allocation_is_refused() -> None:
    r = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", memory_mb=512)
    assert "allocated" not in r.stdout
    assert_reported(r, "memory_limit")
    assert "512 MB" in r.error_text_for_agent
    assert r.duration_s < 5
    assert_next_call_works()


def test_output_flood_is_cut_at_the_cap() -> None:
    r = run_python("print('x' * 100_000_000)", max_output_bytes=64_000)
    assert_reported(r, "output_limit")
    assert len(r.stdout.encode()) + len(r.stderr.encode()) <= 64_000
    assert r.duration_s < 5
    r = run_python("import sys\nwhile True:\n    sys.stderr.write('e' * 1000)", timeout_s=5)
    assert_reported(r, "output_limit")  # stderr counts too, and a slow flood is cut as well
    assert_next_call_works()


@needs_isolation
def test_writing_outside_the_working_directory_is_refused(tmp_path: Path) -> None:
    for target in ["/etc/gemtinker_sandbox_probe", str(Path.cwd() / "gemtinker_sandbox_probe")]:
        r = run_python(f"open({target!r}, 'w').write('pwned')")
        assert_reported(r, "filesystem")  # read-only file system
        assert not os.path.exists(target), target
    # The host's /tmp is replaced by an empty directory: the test's own tmp dir does not exist
    # for the code, so the write fails with FileNotFoundError, an ordinary error for the agent.
    target = str(tmp_path / "probe")
    r = run_python(f"open({target!r}, 'w').write('pwned')")
    assert not r.ok and "FileNotFoundError" in r.error_text_for_agent
    assert not os.path.exists(target)
    assert_next_call_works()


@needs_isolation
def test_working_directory_is_fresh_and_removed() -> None:
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "gemtinker-sbx-*")))
    r1 = run_python("import os\nopen('left_behind', 'w').write('x')\nprint(os.getcwd())")
    r2 = run_python("import os\nprint(os.listdir('.'))")
    assert r1.ok and r2.ok
    assert r2.stdout.strip() == "[]"  # the second call does not see the first call's files
    assert not os.path.exists(r1.stdout.strip())
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "gemtinker-sbx-*")))
    assert after <= before


@needs_isolation
def test_run_checkpoint_folder_is_unreadable(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "000010"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter.safetensors").write_text("SECRET-WEIGHTS")
    for p in (tmp_path, run_dir, run_dir / "checkpoints", ckpt):
        p.chmod(0o755)  # world-readable on purpose: only the sandbox may keep the code out
    (ckpt / "adapter.safetensors").chmod(0o644)
    code = (
        "import os\n"
        f"print(open({str(ckpt / 'adapter.safetensors')!r}).read())\n"
    )
    # forbid_paths alone must suffice, even with the default hidden paths (/tmp, ...) switched off.
    r = run_python(code, forbid_paths=[run_dir], hide_default_paths=False)
    assert "SECRET" not in r.error_text_for_agent
    assert_reported(r, "filesystem")
    r = run_python(
        f"import os\nprint(os.listdir({str(run_dir)!r}))",
        forbid_paths=[run_dir], hide_default_paths=False,
    )  # fmt: skip
    assert "checkpoints" not in r.stdout
    assert_reported(r, "filesystem")
    assert_next_call_works()


def test_socket_to_a_local_listener_fails() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                continue

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"  # fmt: skip
        r = run_python(code)
        assert "connected" not in r.stdout
        assert_reported(r, "network")
        assert "Network access is disabled" in r.error_text_for_agent
    finally:
        stop.set()
        thread.join(2)
        server.close()
    assert accepted == []
    assert_next_call_works()


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_API_KEY", "tml-secret-key")
    r = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('TINKER_API_KEY'))")
    assert r.ok
    assert "tml-secret-key" not in r.stdout and "TINKER_API_KEY" not in r.stdout


@needs_isolation
def test_host_processes_are_invisible() -> None:
    r = run_python("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert r.ok, r.error_text_for_agent
    pids = eval(r.stdout)  # noqa: S307 - our own sandbox's output in a test
    assert os.getpid() not in pids and len(pids) <= 3


def test_concurrent_calls_from_threads() -> None:
    results: dict[int, str] = {}

    def call(i: int) -> None:
        results[i] = run_python(f"print({i} * {i})").stdout.strip()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: str(i * i) for i in range(6)}


@pytest.mark.integration  # starts GEM's tool env and several sandboxed runs: `make test` only
def test_gem_python_tool_goes_through_the_sandbox() -> None:
    pytest.importorskip("gem")
    from gem.wrappers.wrapper_factory import WRAPPER_FACTORY

    from gemtinker.sandbox import SandboxedPythonCodeTool, install_into_gem, uninstall_from_gem

    install_into_gem()
    try:
        # The tool instance GEM built at import time for this wrapper name.
        tool = WRAPPER_FACTORY["python_tool_no_int_reward_last_line_error"].keywords["tools"][0]
        tool.timeout = 2
        is_valid, has_error, obs, _ = tool.execute_action("<python>while True: pass</python>")
        assert is_valid and has_error
        assert obs.startswith("Code execution result: ")
        assert "SandboxError: Execution timed out after 2 seconds" in obs
        tool.timeout = 30  # the calls below finish at once, but GEM's import retry is slow on a loaded CPU
        # GEM's own format: stdout keeps print's newline, then the tool appends one.
        is_valid, has_error, obs, _ = tool.execute_action("```python\nprint(1+1)\n```")
        assert (is_valid, has_error, obs) == (True, False, "Code execution result: 2\n\n")
        # GEM's missing-import retry still works: `sqrt` comes from GEM's BASE_IMPORTS.
        _, has_error, obs, _ = tool.execute_action("<python>print(sqrt(16))</python>")
        assert (has_error, obs) == (False, "Code execution result: 4.0\n\n")
    finally:
        tool.timeout = 5
        uninstall_from_gem()
    explicit = SandboxedPythonCodeTool(timeout=5, keep_error_last_line=True, memory_mb=256)
    _, has_error, obs, _ = explicit.execute_action("<python>x = bytearray(10 * 1024**3)</python>")
    assert has_error and "SandboxError: Memory limit exceeded" in obs and "256 MB" in obs
    _, has_error, obs, _ = explicit.execute_action("<python>print(1+1)</python>")
    assert (has_error, obs) == (False, "Code execution result: 2\n\n")


@pytest.mark.skipif(MODE != "root", reason="compares the modes available to root")
def test_unprivileged_user_namespace_mode_if_available() -> None:
    from gemtinker.sandbox.runner import _probe_userns

    if not _probe_userns():
        pytest.skip("unprivileged user namespaces are not available here")
    r = run_python("print(1+1)", isolation="userns")
    assert r.ok and r.stdout.strip() == "2" and r.isolation == "userns"
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))", isolation="userns")
    assert_reported(r, "network")
    r = run_python("open('/etc/gemtinker_sandbox_probe', 'w')", isolation="userns")
    assert_reported(r, "filesystem")


def test_private_folders_above_the_python_installation_are_found(tmp_path: Path) -> None:
    """A venv inside a folder other users may not enter (a checkout made with `mktemp -d`):
    root mode hides that folder and re-exposes the venv, or its fresh uid could not start Python."""
    from gemtinker.sandbox.runner import _untraversable_ancestors

    private = tmp_path / "private"
    venv = private / "repo" / ".venv"
    venv.mkdir(parents=True)
    for p in (tmp_path, private / "repo"):
        p.chmod(0o755)
    private.chmod(0o700)
    # (pytest's own base folder above tmp_path may be private too: only tmp_path's part is checked.)
    mine = [p for p in _untraversable_ancestors([str(venv)], hidden=[]) if p.startswith(str(tmp_path))]
    assert mine == [str(private)]
    # Already inside a hidden path: re-exposed through that path's tmpfs, nothing more to hide.
    found = _untraversable_ancestors([str(venv)], hidden=[str(tmp_path)])
    assert not any(p.startswith(str(tmp_path)) for p in found)
