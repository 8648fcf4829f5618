"""The strict level fails closed and shows the program nothing of the host (issue 11, findings 1, 2, 5).

Covered: `execute` refuses when strict cannot be reached (made unreachable here by a seccomp filter that denies
`unshare`, as a container's default profile does) and never falls back; `rlimits-only` runs only when asked for by
name; a virtual environment and a Python installation under a 0700 directory in /tmp keep every protection; a
problems file placed world-readable outside /tmp (its path on a process's command line) cannot be found; every
mount is read-only except /proc, /tmp and the device nodes, and nothing is writable outside /tmp; no path-bound or
abstract Unix socket of the host is reachable; nothing persists in /dev/shm, /var/tmp, /run or /tmp; as an
unprivileged user (uid 65534, the user-namespace path) the program cannot read the grader's environment, signal
it, or fork past the process limit. Hostile programs run only once strict is verified (`require_strict`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from sandbox_helpers import REPO, require_strict, strict_unavailable_reason

from sandbox.executor import CheckJob, IsolationUnavailable, Limits, execute, execute_many
from sandbox.verdict import grade_correct

STRICT_ROOT = {"uid_drop", "cgroup_memory_pids", "no_new_privs", "seccomp", "minimal_root", "readonly_root",
               "pid_namespace", "net_namespace", "ipc_namespace", "rlimits", "scrubbed_env", "fresh_workdir"}
LIMITS = Limits(timeout_s=2.0, memory_mb=256)
TOKEN = "isolation-5f3a91"
PYSECCOMP_DIR = os.path.dirname(__import__("importlib").util.find_spec("pyseccomp").origin)


def _values(code: str, *calls: str, limits: Limits = LIMITS) -> list:
    res = execute(CheckJob(code=code, calls=calls), limits)
    assert res.status == "ok", (res.status, res.error, res.stderr[-500:])
    assert all(c.ok for c in res.calls), [c.error for c in res.calls]
    return [c.value for c in res.calls]


def _run_script(python: str, body: str, user: int | None = None, timeout: float = 120) -> dict:
    """Run `body` (which prints one JSON line) with `python`, importing this checkout and pyseccomp."""
    script = f"import sys\nsys.path[:0] = [{str(REPO)!r}, {PYSECCOMP_DIR!r}]\n" + textwrap.dedent(body)
    kwargs = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    proc = subprocess.run([python, "-I", "-c", script], capture_output=True, text=True, timeout=timeout,
                          cwd="/", env={"PATH": "/usr/bin:/bin", "ROUTED_GRPO_TEST_SECRET": TOKEN}, **kwargs)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- fail closed
def test_strict_is_the_default_and_names_are_checked():
    assert Limits().isolation == "strict"
    with pytest.raises(ValueError, match="isolation"):
        Limits(isolation="none")


def test_execute_refuses_when_strict_cannot_be_reached():
    reason = strict_unavailable_reason()
    if reason is not None:  # this machine cannot reach strict: then execute must refuse here too
        with pytest.raises(IsolationUnavailable, match="rlimits-only"):
            execute(CheckJob(code="x = 1", calls=("x",)))
        return
    marker = Path(f"/tmp/{TOKEN}-ran")
    marker.unlink(missing_ok=True)
    body = f"""
        import json, pyseccomp
        f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        f.add_rule(pyseccomp.ERRNO(1), "unshare")  # what a container's default seccomp profile does
        f.load()
        from sandbox.executor import CheckJob, IsolationUnavailable, execute
        try:
            res = execute(CheckJob(code="open('/tmp/{TOKEN}-ran', 'w')", calls=("1",)))
            print(json.dumps({{"raised": None, "status": res.status}}))
        except IsolationUnavailable as e:
            print(json.dumps({{"raised": str(e)}}))
    """
    out = _run_script(sys.executable, body)
    assert out["raised"] is not None, out
    assert "strict" in out["raised"] and "unshare" in out["raised"] and "rlimits-only" in out["raised"]
    assert not marker.exists()


def test_rlimits_only_runs_only_when_asked_and_says_what_it_lacks():
    res = execute(CheckJob(code="import os", calls=("os.getpid()",)), Limits(isolation="rlimits-only"))
    assert res.status == "ok" and res.calls[0].ok
    assert {"rlimits", "fresh_workdir", "scrubbed_env"} <= set(res.protections)
    assert not {"minimal_root", "pid_namespace", "seccomp", "uid_drop"} & set(res.protections)


def test_strict_protections_are_all_verified():
    require_strict()
    res = execute(CheckJob(code="x = 1", calls=("x",)), LIMITS)
    need = STRICT_ROOT if os.geteuid() == 0 else STRICT_ROOT - {"uid_drop", "cgroup_memory_pids"} | {"no_capabilities"}
    assert need <= set(res.protections), need - set(res.protections)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (uid drop, the venv's owner differs)")
def test_venv_under_a_0700_tmp_directory_keeps_every_protection(tmp_path):
    require_strict()
    base = Path(tempfile.mkdtemp(prefix="routed-grpo-venv-"))  # mode 0700, under /tmp: the install
    try:
        assert base.stat().st_mode & 0o777 == 0o700 and str(base).startswith("/tmp/")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base / "venv")], check=True)
        out = _run_script(str(base / "venv" / "bin" / "python"), f"""
            import json, os
            from sandbox.executor import CheckJob, execute
            code = "import os\\ndef w(p):\\n    try:\\n        open(p, 'w').write('x')\\n        return True\\n" \\
                   "    except OSError:\\n        return False\\n"
            res = execute(CheckJob(code=code, calls=("os.getuid()", "w('/{TOKEN}')", "w('/var/tmp/{TOKEN}')")))
            print(json.dumps({{"protections": res.protections, "values": [c.value for c in res.calls]}}))
        """)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert STRICT_ROOT <= set(out["protections"]), STRICT_ROOT - set(out["protections"])
    uid, wrote_root, wrote_var = out["values"]
    assert uid != 0 and not wrote_root and not wrote_var
    assert not os.path.exists(f"/{TOKEN}") and not os.path.exists(f"/var/tmp/{TOKEN}")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and util-linux")
def test_python_installed_under_a_0700_tmp_directory_keeps_every_protection():
    """The interpreter and its standard library themselves live under a 0700 directory in /tmp (bind-mounted
    there in a private mount namespace): the zygote's private /tmp would hide them without the minimal root."""
    require_strict()
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.relpath(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), prefix)
    base = tempfile.mkdtemp(prefix="routed-grpo-python-")
    try:
        os.mkdir(f"{base}/py")
        script = (f"import sys\nsys.path[:0] = [{str(REPO)!r}, {PYSECCOMP_DIR!r}]\nimport json\n"
                  "from sandbox.executor import CheckJob, execute\n"
                  "r = execute(CheckJob(code='import os, sys', calls=('os.getuid()', 'sys.prefix')))\n"
                  "print(json.dumps({'p': r.protections, 'v': [c.value for c in r.calls], 'e': r.error}))\n")
        cmd = f"mount --bind {prefix} {base}/py && exec {base}/py/{exe} -I -c \"$0\""
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", cmd, script],
                              capture_output=True, text=True, timeout=120, cwd="/")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert STRICT_ROOT <= set(out["p"]), (STRICT_ROOT - set(out["p"]), out["e"])
    assert out["v"][0] != 0 and out["v"][1].startswith(base)  # it really ran from under the 0700 directory


# ------------------------------------------------------------------------------------ a minimal view of the host
SEARCH = r'''
import os, re
def find_expected(token):
    """Look for a *.jsonl file holding this problem's asserts: command lines and environments of every process
    in /proc, then a walk of the file system. Returns the expected value if found, else the places looked."""
    paths, seen = [], 0
    for pid in os.listdir("/proc"):
        for what in ("cmdline", "environ"):
            try:
                text = open(f"/proc/{pid}/{what}", "rb").read().decode("utf-8", "replace")
            except OSError:
                continue
            paths += re.findall(r"/[^\x00=: ]*\.jsonl", text)
    for top in ("/var/tmp", "/srv", "/home", "/opt", "/mnt", "/run", "/media", "/root", "/work", "/"):
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not (root == "/" and d in ("proc", "sys"))]
            seen += len(files)
            paths += [os.path.join(root, f) for f in files if f.endswith(".jsonl")]
            if seen > 200000:
                break
    for path in paths:
        try:
            text = open(path).read()
        except OSError:
            continue
        m = re.search(r"Solution\(\)\.add\(a = 2, b = 3\) == (\d+)", text)
        if token in text and m:
            return int(m.group(1))
    return "not found: " + ", ".join(sorted(set(paths))[:5])
class Solution:
    def add(self, a, b):
        return find_expected(TOKEN)
'''


@pytest.mark.parametrize("where", ["/var/tmp", "/srv"])
def test_a_world_readable_problems_file_cannot_be_found(where):
    require_strict()
    folder = Path(tempfile.mkdtemp(prefix="routed-grpo-data-", dir=where))
    data = folder / "problems.jsonl"
    expected = 1_000_003  # not a + b: only the file knows it
    gt = f"assert Solution().add(a = 2, b = 3) == {expected}"
    data.write_text(json.dumps({"id": TOKEN, "gt_answer": [gt]}) + "\n")
    os.chmod(folder, 0o755)
    os.chmod(data, 0o644)
    grader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(data)])  # path in argv
    try:
        correct, res = grade_correct(f"TOKEN = {TOKEN!r}\n", SEARCH, [gt], Limits(timeout_s=20.0))
    finally:
        grader.kill()
        grader.wait()
        shutil.rmtree(folder)
    assert res.status == "ok", (res.status, res.error, res.stderr[-800:])
    assert not correct and str(res.calls[0].value).startswith("not found"), res.calls[0].value


def test_mounts_are_read_only_and_only_tmp_is_writable():
    require_strict()
    code = textwrap.dedent('''
        import os
        def mounts():
            out = []
            for line in open("/proc/self/mountinfo"):
                f = line.split()
                out.append((f[4], "rw" in f[5].split(",")))
            return out
        def writable():
            hits, dirs = [], set()
            for point, _ in mounts():
                dirs.add(point if os.path.isdir(point) else os.path.dirname(point))
            for root, ds, _ in os.walk("/"):
                ds[:] = [d for d in ds if not (root == "/" and d in ("proc", "sys"))]
                dirs.add(root)
                if len(dirs) > 20000:  # the minimal root has a few thousand; a host has far more
                    break
            for d in sorted(dirs):
                try:
                    fd = os.open(os.path.join(d, "probe-w"), os.O_CREAT | os.O_WRONLY, 0o600)
                    os.close(fd)
                    os.unlink(os.path.join(d, "probe-w"))
                    hits.append(d)
                except OSError:
                    pass
            return hits
    ''')
    (mounts,) = _values(code, "mounts()")
    rw = sorted(p for p, is_rw in mounts if is_rw)
    assert set(rw) <= {"/proc", "/tmp", "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"}, rw
    writable, cwd = _values(code, "writable()", "os.getcwd()", limits=Limits(timeout_s=20.0))
    assert set(writable) <= {"/tmp", cwd} and cwd.startswith("/tmp/"), writable


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
        values = _values(code, f"reach({path!r})", f"reach({chr(0) + TOKEN!r})")
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
    code = f"import os\ndef drop(d):\n    try:\n        open(os.path.join(d, {TOKEN!r}), 'w').write('x')\n" \
           "        return True\n    except OSError:\n        return False\n"
    first = _values(code, *[f"drop({d!r})" for d in places])
    assert first[places.index("/tmp")] is True  # the job's private /tmp ...
    for d in places:
        assert not os.path.exists(os.path.join(d, TOKEN)), d
    later = _values("import os", f"os.path.exists('/tmp/{TOKEN}')")  # ... is empty again for the next job
    assert later == [False]


def test_kill_minus_one_leaves_concurrent_jobs_intact():
    require_strict()
    killer = CheckJob(code="import os, signal, time\nend = time.time() + 1.5\nwhile time.time() < end:\n"
                           "    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP, signal.SIGINT):\n"
                           "        for target in (-1, 1):  # everyone it may signal, and init\n"
                           "            try:\n                os.kill(target, sig)\n"
                           "            except OSError:\n                pass\n",
                      calls=("1",))
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


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs root (to become uid 65534) and a system /usr/bin/python3 that uid can run")
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
    proc = subprocess.run(["/usr/bin/python3", "-I", "-c", script], capture_output=True, text=True, timeout=120,
                          cwd="/", user=65534, group=65534, extra_groups=[],
                          env={"PATH": "/usr/bin:/bin", "ROUTED_GRPO_TEST_SECRET": TOKEN})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_job_cgroup_bounds_the_memory_of_all_its_processes():
    require_strict()
    if os.geteuid() != 0:
        pytest.skip("the job cgroup needs root (without root memory is bounded per process only)")
    code = ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        x = bytearray(150 << 20)\n"
            "        time.sleep(1)\n        os._exit(0)\nfor _ in range(4):\n    os.wait()\n")
    res = execute(CheckJob(code=code, calls=("1",)), Limits(timeout_s=5.0, memory_mb=256))
    assert res.status == "memory", (res.status, res.error, res.cpu_seconds)  # 4 x 150 MiB > 256 MiB
    alone = execute(CheckJob(code="x = bytearray(150 << 20)", calls=("len(x)",)), Limits(memory_mb=256))
    assert alone.status == "ok" and alone.calls[0].value == 150 << 20  # one of them alone fits


def test_denied_system_calls_fail_inside_the_job():
    require_strict()
    code = textwrap.dedent('''
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
    ''')
    if os.uname().machine != "x86_64":
        pytest.skip("the raw syscall numbers below are x86_64's")
    (got,) = _values(code, "tries()")
    assert "allowed" not in got.values(), got
    assert got["clone3"] == 38 and got["unshare_user"] == 1 and got["nice"] == 1  # ENOSYS, EPERM, EPERM
