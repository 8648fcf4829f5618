"""The fork server ("zygote") of `sandbox.executor`: stdlib only, fed to `python -I -S -` on stdin by the parent.

The parent's bootstrap sets `CONFIG` (isolation level, the socket's fd, where `pyseccomp` is, host paths the
probe must not see) and calls `main()`. Set up once per zygote, for the `strict` level (see `_isolation.py`):
namespaces, the job cgroup (as root), the seccomp filter (`_seccomp.py`, built here, installed by each child),
the minimal root, a PID namespace whose init reaps orphans; then the probe (`_probe.py`) runs as an ordinary job
and the hello message lists the protections it verified. The `rlimits-only` level sets up none of this.

Then it serves one job at a time. The zygote never holds a job's data, so a later job, forked from its memory,
cannot find an earlier one's: it receives only the job's limits and the names of the files to return (JSON) with
four fds (SCM_RIGHTS): the write ends of stdout, stderr and the value channel, and a memfd holding the job's
program, which only the forked child reads (`_harness.py`); values and output go from the child straight to the
parent; returned files are read by a short-lived process forked for that, which sends them to the parent itself.
Per job, the zygote makes the job's working directory (in the strict level, in the private `/tmp`), forks the
child and watches it: the job's CPU time may not exceed `timeout_s`; the backstop is the main process's
wall-clock time less the time it waited for a CPU (`/proc/<pid>/schedstat`), at most `wall_factor * timeout_s`, so
a sleeping or blocked program ends but a busy machine does not turn a verdict into a timeout; a machine so loaded
that the job got almost no CPU for ten backstops is an infrastructure error, never a verdict. After the main
process ends, what is left of the job is killed (`kill(-1)` from inside the PID namespace), `/tmp` is emptied
without recursion, the job's System V IPC objects are removed and the zygote enters a fresh IPC namespace
(`_cleanup.py`); then the result (exit status, CPU seconds, OOM kills, setup outcome) goes back on the socket.

Job CPU time. As root, from the job cgroup's cpuacct counter read before and after the job, less the zygote's own
CPU time (`_cgroup.py`): every process of the job counts, also children the kernel reaps itself (SIGCHLD ignored).
Without that counter (no root, or `rlimits-only`): live processes from `/proc`, reaped ones through the rusage of
the job's main process and the children time of init (strict) or of the zygote; the sum of the own CPU time of
every process seen alive at a sample is a floor, and the job is sampled every 50 ms while it has more than one
process. Not covered there: CPU a child spends between its last sample and its end, when the kernel reaps it
(SIGCHLD ignored) or it is reaped by a process that ignores its children's times.

Not covered: the backstop watches the main thread of the job's main process only, so a program whose main thread
waits for a starved thread or child can reach it sooner on a busy machine (no reference solution does); CPU time
of live processes is read in clock ticks (10 ms), of reaped ones exactly.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import tempfile
import time

import _cleanup

CONFIG: dict = {}  # set by the parent's bootstrap
UID_BASE = 1_000_000  # job uid (as root) = UID_BASE + zygote pid: unique among live zygotes
HARD_CAP_BACKSTOPS = 10
MULTI_PROCESS_POLL_S = 0.05  # without a cpuacct counter: sampling interval while the job has other processes
_PREIMPORT = (
    "random functools collections string math datetime typing itertools heapq bisect operator re json copy "
    "fcntl ctypes"
)
_TICK = os.sysconf("SC_CLK_TCK")


def send_frame(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        c = sock.recv(min(n - got, 1 << 20))
        if not c:
            raise EOFError
        chunks.append(c)
        got += len(c)
    return b"".join(chunks)


# ------------------------------------------------------------------------------------------ job accounting
def _stat_cpu(pid: int | str, children: bool = True) -> float:
    """utime + stime (+ cutime + cstime) of a process, from /proc, in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    n = 4 if children else 2
    return sum(int(x) for x in fields[11 : 11 + n]) / _TICK


def _run_delay(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _stat_self(pid: str) -> tuple[tuple[str, str], float] | None:
    """((pid, start time), own utime + stime in seconds) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (pid, fields[19]), (int(fields[11]) + int(fields[12])) / _TICK


class Job:
    """The processes of one job, seen from the zygote: `main` (host pid), `ns_main` (its pid in /proc here, from the
    child's setup report, read when first needed: a short job is never woken up for it)."""

    def __init__(self, state: Server, main: int, setup_fd: int, clock0: tuple) -> None:
        self.s, self.main, self.setup_fd = state, main, setup_fd
        self.clock0 = clock0  # (cgroup CPU ns, zygote CPU ns) or (init CPU s, zygote's children rusage)
        self._setup: str | None = None
        self.seen: dict[tuple[str, str], float] = {}  # without a counter: own CPU of each process seen alive
        self.multi = False

    @property
    def setup(self) -> str:
        if self._setup is None:
            self._setup = _read_setup(self.setup_fd)
        return self._setup

    @property
    def setup_ok(self) -> bool:
        return self.setup.startswith("ok ")

    @property
    def ns_main(self) -> int:
        if not self.s.strict:
            return self.main
        return int(self.setup.split()[1]) if self.setup_ok else -1

    def others(self) -> list[str]:
        """Pids (as /proc shows them) of the job's processes other than the main one."""
        if not self.s.strict:
            return []
        return [p for p in os.listdir("/proc") if p.isdigit() and p not in ("1", str(self.ns_main))]

    def _counter(self) -> float:
        cg0, own0 = self.clock0
        return max(0.0, (self.s.cgroup.cpu_ns() - cg0 - (time.process_time_ns() - own0)) / 1e9)

    def cpu_live(self) -> float:
        if self.s.counts_cpu:
            return self._counter()
        others = self.others()
        self.multi = bool(others)
        for p in [str(self.ns_main), *others]:
            got = _stat_self(p)
            if got is not None:
                self.seen[got[0]] = got[1]
        total = _stat_cpu(self.ns_main) + sum(_stat_cpu(p) for p in others)
        total += _stat_cpu(1) - self.clock0[0] if self.s.strict else 0.0
        return max(total, sum(self.seen.values()))

    def cpu_final(self, main_rusage) -> float:
        if self.s.counts_cpu:
            return self._counter()
        own = main_rusage.ru_utime + main_rusage.ru_stime  # with the children it waited for
        floor = sum(self.seen.values())  # each process's own time at its last sample: nothing counted twice
        if self.s.strict:
            return max(floor, own + max(0.0, _stat_cpu(1) - self.clock0[0]))
        now = resource.getrusage(resource.RUSAGE_CHILDREN)  # everything the zygote reaped during the job
        rusage0 = self.clock0[1]
        return max(floor, own, now.ru_utime + now.ru_stime - rusage0.ru_utime - rusage0.ru_stime)


def _watch(job: Job, limits: dict, sock: socket.socket, t0: float) -> tuple[str | None, bool]:
    """Wait for the main process. Returns (why it was stopped early or None, parent gone)."""
    cpu_limit = limits["timeout_s"]
    backstop = limits["wall_factor"] * cpu_limit
    ncpu = max(1, len(os.sched_getaffinity(0)))
    pfd = os.pidfd_open(job.main)
    try:
        wait = cpu_limit / ncpu
        while True:
            ready, _, _ = select.select([pfd, sock], [], [], max(0.005, wait))
            if pfd in ready:
                return None, False
            if sock in ready:
                return "parent", True
            if not job.setup_ok:
                return "setup", False
            wall = time.monotonic() - t0
            cpu = job.cpu_live()
            awake = wall - _run_delay(job.ns_main)
            if cpu > cpu_limit:
                return "cpu", False
            if awake > backstop:
                return "backstop", False
            if wall > HARD_CAP_BACKSTOPS * backstop:
                return "overload", False
            wait = min((cpu_limit - cpu) / ncpu, backstop - awake, HARD_CAP_BACKSTOPS * backstop - wall)
            if job.multi:
                wait = min(wait, MULTI_PROCESS_POLL_S)
    finally:
        os.close(pfd)


# -------------------------------------------------------------------------------------------- returned files
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


def _send_files(sock: socket.socket, workdir: str, names: list[str], uid: int | None) -> None:
    """Send the job's returned files to the parent from a process forked for it (as the job's uid), so that their
    contents never enter the zygote's memory. The `files` frame precedes the zygote's `done`."""
    pid = _cleanup.fork_retrying()
    if pid is None:
        send_frame(sock, {"k": "files", "files": {}, "error": "cannot fork to read the returned files"})
        return
    if pid == 0:
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            send_frame(sock, {"k": "files", "files": _read_files(workdir, names)})
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


# ------------------------------------------------------------------------------------------------ serving
class Server:
    """The zygote's state: level, job context for the children, cgroup, and where jobs work."""

    def __init__(self, sock: socket.socket, level: str) -> None:
        from _harness import JobContext

        self.sock, self.strict = sock, level == "strict"
        self.ctx = JobContext()
        self.cgroup = None
        self.tmp = "/tmp" if self.strict else tempfile.mkdtemp(prefix="routed-grpo-sandbox-")
        self.init_pid: int | None = None

    @property
    def counts_cpu(self) -> bool:
        return self.cgroup is not None and self.cgroup.counts_cpu

    def _clock(self) -> tuple:
        if self.counts_cpu:
            return self.cgroup.cpu_ns(), time.process_time_ns()
        return (_stat_cpu(1) if self.strict else 0.0), resource.getrusage(resource.RUSAGE_CHILDREN)

    def handle(self, job: dict, fds: list[int], child_main) -> dict | None:
        """Run one job (`fds`: stdout, stderr, value channel, the memfd holding the program); the `done` message,
        or None when the parent has gone."""
        workdir = None
        try:
            workdir = tempfile.mkdtemp(prefix="job-", dir=self.tmp)
            if self.ctx.uid is not None:
                os.chown(workdir, self.ctx.uid, self.ctx.uid)
            lim = job["limits"]
            if self.cgroup is not None:
                self.cgroup.set_limits(lim["memory_mb"] << 20, lim["max_procs"])
            oom0 = self.cgroup.oom_kills() if self.cgroup is not None else 0
            setup_r, setup_w = os.pipe()
            t0 = time.monotonic()
            clock0 = self._clock()
            pid = os.fork()
            if pid == 0:
                self.sock.close()
                os.close(setup_r)
                child_main(job, [*fds, setup_w], workdir, self.ctx)
                os._exit(121)
            for fd in (*fds, setup_w):
                os.close(fd)
            try:
                return self._finish(job, Job(self, pid, setup_r, clock0), workdir, t0, oom0)
            finally:
                os.close(setup_r)
        finally:
            if self.strict:
                _cleanup.remove_tree(self.tmp, keep=True)
                _cleanup.clear_ipc()
            elif workdir is not None:
                _cleanup.remove_tree(workdir)

    def _finish(self, job: dict, watched: Job, workdir: str, t0: float, oom0: int) -> dict | None:
        pid = watched.main
        stopped, gone = _watch(watched, job["limits"], self.sock, t0)
        if stopped is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status, rusage = os.wait4(pid, 0)
        setup = watched.setup
        seconds = time.monotonic() - t0
        tasks = self.cgroup.tasks if self.cgroup is not None else None
        all_gone = _cleanup.kill_rest(self.strict, watched.others, tasks, pid)
        cpu = watched.cpu_final(rusage)
        if gone:
            return None
        if job["files"]:
            _send_files(self.sock, workdir, job["files"], self.ctx.uid)
        done = {
            "k": "done",
            "exit": os.waitstatus_to_exitcode(status),
            "seconds": seconds,
            "cpu_seconds": cpu,
            "timed_out": stopped in ("cpu", "backstop") or cpu > job["limits"]["timeout_s"],
            "oom_kills": (self.cgroup.oom_kills() - oom0) if self.cgroup is not None else 0,
            "leftover_processes": not all_gone,
        }
        if not setup.startswith("ok "):
            done["error"] = f"job setup failed: {setup or 'no report'}"
        elif stopped == "overload":
            done["error"] = (
                f"the machine is overloaded: the job got {cpu:.2f} s of CPU in {seconds:.0f} s of wall "
                "clock; no verdict"
            )
        return done


def _read_setup(fd: int) -> str:
    """The child's setup report: 'ok <pid>' or an error. EOF without a report: the child died during setup."""
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 30.0)
        if not ready:
            return "no setup report within 30 s"
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).decode("utf-8", "replace").strip()
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks).decode("utf-8", "replace").strip()


def _serve(server: Server, child_main) -> None:
    sock = server.sock
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 4, 4)
            if len(msg) < 4:
                return
            job = json.loads(_recv_exact(sock, struct.unpack("!I", msg)[0]))  # limits and file names only
        except (EOFError, OSError):
            return
        if len(fds) != 4:
            for fd in fds:
                os.close(fd)
            send_frame(sock, {"k": "done", "error": f"expected 4 fds, got {len(fds)}"})
            continue
        try:
            done = server.handle(job, fds, child_main)
        except Exception as e:  # noqa: BLE001 - infrastructure failure: reported, never a verdict
            done = {"k": "done", "error": f"zygote: {e!r}"}
        if done is None:
            return
        send_frame(sock, done)


def main() -> None:
    sock = socket.socket(fileno=os.dup(CONFIG["sock_fd"]))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, CONFIG["sock_fd"])
    os.close(null)
    sys.path.insert(0, CONFIG["dir"])
    import _harness
    import _setup

    sys.path.pop(0)
    for name in _PREIMPORT.split():
        __import__(name)
    try:
        server = Server(sock, CONFIG["level"])
        hello = _setup.setup(server, CONFIG)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        send_frame(sock, {"k": "hello", "error": f"{type(e).__name__}: {e}"})
        return
    gc.collect()
    gc.freeze()  # children never scan (and so never copy-on-write) the zygote's objects in their collections
    send_frame(sock, hello)
    if hello.get("missing"):
        return
    try:
        _serve(server, _harness.child_main)
    finally:
        if server.cgroup is not None:
            server.cgroup.remove()
        if not server.strict:
            _cleanup.remove_tree(server.tmp)
