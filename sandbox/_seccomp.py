"""The seccomp filter of a sandboxed job (stdlib plus `pyseccomp`, loaded by the zygote from a file path).

Built once per zygote with libseccomp (through the `pyseccomp` binding) and exported as raw BPF; each job's child gets
it in two layers, so that no job pays for libseccomp's compilation nor for the kernel's preparation of the whole
filter: the zygote installs all of it but `unshare` (it enters a fresh IPC namespace for every job), and each child
inherits that and installs a small filter denying `unshare` itself
(`prctl(PR_SET_SECCOMP)` after `PR_SET_NO_NEW_PRIVS`). Default action: allow. Denied with EPERM: the system calls no
solution needs and that widen what a process can reach or observe (namespaces, mounts, tracing, kernel keyrings, BPF,
perf, kernel modules, io_uring, changing its own scheduling class or priority so that it starves for CPU, clock and
host settings); `clone` with any namespace flag; `clone3` answers ENOSYS, so that libc falls back to `clone`, whose
flags the filter can see. A syscall from another ABI (for example i386 on x86_64) kills the process (libseccomp's
default for a foreign architecture).

Shared kernel objects that could carry data between concurrent jobs (every job binds the same read-only inodes of
the standard library): file locks are denied (`flock`, and `fcntl` record, open-file-description and lease
commands: EPERM), as are file-change notifications (`inotify_*`, `fcntl(F_NOTIFY)`, `fanotify_init`), page
cache residency queries (`mincore`, `cachestat`, `preadv2`/`pwritev2` with `RWF_NOWAIT`) and futexes that are not
process-private (`futex` wake and requeue commands without `FUTEX_PRIVATE_FLAG` answer EPERM, shared waits answer
EAGAIN at once, so no job ever sleeps on a shared key that a wake of another job, or the kernel's clear-tid wake at
a thread's exit, could reach; `futex_wake`, `futex_requeue`, `futex_wait` and `futex_waitv` are denied): a shared
futex on a page of a shared file is keyed by its inode, so it would reach other jobs. Argument checks compare the
width the kernel reads (`fcntl`'s command as 32 bits), so a value with high bits set cannot slip past them.
`sqlite3` in memory needs no lock and works; a database file in the job's `/tmp` cannot be locked, so sqlite
reports an error on it (the `unix-none` VFS, `sqlite3.connect("file:x.db?vfs=unix-none", uri=True)`, works).

Socket families are an allow-list: `socket` and `socketpair` succeed for `AF_UNIX`, `AF_INET` and `AF_INET6` only
(what the empty network namespace has), any other family answers EAFNOSUPPORT (so netlink, packet and vsock
sockets are refused).

Not covered: names that the installed libseccomp does not know are skipped (`skipped` lists them); apart from the
socket families the filter is a deny list, not an allow list, so a system call added to the kernel later is
allowed; channels through shared resources and global counters are not closed (CPU contention, page cache timing,
free memory, the load average, inode numbers of pipes and sockets, which the kernel numbers machine-wide).
"""

from __future__ import annotations

import ctypes
import errno
import os

DENIED = (
    # namespaces and mounts
    "unshare setns mount umount2 pivot_root chroot mount_setattr move_mount open_tree fsopen fsconfig fsmount fspick"
    # tracing and other processes' memory
    " ptrace process_vm_readv process_vm_writev kcmp pidfd_getfd"
    # kernel facilities no solution needs
    " bpf perf_event_open keyctl add_key request_key userfaultfd io_uring_setup io_uring_enter io_uring_register"
    " fanotify_init name_to_handle_at open_by_handle_at lookup_dcookie"
    # scheduling: a job may not lower its own priority (it would stretch the wall-clock backstop under load)
    " sched_setscheduler sched_setparam sched_setattr setpriority"
    # host administration
    " kexec_load kexec_file_load init_module finit_module delete_module reboot swapon swapoff acct quotactl"
    " syslog settimeofday clock_settime clock_adjtime adjtimex sethostname setdomainname iopl ioperm vhangup"
    " nfsservctl uselib"
    # shared kernel objects that could carry data between jobs: locks, change notifications, page cache residency
    " flock inotify_init inotify_init1 inotify_add_watch mincore cachestat futex_wake futex_requeue futex_waitv"
    " futex_wait"
).split()
# futex commands that wake or requeue waiters: refused unless FUTEX_PRIVATE_FLAG (128) is set, so that no job wakes a
# waiter of another job on a page of a shared file (a shared futex key is the file's inode and offset).
SHARED_FUTEX_WAKERS = (1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13)
# Shared waits (FUTEX_WAIT, FUTEX_WAIT_BITSET without FUTEX_PRIVATE_FLAG) answer EAGAIN at once: no job ever sleeps
# on a shared key, so the wakes the kernel itself makes (a thread's clear-tid address, which a job can point at a
# page of a shared file) reach nobody. EAGAIN is what a wait answers when the futex word has changed, so libc
# callers retry: glibc's pthread_join then spins until the thread has gone instead of sleeping (CPython before 3.13
# never joins a thread through it; from 3.13 a join costs CPU time while it waits).
SHARED_FUTEX_WAITS = (0, 9)
_FUTEX_CMD_AND_PRIVATE = 0x7F | 128
# fcntl commands: F_GETLK F_SETLK F_SETLKW, F_OFD_GETLK F_OFD_SETLK F_OFD_SETLKW, F_SETLEASE F_GETLEASE F_NOTIFY
DENIED_FCNTL = (5, 6, 7, 36, 37, 38, 1024, 1025, 1026)
SOCKET_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6: every other family is refused
_RWF_NOWAIT = 0x8
_LOW32 = 0xFFFFFFFF
ZYGOTE_NEEDS = ("unshare",)  # per job: a fresh IPC namespace
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


def build_bpf(pyseccomp, leave: tuple[str, ...] = ()) -> tuple[bytes, list[str]]:
    """The filter as raw BPF bytes (struct sock_filter[]), and the denied names this libseccomp did not know.
    `leave`: denied names left out (the zygote's layer: see `build_job_bpf`)."""
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    eperm = pyseccomp.ERRNO(errno.EPERM)
    skipped = _deny(pyseccomp, filt, [name for name in DENIED if name not in leave])
    for flag in NAMESPACE_FLAGS:
        filt.add_rule(eperm, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    for cmd in SHARED_FUTEX_WAKERS:
        filt.add_rule(eperm, "futex", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _FUTEX_CMD_AND_PRIVATE, cmd))
    for cmd in SHARED_FUTEX_WAITS:
        filt.add_rule(
            pyseccomp.ERRNO(errno.EAGAIN), "futex", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _FUTEX_CMD_AND_PRIVATE, cmd)
        )
    for cmd in DENIED_FCNTL:  # the kernel reads `cmd` as a 32-bit unsigned int: compare the low 32 bits only
        filt.add_rule(eperm, "fcntl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _LOW32, cmd))
    for call in ("preadv2", "pwritev2"):
        filt.add_rule(eperm, call, pyseccomp.Arg(5, pyseccomp.MASKED_EQ, _RWF_NOWAIT, _RWF_NOWAIT))
    _socket_allow_list(pyseccomp, filt)
    if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "clone3") >= 0:
        filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    return _export(filt), skipped


def build_job_bpf(pyseccomp, names: tuple[str, ...] = ZYGOTE_NEEDS) -> bytes:
    """A small filter denying only `names`: installed by each job's child on top of the zygote's filter (which
    leaves them out), so a job gets the whole filter while no job pays for installing all of it (the kernel
    prepares every filter it installs, in proportion to its size)."""
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    _deny(pyseccomp, filt, list(names))
    return _export(filt)


def _deny(pyseccomp, filt, names: list[str]) -> list[str]:
    skipped = []
    for name in names:
        nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
        if nr < 0:
            skipped.append(name)
            continue
        filt.add_rule(pyseccomp.ERRNO(errno.EPERM), nr)
    return skipped


def _export(filt) -> bytes:
    fd = os.memfd_create("seccomp-bpf")
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            filt.export_bpf(f)
        size = os.lseek(fd, 0, os.SEEK_END)
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if not data or len(data) % 8:
        raise OSError(f"libseccomp exported {len(data)} bytes of BPF (expected a multiple of 8)")
    return data


def _socket_allow_list(pyseccomp, filt) -> None:
    """`socket` and `socketpair` answer EAFNOSUPPORT for every family but SOCKET_FAMILIES (compared as 64-bit
    values: a family with any high bit set is refused too)."""
    refuse = pyseccomp.ERRNO(errno.EAFNOSUPPORT)
    top = max(SOCKET_FAMILIES)
    for call in ("socket", "socketpair"):
        filt.add_rule(refuse, call, pyseccomp.Arg(0, pyseccomp.GT, top))
        for family in range(top):
            if family not in SOCKET_FAMILIES:
                filt.add_rule(refuse, call, pyseccomp.Arg(0, pyseccomp.EQ, family))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Installer:
    """Holds the BPF program in memory the forked children inherit; `install()` applies it to the caller."""

    def __init__(self, bpf: bytes) -> None:
        self._buf = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // 8, ctypes.addressof(self._buf))
        self._prog_ref = ctypes.addressof(self._prog)
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        self._prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
        self._prctl.restype = ctypes.c_int

    def install(self) -> None:
        if self._prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if self._prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, self._prog_ref, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
