"""The job cgroup of the sandbox's strict level as root (stdlib only; used by `_setup.py` and `_zygote.py`).

One cgroup per zygote with the memory, pids and (where mounted) cpuacct controllers (cgroup v1 hierarchies, or v2
where its controllers can be enabled), created below the cgroup the zygote was started in (read from
`/proc/self/cgroup`), so the caller's own limits bound the sandbox's jobs too. The zygote joins it once so that each
job's processes start in it; the memory and pids limits are fixed amounts per job; the CPU time of all the
processes in it is read before and after each job; OOM kills are counted; the cgroup is removed when the zygote
ends (and cgroups of dead zygotes when the next one starts). Not covered: without root there is no cgroup; the v2
path is not exercised on the development machine (which mounts v1), and under v2 the caller's cgroup must allow
the memory and pids controllers for its children (a cgroup holding processes cannot enable them: then the strict
level is refused, naming this step).
"""

from __future__ import annotations

import os

CGROUP_NAME = "routed_grpo_sandbox"
ZYGOTE_ALLOWANCE = 64 << 20  # the zygote's own pages charged here after it joined (it stays small: see _zygote.py)
_CONTROLLERS = ("memory", "pids", "cpuacct")


class JobCgroup:
    """One job cgroup per zygote (memory, pids, cpuacct). The zygote joins it once (`join`), so that every child
    starts in it: no per-job migration, which would take the kernel's global cgroup lock on every fork of the
    machine. Jobs run one at a time per zygote, so the cgroup's CPU usage read before and after a job, less the
    zygote's own, is the job's: every process it made, also those reaped by the kernel (SIGCHLD ignored). The memory
    limit is the job's allowance plus a fixed allowance for the zygote, written once (again only when a job asks for
    another amount); after each job the zygote checks that the charge fell back (see `_zygote.py`). The OOM killer
    picks a job's process first (each sets its `oom_score_adj` to 1000, the zygote keeps 0: lowering it would need
    CAP_SYS_RESOURCE). Every file is opened at creation: after `pivot_root` the zygote reaches the cgroup only
    through these."""

    def __init__(self) -> None:
        self.dirs: dict[str, str] = {}  # controller -> directory of this zygote's job cgroup
        self.rel: dict[str, str] = {}  # controller -> its path as /proc/<pid>/cgroup shows it
        self.v2 = False
        self.procs_fds: list[int] = []
        self._home_fds: list[int] = []  # cgroup.procs of the cgroups the zygote came from
        self._fds: dict[str, int] = {}
        self._parents: list[tuple[int, str]] = []  # (fd of the parent directory, name) for removal
        self._limits: dict[str, int] = {}

    @classmethod
    def create(cls) -> JobCgroup:
        cg = cls()
        mounts = _cgroup_mounts()
        own = _own_cgroups()
        name = f"{CGROUP_NAME}/z{os.getpid()}"
        if "memory" in mounts and "pids" in mounts:
            for ctl in _CONTROLLERS:
                if ctl in mounts:
                    cg.rel[ctl] = _join(own.get(ctl, "/"), name)
                    cg.dirs[ctl] = _make_cgroup(mounts[ctl], cg.rel[ctl])
            files = {
                "limit": ("memory", "memory.limit_in_bytes"),
                "pids": ("pids", "pids.max"),
                "tasks": ("pids", "pids.current"),
                "usage": ("memory", "memory.usage_in_bytes"),
                "events": ("memory", "memory.oom_control"),
                "memsw": ("memory", "memory.memsw.limit_in_bytes"),
                "cpu": ("cpuacct", "cpuacct.usage"),
            }
        elif "" in mounts and {"memory", "pids"} <= _v2_controllers(mounts[""][0]):
            cg.v2 = True
            cg.rel[""] = _join(own.get("", "/"), name)
            cg.dirs["memory"] = cg.dirs["pids"] = cg.dirs["cpuacct"] = _make_v2_cgroup(mounts[""], cg.rel[""])
            files = {
                "limit": ("memory", "memory.max"),
                "pids": ("pids", "pids.max"),
                "tasks": ("pids", "pids.current"),
                "events": ("memory", "memory.events"),
                "usage": ("memory", "memory.current"),
                "swap": ("memory", "memory.swap.max"),
                "cpu": ("cpuacct", "cpu.stat"),
            }
        else:
            raise OSError("no writable memory and pids cgroup controllers (cgroup v1 hierarchies or v2)")
        cg._open(files, mounts, own)
        return cg

    def _open(self, files: dict, mounts: dict, own: dict) -> None:
        for key, (ctl, fname) in files.items():
            path = os.path.join(self.dirs.get(ctl, "/nonexistent"), fname)
            if key in ("swap", "memsw", "cpu") and not os.path.exists(path):  # not accounted here: nothing to do
                continue
            readonly = key in ("events", "tasks", "usage", "cpu")
            self._fds[key] = os.open(path, (os.O_RDONLY if readonly else os.O_WRONLY) | os.O_CLOEXEC)
        for d in sorted(set(self.dirs.values())):
            self.procs_fds.append(os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
            self._parents.append(
                (os.open(os.path.dirname(d), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), os.path.basename(d))
            )
        for ctl in [""] if self.v2 else [c for c in _CONTROLLERS if c in self.dirs]:
            home = _under_mount(mounts[ctl], own.get(ctl, "/"))
            self._home_fds.append(os.open(os.path.join(home, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))

    @property
    def counts_cpu(self) -> bool:
        return "cpu" in self._fds

    def cpu_ns(self) -> int:
        """CPU time of every process that has been in the cgroup, in nanoseconds."""
        text = os.pread(self._fds["cpu"], 4096, 0).decode()
        if not self.v2:
            return int(text)
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
        raise OSError("cpu.stat has no usage_usec")

    def usage(self) -> int:
        return int(os.pread(self._fds["usage"], 64, 0))

    def join(self) -> None:
        """Move the calling process (the zygote) into the job cgroup."""
        for fd in self.procs_fds:
            os.write(fd, b"0")

    def set_limits(self, memory_bytes: int, pids: int) -> None:
        """Before a job: memory = the job's allowance + ZYGOTE_ALLOWANCE (a fixed amount: written only when it
        changes, since rewriting the limit makes the kernel drain per-CPU charge caches on every CPU); processes =
        the job's + the zygote + its reaper."""
        memory = memory_bytes + ZYGOTE_ALLOWANCE
        order = [("limit", memory), ("memsw", memory)]  # v1: memory+swap may never be below memory
        if memory > self._limits.get("limit", 1 << 62):
            order.reverse()
        for key, value in (*order, ("pids", pids + 2), ("swap", 0)):
            if key in self._fds and self._limits.get(key) != value:
                os.pwrite(self._fds[key], str(value).encode(), 0)
                self._limits[key] = value

    def tasks(self) -> int:
        """How many tasks of the job are alive (zombies included): all in the cgroup but the zygote."""
        return int(os.pread(self._fds["tasks"], 64, 0)) - 1

    def oom_kills(self) -> int:
        for line in os.pread(self._fds["events"], 4096, 0).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        for fd in self._home_fds:  # leave, so that the cgroup can be removed
            try:
                os.write(fd, b"0")
            except OSError:
                pass
        for fd in [*self.procs_fds, *self._home_fds, *self._fds.values()]:
            os.close(fd)
        for dir_fd, name in self._parents:
            try:
                os.rmdir(name, dir_fd=dir_fd)
            except OSError:
                pass
            os.close(dir_fd)


def _write(path: str, text: str, missing_ok: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except FileNotFoundError:
        if not missing_ok:
            raise


def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """controller -> (mount point, root of the mount inside its hierarchy) of its v1 hierarchy; "" -> v2's."""
    out: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _, opts = (post.split() + ["", "", ""])[:3]
            root, point = pre.split()[3:5]
            if fstype == "cgroup2":
                out.setdefault("", (point, root))
            elif fstype == "cgroup":
                for opt in opts.split(","):
                    if opt in _CONTROLLERS:
                        out.setdefault(opt, (point, root))
    return out


def _own_cgroups() -> dict[str, str]:
    """controller -> the path of this process's cgroup in that hierarchy ("" -> v2), from /proc/self/cgroup."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for ctl in names.split(",") if names else [""]:
                out[ctl] = path
    return out


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _under_mount(mount: tuple[str, str], path: str) -> str:
    """The directory of the cgroup `path` (as /proc/self/cgroup names it) below the hierarchy's mount."""
    point, root = mount
    if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root.rstrip("/")) :]
    return os.path.join(point, path.lstrip("/"))


def _v2_controllers(point: str) -> set[str]:
    try:
        with open(os.path.join(point, "cgroup.controllers")) as f:
            return set(f.read().split())
    except OSError:
        return set()


def _make_v2_cgroup(mount: tuple[str, str], rel: str) -> str:
    """v2: the controllers must be enabled for the children of the caller's cgroup and of our base cgroup."""
    base = _under_mount(mount, os.path.dirname(os.path.dirname(rel)))
    if not {"memory", "pids"} <= _v2_controllers(base):
        raise OSError(f"the caller's cgroup {base} does not offer the memory and pids controllers")
    try:
        _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
    except OSError as e:
        raise OSError(f"cannot enable memory and pids for the children of the caller's cgroup {base}: {e}") from None
    ours = os.path.dirname(_under_mount(mount, rel))
    os.makedirs(ours, exist_ok=True)
    _write(os.path.join(ours, "cgroup.subtree_control"), "+memory +pids")
    return _make_cgroup(mount, rel)


def _make_cgroup(mount: tuple[str, str], rel: str) -> str:
    """Create the cgroup `rel` (removing cgroups left by dead zygotes beside it first) and return its path."""
    path = _under_mount(mount, rel)
    base = os.path.dirname(path)
    os.makedirs(base, exist_ok=True)
    for entry in os.listdir(base):
        if entry.startswith("z") and entry[1:].isdigit() and not os.path.exists(f"/proc/{entry[1:]}"):
            try:
                os.rmdir(os.path.join(base, entry))
            except OSError:
                pass
    os.makedirs(path, exist_ok=True)
    return path
