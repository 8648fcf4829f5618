"""Ending a job in the zygote (stdlib only; used by `_zygote.py`): killing what is left of it, emptying its `/tmp`
(strict) or removing its working directory (`rlimits-only`), removing its IPC objects and entering a fresh IPC
namespace.

Nothing here walks a tree the job made with Python recursion: `remove_tree` goes depth-first through directory fds,
one open at a time, keeping only a list of names, so neither Python's stack nor PATH_MAX limits how deep a tree can
be. (A fresh tmpfs per job, unmounted after it, walks nothing either, but each unmount waits for an RCU grace
period: it cost about 3 ms per job here, more than the whole rest of a short job's overhead.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

_CLONE_NEWIPC, _IPC_RMID = 0x08000000, 0
_LIBC = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# ---------------------------------------------------------------------------------------- strict level
def clear_ipc() -> None:
    """Remove every System V IPC object of this IPC namespace (their memory is freed now, not when the namespace is
    torn down later), then enter a fresh IPC namespace for the next job (which also drops POSIX message queues,
    which no file lists, and anything a removal missed: a failed removal is no error)."""
    for kind, rm in (("shm", _shm_rm), ("sem", _sem_rm), ("msg", _msg_rm)):
        with open(f"/proc/sysvipc/{kind}") as f:
            ids = [int(line.split()[1]) for line in f.read().splitlines()[1:] if line.strip()]
        for ident in ids:
            rm(ident)
    _check(_LIBC.unshare(_CLONE_NEWIPC), "unshare(CLONE_NEWIPC)")


def _shm_rm(ident: int) -> int:
    return _LIBC.shmctl(ident, _IPC_RMID, None)


def _sem_rm(ident: int) -> int:
    return _LIBC.semctl(ident, 0, _IPC_RMID)


def _msg_rm(ident: int) -> int:
    return _LIBC.msgctl(ident, _IPC_RMID, None)


# ---------------------------------------------------------------------------------------------- killing
def kill_rest(strict: bool, others, cgroup_tasks, main: int) -> bool:
    """Kill every process of the job but init; True when none is left (they are reaped by init or by us).
    `others()` lists the job's other pids (strict), `cgroup_tasks()` counts them (None without a cgroup)."""
    if strict:
        if (cgroup_tasks() == 0) if cgroup_tasks is not None else not others():
            return True
        reaper = fork_retrying()  # into the PID namespace: kill(-1) there reaches the job's processes only
        if reaper is None:
            return False
        if reaper == 0:
            try:
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(reaper, 0)
        end = time.monotonic() + 2.0
        while others():
            if time.monotonic() > end:
                return False
            time.sleep(0.001)
        return True
    try:
        os.killpg(main, signal.SIGKILL)
    except OSError:
        pass
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True  # no orphan came back to us (we are their subreaper)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and ppid(entry) == os.getpid():
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
    end = time.monotonic() + 2.0
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                if time.monotonic() > end:
                    return False
                time.sleep(0.0005)
        except ChildProcessError:
            return True


def fork_retrying(tries: int = 50) -> int | None:
    """os.fork(), retried while the job's processes hold every pid its cgroup allows; None if it never succeeds."""
    for _ in range(tries):
        try:
            return os.fork()
        except BlockingIOError:
            time.sleep(0.002)
    return None


def ppid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# -------------------------------------------------------------------------------------- removing a tree
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int) -> int | None:
    for attempt in range(2):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except PermissionError:
            if attempt == 0:
                try:
                    os.chmod(name, 0o700, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    return None
        except OSError:
            return None
    return None


def _clear_entries(fd: int, skip: set) -> str | None:
    """Unlink everything but directories in the directory `fd`; the name of one subdirectory left, or None."""
    sub = None
    with os.scandir(fd) as it:
        for entry in it:
            try:
                if entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) not in skip:
                        sub = entry.name
                else:
                    os.unlink(entry.name, dir_fd=fd)
            except OSError:
                pass
    return sub


def remove_tree(path: str, keep: bool = False) -> None:
    """Remove the directory `path` (with `keep`, only what is in it) and everything in it, best effort, without
    recursion: depth-first through directory fds (one open at a time), so neither Python's stack nor PATH_MAX limits
    how deep a tree can be."""
    try:
        cur = os.open(path, _DIR_FLAGS)
    except OSError:
        return
    names: list[str] = []
    skip: set = set()  # directories that could not be removed: never entered again
    try:
        while True:
            sub = _clear_entries(cur, skip)
            if sub is not None:
                nxt = _open_dir(sub, cur)
                if nxt is not None:
                    os.close(cur)
                    cur = nxt
                    names.append(sub)
                    continue
                st = os.stat(sub, dir_fd=cur, follow_symlinks=False)
                skip.add((st.st_dev, st.st_ino))
                continue
            if not names:
                break
            up = os.open("..", _DIR_FLAGS & ~os.O_NOFOLLOW, dir_fd=cur)
            os.close(cur)
            cur = up
            name = names.pop()
            try:
                os.rmdir(name, dir_fd=cur)
            except OSError:
                st = os.stat(name, dir_fd=cur, follow_symlinks=False)
                skip.add((st.st_dev, st.st_ino))
    finally:
        os.close(cur)
    if not keep:
        try:
            os.rmdir(path)
        except OSError:
            pass
