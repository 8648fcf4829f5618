"""The in-child harness of `sandbox.executor` (stdlib only): per-job setup of the forked child, the job, the channel.

The child (forked by the zygote in `_zygote.py`, already inside its namespaces, minimal root and job cgroup)
starts a new session (own process group), reads its program from the memfd the parent sent (the zygote never
reads it), gets stdin `/dev/null`, rlimits, an OOM score that makes it the first victim, as root an unprivileged
uid unique to its zygote (so RLIMIT_NPROC binds), without root an empty capability set, a scrubbed environment and
the seccomp filter. Then it reports `ok <pid>` on the one-shot setup pipe and closes it, and only then runs the
job: `code` as the module `__main__`, each call expression, the script. Call values are encoded as tagged JSON
(plain data only, exact types) and written as length-prefixed frames to fd 3, which only the parent reads (see
`_channel.py` for what it accepts); stdout is never parsed. Nothing here decides a verdict or ever sees an expected
value.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import resource
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
import types

CHAN_FD = 3
SETUP_FD = 4
_MAX_DEPTH, _MAX_NODES = 200, 1_000_000


# ----------------------------------------------------------------------------------------------- framing
def send_frame(fd_or_sock, obj) -> None:
    data = json.dumps(obj, allow_nan=True, separators=(",", ":")).encode()
    buf = memoryview(struct.pack("!I", len(data)) + data)
    while buf:
        n = fd_or_sock.send(buf) if isinstance(fd_or_sock, socket.socket) else os.write(fd_or_sock, buf)
        buf = buf[n:]


def parse_frames(buf: bytes) -> list:
    """Length-prefixed JSON frames (as `send_frame` writes them); a truncated tail is dropped."""
    frames, pos = [], 0
    while pos + 4 <= len(buf):
        (n,) = struct.unpack("!I", buf[pos : pos + 4])
        if pos + 4 + n > len(buf):
            break
        frames.append(json.loads(buf[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return frames


# ------------------------------------------------------------------------------------- value encoding
class Unserialisable(Exception):
    pass


def _node_kind(v) -> str | None:
    name = type(v).__name__
    if name == "ListNode" and hasattr(v, "val") and hasattr(v, "next"):
        return "ListNode"
    if name == "TreeNode" and hasattr(v, "val") and hasattr(v, "left") and hasattr(v, "right"):
        return "TreeNode"
    return None


def encode(v, depth: int = 0):
    """Plain data -> JSON-able tagged form. Exact types only: subclasses (which may override __eq__) are refused."""
    if depth > _MAX_DEPTH:
        raise Unserialisable(f"nesting deeper than {_MAX_DEPTH}")
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is int:
        return v if v.bit_length() < 12000 else {"I": format(v, "x")}
    if t is float:
        return v if math.isfinite(v) else {"F": repr(v)}
    if t is list:
        return [encode(x, depth + 1) for x in v]
    if t is tuple:
        return {"t": [encode(x, depth + 1) for x in v]}
    if t is dict:
        return {"d": [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in v.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "f": [encode(x, depth + 1) for x in v]}
    if t is bytes:
        return {"b": v.hex()}
    if t is complex:
        return {"c": [repr(v.real), repr(v.imag)]}
    kind = _node_kind(v)
    if kind == "ListNode":
        return {"L": _list_values(v, depth)}
    if kind == "TreeNode":
        return {"T": _tree_values(v, depth)}
    raise Unserialisable(f"unserialisable {t.__name__}")


def _list_values(node, depth: int) -> list:
    out, seen = [], set()
    while node is not None:
        if id(node) in seen or len(out) > _MAX_NODES:
            raise Unserialisable("cyclic or oversized ListNode")
        seen.add(id(node))
        out.append(encode(node.val, depth + 1))
        node = node.next
    return out


def _tree_values(root, depth: int) -> list:
    """LeetCode level order (None for a missing child, trailing Nones dropped), the inverse of `tree_node`."""
    out, queue, seen, i = [], [root], set(), 0
    while i < len(queue):
        node = queue[i]
        i += 1
        if node is None:
            out.append(None)
            continue
        if id(node) in seen or len(seen) > _MAX_NODES:
            raise Unserialisable("cyclic or oversized TreeNode")
        seen.add(id(node))
        out.append(encode(node.val, depth + 1))
        queue.extend((node.left, node.right))
    while out and out[-1] is None:
        out.pop()
    return out


class _Sentinel:
    __slots__ = ()


def _claims_equal_to_anything(v) -> bool:
    try:
        return bool(v == _Sentinel())
    except BaseException:
        return False


# ------------------------------------------------------------------------------------------- child side
def _err(e: BaseException) -> dict:
    try:
        msg = f"{type(e).__name__}: {str(e)[:300]}"
    except BaseException:
        msg = type(e).__name__
    return {"e": msg, "mem": isinstance(e, MemoryError)}


class _Channel:
    """Frames to fd 3, batched: written when 20 ms old or 64 KiB big, before the script and at the end (fewer
    wake-ups of the parent; a timeout loses at most the last 20 ms of call values)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.since = time.monotonic()

    def put(self, frame: dict, flush: bool = False) -> None:
        data = json.dumps(frame, allow_nan=True, separators=(",", ":")).encode()
        self.buf += struct.pack("!I", len(data)) + data
        if flush or len(self.buf) > 65536 or time.monotonic() - self.since > 0.02:
            self.flush()

    def flush(self) -> None:
        view = memoryview(bytes(self.buf))
        self.buf.clear()
        self.since = time.monotonic()
        while view:
            view = view[os.write(CHAN_FD, view) :]


def run_job(job: dict) -> int:
    """Runs in the child after isolation; returns the exit code. SystemExit from the program propagates."""
    mod = types.ModuleType("__main__")
    mod.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = mod
    ns = mod.__dict__
    chan = _Channel()
    try:
        exec(compile(job["code"], "<solution>", "exec"), ns)
    except Exception as e:  # noqa: BLE001 - reported on the channel; SystemExit/KeyboardInterrupt propagate
        traceback.print_exc()
        chan.put(dict(k="code_error", **_err(e)), flush=True)
        return 1
    for i, call in enumerate(job["calls"]):
        frame = {"k": "call", "i": i}
        try:
            value = eval(compile(call, f"<call {i}>", "eval"), ns)
        except Exception as e:  # noqa: BLE001
            frame.update(ok=False, **_err(e))
        else:
            frame["eqt"] = _claims_equal_to_anything(value)
            try:
                frame.update(ok=True, v=encode(value))
            except (Unserialisable, RecursionError, ValueError) as e:
                frame.update(ok=False, e=str(e) or type(e).__name__, mem=False)
        chan.put(frame)
    chan.flush()
    code = 0
    if job["script"] is not None:
        try:
            exec(compile(job["script"], "<script>", "exec"), ns)
            chan.put({"k": "script", "ok": True})
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            chan.put(dict(k="script", ok=False, **_err(e)))
            code = 1
    chan.put({"k": "end"}, flush=True)
    return code


class JobContext:
    """What the zygote prepared for every child: the job uid (root only), the RLIMIT_NPROC to set, and the last
    steps of its confinement (`confine`: without root, dropping every capability; the seccomp filter, with
    no_new_privs). The job cgroup and the namespaces are the zygote's own, inherited at fork."""

    def __init__(self) -> None:
        self.uid: int | None = None
        self.nproc_extra: int | None = None  # RLIMIT_NPROC = max_procs + this; None: none (rlimits-only)
        self.confine: list = []


def _read_payload(fd: int) -> dict:
    """The job's program (code, calls, script), JSON in the memfd `fd`."""
    size = os.fstat(fd).st_size
    chunks, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return json.loads(b"".join(chunks))


def _child_setup(job: dict, fds: list[int], workdir: str, ctx: JobContext, report: list[int]) -> None:
    os.setsid()
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in [os.open(os.devnull, os.O_RDONLY), *fds]]
    payload_fd = high.pop(4)
    for src, dst in zip(high, (0, 1, 2, CHAN_FD, SETUP_FD), strict=True):  # via high numbers: no clobbering
        os.dup2(src, dst)
    report[0] = SETUP_FD
    job.update(_read_payload(payload_fd))
    os.closerange(SETUP_FD + 1, 1 << 16)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGALRM):  # as a fresh interpreter has them
        signal.signal(sig, signal.SIG_DFL)
    lim = job["limits"]
    cpu = int(math.ceil(lim["timeout_s"])) + 1  # a second line of defence: the zygote enforces job CPU time
    mb = 1 << 20
    rl = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, lim["memory_mb"] * mb, lim["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, lim["max_file_mb"] * mb, lim["max_file_mb"] * mb),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, lim["max_open_files"], lim["max_open_files"]),
    ]
    if ctx.nproc_extra is not None:
        nproc = lim["max_procs"] + ctx.nproc_extra
        rl.append((resource.RLIMIT_NPROC, nproc, nproc))
    for what, soft, hard in rl:
        resource.setrlimit(what, (soft, hard))
    os.chdir(workdir)
    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)  # the OOM killer picks a job's process, not the zygote
    os.write(fd, b"1000")
    os.close(fd)
    if ctx.uid is not None:
        os.setgroups([])
        os.setgid(ctx.uid)
        os.setuid(ctx.uid)
    os.environ.clear()
    os.environ.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8")
    tempfile.tempdir = None
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")
    sys.argv = ["-c"]
    for step in ctx.confine:
        step()


def child_main(job: dict, fds: list[int], workdir: str, ctx: JobContext, _exit=os._exit) -> None:
    """Never returns: the forked child ends with os._exit (bound at import, so patching `os._exit` is moot).

    `fds` are the write ends of stdout, stderr, the value channel, the memfd holding the program and the setup
    pipe. Setup success is the line
    `ok <pid>` on the setup pipe, which is closed before the program's code runs: the program cannot write to it."""
    report = [fds[4]]  # where a setup failure is written: the setup pipe, at SETUP_FD once it has been moved there
    try:
        _child_setup(job, fds, workdir, ctx, report)
        os.write(SETUP_FD, f"ok {os.getpid()}\n".encode())
        os.close(SETUP_FD)
    except BaseException as e:  # noqa: BLE001 - an executor failure, reported on the setup pipe only
        try:
            os.write(report[0], repr(e).encode()[:2000])
        finally:
            _exit(120)
    code = 1
    try:
        code = run_job(job)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - KeyboardInterrupt and the like: exit like Python would
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    _exit(code & 0xFF)
