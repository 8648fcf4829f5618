"""The job cgroup of the sandbox's strict level as root (stdlib only; used by `_setup.py` and `_zygote.py`).

One cgroup per zygote with the memory and pids controllers (cgroup v1 hierarchies, or v2 where its controllers
can be enabled), which the zygote joins once so that each job's processes start in it; limits are set before
each job; OOM kills are counted; the cgroup is removed when the zygote ends (and cgroups of dead zygotes when the
next one starts). Not covered: without root there is no cgroup; the v2 path is not exercised on the development
machine (which mounts v1).
"""

from __future__ import annotations

import os

CGROUP_NAME = "routed_grpo_sandbox"
_SLACK = 32 << 20


class JobCgroup:
    """One job cgroup per zygote (memory and pids controllers). The zygote joins it once (`join`), so that every
    child starts in it: no per-job migration, which would take the kernel's global cgroup lock on every fork of the
    machine. The zygote's own pages stay charged where they were; each job's limit is the charge at its start plus
    the job's allowance; the OOM killer picks a job's process first (each sets its `oom_score_adj` to 1000, the
    zygote keeps 0: lowering it would need CAP_SYS_RESOURCE). Every file is opened at creation: after
    `pivot_root` the zygote reaches the cgroup only through these."""

    def __init__(self) -> None:
        self.dirs: dict[str, str] = {}  # controller -> directory of this zygote's job cgroup
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
        name = f"{CGROUP_NAME}/z{os.getpid()}"
        if "memory" in mounts and "pids" in mounts:
            for ctl in ("memory", "pids"):
                cg.dirs[ctl] = _make_cgroup(mounts[ctl], name)
            files = {
                "limit": ("memory", "memory.limit_in_bytes"),
                "pids": ("pids", "pids.max"),
                "tasks": ("pids", "pids.current"),
                "usage": ("memory", "memory.usage_in_bytes"),
                "events": ("memory", "memory.oom_control"),
                "memsw": ("memory", "memory.memsw.limit_in_bytes"),
            }
        elif "" in mounts and {"memory", "pids"} <= _v2_controllers(mounts[""]):
            cg.v2 = True
            base = os.path.join(mounts[""], CGROUP_NAME)
            os.makedirs(base, exist_ok=True)
            _write(os.path.join(mounts[""], "cgroup.subtree_control"), "+memory +pids", missing_ok=True)
            _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
            cg.dirs["memory"] = cg.dirs["pids"] = _make_cgroup(mounts[""], name)
            files = {
                "limit": ("memory", "memory.max"),
                "pids": ("pids", "pids.max"),
                "tasks": ("pids", "pids.current"),
                "events": ("memory", "memory.events"),
                "usage": ("memory", "memory.current"),
                "swap": ("memory", "memory.swap.max"),
            }
        else:
            raise OSError("no writable memory and pids cgroup controllers (cgroup v1 hierarchies or v2)")
        for key, (ctl, fname) in files.items():
            path = os.path.join(cg.dirs[ctl], fname)
            if key in ("swap", "memsw") and not os.path.exists(path):  # no swap accounting: nothing to bound
                continue
            readonly = key in ("events", "tasks", "usage")
            cg._fds[key] = os.open(path, (os.O_RDONLY if readonly else os.O_WRONLY) | os.O_CLOEXEC)
        for d in sorted(set(cg.dirs.values())):
            cg.procs_fds.append(os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
            cg._parents.append(
                (os.open(os.path.dirname(d), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), os.path.basename(d))
            )
        for home in _home_cgroups(mounts, cg.v2):
            cg._home_fds.append(os.open(os.path.join(home, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
        return cg

    def join(self) -> None:
        """Move the calling process (the zygote) into the job cgroup."""
        for fd in self.procs_fds:
            os.write(fd, b"0")

    def set_limits(self, memory_bytes: int, pids: int) -> None:
        """Before a job: memory = what is charged now (the zygote's own growth, cache) + the job's allowance, give or
        take `_SLACK` (rewriting the limit makes the kernel drain per-CPU charge caches on every CPU, which slowed
        concurrent jobs when done for each); processes = the job's + the zygote + its reaper."""
        memory = int(os.pread(self._fds["usage"], 64, 0)) + memory_bytes
        if abs(memory - self._limits.get("limit", 0)) <= _SLACK:
            memory = self._limits["limit"]
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


def _cgroup_mounts() -> dict[str, str]:
    """controller -> mount point of its v1 hierarchy; "" -> the v2 mount point."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _, opts = (post.split() + ["", "", ""])[:3]
            point = pre.split()[4]
            if fstype == "cgroup2":
                out.setdefault("", point)
            elif fstype == "cgroup":
                for opt in opts.split(","):
                    if opt in ("memory", "pids"):
                        out.setdefault(opt, point)
    return out


def _home_cgroups(mounts: dict[str, str], v2: bool) -> list[str]:
    """The directories of the cgroups this process is in now, for the controllers the job cgroup uses."""
    out = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for ctl in [""] if v2 else ["memory", "pids"]:
                if (names == "" if v2 else ctl in names.split(",")) and ctl in mounts:
                    out.append(os.path.join(mounts[ctl], path.lstrip("/")))
    return out


def _v2_controllers(point: str) -> set[str]:
    try:
        with open(os.path.join(point, "cgroup.controllers")) as f:
            return set(f.read().split())
    except OSError:
        return set()


def _make_cgroup(point: str, name: str) -> str:
    """Create point/name (removing cgroups left by dead zygotes first) and return its path."""
    base = os.path.join(point, CGROUP_NAME)
    os.makedirs(base, exist_ok=True)
    for entry in os.listdir(base):
        if entry.startswith("z") and entry[1:].isdigit() and not os.path.exists(f"/proc/{entry[1:]}"):
            try:
                os.rmdir(os.path.join(base, entry))
            except OSError:
                pass
    path = os.path.join(point, name)
    os.makedirs(path, exist_ok=True)
    return path
