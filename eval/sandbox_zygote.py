"""A pre-started interpreter inside one bubblewrap sandbox that forks each untrusted program (root harness only).

eval.sandbox starts one of these per worker as `bwrap ... --cap-add CAP_SETUID,CAP_SETGID -- python -I -S
sandbox_zygote.py` and sends it programs over stdin; it answers each with the program's exit status and output.
Standalone on purpose (no package imports): nothing of the harness is loaded next to untrusted code.

Per program, in a fork of this warm interpreter (no interpreter start-up, common modules already imported):
1. its own session, stdin /dev/null, stdout/stderr to fresh pipes, every other descriptor closed;
2. resource limits, no supplementary groups, a uid/gid of its own (given by the harness, unique per program),
   no_new_privs: the uid change clears every capability, and the program can signal or ptrace no process of
   another program, of this zygote (uid 0) or outside the sandbox (its PID namespace);
3. a private scratch directory /tmp/<uid> as its working directory, a stripped environment;
4. the program runs as __main__; its exit status and its output (capped) go back to the harness.
When the program ends, times out or floods its output, every process of its uid is killed (kill(-1) sent as that
uid reaches exactly those) and its scratch directory removed, before the next program starts.

Frames in both directions: 4-byte big-endian length, then JSON.
"""

import base64
import builtins
import ctypes
import json
import os
import resource
import select
import signal
import stat
import struct
import sys
import time
import traceback

# Warm the modules programs commonly import, so a forked program does not pay for them.
import bisect  # noqa: F401
import collections  # noqa: F401
import fractions  # noqa: F401
import functools  # noqa: F401
import hashlib  # noqa: F401
import heapq  # noqa: F401
import itertools  # noqa: F401
import math  # noqa: F401
import random  # noqa: F401
import re  # noqa: F401
import string  # noqa: F401
import typing  # noqa: F401

PR_SET_NO_NEW_PRIVS = 38
libc = ctypes.CDLL(None, use_errno=True)


def read_exact(n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def send(obj) -> None:
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(1, data):]


def run_program(req: dict, out_w: int, err_w: int) -> None:
    """In the forked child: confine, then run the program as __main__. Never returns."""
    code = 1
    try:
        os.setsid()
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1 << 16)
        for name, (soft, hard) in req["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        uid = req["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        work = f"/tmp/{uid}"
        os.mkdir(work, 0o700)
        os.chdir(work)
        os.environ.clear()
        os.environ.update(req["env"], HOME=work)
        sys.argv = ["prog.py"]
        sys.path[0] = work
        program = compile(req["source"], "prog.py", "exec")
    except BaseException:
        os.write(2, traceback.format_exc().encode())
        os._exit(126)
    try:
        exec(program, {"__name__": "__main__", "__file__": "prog.py", "__builtins__": builtins})
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def remove_tree(path: str) -> None:
    """rm -rf that also gets into directories the program made unreadable (it is their owner)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        os.chmod(path, 0o700)
        for name in os.listdir(path):
            remove_tree(os.path.join(path, name))
        os.rmdir(path)
    else:
        os.unlink(path)


def kill_all_of_my_uid() -> None:
    """SIGKILL every other process of this uid until none is left (a fork bomb may still be forking)."""
    me, uid = os.getpid(), str(os.getuid())
    while True:
        os.kill(-1, signal.SIGKILL)  # reaches exactly the processes of this uid (and succeeds even when none)
        left = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue  # gone already
            if int(pid) != me and fields["Uid"].split()[0] == uid and not fields["State"].strip().startswith("Z"):
                left = True
                break
        if not left:
            return


def sweep(uid: int) -> None:
    """Kill every process of `uid` and remove its scratch directory, acting as that uid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            kill_all_of_my_uid()
            remove_tree(f"/tmp/{uid}")
        except BaseException:
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)


def serve(req: dict) -> dict:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(err_r)
        run_program(req, out_w, err_w)
    os.close(out_w)
    os.close(err_w)
    cap, deadline = req["output_bytes"], time.monotonic() + req["timeout"]
    exited = os.pidfd_open(pid)  # readable once the program has exited
    buffers = {out_r: bytearray(), err_r: bytearray()}
    watch, stop, status = {out_r, err_r, exited}, None, None
    while watch - {exited} or status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            stop = "timeout"
            break
        ready, _, _ = select.select(list(watch), [], [], left)
        for fd in ready:
            if fd == exited:
                status = os.waitpid(pid, 0)[1]
                watch.discard(exited)
                # The program is over: what it left running dies now, which also closes the pipes it held.
                sweep(req["uid"])
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                watch.discard(fd)
                continue
            buffers[fd] += chunk
            if len(buffers[fd]) > cap:
                stop = "output"
        if stop:
            break
    sweep(req["uid"])
    if status is None:
        status = os.waitpid(pid, 0)[1]
    os.close(exited)
    os.close(out_r)
    os.close(err_r)
    if os.WIFSIGNALED(status):
        exit_status = f"signal {os.WTERMSIG(status)}"
    else:
        exit_status = f"exit {os.WEXITSTATUS(status)}"
    return {
        "status": exit_status,
        "stop": stop,
        "stdout": base64.b64encode(bytes(buffers[out_r][: cap + 1])).decode(),
        "stderr": base64.b64encode(bytes(buffers[err_r][: cap + 1])).decode(),
    }


def main() -> None:
    send({"ready": True})
    while True:
        try:
            (size,) = struct.unpack(">I", read_exact(4))
            req = json.loads(read_exact(size))
        except EOFError:
            return
        send(serve(req))


if __name__ == "__main__":
    if sys.argv[1:] == ["--kill-all-of-my-uid"]:  # the harness's clean-up after an unsandboxed program
        kill_all_of_my_uid()
    else:
        main()
