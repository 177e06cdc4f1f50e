"""The code sandbox against hostile programs: each is contained, classified, and leaves nothing behind."""

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

from eval.sandbox import Verdict, isolation_level, run_program, run_programs

LEVEL = isolation_level()
needs_namespaces = pytest.mark.skipif(LEVEL == "none", reason="no namespaces on this machine (see eval.sandbox)")


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.fixture(autouse=True)
def nothing_left_in_tmp():
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("llama4-sandbox-")}
    yield
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("llama4-sandbox-")}
    assert after <= before


def test_correct_and_wrong_programs():
    assert run_program("def f(x):\n    return 2 * x\nassert f(2) == 4\n") == Verdict(True, "passed", "passed")
    v = run_program("assert 1 + 1 == 3\n")
    assert (v.passed, v.kind) == (False, "failed") and "AssertionError" in v.detail


@pytest.mark.parametrize("source", ["import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False"])
def test_exit_code_cannot_fake_a_pass(source):
    v = run_program(source)
    assert (v.passed, v.kind) == (False, "failed")


def test_infinite_loop_times_out():
    v = run_program("while True:\n    pass\n", timeout=0.5)
    assert v.kind == "timeout" and not v.passed


def test_signal_tampering_does_not_stop_the_timeout():
    source = (
        "import signal\n"
        "for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "while True:\n    pass\n"
    )
    v = run_program(source, timeout=0.5)
    assert v.kind == "timeout"


def test_memory_hog_hits_the_address_space_limit():
    v = run_program("x = bytearray(8 * 2**30)\n")
    assert (v.kind, v.passed) == ("resource_limit", False) and "MemoryError" in v.detail


def test_huge_output_is_cut_and_classified():
    v = run_program("while True:\n    print('x' * 10000)\n", timeout=5)
    assert v.kind == "resource_limit" and "output" in v.detail


def test_huge_file_hits_the_file_size_limit():
    v = run_program("open('big', 'wb').write(b'x' * (200 * 2**20))\n")
    assert v.kind == "resource_limit"


@needs_namespaces
def test_fork_bomb_is_contained_and_killed():
    marker = f"forkbomb-{uuid.uuid4().hex}"
    source = f"import os\n# {marker}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    v = run_program(source, timeout=1)
    assert not v.passed and v.kind in ("timeout", "resource_limit")
    assert processes_with(marker) == []


@needs_namespaces
def test_detached_grandchild_dies_with_the_sandbox():
    marker = f"orphan-{uuid.uuid4().hex}"
    source = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n"
    )
    v = run_program(source, timeout=2)
    assert v.passed  # the program itself finished normally
    assert processes_with(marker) == []


@needs_namespaces
def test_cannot_write_outside_its_work_dir(tmp_path):
    target = tmp_path / "escaped"
    host_tmp = Path(tempfile.gettempdir()) / f"escaped-{uuid.uuid4().hex}"
    source = (
        "import posix\n"
        f"posix.system('touch {target} {host_tmp}')\n"
        f"open({str(host_tmp)!r}, 'w').write('x')\n"
        f"open({str(target)!r}, 'w').write('x')\n"
    )
    v = run_program(source)
    assert not v.passed and v.kind == "failed"
    assert not target.exists() and not host_tmp.exists()


@needs_namespaces
def test_has_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    v = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n")
    # A connection that got through would wait in the backlog; a non-blocking accept finds none.
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()
    assert not v.passed and v.kind == "failed"


@needs_namespaces
def test_cannot_kill_its_parent_or_the_harness():
    source = f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill({os.getpid()}, signal.SIGKILL)\n"
    v = run_program(source)
    assert not v.passed and v.kind == "failed"


def test_crash_is_classified():
    v = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert (v.kind, v.passed) == ("crashed", False)


def test_parallel_runs_keep_order():
    sources = [f"assert {i} % 2 == 0\n" for i in range(6)]
    assert [v.passed for v in run_programs(sources, workers=3)] == [i % 2 == 0 for i in range(6)]


def test_degraded_mode_warns_and_still_judges():
    with pytest.warns(UserWarning, match="Lost"):
        v = run_program("assert sum(range(4)) == 6\n", isolation="none")
    assert v.passed
    with pytest.warns(UserWarning):
        assert run_program("while True:\n    pass\n", timeout=0.5, isolation="none").kind == "timeout"


def test_bad_arguments():
    with pytest.raises(TypeError):
        run_program(b"print(1)")
    with pytest.raises(ValueError, match="timeout"):
        run_program("pass", timeout=0)
    with pytest.raises(ValueError, match="isolation"):
        run_program("pass", isolation="docker")
