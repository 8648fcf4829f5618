"""The fork server ("zygote") of `sandbox.executor`: stdlib only, run as `python -I -S _zygote.py FD SITE_DIRS`.

FD is one end of a Unix socket pair. The zygote sets up its isolation once: a pids cgroup (v1) it joins, so its
children start in it; a network and a mount namespace with a private tmpfs `/tmp` and `/dev/shm`, the
interpreter's prefix made reachable for the unprivileged job uid under an otherwise empty tmpfs (e.g. over a 0700
`/root`), and a read-only `/`; it degrades explicitly when the OS refuses (a user namespace without root, else
nothing) and reports the protections in force. It pre-imports the modules the reference setup code uses and
freezes the GC (measured: fewer copy-on-write faults per child). Then it serves one job at a time: it receives the
job (JSON) with three pipe write ends (stdout, stderr, value channel) by SCM_RIGHTS, forks a child (see
`_harness.py`), enforces the wall-clock timeout, kills everything of the job (SIGKILL to the process group, then
`kill(-1)` as the job uid when anything is left in the cgroup), reaps it (it is the subreaper), removes the
working directory and reports the exit status. It exits when the parent closes the socket.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import child_main, send_frame  # noqa: E402

sys.path.pop(0)

CGROUP: str | None = None  # this zygote's pids cgroup, set by serve()
SITE_DIRS: list[str] = []  # the parent's site-packages directories (we run with -S), set by serve()
UID_BASE = 1_000_000  # job uid = UID_BASE + zygote pid: unique among live zygotes, no passwd entry needed
_CLONE_NEWNS, _CLONE_NEWNET, _CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
_PR_SET_CHILD_SUBREAPER = 36
_PREIMPORT = "random functools collections string math datetime typing itertools heapq bisect operator re json copy"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        c = sock.recv(min(n - got, 1 << 20))
        if not c:
            raise EOFError
        chunks.append(c)
        got += len(c)
    return b"".join(chunks)


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, src: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    def enc(s):
        return (s.encode() if s is not None else None)
    if libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target} failed")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _blocking_ancestor(path: str) -> str | None:
    """The top-most directory above `path` that others cannot traverse (mode without o+x), if any."""
    parts = os.path.abspath(path).split("/")[1:]
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _expose(libc, paths: list[str]) -> None:
    """Make `paths` reachable by the job uid without exposing their siblings: each blocking ancestor (e.g. a 0700
    /root holding a pyenv interpreter) is covered by an empty tmpfs into which only `paths` are bind-mounted."""
    by_top: dict[str, list[str]] = {}
    for p in paths:
        top = _blocking_ancestor(p)
        if top is not None:
            by_top.setdefault(top, []).append(os.path.abspath(p))
    for n, (top, subs) in enumerate(by_top.items()):
        stage = f"/tmp/.stage{n}"
        os.mkdir(stage, 0o700)
        _mount(libc, top, stage, None, _MS_BIND | _MS_REC, None)
        _mount(libc, "tmpfs", top, "tmpfs", 0, "mode=0711,size=1m")
        for sub in subs:
            rel = os.path.relpath(sub, top)
            cur = top
            for part in rel.split("/"):
                cur = os.path.join(cur, part)
                if not os.path.isdir(cur):
                    os.mkdir(cur, 0o711)
            _mount(libc, os.path.join(stage, rel), cur, None, _MS_BIND | _MS_REC, None)
            _mount(libc, "none", cur, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None)
        _mount(libc, "none", top, None, _MS_REMOUNT | _MS_RDONLY, "mode=0711,size=1m")
        if libc.umount2(stage.encode(), 2) != 0:  # MNT_DETACH
            raise OSError(ctypes.get_errno(), f"umount {stage} failed")
        os.rmdir(stage)


def _uid_can_import(uid: int) -> bool:
    """Probe: can the job uid read the interpreter's stdlib and site-packages?"""
    probes = [os.__file__, json.__file__] + [p for p in SITE_DIRS if os.path.isdir(p)]
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            ok = all(os.access(p, os.R_OK) for p in probes)
        finally:
            os._exit(0 if ok else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


_CG_ROOT = "/sys/fs/cgroup/pids/routed_grpo_sandbox"


def _setup_pids_cgroup() -> str | None:
    """A pids cgroup for this zygote's jobs (cgroup v1), or None. Removes stale ones of dead zygotes."""
    try:
        os.makedirs(_CG_ROOT, exist_ok=True)
        for name in os.listdir(_CG_ROOT):
            if name.startswith("z") and name[1:].isdigit() and not os.path.exists("/proc/" + name[1:]):
                try:
                    os.rmdir(os.path.join(_CG_ROOT, name))
                except OSError:
                    pass
        cg = os.path.join(_CG_ROOT, f"z{os.getpid()}")
        os.makedirs(cg, exist_ok=True)
        _write(os.path.join(cg, "cgroup.procs"), str(os.getpid()))  # children inherit it: no per-job migration
        return cg
    except OSError:
        return None


_PIDS_MAX: list[int] = []


def _set_pids_max(n: int) -> None:
    if _PIDS_MAX != [n]:
        _write(os.path.join(CGROUP, "pids.max"), str(n))
        _PIDS_MAX[:] = [n]


def _cg_count(cg: str) -> int:
    with open(os.path.join(cg, "pids.current")) as f:
        return int(f.read())


def setup_isolation() -> tuple[list[str], int | None]:
    """Namespaces once for the zygote (inherited by every child). Returns (protections, job uid or None)."""
    prot = ["process_group", "rlimits", "scrubbed_env", "fresh_workdir", "stdin_closed", "output_cap"]
    libc = _libc()
    root = os.geteuid() == 0
    euid, egid = os.geteuid(), os.getegid()
    flags = _CLONE_NEWNS | _CLONE_NEWNET | (0 if root else _CLONE_NEWUSER)
    if libc.unshare(flags) == 0:
        if not root:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {euid} 1")
            _write("/proc/self/gid_map", f"0 {egid} 1")
            prot.append("userns")
        prot.append("netns")
        try:
            _mount(libc, "none", "/", None, _MS_REC | _MS_PRIVATE, None)
            _mount(libc, "tmpfs", "/tmp", "tmpfs", 0, "mode=0755,size=1g")
            if os.path.isdir("/dev/shm"):
                _mount(libc, "tmpfs", "/dev/shm", "tmpfs", 0, "mode=0755,size=64m")
            prot.append("mountns_private_tmp")
            if root:
                _expose(libc, [sys.base_prefix, sys.prefix, sys.exec_prefix] + SITE_DIRS)
            _mount(libc, "/", "/", None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None)
            prot.append("readonly_root")
        except OSError as e:
            prot.append(f"mount_degraded:{e.strerror}")
    else:
        prot.append(f"no_namespaces:{os.strerror(ctypes.get_errno())}")
    uid = UID_BASE + os.getpid() if root else None
    if uid is not None and not _uid_can_import(uid):
        uid = None
        prot.append("no_uid_drop:interpreter_unreadable_by_unprivileged_uid")
    else:
        prot.append("uid_drop" if uid is not None else "no_uid_drop:not_root")
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
        prot.append("subreaper")
    return prot, uid


def _kill_all(pid: int, uid: int | None) -> None:
    """SIGKILL the job's process group and, as the job uid, every process of that uid (covers setsid escapes)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    if uid is not None:
        reaper = os.fork()
        if reaper == 0:
            try:
                os.setuid(uid)
                for _ in range(3):
                    try:
                        os.kill(-1, signal.SIGKILL)
                    except ProcessLookupError:
                        break
            finally:
                os._exit(0)
        os.waitpid(reaper, 0)
    else:  # degraded: orphans re-parent to us (subreaper); kill our remaining children
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    if ppid == os.getpid():
                        os.kill(int(entry), signal.SIGKILL)
                except (OSError, ValueError, IndexError):
                    pass


def _reap_all(grace_s: float = 2.0) -> bool:
    """Reap every descendant (we are their subreaper). False if some are still alive after `grace_s`."""
    end = time.monotonic() + grace_s
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                if time.monotonic() > end:
                    return False
                time.sleep(0.0005)
        except ChildProcessError:
            return True


def _wait_child(pid: int, deadline: float, sock: socket.socket) -> tuple[int, bool, bool]:
    """Wait for the child until the deadline. Returns (wait status, timed out, parent gone)."""
    pfd = os.pidfd_open(pid)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return -1, True, False
            ready, _, _ = select.select([pfd, sock], [], [], left)
            if pfd in ready:
                return os.waitpid(pid, 0)[1], False, False
            if sock in ready:
                return -1, False, True
    finally:
        os.close(pfd)


def _read_files(workdir: str, names: list[str], cap: int = 1 << 20) -> dict[str, str]:
    out = {}
    for name in names:
        if os.path.isabs(name) or ".." in name.split("/"):
            continue
        try:
            fd = os.open(os.path.join(workdir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_mode & 0o170000 == 0o100000:
                out[name] = os.read(fd, cap).decode("utf-8", "replace")
        finally:
            os.close(fd)
    return out


def handle(sock: socket.socket, job: dict, fds: list[int], uid: int | None) -> bool:
    """One job. Returns False when the parent has gone."""
    workdir = tempfile.mkdtemp(prefix="job-")
    if uid is not None:
        os.chown(workdir, uid, uid)
    if CGROUP is not None:
        _set_pids_max(job["limits"]["max_procs"] + 2)  # + zygote and reaper
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        sock.close()
        child_main(job, fds, workdir, uid)
        os.kill(os.getpid(), signal.SIGKILL)  # only reached if the program defeated the exit above
    for fd in fds:
        os.close(fd)
    status, timed_out, gone = _wait_child(pid, t0 + job["limits"]["timeout_s"], sock)
    seconds = time.monotonic() - t0
    if status == -1 or CGROUP is None or _cg_count(CGROUP) > 1:  # 1: the zygote itself
        _kill_all(pid, uid)
    if status == -1:
        status = os.waitpid(pid, 0)[1]
    all_gone = _reap_all()
    files = _read_files(workdir, job["files"])
    shutil.rmtree(workdir, ignore_errors=True)
    if gone:
        return False
    code = os.waitstatus_to_exitcode(status)
    send_frame(sock, {"k": "done", "exit": code, "timed_out": timed_out, "seconds": seconds, "files": files,
                      "leftover_processes": not all_gone})
    return True


def serve(sock_fd: int, site_dirs: list[str]) -> None:
    global CGROUP
    SITE_DIRS[:] = site_dirs
    sock = socket.socket(fileno=sock_fd)
    try:
        CGROUP = _setup_pids_cgroup() if os.geteuid() == 0 else None
        prot, uid = setup_isolation()
        if CGROUP is not None:
            prot.append("cgroup_pids")
    except Exception as e:  # noqa: BLE001
        send_frame(sock, {"k": "hello", "error": repr(e)})
        return
    sys.path.extend(p for p in SITE_DIRS if os.path.isdir(p) and p not in sys.path)
    for name in _PREIMPORT.split():
        __import__(name)
    gc.collect()
    gc.freeze()  # children never scan (and so never copy-on-write) the zygote's objects in their collections
    os.chdir("/")
    send_frame(sock, {"k": "hello", "protections": prot})
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 4, 3)
            if len(msg) < 4:
                break
            job = json.loads(_recv_exact(sock, struct.unpack("!I", msg)[0]))
        except (EOFError, OSError):
            break
        if len(fds) != 3:
            send_frame(sock, {"k": "done", "error": f"expected 3 fds, got {len(fds)}"})
            for fd in fds:
                os.close(fd)
            continue
        try:
            if not handle(sock, job, fds, uid):
                break
        except Exception as e:  # noqa: BLE001 - infrastructure failure: reported, never a verdict
            send_frame(sock, {"k": "done", "error": f"zygote: {e!r}"})
    if CGROUP is not None:  # leave our cgroup so that it can be removed
        try:
            _write(os.path.join(os.path.dirname(CGROUP), "cgroup.procs"), str(os.getpid()))
            os.rmdir(CGROUP)
        except OSError:
            pass


if __name__ == "__main__":
    serve(int(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else [])
