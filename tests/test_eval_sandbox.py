"""The code sandbox against hostile programs, for every common interpreter location; and its refusal to run
anything when isolation is unavailable. Nothing here skips: a machine without isolation fails these tests."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

import pytest

from llama4_sparse.eval import sandbox
from llama4_sparse.eval.sandbox import Limits, SandboxUnavailable, Verdict, isolation_level, run_program, run_programs

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def require(condition: bool, why: str) -> None:
    """A missing capability fails under CI (where it must exist) and skips elsewhere."""
    if not condition:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why)


def sandbox_uid_processes() -> list[int]:
    """Live processes under the sandbox's dedicated uids (200000 and up)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) >= 200_000 and not fields["State"].strip().startswith("Z"):
            found.append(int(pid))
    return found


def make_venv(parent: Path, *extra: str) -> str:
    """A venv (symlinked to this interpreter's installation) inside a directory only its owner may enter."""
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(parent, 0o700)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *extra, str(parent / "venv")], check=True)
    return str(parent / "venv" / "bin" / "python")


@pytest.fixture(scope="module")
def interpreters(tmp_path_factory):
    """This interpreter, a venv under a private directory in /tmp, a venv under the home directory, and the
    system Python."""
    home_dir = Path.home() / f".llama4-sandbox-test-{uuid.uuid4().hex[:8]}"
    found = {
        "this": sys.executable,
        "venv_in_tmp": make_venv(tmp_path_factory.mktemp("private") / "env"),
        "venv_in_home": make_venv(home_dir),
    }
    if os.path.exists(SYSTEM_PYTHON):
        found["system"] = SYSTEM_PYTHON
    yield found
    shutil.rmtree(home_dir, ignore_errors=True)


def test_isolation_is_available_here():
    # CI installs bubblewrap through `make setup`; without it every program would be refused.
    assert isolation_level() == "bwrap"


def test_correct_and_wrong_programs():
    assert run_program("def f(x):\n    return 2 * x\nassert f(2) == 4\n") == Verdict(True, "passed", "passed")
    v = run_program("assert 1 + 1 == 3\n")
    assert (v.passed, v.kind) == (False, "failed") and "AssertionError" in v.detail


def test_program_runs_unprivileged_in_its_own_scratch_dir():
    source = (
        "import os\n"
        "assert os.getuid() != 0 and os.geteuid() != 0 and os.getgroups() == []\n"
        "assert os.getcwd().startswith('/tmp')\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "assert open('scratch.txt').read() == 'ok'\n"
        "assert 'CapEff:\\t0000000000000000' in open('/proc/self/status').read()\n"
    )
    assert run_program(source).passed


@pytest.mark.parametrize("source", ["import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False"])
def test_exit_code_cannot_fake_a_pass(source):
    v = run_program(source)
    assert (v.passed, v.kind) == (False, "failed")


def test_limits_and_classification():
    sources = [
        "while True:\n    pass\n",
        "import signal\nfor s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n",
        "x = bytearray(8 * 2**30)\n",
        "while True:\n    print('x' * 10000)\n",
        "open('big', 'wb').write(b'x' * (200 * 2**20))\n",
        "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
    ]
    verdicts = run_programs(sources, timeout=1.0, workers=2)
    assert [v.kind for v in verdicts] == ["timeout", "timeout", "resource_limit", "resource_limit",
                                          "resource_limit", "crashed"]
    assert "MemoryError" in verdicts[2].detail and "output" in verdicts[3].detail
    assert not any(v.passed for v in verdicts)


def orphan_program(marker: str) -> str:
    """Leaves a detached grandchild (its own session) sleeping for a minute, `marker` in its command line."""
    return (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-S', '-c', 'import time; time.sleep(60)', '{marker}'])\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
    )


def hostile_suite(tmp_path: Path, harness_pid: int):
    """({name: (program, whether it should pass, None: either)}, paths and marker to check afterwards). Every hostile program
    asserts that its attack worked, so a pass would mean the attack succeeded."""
    outside = tmp_path / "escaped"
    host_tmp = Path(tempfile.gettempdir()) / f"escaped-{uuid.uuid4().hex}"
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    os.chmod(secret, 0o644)
    public_secret = Path(tempfile.gettempdir()) / f"public-secret-{uuid.uuid4().hex}"
    public_secret.write_text("TOP-SECRET")
    os.chmod(public_secret, 0o644)
    marker = f"orphan-{uuid.uuid4().hex}"
    return {
        "write_outside": (
            "import posix\n"
            f"posix.system('touch {outside} {host_tmp} 2>/dev/null')\n"
            # lands in the sandbox's own /tmp, if anywhere: what counts is that the host never sees it
            f"open({str(host_tmp)!r}, 'w').write('x')\n", None),
        "write_outside_python": (f"open({str(outside)!r}, 'w').write('x')\n", False),
        "read_private_secret": (f"assert open({str(secret)!r}).read() == 'TOP-SECRET'\n", False),
        "read_world_readable_host_file": (f"assert open({str(public_secret)!r}).read() == 'TOP-SECRET'\n", False),
        "read_etc": ("assert 'root' in open('/etc/passwd').read()\n", False),
        "list_interpreter_parents": (
            "import os, sys\nseen = []\n"
            "for prefix in {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))}:\n"
            "    parent = os.path.dirname(prefix)\n"
            "    if parent != '/':\n"
            "        try:\n            seen += os.listdir(parent)\n"
            "        except OSError:\n            pass\n"
            "assert seen\n", False),
        "network": (
            "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1).sendall(b'hi')\n", False),
        "kill_harness": (
            "import os, signal\n"
            f"os.kill({harness_pid}, signal.SIGKILL)\n", False),
        "kill_everything": (
            "import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
            "import time\ntime.sleep(0.2)\nassert False, 'still here'\n", False),
        "ptrace_harness": (
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"assert libc.ptrace(16, {harness_pid}, 0, 0) == 0\n", False),
        "see_harness": (f"import os\nassert os.path.exists('/proc/{harness_pid}/cmdline')\n"
                        f"assert b'pytest' in open('/proc/{harness_pid}/cmdline', 'rb').read()\n", False),
        "orphan": (orphan_program(marker), True),
        "fork_bomb": (
            f"import os\n# {marker}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            False),
        "become_root": ("import os\nos.setuid(0)\n", False),
        "new_user_namespace_as_root": (
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "assert libc.unshare(0x10000000) == 0\nassert libc.mount(b'none', b'/', None, 1 << 14 | 4096, None) == 0\n"
            "open('/usr/pwned', 'w').write('x')\n", False),
        "write_interpreter": ("import sys, os\nopen(os.path.join(sys.base_prefix, 'pwned'), 'w').write('x')\n",
                              False),
        "canonical": ("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n", True),
    }, (outside, host_tmp, public_secret, marker)


@pytest.mark.parametrize("where", ["this", "venv_in_tmp", "venv_in_home", "system"])
def test_hostile_programs_are_contained_for_every_interpreter_location(where, interpreters, tmp_path):
    require(where in interpreters, f"no {SYSTEM_PYTHON} on this machine")
    python = interpreters[where]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    suite, (outside, host_tmp, public_secret, marker) = hostile_suite(tmp_path, os.getpid())
    names = list(suite)
    sources = [suite[n][0].replace("PORT", str(port)) for n in names]
    try:
        verdicts = dict(zip(names, run_programs(sources, timeout=2.0, workers=2, python=python)))
    finally:
        public_secret.unlink()
    # A connection that got through would wait in the backlog; a non-blocking accept finds none.
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()
    wrong = {n: verdicts[n] for n in names if suite[n][1] is not None and verdicts[n].passed != suite[n][1]}
    assert not wrong, wrong
    assert not outside.exists() and not host_tmp.exists()
    assert not Path(sys.base_prefix, "pwned").exists() and not Path("/usr/pwned").exists()
    assert processes_with(marker) == [] and sandbox_uid_processes() == []
    assert verdicts["fork_bomb"].kind in ("timeout", "resource_limit")


def test_harness_under_a_venv_isolates_with_its_own_interpreter(tmp_path):
    """sys.executable is a venv's python: the default interpreter is exposed and used."""
    python = make_venv(tmp_path / "private", "--system-site-packages")
    venv = Path(python).parents[1]
    outside = tmp_path / "escaped"
    programs = [f"import sys\nassert sys.executable.startswith({str(venv)!r})",
                f"open({str(outside)!r}, 'w').write('x')"]
    code = (
        "import sys\nfrom eval.sandbox import isolation_level, run_programs\n"
        "assert isolation_level() == 'bwrap'\n"
        f"print([x.passed for x in run_programs({programs!r})])\n"
    )
    out = subprocess.run([python, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[True, False]"
    assert not outside.exists()


def test_unprivileged_harness_isolates_with_user_namespaces(tmp_path):
    """A harness that is not root: nobody inside a user namespace, same containment."""
    if os.geteuid() != 0:
        harness = [sys.executable]
    else:
        require(os.path.exists(SYSTEM_PYTHON), f"{SYSTEM_PYTHON} is needed to run a harness as an unprivileged user")
        harness = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON]
    copy = Path(tempfile.mkdtemp(prefix="llama4-sandbox-harness-"))  # reachable by the unprivileged user
    for name in ("sandbox.py", "sandbox_zygote.py"):
        shutil.copy(REPO / "eval" / name, copy / name)
    os.chmod(copy, 0o777)  # writable by anyone: only the sandbox can keep the program from writing here
    outside = copy / "escaped"
    programs = ["import os\nassert os.getuid() == 65534", "import os\nos.kill(os.getppid(), 9)\nos.kill(-1, 9)",
                f"open({str(outside)!r}, 'w').write('x')", "while True: pass"]
    code = (
        f"import sys\nsys.path.insert(0, {str(copy)!r})\nimport sandbox\n"
        "assert sandbox.isolation_level() == 'bwrap'\n"
        f"print([(x.passed, x.kind) for x in sandbox.run_programs({programs!r}, timeout=1.0)])\n"
    )
    try:
        out = subprocess.run([*harness, "-c", code], capture_output=True, text=True, timeout=120)
        escaped = outside.exists()
    finally:
        shutil.rmtree(copy)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("[(True, 'passed'), (False, 'failed'), (False, 'failed'), (False, 'timeout')]")
    assert not escaped


def hide_isolation_tools(monkeypatch, tmp_path) -> None:
    """A PATH that has python and the basic tools but no bwrap."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python3", "kill", "setpriv", "unshare"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_refuses_to_run_anything_without_isolation(monkeypatch, tmp_path):
    hide_isolation_tools(monkeypatch, tmp_path)
    marker = tmp_path / "ran"
    os.chmod(tmp_path, 0o777)
    with pytest.raises(SandboxUnavailable, match=r"bwrap.*not found.*apt-get install bubblewrap.*allow-unsandboxed"):
        run_programs([f"open({str(marker)!r}, 'w').write('x')\n"])
    with pytest.raises(SandboxUnavailable):
        isolation_level()
    assert not marker.exists()


def test_explicit_opt_out_runs_unsandboxed_and_says_so(monkeypatch, tmp_path):
    hide_isolation_tools(monkeypatch, tmp_path)
    with pytest.warns(UserWarning, match="WITHOUT isolation"):
        assert isolation_level(allow_unsandboxed=True) == "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verdicts = run_programs(["assert sum(range(4)) == 6\n", "while True:\n    pass\n"], timeout=0.5,
                                allow_unsandboxed=True)
    assert [(v.passed, v.kind) for v in verdicts] == [(True, "passed"), (False, "timeout")]


def test_unsandboxed_root_run_leaves_no_process_behind(monkeypatch, tmp_path):
    require(os.geteuid() == 0 and os.path.exists(SYSTEM_PYTHON) and sandbox._world_executable(SYSTEM_PYTHON),
            "needs root and a world-executable system Python, as on CI")
    hide_isolation_tools(monkeypatch, tmp_path)
    marker = f"orphan-{uuid.uuid4().hex}"
    source = orphan_program(marker) + "assert os.getuid() != 0\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_program(source, allow_unsandboxed=True, python=SYSTEM_PYTHON).passed
    assert processes_with(marker) == [] and sandbox_uid_processes() == []


def test_zygote_survives_programs_that_attack_it():
    """Programs sharing a worker cannot disturb the next one: 20 in a row through 1 worker, hostile ones between."""
    sources = []
    for i in range(10):
        sources.append("import os, signal\nfor p in range(1, 64):\n    try:\n        os.kill(p, signal.SIGKILL)\n"
                       "    except OSError:\n        pass\n")
        sources.append(f"assert {i} + 1 == {i + 1}\n")
    verdicts = run_programs(sources, timeout=1.0, workers=1)
    assert [v.passed for v in verdicts[1::2]] == [True] * 10


def test_parallel_runs_keep_order():
    sources = [f"assert {i} % 2 == 0\n" for i in range(6)]
    assert [v.passed for v in run_programs(sources, workers=3)] == [i % 2 == 0 for i in range(6)]


def test_bad_arguments():
    with pytest.raises(TypeError):
        run_program(b"print(1)")
    with pytest.raises(ValueError, match="timeout"):
        run_program("pass", timeout=0)
    with pytest.raises(ValueError, match="not found on PATH"):
        run_program("pass", python="no-such-python-here")


def test_limits_are_configurable():
    small = Limits(memory_mb=256)
    assert run_program("x = bytearray(100 * 2**20)\n", limits=small).passed
    assert run_program("x = bytearray(400 * 2**20)\n", limits=small).kind == "resource_limit"


def test_kill_signal_names():
    assert sandbox._classify("t", b"", b"", None, -signal.SIGKILL, Limits()).detail == "killed by SIGKILL"
