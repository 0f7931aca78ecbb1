"""Sandbox bootstrap: runs as its own interpreter (`python -I -S _bootstrap.py CONFIG_JSON`).

It is deliberately a stand-alone script using only the standard library (hence one file of
over 400 lines: it cannot import the package it isolates): it executes in a fresh
process (no threads, unlike the trainer that starts it, so forking here is safe), builds the
isolation, then `execve`s a clean interpreter for the agent's code. Nothing of the trainer's
memory or file descriptors survives into the agent's process.

Process tree in the namespace modes:

    trainer --Popen(new session)--> bootstrap (host pid ns; unshare'd mount/net/ipc/uts/pid ns)
        bootstrap --fork--> init (pid 1 of the new pid ns; mounts /proc; PDEATHSIG=SIGKILL)
            init --fork--> worker (drops uid/caps, rlimits, seccomp, execve python)

Killing the bootstrap's process group kills the bootstrap; its death SIGKILLs init, and the death
of a pid namespace's init makes the kernel kill every process left in it, so nothing the agent
forks (even after escaping the process group) outlives the call. In "rlimits" mode there are no
namespaces: the bootstrap itself becomes the worker, and seccomp forbids setsid/setpgid so the
trainer's killpg still reaches every descendant.

The code to run is read from stdin (to EOF) and handed to the worker through a memfd on fd 3,
so it never lands in the agent-visible working directory and has no argv size limit.

Exit protocol with the parent: exit 125 + a line starting with SETUP_ERROR_PREFIX on stderr when
the isolation could not be built; otherwise the worker's exit code, or death by the worker's
terminating signal (the bootstrap re-raises it on itself).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import signal
import struct
import sys

SETUP_ERROR_PREFIX = "gemtinker-sandbox-setup-error:"
SETUP_EXIT_CODE = 125

# --- Linux constants (uapi headers) -------------------------------------------------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
O_PATH = 0o10000000

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
# SECBIT_NOROOT | _LOCKED | SECBIT_NO_SETUID_FIXUP | _LOCKED | SECBIT_KEEP_CAPS_LOCKED: uid 0 gets
# no implicit capabilities at execve (needed in the user-namespace mode, where we stay "root").
SECUREBITS_NO_ROOT = 0x01 | 0x02 | 0x04 | 0x08 | 0x20

# seccomp BPF
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
EACCES = 13
AF_UNIX = 1
X32_SYSCALL_BIT = 0x40000000

# Syscalls the agent's code never legitimately needs, denied with EPERM. Beyond the namespaces and
# dropped capabilities they are defence in depth; in "rlimits" mode they are the main protection
# (setsid/setpgid keep every descendant in the process group that the trainer kills).
_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "setsid", "setpgid",
    "chroot", "acct", "mount", "umount2", "pivot_root", "swapon", "swapoff", "reboot",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "quotactl",
    "add_key", "request_key", "keyctl", "unshare", "setns", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
)  # fmt: skip
_SYSCALLS = {
    # name: (x86_64, aarch64/asm-generic); checked against the kernel uapi headers.
    "socket": (41, 198), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "pidfd_getfd": (438, 438), "setsid": (112, 157),
    "setpgid": (109, 154), "chroot": (161, 51), "acct": (163, 89), "mount": (165, 40),
    "umount2": (166, 39), "pivot_root": (155, 41), "swapon": (167, 224), "swapoff": (168, 225),
    "reboot": (169, 142), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "quotactl": (179, 60), "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    "unshare": (272, 97), "setns": (308, 268), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442),
}  # fmt: skip
_ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}

# The tiny program the worker interpreter runs: read the agent's code from fd 3 and execute it as
# `__main__`. Registering the source with linecache makes tracebacks show the offending lines,
# and dropping the loader's own frame keeps tracebacks identical to `python script.py`.
LOADER = r"""
import sys, linecache, traceback
with open(3, encoding="utf-8", errors="replace", closefd=True) as f:
    src = f.read()
name = "<agent_code>"
linecache.cache[name] = (len(src), None, src.splitlines(True), name)
sys.argv = [name]
sys.path.insert(0, "")
g = {"__name__": "__main__", "__builtins__": __builtins__}
del f
try:
    code = compile(src, name, "exec")
except SyntaxError as e:
    traceback.print_exception(type(e), e, None)
    sys.exit(1)
try:
    exec(code, g)
except SystemExit:
    raise
except BaseException as e:
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
"""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]  # fmt: skip
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]  # fmt: skip
_libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:  # fmt: skip
    _check(_libc.mount(_b(src), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def prctl(option: int, arg2: int = 0) -> None:
    _check(_libc.prctl(option, arg2, 0, 0, 0), f"prctl({option})")


def mount_setattr(path: str, flags: int, attr_set: int, attr_clr: int) -> None:
    attr = struct.pack("QQQQ", attr_set, attr_clr, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = _libc.syscall(
        ctypes.c_long(_SYSCALLS["mount_setattr"][_arch()[1]]), ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)), ctypes.c_uint(flags), buf, ctypes.c_size_t(len(attr)),
    )  # fmt: skip
    _check(0 if ret == 0 else -1, f"mount_setattr {path}")


def _arch() -> tuple[int, int]:
    machine = platform.machine()
    if machine not in _ARCHES:
        raise SetupError(f"unsupported architecture {machine!r} for the seccomp filter")
    return _ARCHES[machine]


# --- filesystem view ------------------------------------------------------------------------------
_OPT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}


def _make_everything_readonly() -> None:
    try:
        mount_setattr("/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0)
        return
    except SetupError:
        pass  # kernel < 5.12 (no mount_setattr): remount every mount point read-only instead.
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4:6] for line in f]
    for point, opts in points:
        point = point.encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in opts.split(","):
            flags |= _OPT_FLAGS.get(opt, 0)  # locked flags must be kept in a user namespace
        try:
            mount(None, point, None, flags)
        except SetupError:
            if point == "/":
                raise


def _makedirs_in_tmpfs(path: str) -> None:
    # Directories created inside a hiding tmpfs are traversable but not listable.
    os.makedirs(path, mode=0o711, exist_ok=True)


def _hide(path: str, traversable: bool) -> None:
    """Cover a directory with an empty tmpfs (mode 000, or 0711 when something inside must stay
    reachable) and a file with /dev/null."""
    if os.path.isdir(path):
        mode = "0711" if traversable else "0000"
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size=64k,nr_inodes=256,mode={mode}")  # fmt: skip
    else:
        mount("/dev/null", path, None, MS_BIND)  # a hidden file reads as empty


def build_filesystem(cfg: dict, uid: int, gid: int) -> None:
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    hide = [p for p in cfg["hide_paths"] if os.path.isdir(p) or os.path.isfile(p)]
    # Paths the worker must still reach (the Python installation) although a hidden directory
    # contains them, e.g. a pyenv interpreter under /root. Pin them with O_PATH fds before hiding.
    keep_fds: list[tuple[str, int]] = []
    for keep in cfg["keep_paths"]:
        if any(keep == h or keep.startswith(h.rstrip("/") + "/") for h in hide) and os.path.exists(keep):  # fmt: skip
            keep_fds.append((keep, os.open(keep, O_PATH)))

    def under(path: str, parent: str) -> bool:
        return path.startswith(parent.rstrip("/") + "/")

    # Outer hidden paths first; a path nested in another is already invisible, unless it lies in
    # a re-exposed Python prefix, so nested ones are handled after the re-exposure below.
    outer = [p for p in hide if not any(under(p, q) for q in hide if q != p)]
    nested = sorted((p for p in hide if p not in outer), key=len)
    for path in outer:
        inner = [k for k, _ in keep_fds] + [cfg["workdir"]]
        _hide(path, traversable=any(under(k, path) for k in inner))
    for keep, fd in keep_fds:
        _makedirs_in_tmpfs(keep)
        mount(f"/proc/self/fd/{fd}", keep, None, MS_BIND | MS_REC)
        os.close(fd)
    for path in nested:
        if os.path.lexists(path):
            _hide(path, traversable=under(cfg["workdir"], path))
    workdir = cfg["workdir"]
    _makedirs_in_tmpfs(workdir)  # when /tmp is hidden, the mount point is recreated inside it
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={gid}")  # fmt: skip
    _make_everything_readonly()
    try:
        mount_setattr(workdir, 0, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, MOUNT_ATTR_RDONLY)
    except SetupError:
        mount(None, workdir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)


def mount_proc() -> None:
    """Runs as pid 1 of the new pid namespace: a fresh /proc shows only the sandbox's processes,
    so host processes' environ, cmdline and /proc/<pid>/root are out of reach."""
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        # An unprivileged user namespace may not mount proc where the host's /proc has masked
        # sub-mounts. Hide the host's /proc entirely rather than expose it.
        mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0555")  # fmt: skip


# --- privileges, seccomp, rlimits -----------------------------------------------------------------
def drop_capability_bounding_set() -> None:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL for unknown caps is fine


def install_seccomp() -> None:
    audit_arch, col = _arch()
    denied = sorted({_SYSCALLS[n][col] for n in _DENIED})
    socket_nr = _SYSCALLS["socket"][col]
    prog: list[tuple[int, int, int, int]] = []

    def stmt(code: int, k: int) -> None:
        prog.append((code, 0, 0, k))

    def jeq(k: int, jt: int, jf: int) -> None:
        prog.append((BPF_JEQ_K, jt, jf, k))

    deny = SECCOMP_RET_ERRNO | EPERM
    stmt(BPF_LD_W_ABS, 4)  # seccomp_data.arch
    jeq(audit_arch, 1, 0)
    stmt(BPF_RET_K, deny)  # foreign ABI (e.g. i386 via int 0x80): refuse everything
    stmt(BPF_LD_W_ABS, 0)  # seccomp_data.nr
    prog.append((BPF_JGE_K, 0, 1, X32_SYSCALL_BIT))
    stmt(BPF_RET_K, deny)  # x32 ABI aliases
    n = len(denied)
    # After the socket check come n deny-checks, then ALLOW, DENY, then the socket family check.
    jeq(socket_nr, n + 2, 0)
    for i, nr in enumerate(denied):
        jeq(nr, n - i, 0)  # jump to the DENY below
    stmt(BPF_RET_K, SECCOMP_RET_ALLOW)
    stmt(BPF_RET_K, deny)
    stmt(BPF_LD_W_ABS, 16)  # args[0] low word: the address family
    jeq(AF_UNIX, 0, 1)
    stmt(BPF_RET_K, SECCOMP_RET_ALLOW)
    stmt(BPF_RET_K, SECCOMP_RET_ERRNO | EACCES)  # no network sockets at all

    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
        "seccomp",
    )


def set_rlimits(cfg: dict) -> None:
    mem = cfg["memory_mb"] * 1024 * 1024
    cpu = int(cfg["cpu_s"])
    limits = {
        resource.RLIMIT_AS: (mem, mem),
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL a second later
        resource.RLIMIT_FSIZE: (cfg["fsize_mb"] * 1024 * 1024,) * 2,
        resource.RLIMIT_NPROC: (cfg["nproc"],) * 2,
        resource.RLIMIT_NOFILE: (256, 256),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_MEMLOCK: (0, 0),
        resource.RLIMIT_MSGQUEUE: (0, 0),
    }
    for which, value in limits.items():
        resource.setrlimit(which, value)


def _code_memfd(data: bytes, name: str) -> int:
    fd = os.memfd_create(name, 0)
    _write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def become_worker(cfg: dict, code: bytes, ns_mode: str) -> None:
    """Final steps in the process that becomes the agent's interpreter; never returns."""
    code_fd = _code_memfd(code, "agent_code")
    stdin_fd = _code_memfd(cfg["stdin"].encode(), "agent_stdin")
    os.dup2(stdin_fd, 0)
    os.dup2(code_fd, 3)
    for fd in (code_fd, stdin_fd):
        if fd not in (0, 3):
            os.close(fd)
    os.set_inheritable(3, True)
    os.closerange(4, 65536)
    if ns_mode != "rlimits":
        drop_capability_bounding_set()
    if ns_mode == "root":
        uid, gid = cfg["uid"], cfg["uid"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # leaves all capabilities behind (no KEEPCAPS)
    elif ns_mode == "userns":
        prctl(PR_SET_SECUREBITS, SECUREBITS_NO_ROOT)
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary can give privileges back
    os.chdir(cfg["workdir"])
    set_rlimits(cfg)
    install_seccomp()  # last: it forbids syscalls used above
    os.execve(cfg["python"], [cfg["python"], "-I", "-c", LOADER], cfg["env"])


def _relay_status(status: int) -> None:
    """Leave the way the worker left: same exit code, or death by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _write_id_maps(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    code = sys.stdin.buffer.read()
    mode = cfg["mode"]
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if mode == "rlimits":
            become_worker(cfg, code, mode)
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        host_uid, host_gid = os.getuid(), os.getgid()
        if mode == "userns":
            flags |= CLONE_NEWUSER
        _check(_libc.unshare(flags), "unshare")
        if mode == "userns":
            _write_id_maps(host_uid, host_gid)
            fs_uid = fs_gid = 0
        else:
            fs_uid = fs_gid = cfg["uid"]
        build_filesystem(cfg, fs_uid, fs_gid)
    except (SetupError, OSError) as e:
        sys.stderr.write(f"{SETUP_ERROR_PREFIX} {e}\n")
        os._exit(SETUP_EXIT_CODE)

    status_r, status_w = os.pipe()
    init_pid = os.fork()
    if init_pid == 0:
        try:
            os.close(status_r)
            # Belt and braces: init is also in the process group the trainer kills, but if only
            # the bootstrap dies, init (and with it the whole pid namespace) must die too.
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            mount_proc()
            worker = os.fork()
            if worker == 0:
                os.close(status_w)
                become_worker(cfg, code, mode)
            os.write(status_w, str(os.waitpid(worker, 0)[1]).encode())
            os._exit(0)  # pid 1 exits: the kernel kills whatever the agent left running
        except BaseException as e:  # noqa: BLE001 - report any setup failure, never continue
            sys.stderr.write(f"{SETUP_ERROR_PREFIX} {e}\n")
            sys.stderr.flush()
            os._exit(SETUP_EXIT_CODE)
    os.close(status_w)
    _, init_status = os.waitpid(init_pid, 0)
    with os.fdopen(status_r, "rb") as f:
        raw = f.read()
    if not raw:
        _relay_status(init_status)  # init failed during setup (exit 125) or was killed
    _relay_status(int(raw))


if __name__ == "__main__":
    main()
