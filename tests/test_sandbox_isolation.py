"""The strict level fails closed and shows the program nothing of the host (issue 11, findings 1, 2, 5).

Covered: `execute` refuses when strict cannot be reached (made unreachable here by a seccomp filter that denies
`unshare`, as a container's default profile does) and never falls back; `rlimits-only` runs only when asked for by
name; a virtual environment and a Python installation under a 0700 directory in /tmp keep every protection; a
problems file placed world-readable outside /tmp (its path on a process's command line) cannot be found; every
mount is read-only except /proc, /tmp and the device nodes, and nothing is writable outside /tmp. What a job
cannot reach or keep (sockets, signals, memory, syscalls, the user-namespace path) is `test_sandbox_confinement.py`.
Hostile programs run only once strict is verified (`require_strict`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from sandbox_helpers import LIMITS, PYSECCOMP_DIR, REPO, job_values, require_strict, strict_unavailable_reason

from sandbox.executor import CheckJob, IsolationUnavailable, Limits, execute
from sandbox.verdict import grade_correct

STRICT_ROOT = {
    "uid_drop",
    "cgroup_memory_pids",
    "no_new_privs",
    "seccomp",
    "minimal_root",
    "readonly_root",
    "pid_namespace",
    "net_namespace",
    "ipc_namespace",
    "rlimits",
    "scrubbed_env",
    "fresh_workdir",
}
TOKEN = "isolation-5f3a91"


def _run_script(python: str, body: str, user: int | None = None, timeout: float = 120) -> dict:
    """Run `body` (which prints one JSON line) with `python`, importing this checkout and pyseccomp."""
    script = f"import sys\nsys.path[:0] = [{str(REPO)!r}, {PYSECCOMP_DIR!r}]\n" + textwrap.dedent(body)
    kwargs = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    proc = subprocess.run(
        [python, "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "ROUTED_GRPO_TEST_SECRET": TOKEN},
        **kwargs,
    )
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
        out = _run_script(
            str(base / "venv" / "bin" / "python"),
            f"""
            import json, os
            from sandbox.executor import CheckJob, execute
            code = "import os\\ndef w(p):\\n    try:\\n        open(p, 'w').write('x')\\n        return True\\n" \\
                   "    except OSError:\\n        return False\\n"
            res = execute(CheckJob(code=code, calls=("os.getuid()", "w('/{TOKEN}')", "w('/var/tmp/{TOKEN}')")))
            print(json.dumps({{"protections": res.protections, "values": [c.value for c in res.calls]}}))
        """,
        )
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
        script = (
            f"import sys\nsys.path[:0] = [{str(REPO)!r}, {PYSECCOMP_DIR!r}]\nimport json\n"
            "from sandbox.executor import CheckJob, execute\n"
            "r = execute(CheckJob(code='import os, sys', calls=('os.getuid()', 'sys.prefix')))\n"
            "print(json.dumps({'p': r.protections, 'v': [c.value for c in r.calls], 'e': r.error}))\n"
        )
        cmd = f'mount --bind {prefix} {base}/py && exec {base}/py/{exe} -I -c "$0"'
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", cmd, script],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
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
    code = textwrap.dedent("""
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
    """)
    (mounts,) = job_values(code, "mounts()")
    rw = sorted(p for p, is_rw in mounts if is_rw)
    assert set(rw) <= {"/proc", "/tmp", "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"}, rw
    writable, cwd = job_values(code, "writable()", "os.getcwd()", limits=Limits(timeout_s=20.0))
    assert set(writable) <= {"/tmp", cwd} and cwd.startswith("/tmp/"), writable
