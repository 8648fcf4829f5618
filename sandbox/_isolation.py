"""Kernel interfaces of the sandbox's strict level, set up once per fork server ("zygote"); stdlib only.

Covered here (used by `_zygote.py` once per zygote, and by `_harness.py` in each job's child):
- namespaces: mount, network, IPC and UTS (plus a user namespace mapping the caller's uid to 0 when not root);
  a PID namespace whose init (`run_init`) reaps orphans, so a job's processes see only that init and each other;
- the minimal root (`build_root`): an empty tmpfs holding read-only bind mounts of only the standard library (its
  `site-packages` masked by an empty tmpfs), the interpreter, each file the zygote has mapped, the system library
  directories (`/lib/<triplet>`, `/usr/lib/<triplet>`, `/lib64`, `/usr/lib64`, whole) and `/etc/ld.so.cache`, a few
  `/dev` nodes, the PID namespace's own `/proc` and a fresh tmpfs `/tmp`; then `pivot_root` into it and detach the
  old root. Each bind is non-recursive, so nothing mounted below a bound path comes along, and each is remounted
  read-only. Parent directories are recreated (mode 0755), so an interpreter under a 0700 directory, or under a
  `/tmp` that the new root replaces, is reachable by the job's uid. Sources are opened (O_PATH) before anything is
  mounted over them.
- capabilities: `drop_capabilities` empties the bounding, ambient, effective, permitted and inheritable sets.

Not covered: site-packages are not in the root (the setup code of the reference problems imports only the
standard library); a program that starts another interpreter finds it (it is bound) but not the virtual
environment. The root depends on `pivot_root`, whose syscall number is known here for x86_64 and aarch64 only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
_ST_TO_MS = ((1024, 1024), (2048, 2048), (4096, 1 << 21), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC))
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT = 1, 4, 24, 47
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
STAGE = "/tmp"  # where the new root is assembled (a tmpfs mounted over the private namespace's /tmp)

LIBC = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src: str | None, target: str | None, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s):
        return s.encode() if s is not None else None

    _check(LIBC.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def prctl(option: int, arg: int = 0) -> None:
    _check(
        LIBC.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
        f"prctl({option})",
    )


# ------------------------------------------------------------------------------------------ namespaces
def enter_namespaces(root_user: bool) -> None:
    """Mount, network, IPC and UTS namespaces (and, without root, a user namespace where we are uid 0)."""
    euid, egid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | (0 if root_user else CLONE_NEWUSER)
    _check(LIBC.unshare(flags), f"unshare({'' if root_user else 'user/'}mount/net/ipc/uts namespaces)")
    if not root_user:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {euid} 1"), ("gid_map", f"0 {egid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    _check(LIBC.sethostname(b"sandbox", 7), "sethostname")


def new_pid_namespace_for_children() -> None:
    _check(LIBC.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")


def run_init(ready_w: int, proc_target: str, install_seccomp) -> None:
    """PID 1 of the jobs' PID namespace: mount its /proc, report on `ready_w`, then reap orphans forever.

    It ignores every signal it can (a namespace's init gets no signal it has no handler for from inside), dies with
    the zygote (PDEATHSIG), is not dumpable, and holds no capability and has the seccomp filter once /proc is
    mounted."""
    try:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        mount("proc", proc_target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        prctl(_PR_SET_DUMPABLE, 0)
        drop_capabilities()
        install_seccomp()
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.write(ready_w, b"ok")
    except BaseException as e:  # noqa: BLE001 - reported to the zygote, which refuses to serve
        os.write(ready_w, f"init: {e}".encode()[:500])
        os._exit(1)
    os.closerange(3, 1 << 16)
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (OSError, ValueError):
                pass
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            signal.sigwait({signal.SIGCHLD})
        except OSError:
            pass


def drop_capabilities() -> None:
    """Empty the bounding and ambient sets, then the effective, permitted and inheritable sets."""
    last = 63
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        pass
    for cap in range(last + 1):
        LIBC.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    LIBC.prctl(_PR_CAP_AMBIENT, ctypes.c_ulong(4), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()
    _check(LIBC.capset(header, data), "capset")


# ------------------------------------------------------------------------------------------ the root
class RootPlan:
    """What the new root holds: paths to bind (directory or file), symlinks to recreate, paths to mask. Sources are
    opened (O_PATH) by `open_sources`, inside the new mount namespace (a bind source must belong to it) and before
    anything is mounted over them."""

    def __init__(self) -> None:
        self.binds: dict[str, bool] = {}  # real path -> is a directory
        self.devices: list[str] = []
        self.symlinks: dict[str, str] = {}
        self.masks: list[str] = []
        self.fds: dict[str, int] = {}

    def add(self, path: str) -> None:
        real = self._mirror(os.path.abspath(path), 0)
        if real in self.binds or any(real.startswith(d.rstrip("/") + "/") for d, isdir in self.binds.items() if isdir):
            return
        self.binds[real] = os.path.isdir(real)

    def add_device(self, path: str) -> None:
        if os.path.exists(path):
            self.devices.append(path)

    def _mirror(self, path: str, depth: int) -> str:
        """Record the symlinks along `path` (recreated in the new root) and return the path they resolve to."""
        if depth > 40:
            raise OSError(f"too many symbolic links resolving {path}")
        parts = path.split("/")[1:]
        for i in range(len(parts)):
            cur = "/" + "/".join(parts[: i + 1])
            if os.path.islink(cur):
                target = os.readlink(cur)
                self.symlinks.setdefault(cur, target)
                resolved = os.path.normpath(os.path.join(os.path.dirname(cur), target))
                return self._mirror(os.path.join(resolved, *parts[i + 1 :]), depth + 1)
        return path

    def open_sources(self) -> None:
        for path in [*self.binds, *self.devices]:
            self.fds[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def plan_root(preloaded_maps: str) -> RootPlan:
    """The standard library on `sys.path` (the zygote runs with -I -S), the interpreter, every shared object the
    zygote has mapped, the system library directories libc searches, the loader's cache and a few devices."""
    plan = RootPlan()
    for entry in sys.path:
        if entry and os.path.exists(entry):
            plan.add(entry)
            for sub in ("site-packages", "dist-packages"):
                if os.path.isdir(os.path.join(entry, sub)):
                    plan.masks.append(os.path.realpath(os.path.join(entry, sub)))
    multiarch = getattr(sys.implementation, "_multiarch", None) or f"{os.uname().machine}-linux-gnu"
    for d in (f"/lib/{multiarch}", f"/usr/lib/{multiarch}", "/lib64", "/usr/lib64"):
        if os.path.isdir(d):
            plan.add(d)
    exe = getattr(sys, "_base_executable", None) or sys.executable
    for path in [exe, "/etc/ld.so.cache"] + mapped_files(preloaded_maps):
        if os.path.isfile(path):
            plan.add(path)
    for dev in DEVICES:
        plan.add_device(dev)
    return plan


def mapped_files(maps_text: str) -> list[str]:
    out = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].endswith("(deleted)"):
            out.append(fields[5])
    return sorted(set(out))


def _locked_flags(path_fd: int) -> int:
    """Mount flags of the source's mount that a bind remount must keep (a user namespace may not clear them)."""
    st = os.statvfs(f"/proc/self/fd/{path_fd}").f_flag
    return sum(ms for st_bit, ms in _ST_TO_MS if st & st_bit)


def _make_mountpoint(path: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(path, 0o755, exist_ok=True)
        return
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def build_root(plan: RootPlan) -> None:
    """Assemble the new root at STAGE (a fresh tmpfs): binds, masks, devices, symlinks, mount points."""
    plan.open_sources()
    mount("tmpfs", STAGE, "tmpfs", MS_NOSUID, "mode=0755,size=4m")
    os.chmod(STAGE, 0o755)
    for link, target in sorted(plan.symlinks.items()):
        os.makedirs(STAGE + os.path.dirname(link), 0o755, exist_ok=True)
        if not os.path.lexists(STAGE + link):
            os.symlink(target, STAGE + link)
    for real, is_dir in sorted(plan.binds.items()):
        target, fd = STAGE + real, plan.fds[real]
        _make_mountpoint(target, is_dir)
        mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(fd))
    for masked in plan.masks:
        mount("tmpfs", STAGE + masked, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
    for dev in plan.devices:
        _make_mountpoint(STAGE + dev, False)
        mount(f"/proc/self/fd/{plan.fds[dev]}", STAGE + dev, None, MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{STAGE}/dev/{name}")
    for d in ("proc", "tmp", ".oldroot"):
        os.makedirs(f"{STAGE}/{d}", 0o755, exist_ok=True)


def pivot_into_root() -> None:
    """pivot_root into STAGE, detach the old root, make the root read-only and mount a fresh tmpfs on /tmp."""
    nr = _PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(f"pivot_root: syscall number unknown for {os.uname().machine}")
    _check(LIBC.syscall(ctypes.c_long(nr), STAGE.encode(), f"{STAGE}/.oldroot".encode()), "pivot_root")
    os.chdir("/")
    _check(LIBC.umount2(b"/.oldroot", 2), "umount2(/.oldroot)")  # MNT_DETACH
    os.rmdir("/.oldroot")
    mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=2g")
