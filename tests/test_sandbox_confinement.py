"""What a strict job cannot reach or keep (issue 11, findings 1 and 5): sockets, files, signals, memory, syscalls.

Covered: no path-bound or abstract Unix socket of the host is reachable; nothing persists in /dev/shm, /var/tmp,
/run or /tmp; `kill(-1)` and signals to init in one job leave concurrent jobs' verdicts intact; the job cgroup
bounds the memory of all of a job's processes together; the system calls the seccomp filter denies fail; as an
unprivileged user (uid 65534, the user-namespace path) the program cannot read the grader's environment, signal
it, or fork past the process limit. Hostile programs run only once strict is verified (`require_strict`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap

import pytest
from sandbox_helpers import LIMITS, PYSECCOMP_DIR, REPO, job_values, require_strict

from sandbox.executor import CheckJob, Limits, execute, execute_many

TOKEN = "confinement-0b7d42"


def test_path_bound_and_abstract_unix_sockets_of_the_host_are_unreachable():
    require_strict()
    folder = tempfile.mkdtemp(prefix="routed-grpo-sock-", dir="/var/tmp")
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "docker.sock")
    servers = []
    for address in (path, "\0" + TOKEN):
        s = socket.socket(socket.AF_UNIX)
        s.bind(address)
        s.listen(4)
        s.setblocking(False)
        servers.append(s)
    os.chmod(path, 0o777)
    code = textwrap.dedent(f'''
        import socket
        def reach(address):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(address)
                s.sendall(b"{TOKEN}")
                return True
            except OSError as e:
                return type(e).__name__
    ''')
    try:
        values = job_values(code, f"reach({path!r})", f"reach({chr(0) + TOKEN!r})")
        for s in servers:
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in servers:
            s.close()
        shutil.rmtree(folder)
    assert True not in values, values


def test_nothing_persists_outside_the_job():
    require_strict()
    places = ["/dev/shm", "/var/tmp", "/run", "/run/lock", "/tmp", "/"]
    code = (
        f"import os\ndef drop(d):\n    try:\n        open(os.path.join(d, {TOKEN!r}), 'w').write('x')\n"
        "        return True\n    except OSError:\n        return False\n"
    )
    first = job_values(code, *[f"drop({d!r})" for d in places])
    assert first[places.index("/tmp")] is True  # the job's private /tmp ...
    for d in places:
        assert not os.path.exists(os.path.join(d, TOKEN)), d
    later = job_values("import os", f"os.path.exists('/tmp/{TOKEN}')")  # ... is empty again for the next job
    assert later == [False]


def test_kill_minus_one_leaves_concurrent_jobs_intact():
    require_strict()
    killer = CheckJob(
        code="import os, signal, time\nend = time.time() + 1.5\nwhile time.time() < end:\n"
        "    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP, signal.SIGINT):\n"
        "        for target in (-1, 1):  # everyone it may signal, and init\n"
        "            try:\n                os.kill(target, sig)\n"
        "            except OSError:\n                pass\n",
        calls=("1",),
    )
    sleeper = CheckJob(code="import time\ntime.sleep(1.0)\nx = 42", calls=("x",))
    res = execute_many([sleeper, killer, sleeper], Limits(timeout_s=3.0), workers=3)
    assert [r.status for r in res] == ["ok", "ok", "ok"], [(r.status, r.error) for r in res]
    assert res[0].calls[0].value == 42 and res[2].calls[0].value == 42
    assert execute(CheckJob(code="x = 1", calls=("x",)), LIMITS).calls[0].value == 1


# ----------------------------------------------------------------------------------- without root: user namespace
NOBODY_JOB = f'''
import os, signal
def leak():
    found = ""
    for pid in os.listdir("/proc"):
        try:
            found += open(f"/proc/{{pid}}/environ", "rb").read().decode("utf-8", "replace")
        except OSError:
            pass
    return "{TOKEN}" in found or "{TOKEN}" in str(os.environ)
def signal_grader(pid):
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False
def forks(n):
    made = 0
    for _ in range(n):
        try:
            if os.fork() == 0:
                signal.pause()
            made += 1
        except OSError:
            break
    return made
'''


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
    reason="needs root (to become uid 65534) and a system /usr/bin/python3 that uid can run",
)
def test_unprivileged_user_gets_strict_through_a_user_namespace():
    """As uid 65534 (no root): the program cannot read the grader's environment (an API token), kill or stop it,
    or fork past the process limit; the protections say no capabilities instead of a uid drop."""
    copy = tempfile.mkdtemp(prefix="routed-grpo-nobody-")
    try:
        os.chmod(copy, 0o755)
        shutil.copytree(REPO / "sandbox", f"{copy}/sandbox", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(os.path.join(PYSECCOMP_DIR, "pyseccomp.py"), copy)
        for root, dirs, files in os.walk(copy):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o755)
        body = f"""
            import json, os
            from sandbox.executor import CheckJob, IsolationUnavailable, Limits, execute
            calls = ("leak()", f"signal_grader({{os.getpid()}})", "forks(200)")
            try:
                res = execute(CheckJob(code={NOBODY_JOB!r}, calls=calls), Limits(timeout_s=5.0, max_procs=16))
            except IsolationUnavailable as e:
                print(json.dumps({{"unavailable": str(e)}}))
            else:
                print(json.dumps({{"p": res.protections, "v": [c.value for c in res.calls], "s": res.status}}))
        """
        out = _run_script_as(copy, body)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    if "unavailable" in out:
        pytest.skip(f"unprivileged user namespaces are not available here: {out['unavailable']}")
    assert {"no_capabilities", "pid_namespace", "minimal_root", "seccomp"} <= set(out["p"]), out["p"]
    leaked, signalled, made = out["v"]
    assert out["s"] == "ok" and leaked is False and signalled is False and made < 16, out


def _run_script_as(path: str, body: str) -> dict:
    script = f"import sys\nsys.path[:0] = [{path!r}]\n" + textwrap.dedent(body)
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        user=65534,
        group=65534,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "ROUTED_GRPO_TEST_SECRET": TOKEN},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_job_cgroup_bounds_the_memory_of_all_its_processes():
    require_strict()
    if os.geteuid() != 0:
        pytest.skip("the job cgroup needs root (without root memory is bounded per process only)")
    code = (
        "import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        x = bytearray(150 << 20)\n"
        "        time.sleep(1)\n        os._exit(0)\nfor _ in range(4):\n    os.wait()\n"
    )
    res = execute(CheckJob(code=code, calls=("1",)), Limits(timeout_s=5.0, memory_mb=256))
    assert res.status == "memory", (res.status, res.error, res.cpu_seconds)  # 4 x 150 MiB > 256 MiB
    alone = execute(CheckJob(code="x = bytearray(150 << 20)", calls=("len(x)",)), Limits(memory_mb=256))
    assert alone.status == "ok" and alone.calls[0].value == 150 << 20  # one of them alone fits


def test_denied_system_calls_fail_inside_the_job():
    require_strict()
    code = textwrap.dedent("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        def errno_of(ret):
            return ctypes.get_errno() if ret == -1 else "allowed"
        def tries():
            out = {
                "unshare_user": errno_of(libc.unshare(0x10000000)),
                "mount": errno_of(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
                "ptrace_attach_init": errno_of(libc.ptrace(16, 1, None, None)),
                "setns": errno_of(libc.setns(0, 0)),
                "bpf": errno_of(libc.syscall(321, 0, None, 0)),
                "perf_event_open": errno_of(libc.syscall(298, None, 0, -1, -1, 0)),
                "keyctl": errno_of(libc.syscall(250, 0, 0, 0, 0, 0)),
                "clone3": errno_of(libc.syscall(435, None, 0)),
                "clone_newpid": errno_of(libc.syscall(56, 0x20000000 | 17, None, None, None, None)),
            }
            try:
                os.setpriority(os.PRIO_PROCESS, 0, 19)
                out["nice"] = "allowed"
            except OSError as e:
                out["nice"] = e.errno
            try:
                os.open("/proc/1/mem", os.O_RDWR)
                out["init_memory"] = "allowed"
            except OSError as e:
                out["init_memory"] = e.errno
            return out
    """)
    if os.uname().machine != "x86_64":
        pytest.skip("the raw syscall numbers below are x86_64's")
    (got,) = job_values(code, "tries()")
    assert "allowed" not in got.values(), got
    assert got["clone3"] == 38 and got["unshare_user"] == 1 and got["nice"] == 1  # ENOSYS, EPERM, EPERM
