"""First process inside the sandbox's namespaces (PID 1): builds the program's view of the system, runs it, reports.

Run by eval.sandbox as `unshare --mount --net --pid --fork --kill-child --mount-proc python -I sandbox_init.py
SPEC_JSON`; standalone on purpose (no package imports), so nothing of the harness is loaded next to untrusted code.

Inside fresh mount, PID and network namespaces it
1. mounts private tmpfs on /tmp and /dev/shm and copies the program into /tmp/work (owned by the sandbox uid),
2. remounts every other file system read-only (the host's mounts are untouched: propagation is private),
3. forks the program: resource limits, no supplementary groups, the sandbox uid/gid, no_new_privs, stripped
   environment, `python -I`, cwd /tmp/work,
4. reaps children until the program ends, writes "exit N" or "signal N" to the status descriptor, and exits,
   which makes the kernel kill every process left in the PID namespace (a setsid() grandchild included).
Steps the kernel refuses are listed in the status line as "lost: ..." so the caller can say what is missing.
"""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC = 1, 2, 4, 32, 4096, 8192, 16384
PR_SET_NO_NEW_PRIVS = 38
WRITABLE = ("/proc", "/tmp", "/dev/shm", "/dev/pts", "/dev/mqueue")

libc = ctypes.CDLL(None, use_errno=True)


def mount(source, target, fstype, flags, data=None) -> str | None:
    enc = [x.encode() if isinstance(x, str) else x for x in (source, target, fstype, data)]
    if libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:
        return f"mount {target}: {os.strerror(ctypes.get_errno())}"
    return None


def expose(path: str, keep: str) -> list[str]:
    """Make `path` reachable for the sandbox uid without opening its private ancestors.

    An interpreter under /root (pyenv, conda) sits below a directory only root may enter. Each such ancestor A is
    covered with an empty tmpfs, and only the child on the way to `path` is bound back into it, so the program can
    run Python but sees nothing else of A.
    """
    failed = []
    parts = [p for p in os.path.realpath(path).split("/") if p]
    current = "/"
    for part in parts:
        child = os.path.join(current, part)
        if os.stat(current).st_mode & 0o001 == 0:
            hold = os.path.join(keep, str(len(os.listdir(keep))))
            os.mkdir(hold)
            err = (
                mount(child, hold, None, MS_BIND | MS_REC)
                or mount("tmpfs", current, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            )
            if err:
                failed.append(err)
                break
            if not os.path.isdir(child):
                os.mkdir(child)
            err = mount(hold, child, None, MS_MOVE)
            if err:
                failed.append(err)
                break
        current = child
    return failed


def read_only_everywhere() -> list[str]:
    """Remount every mount point except the private writable ones read-only; return what failed."""
    with open("/proc/self/mounts") as f:
        points = sorted({line.split()[1].replace("\\040", " ") for line in f}, key=len)
    failed = []
    for point in points:
        if any(point == w or point.startswith(w + "/") for w in WRITABLE):
            continue
        err = mount("none", point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
        if err:
            failed.append(err)
    return failed


def main() -> None:
    spec = json.loads(sys.argv[1])
    status_fd = spec["status_fd"]
    lost = []
    # Read before /tmp is replaced: the caller's directory is usually under the host's /tmp.
    with open(os.path.join(spec["host_dir"], "prog.py"), "rb") as f:
        source = f.read()
    for target, size in (("/tmp", spec["tmp_mb"]), ("/dev/shm", 1)):
        err = mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode=1777")
        if err:
            lost.append(err)
    keep = "/tmp/.expose"
    os.mkdir(keep, 0o700)
    for path in spec["expose"]:
        lost += expose(path, keep)
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    with open(os.path.join(work, "prog.py"), "wb") as f:
        f.write(source)
    drop = spec["uid"] is not None
    if drop:
        os.chown(work, spec["uid"], spec["gid"])
        os.chown(os.path.join(work, "prog.py"), spec["uid"], spec["gid"])
    lost += read_only_everywhere()

    pid = os.fork()
    if pid == 0:
        try:
            os.close(status_fd)
            os.chdir(work)
            for name, value in spec["rlimits"].items():
                resource.setrlimit(getattr(resource, name), (value[0], value[1]))
            if drop:
                os.setgroups([])
                os.setresgid(spec["gid"], spec["gid"], spec["gid"])
                os.setresuid(spec["uid"], spec["uid"], spec["uid"])
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            os.execve(spec["python"], [spec["python"], "-I", "prog.py"], spec["env"])
        finally:
            os._exit(126)

    status = None
    while status is None:
        try:
            done, code = os.wait()
        except ChildProcessError:
            break
        if done == pid:
            status = f"signal {os.WTERMSIG(code)}" if os.WIFSIGNALED(code) else f"exit {os.WEXITSTATUS(code)}"
    report = {"status": status or "exit 126", "lost": lost}
    os.write(status_fd, json.dumps(report).encode())
    os._exit(0)


if __name__ == "__main__":
    main()
