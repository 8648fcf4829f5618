"""The fork server ("zygote") of `sandbox.executor`: stdlib only, fed to `python -I -S -` on stdin by the parent.

The parent's bootstrap sets `CONFIG` (isolation level, the socket's fd, where `pyseccomp` is, host paths the
probe must not see) and calls `main()`. Set up once per zygote, for the `strict` level (see `_isolation.py`):
namespaces, the job cgroup (as root), the seccomp filter (`_seccomp.py`), the minimal root, a PID namespace
whose init reaps orphans; then the probe (`_probe.py`) runs as an ordinary job and the hello message lists the
protections it verified. The `rlimits-only` level sets up none of this.

Then it serves one job at a time: it receives the job (JSON) and the write ends of stdout, stderr and the value
channel (SCM_RIGHTS), makes a working directory and a one-shot setup pipe, forks the child (`_harness.py`) and
watches it: the job's CPU time (all its processes: live ones from `/proc`, reaped ones through the rusage of the
job's main process and the children time of init) may not exceed `timeout_s`; the backstop is the main process's
wall-clock time less the time it waited for a CPU (`/proc/<pid>/schedstat`), at most `wall_factor * timeout_s`, so
a sleeping or blocked program ends but a busy machine does not turn a verdict into a timeout; a machine so loaded
that the job got almost no CPU for ten backstops is an infrastructure error, never a verdict. After the main
process ends, what is left of the job is killed (`kill(-1)` from inside the PID namespace), /tmp is emptied and the
result (exit status, CPU seconds, OOM kills, setup outcome, returned files) goes back on the socket.

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
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time

CONFIG: dict = {}  # set by the parent's bootstrap
UID_BASE = 1_000_000  # job uid (as root) = UID_BASE + zygote pid: unique among live zygotes
HARD_CAP_BACKSTOPS = 10
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


class Job:
    """The processes of one job, seen from the zygote: `main` (host pid), `ns_main` (its pid in /proc here, from the
    child's setup report, read when first needed: a short job is never woken up for it)."""

    def __init__(self, state: Server, main: int, setup_fd: int, init_cpu0: float, rusage0) -> None:
        self.s, self.main, self.setup_fd = state, main, setup_fd
        self.init_cpu0, self.rusage0 = init_cpu0, rusage0
        self._setup: str | None = None

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

    def cpu_live(self) -> float:
        total = _stat_cpu(self.ns_main) + sum(_stat_cpu(p) for p in self.others())
        return total + (_stat_cpu(1) - self.init_cpu0 if self.s.strict else 0.0)

    def cpu_final(self, main_rusage) -> float:
        own = main_rusage.ru_utime + main_rusage.ru_stime
        if self.s.strict:
            return own + max(0.0, _stat_cpu(1) - self.init_cpu0)
        now = resource.getrusage(resource.RUSAGE_CHILDREN)  # everything the zygote reaped during the job
        return max(own, now.ru_utime + now.ru_stime - self.rusage0.ru_utime - self.rusage0.ru_stime)


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
    finally:
        os.close(pfd)


# ----------------------------------------------------------------------------------------------- killing
def _kill_rest(s: Server, job: Job) -> bool:
    """Kill every process of the job but init; True when none is left (they are reaped by init or by us)."""
    if s.strict:
        if (s.cgroup.tasks() == 0) if s.cgroup is not None else not job.others():
            return True
        reaper = _fork_retrying()  # into the PID namespace: kill(-1) there reaches the job's processes only
        if reaper is None:
            return False
        if reaper == 0:
            try:
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(reaper, 0)
        end = time.monotonic() + 2.0
        while job.others():
            if time.monotonic() > end:
                return False
            time.sleep(0.001)
        return True
    try:
        os.killpg(job.main, signal.SIGKILL)
    except OSError:
        pass
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True  # no orphan came back to us (we are their subreaper)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ppid(entry) == os.getpid():
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


def _fork_retrying(tries: int = 50) -> int | None:
    """os.fork(), retried while the job's processes hold every pid its cgroup allows; None if it never succeeds."""
    for _ in range(tries):
        try:
            return os.fork()
        except BlockingIOError:
            time.sleep(0.002)
    return None


def _ppid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


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


def _empty_dir(path: str) -> None:
    """Remove everything in `path`, also directories the job made unreadable (we own them, or are root)."""

    def retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, ignore_errors=True)
            else:
                func(p)
        except OSError:
            pass

    for entry in os.listdir(path):
        p = os.path.join(path, entry)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, onerror=retry)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


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

    def handle(self, job: dict, fds: list[int], child_main) -> dict | None:
        """Run one job; the `done` message, or None when the parent has gone."""
        workdir = tempfile.mkdtemp(prefix="job-", dir=self.tmp)
        if self.ctx.uid is not None:
            os.chown(workdir, self.ctx.uid, self.ctx.uid)
        lim = job["limits"]
        if self.cgroup is not None:
            self.cgroup.set_limits(lim["memory_mb"] << 20, lim["max_procs"])
        oom0 = self.cgroup.oom_kills() if self.cgroup is not None else 0
        init_cpu0 = _stat_cpu(1) if self.strict else 0.0
        rusage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        setup_r, setup_w = os.pipe()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            self.sock.close()
            os.close(setup_r)
            child_main(job, [*fds, setup_w], workdir, self.ctx)
            os._exit(121)
        for fd in (*fds, setup_w):
            os.close(fd)
        try:
            return self._finish(job, Job(self, pid, setup_r, init_cpu0, rusage0), workdir, t0, oom0)
        finally:
            os.close(setup_r)
            if self.strict:
                _empty_dir(self.tmp)
            else:
                shutil.rmtree(workdir, ignore_errors=True)

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
        all_gone = _kill_rest(self, watched)
        cpu = watched.cpu_final(rusage)
        files = _read_files(workdir, job["files"])
        if gone:
            return None
        done = {
            "k": "done",
            "exit": os.waitstatus_to_exitcode(status),
            "seconds": seconds,
            "cpu_seconds": cpu,
            "timed_out": stopped in ("cpu", "backstop") or cpu > job["limits"]["timeout_s"],
            "files": files,
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
            msg, fds, _, _ = socket.recv_fds(sock, 4, 3)
            if len(msg) < 4:
                return
            job = json.loads(_recv_exact(sock, struct.unpack("!I", msg)[0]))
        except (EOFError, OSError):
            return
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            send_frame(sock, {"k": "done", "error": f"expected 3 fds, got {len(fds)}"})
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
            shutil.rmtree(server.tmp, ignore_errors=True)
