"""Jobs share nothing: no earlier job's program, value, output or file in the memory a later job inherits; no file
lock, IPC object or socket family as a channel; all of a job's CPU counts; its memory is bounded by a fixed limit
under the caller's own cgroup; nothing in its /tmp makes an infrastructure error. Hostile programs of our own."""

from __future__ import annotations

import errno
import os
import secrets

import pytest
from sandbox_helpers import LIMITS, job_values, require_strict

from sandbox import executor
from sandbox.executor import CheckJob, Limits, execute

pytestmark = pytest.mark.usefixtures("strict_only")


@pytest.fixture
def strict_only():
    require_strict()


def _marker() -> str:
    return "ZQX" + secrets.token_hex(16) + "QXZ"


# A job that copies every readable mapping of its own address space into a memfd (write(2): an unreadable page is
# an error, not a crash) and returns what looks like a marker. The pattern does not match its own text; `own` is a
# positive control built at run time.
SCAN = r"""
import ctypes, os, re
def scan():
    own = "ZQX" + "ab" * 16 + "QXZ"
    pat = re.compile(rb"ZQX[0-9a-f]{32}QXZ")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.write.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
    libc.write.restype = ctypes.c_ssize_t
    found, scanned = set(), 0
    with open("/proc/self/maps") as f:
        regions = [line.split() for line in f]
    for fields in regions:
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
            continue
        for start in range(lo, hi, 1 << 22):
            size = min(1 << 22, hi - start)
            fd = os.memfd_create("copy")
            try:
                n = libc.write(fd, start, size)
                chunk = os.pread(fd, n, 0) if n > 0 else b""
            finally:
                os.close(fd)
            scanned += len(chunk)
            found.update(m.decode() for m in pat.findall(chunk))
    return sorted(found), scanned, own
"""


def test_no_earlier_job_data_in_the_memory_a_later_job_inherits():
    code_m, value_m, file_m, out_m = (_marker() for _ in range(4))

    def hidden(m: str) -> str:  # the marker, built at run time: the program text holds it reversed
        return f"{m[::-1]!r}[::-1]"

    earlier = CheckJob(
        code=f"import os\nSECRET = {code_m!r}\nprint({hidden(out_m)})\nopen('out.txt', 'w').write({hidden(file_m)})\n",
        calls=(hidden(value_m), "os.getuid()"),
        files_to_return=("out.txt",),
    )
    limits = Limits(timeout_s=10.0, memory_mb=1024)
    first = execute(earlier, limits)
    assert first.status == "ok" and first.calls[0].value == value_m and first.files == {"out.txt": file_m}
    res = execute(CheckJob(code=SCAN, calls=("scan()", "os.getuid()")), limits)
    assert res.status == "ok", (res.error, res.stderr[-300:])
    (found, scanned, own), uid = res.calls[0].value, res.calls[1].value
    assert uid == first.calls[1].value  # the same zygote served both jobs
    assert own in found and scanned > 1 << 20  # the scan works: it finds the marker in its own heap
    assert not {code_m, value_m, file_m, out_m} & set(found)


def _lock_attempts() -> str:
    return r"""
import fcntl, os, struct, ctypes
def attempts():
    out = {}
    fd = os.open(os.__file__, os.O_RDONLY)
    lk = struct.pack("hhqqi", fcntl.F_RDLCK, 0, 7, 1, 0)
    for name, fn in {
        "F_SETLK": lambda: fcntl.fcntl(fd, fcntl.F_SETLK, lk),
        "F_GETLK": lambda: fcntl.fcntl(fd, fcntl.F_GETLK, lk),
        "F_OFD_SETLK": lambda: fcntl.fcntl(fd, 37, lk),
        "F_OFD_GETLK": lambda: fcntl.fcntl(fd, 36, lk),
        "lockf": lambda: fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 9),
        "flock": lambda: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB),
        "F_NOTIFY": lambda: fcntl.fcntl(os.open("/usr", os.O_RDONLY), 1026, 1),
    }.items():
        try:
            fn()
            out[name] = "allowed"
        except OSError as e:
            out[name] = e.errno
    libc = ctypes.CDLL(None, use_errno=True)
    out["inotify_init1"] = ctypes.get_errno() if libc.inotify_init1(0) < 0 else "allowed"
    return out
"""


def test_file_locks_and_notifications_on_shared_files_are_refused():
    (got,) = job_values(_lock_attempts(), "attempts()")
    assert got == {name: errno.EPERM for name in got}, got


FUTEX = r"""
import ctypes, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {"x86_64": 202, "aarch64": 98}[os.uname().machine]
def wake(op):
    with open(os.__file__, "rb") as f:  # a page of a file every job maps: a shared futex key is its inode
        m = mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_COPY)  # never written: still the file's page
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    args = (ctypes.c_void_p(addr), ctypes.c_int(op), ctypes.c_int(1), None, None, ctypes.c_int(0))
    ret = libc.syscall(ctypes.c_long(NR), *args)
    return ret if ret >= 0 else -ctypes.get_errno()
"""


def test_shared_futex_wakes_are_refused_private_ones_work():
    shared_wake, private_wake = job_values(FUTEX, "wake(1)", "wake(1 | 128)")
    assert shared_wake == -errno.EPERM and private_wake == 0


WAIT = r"""
import ctypes, mmap, os, struct, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {"x86_64": 202, "aarch64": 98}[os.uname().machine]
class TS(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
def wait(op, seconds):
    if op & 128:  # a private futex in the process's own memory
        word, cell = 7, ctypes.c_uint(7)
        addr = ctypes.addressof(cell)
    else:  # the page of a file every job maps: a shared futex key is its inode and offset
        f = open(os.__file__, "rb")
        m = mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_READ)
        word = struct.unpack("I", m[:4])[0]
        name = os.path.basename(os.__file__)
        addr = next(int(line.split("-")[0], 16) for line in open("/proc/self/maps")
                    if line.rstrip().endswith(name) and line.split()[1] == "r--s")
    t0 = time.monotonic()
    ret = libc.syscall(ctypes.c_long(NR), ctypes.c_void_p(addr), ctypes.c_long(op), ctypes.c_long(word),
                       ctypes.byref(TS(0, int(seconds * 1e9))), None, ctypes.c_long(0))
    return (ret if ret >= 0 else -ctypes.get_errno()), round(time.monotonic() - t0, 2)
"""


def test_no_job_sleeps_on_a_shared_futex_key_that_another_job_could_wake():
    """A thread's exit makes the kernel wake its clear-tid address shared, and a job may point that address at a page
    of a file every job maps: a waiter there in another job would be woken (one bit per wake). Shared waits answer
    at once instead; private waits still sleep until their timeout."""
    (shared, shared_s), (private, private_s) = job_values(WAIT, "wait(0, 0.5)", "wait(0 | 128, 0.2)")
    assert shared == -errno.EAGAIN and shared_s < 0.4, (shared, shared_s)
    assert private == -errno.ETIMEDOUT and private_s >= 0.15, (private, private_s)


RAW_FCNTL = r"""
import ctypes, fcntl, os, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {"x86_64": 72, "aarch64": 25}[os.uname().machine]
def raw(cmd):
    fd = os.open(os.__file__, os.O_RDONLY)
    lk = ctypes.create_string_buffer(struct.pack("hhqqi", fcntl.F_RDLCK, 0, 424242, 7, 0))
    ret = libc.syscall(ctypes.c_long(NR), ctypes.c_long(fd), ctypes.c_ulong((1 << 32) | cmd), lk)
    return ret if ret >= 0 else -ctypes.get_errno()
"""


def test_fcntl_lock_commands_with_high_bits_set_are_refused_too():
    """The kernel reads fcntl's command as 32 bits: `(1 << 32) | F_SETLK` is F_SETLK to it, so the filter must compare
    the low 32 bits, or a raw syscall takes a lock that a concurrent job can read back with F_GETLK."""
    got = job_values(RAW_FCNTL, *(f"raw({cmd})" for cmd in (5, 6, 36, 37, 1026)))
    assert got == [-errno.EPERM] * 5, got


def test_sqlite_in_memory_works_and_a_database_file_fails_cleanly():
    code = (
        "import sqlite3\ndef mem():\n    c = sqlite3.connect(':memory:')\n    c.execute('create table t(x)')\n"
        "    c.executemany('insert into t values (?)', [(i,) for i in range(100)])\n"
        "    return c.execute('select sum(x) from t').fetchone()[0]\n"
        "def disk():\n    try:\n        c = sqlite3.connect('db.sqlite')\n        c.execute('create table t(x)')\n"
        "        c.commit()\n        return 'ok'\n    except sqlite3.Error as e:\n        return type(e).__name__\n"
    )
    total, disk = job_values(code, "mem()", "disk()")
    assert total == 4950
    assert disk == "OperationalError"  # the file cannot be locked: sqlite says so, the job runs on


IPC = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
KEY = 0x5EED
def leave(mb, key=KEY):
    shm = libc.shmget(key, mb << 20, 0o1666)
    addr = libc.shmat(shm, None, 0)
    ctypes.memset(addr, 0x41, mb << 20)
    mq = libc.mq_open(b"/left", os.O_CREAT | os.O_RDWR, 0o666, None)  # a POSIX message queue: no file lists it
    return [shm >= 0, libc.msgget(key, 0o1666) >= 0, libc.semget(key, 1, 0o1666) >= 0, mq >= 0]
def look():
    listed = {k: open(f"/proc/sysvipc/{k}").read().splitlines()[1:] for k in ("shm", "msg", "sem")}
    found = [libc.shmget(KEY, 0, 0), libc.msgget(KEY, 0), libc.semget(KEY, 0, 0), libc.mq_open(b"/left", os.O_RDWR)]
    return listed, found
"""


def test_ipc_objects_do_not_outlive_their_job():
    (made,) = job_values(IPC, "leave(64)")
    assert made == [True, True, True, True]
    (listed, lookups) = job_values(IPC, "look()")[0]
    assert listed == {"shm": [], "msg": [], "sem": []} and lookups == [-1, -1, -1, -1]


def _zygote_cgroup(ctl: str) -> tuple[str, str]:
    """(the last idle zygote's cgroup path for `ctl`, the test process's own)."""
    z = executor._IDLE["strict"][-1]

    def path(pid: str) -> str:
        with open(f"/proc/{pid}/cgroup") as f:
            return next(p for _, names, p in (ln.rstrip("\n").split(":", 2) for ln in f) if ctl in names.split(","))

    return path(str(z.proc.pid)), path("self")


def _cgroup_file(ctl: str, rel: str, name: str) -> int:
    with open(f"/sys/fs/cgroup/{ctl}{rel}/{name}") as f:
        return int(f.read())


def test_memory_left_behind_is_freed_and_the_limit_is_fixed_under_the_callers_cgroup():
    res = execute(CheckJob(code="x = 1", calls=("x",)), LIMITS)
    if "cgroup_memory_pids" not in res.protections or not os.path.isdir("/sys/fs/cgroup/memory"):
        pytest.skip("no cgroup v1 memory controller here (needs root)")
    for _ in range(3):  # each job leaves a new 160 MiB shared-memory segment behind (key IPC_PRIVATE)
        assert job_values(IPC, "leave(160, 0)") == [[True, True, True, True]]
    ours, caller = _zygote_cgroup("memory")
    if not os.path.isfile(f"/sys/fs/cgroup/memory{ours}/memory.limit_in_bytes"):
        pytest.skip("the memory hierarchy is not mounted whole at /sys/fs/cgroup/memory here")
    limit = _cgroup_file("memory", ours, "memory.limit_in_bytes")
    usage = _cgroup_file("memory", ours, "memory.usage_in_bytes")
    assert limit <= (LIMITS.memory_mb + 128) << 20  # a fixed amount, not "current usage plus the allowance"
    assert usage < 128 << 20  # the segments were freed with their jobs
    assert ours.startswith(caller.rstrip("/") + "/")  # the caller's memory limit bounds the jobs too
    pids, pids_caller = _zygote_cgroup("pids")
    assert pids.startswith(pids_caller.rstrip("/") + "/")


HIDE_CPU = """
import os, signal
def burn():
    signal.signal(signal.SIGVTALRM, lambda *a: os._exit(0))
    signal.setitimer(signal.ITIMER_VIRTUAL, 0.5)  # half a second of CPU, then exit
    while True:
        pass
def hide(n):
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel, times and all
    for _ in range(n):
        if os.fork() == 0:
            burn()
        try:
            os.wait()
        except ChildProcessError:
            pass
    return 'done'
"""


def test_cpu_hidden_in_auto_reaped_children_counts():
    limits = Limits(timeout_s=1.0, wall_factor=30.0, memory_mb=256)
    res = execute(CheckJob(code=HIDE_CPU, calls=("hide(12)",)), limits)  # 6 s of CPU in 0.5 s children
    assert res.status == "timeout", (res.status, res.cpu_seconds, res.seconds)
    assert res.cpu_seconds >= limits.timeout_s


SOCKETS = """
import socket
def families():
    out = {}
    for name in ("AF_NETLINK", "AF_PACKET", "AF_VSOCK", "AF_UNIX", "AF_INET", "AF_INET6"):
        try:
            socket.socket(getattr(socket, name), socket.SOCK_DGRAM).close()
            out[name] = "ok"
        except OSError as e:
            out[name] = e.errno
    try:
        socket.socketpair(socket.AF_NETLINK)
        out["socketpair_netlink"] = "ok"
    except OSError as e:
        out["socketpair_netlink"] = e.errno
    a, b = socket.socketpair()
    out["socketpair_unix"] = "ok"
    return out
"""


def test_socket_families_are_an_allow_list():
    (got,) = job_values(SOCKETS, "families()")
    refused = {name: errno.EAFNOSUPPORT for name in ("AF_NETLINK", "AF_PACKET", "AF_VSOCK", "socketpair_netlink")}
    assert got == {**refused, "AF_UNIX": "ok", "AF_INET": "ok", "AF_INET6": "ok", "socketpair_unix": "ok"}, got


DEEP_TREE = """
import os
def deep(where, n):
    os.chdir(where)
    for _ in range(n):
        os.mkdir("d")
        os.chdir("d")
    open("f", "w").write("x")
    os.chmod(".", 0)
    return n
"""


@pytest.mark.parametrize("isolation", ["strict", "rlimits-only"])
def test_a_deep_tree_in_tmp_is_no_infrastructure_error(isolation):
    limits = Limits(timeout_s=5.0, memory_mb=256, isolation=isolation)
    for where in (".", "/tmp") if isolation == "strict" else (".",):
        res = execute(CheckJob(code=DEEP_TREE, calls=(f"deep({where!r}, 3000)",)), limits)
        assert res.status == "ok" and res.calls[0].value == 3000, (res.status, res.error)
    after = execute(CheckJob(code="import os", calls=("sorted(os.listdir('/tmp'))", "os.listdir('.')")), limits)
    assert after.status == "ok" and after.calls[1].value == []
    if isolation == "strict":
        assert len(after.calls[0].value) == 1  # only this job's working directory
