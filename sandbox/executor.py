"""Sandbox for untrusted model code: one isolated process per program, values returned as plain data.

Usage::

    from sandbox.executor import CheckJob, Limits, execute, execute_many
    job = CheckJob(code=setup_code + "\\n" + model_code, calls=("Solution().f(n = 7)",))
    res = execute(job, Limits(timeout_s=6.0))      # isolation="strict" unless asked otherwise, by name
    res.status          # "ok" | "timeout" | "memory" | "crash" | "infra_error"
    res.calls[0].value  # plain data returned by the call, decoded in the parent (compare it there)
    results = execute_many(jobs, Limits(), workers=2, progress=True)   # bounded pool, order preserved

`sandbox.verdict.grade_correct` builds such a job from ground-truth asserts and decides correctness in the parent.
For HumanEval-style tests (a `check(candidate)` function with the expected values inside it) pass the test as
`script`: `script_ok` then says whether it ran without raising.

Isolation levels (`Limits.isolation`). `strict` (the default) fails closed: if this machine cannot give it, `execute`
raises `IsolationUnavailable` naming what is missing; nothing falls back silently. As root it runs each program as an
unprivileged uid unique to its zygote; without root, as uid 0 of a user namespace with no capabilities. Either way: its
own PID namespace and `/proc`, network and UTS namespaces, a fresh IPC namespace per job, a minimal read-only root (the
standard library, the interpreter and its shared libraries, `/dev/null`, `/dev/zero`, `/dev/random`, `/dev/urandom`, a
private `/tmp` (emptied after every job) holding its working directory: no home directory, project checkout, dataset,
`/var`, `/srv`, `/mnt`, `/run`, `/dev/shm`, no path-bound socket of the host), a seccomp filter (`_seccomp.py`),
`no_new_privs`, rlimits, and as root a memory, pids and cpuacct cgroup below the caller's own cgroup. `rlimits-only`
(asked for by that name only) runs the program as the caller, with the caller's view of the file system, bounded by
rlimits and the CPU limit. `ExecutionResult.protections` lists what a probe verified from inside the zygote's
namespaces (`_probe.py`), once per zygote.

Jobs share nothing (strict). No job's program, output, value or returned file ever enters the memory later jobs are
forked from: the program travels in a memfd that only the job's child reads, output and values go from the child
straight to this process, returned files come from a reader process forked for the job. Nothing a job made outlives
it: its processes are killed, `/tmp` is emptied (without recursion), its System V IPC objects are removed and the
next job gets a fresh IPC namespace. Between concurrent jobs, which bind the same read-only files, file locks,
change notifications, page cache residency queries and futexes that are not process-private (wakes refused, waits
never sleep) are refused (`_seccomp.py`: `sqlite3` in memory works, a database file in `/tmp` gives
`sqlite3.OperationalError`), and socket families are an allow-list (`AF_UNIX`, `AF_INET`, `AF_INET6`, in an empty
network namespace).

Time. `timeout_s` is CPU time of the whole job, so a verdict does not depend on how busy the machine is. As root
the kernel counts it (the job cgroup's cpuacct counter, protection `job_cpu_cgroup`): every process of the job,
also children it lets the kernel reap (SIGCHLD ignored). Without it, CPU that such children spend between the
zygote's samples (every 50 ms while the job has more than one process) is not counted. The wall-clock backstop
ends programs that sleep or block: the job's main process may spend at most `wall_factor * timeout_s` seconds
awake or blocked, not counting time it waited for a CPU. A `timeout` means one of those two; `cpu_seconds` says
how much CPU the job used. A machine so loaded that a job got almost no CPU for ten backstops gives `infra_error`.

Memory. As root the job cgroup's limit is `memory_mb` plus a fixed allowance for the zygote, set once (not what
is in use plus an allowance), and it sits below the caller's cgroup, so the caller's limits hold too.

Verdict channel (`_channel.py`): values, errors and the end marker travel as length-prefixed JSON frames on fd 3, a
pipe whose read end only the parent holds; stdout is never parsed. Only plain data crosses (None, bool, int, float,
str, bytes, complex, list, tuple, dict, set, frozenset, and ListNode/TreeNode as value lists; exact types only, so
an `int` subclass with a rigged `__eq__` is refused), read in the parent by a bounded tokenizer (`_value.py`: no
`json.loads`, no recursion, never unpickled): a value nested more than 256 deep is a `crash`, more than 2 MiB of
encoded values or 262,144 items per job is `memory`, and a result keeps each value as its encoded text
(`CallOutcome.value` decodes it on access), so grading never raises, stalls or holds more than that. Whatever a
program writes on fd 3 or elsewhere, its status is ok, crash, timeout or memory: setup success travels on a pipe
closed before the program starts, and `infra_error` is left to failures of the executor itself (the job's `/tmp` is
emptied without recursion, `_cleanup.py`, so no tree however deep makes one). Not forge-proof: a program that writes
well-formed frames in order can claim values and `reached_end`, but correctness compares them with expected values
that never enter the child. For a `script` (HumanEval `check`) the expected values do run in the child, so code that
patches what `check` uses (builtins, `AssertionError`) can fake `script_ok`.

How it runs: a pre-warmed fork server ("zygote", `_zygote.py`, one per worker thread) sets up its isolation once
(`_setup.py`, `_isolation.py`, `_cgroup.py`, `_seccomp.py`) and checks it (`_probe.py`), then forks one child per
program (`_harness.py`) and cleans up after it (`_cleanup.py`); stdout/stderr are captured and capped at
`max_output_bytes`.

Not covered: programs cannot import site-packages; apart from socket families the seccomp filter is a deny list;
channels between concurrent jobs through shared resources and global counters are not closed (CPU contention,
page cache timing, free memory, machine-wide inode numbers of pipes and sockets); without root
there is no cgroup (memory is bounded per process by RLIMIT_AS, processes by RLIMIT_NPROC in the user namespace,
the private /tmp by its 2 GiB size, and CPU as said above); under cgroup v2 the caller's cgroup must be able to
enable the memory and pids controllers for its children, else `strict` is refused; the system library directories
are bound whole; for `script` jobs see above.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal

from sandbox._channel import CallOutcome, ChannelError, NodeList, decode_value, read_channel
from sandbox._client import Zygote

__all__ = [
    "CallOutcome",
    "ChannelError",
    "CheckJob",
    "ExecutionResult",
    "IsolationUnavailable",
    "Limits",
    "NodeList",
    "decode_value",
    "execute",
    "execute_many",
    "shutdown",
]
Status = Literal["ok", "timeout", "memory", "crash", "infra_error"]
ISOLATION_LEVELS = ("strict", "rlimits-only")
_MAX_CHANNEL_BYTES = 32 << 20
_BACKSTOP_S = 30.0  # extra seconds the parent waits past the zygote's own hard cap before declaring it hung
_SIGXCPU_EXIT = -24


@dataclass(frozen=True)
class Limits:
    """Limits of one program. `timeout_s`: CPU seconds of the whole job; wall-clock backstop `wall_factor *
    timeout_s` (see the module docstring). `isolation`: "strict" or, asked for by name, "rlimits-only"."""

    timeout_s: float = 6.0
    memory_mb: int = 1024
    max_output_bytes: int = 65536
    max_file_mb: int = 16
    max_open_files: int = 64
    max_procs: int = 32
    wall_factor: float = 3.0
    isolation: str = "strict"

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation {self.isolation!r} is not one of {', '.join(ISOLATION_LEVELS)}")
        if not self.timeout_s > 0 or not self.wall_factor >= 1:
            raise ValueError(f"need timeout_s > 0 and wall_factor >= 1 (got {self.timeout_s}, {self.wall_factor})")


@dataclass(frozen=True)
class CheckJob:
    """One program: `code` as the module `__main__`, then each of `calls` evaluated, then `script`."""

    code: str
    calls: tuple[str, ...] = ()
    script: str | None = None
    files_to_return: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecutionResult:
    """What happened to one program. `status` "ok" means the harness reached its end (`reached_end`)."""

    status: Status
    calls: tuple[CallOutcome, ...] = ()
    script_ok: bool | None = None
    reached_end: bool = False
    exit_code: int | None = None  # negative: killed by that signal
    stdout: str = ""
    stderr: str = ""
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # wall clock
    protections: tuple[str, ...] = ()
    error: str | None = None
    cpu_seconds: float = 0.0  # CPU time of all the job's processes


class IsolationUnavailable(RuntimeError):
    """The requested isolation level cannot be reached on this machine; nothing was run."""


def _assemble(
    job: CheckJob, chan: bytes, done: dict, out: bytes, err: bytes, prot: tuple[str, ...]
) -> ExecutionResult:
    channel = read_channel(chan, len(job.calls))
    exit_code = done.get("exit")
    if done.get("error"):
        status: Status = "infra_error"
    elif channel.memory or done.get("oom_kills", 0) > 0:  # an OOM kill is the more specific reason
        status = "memory"
    elif done.get("timed_out") or exit_code == _SIGXCPU_EXIT:
        status = "timeout"
    else:
        status = "ok" if channel.reached_end and channel.error is None else "crash"
    error = done.get("error") or channel.error or channel.code_error
    if done.get("leftover_processes"):
        error = (error + "; " if error else "") + "some processes of the job could not be killed"
    if status == "crash" and error is None:
        error = f"program ended before the harness finished (exit code {exit_code})"
    return ExecutionResult(
        status=status,
        calls=channel.calls,
        script_ok=channel.script_ok,
        reached_end=channel.reached_end,
        exit_code=exit_code,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        files=dict(done.get("files") or {}),
        seconds=float(done.get("seconds", 0.0)),
        protections=prot,
        error=error,
        cpu_seconds=float(done.get("cpu_seconds", 0.0)),
    )


# -------------------------------------------------------------------------------------------- zygote
def _start_zygote(level: str) -> Zygote:
    """A started zygote at `level`; IsolationUnavailable when the level's protections are not all in force."""
    z = Zygote(level, asdict(Limits()))
    hello = z.hello
    if hello.get("missing"):
        raise IsolationUnavailable(
            f"the sandbox cannot reach isolation level {level!r} on this machine: missing "
            f"{', '.join(hello['missing'])} ({hello.get('reason')}). Nothing was run. To run programs without it "
            "(as your uid, seeing your files), ask for it by name: Limits(isolation='rlimits-only'), or "
            "`--isolation rlimits-only` on the command line."
        )
    return z


def _run(z: Zygote, job: CheckJob, limits: Limits) -> ExecutionResult:
    program = json.dumps({"code": job.code, "calls": list(job.calls), "script": job.script}).encode()
    caps = (limits.max_output_bytes, limits.max_output_bytes, _MAX_CHANNEL_BYTES)
    deadline = time.monotonic() + 10 * limits.wall_factor * limits.timeout_s + _BACKSTOP_S
    bufs, done = z.run(program, list(job.files_to_return), asdict(limits), caps, deadline)
    if done.get("zygote_failed"):
        return ExecutionResult(status="infra_error", protections=z.protections, error=done["error"])
    return _assemble(job, bufs[2], done, bufs[0], bufs[1], z.protections)


# ---------------------------------------------------------------------------------------------- pool
_POOL_LOCK = threading.Lock()
_IDLE: dict[str, list[Zygote]] = {}
_POOL_PID = os.getpid()
_MAX_IDLE = 8


def _acquire(level: str) -> Zygote:
    global _POOL_PID
    with _POOL_LOCK:
        if _POOL_PID != os.getpid():  # forked grading process: the inherited zygotes belong to the parent
            _IDLE.clear()
            _POOL_PID = os.getpid()
        idle = _IDLE.setdefault(level, [])
        while idle:
            z = idle.pop()
            if z.alive():
                return z
            z.close()
    return _start_zygote(level)


def _release(z: Zygote) -> None:
    with _POOL_LOCK:
        idle = _IDLE.setdefault(z.level, [])
        if z.alive() and len(idle) < _MAX_IDLE and _POOL_PID == os.getpid():
            idle.append(z)
            return
    z.close()


def job_uid(z: Zygote) -> int | None:
    """The uid the zygote's children run as (None without uid drop); see `_zygote.UID_BASE`."""
    return 1_000_000 + z.proc.pid if "uid_drop" in z.protections else None


@atexit.register
def shutdown() -> None:
    """Stop every idle zygote (also run at interpreter exit)."""
    with _POOL_LOCK:
        zs = [z for idle in _IDLE.values() for z in idle] if _POOL_PID == os.getpid() else []
        _IDLE.clear()
    for z in zs:
        z.close()


def execute(job: CheckJob, limits: Limits = Limits()) -> ExecutionResult:
    """Run one program in the sandbox. Raises IsolationUnavailable when `limits.isolation` cannot be reached;
    any other failure of the sandbox itself comes back as status "infra_error"."""
    t0 = time.monotonic()
    try:
        z = _acquire(limits.isolation)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        if isinstance(e, IsolationUnavailable):
            raise
        return ExecutionResult(status="infra_error", error=f"cannot start sandbox: {e!r}", seconds=0.0)
    try:
        res = _run(z, job, limits)
    except (OSError, EOFError, ValueError) as e:
        z.close()
        return ExecutionResult(
            status="infra_error",
            protections=z.protections,
            error=f"sandbox failed: {e!r}",
            seconds=time.monotonic() - t0,
        )
    if res.status == "infra_error" or (res.error and "could not be killed" in res.error):
        z.close()  # retire a zygote that failed or could not clean up; its init takes the rest with it
    else:
        _release(z)
    return res


def execute_many(
    jobs: Sequence[CheckJob], limits: Limits = Limits(), workers: int | None = None, progress: bool = False
) -> list[ExecutionResult]:
    """Run `jobs` on a bounded pool of `workers` (default: CPU count) fork servers; results in input order."""
    n = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="sandbox", unit="prog")

    def one(job: CheckJob) -> ExecutionResult:
        res = execute(job, limits)
        if bar is not None:
            bar.update(1)
        return res

    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            return list(pool.map(one, jobs))
    finally:
        if bar is not None:
            bar.close()
