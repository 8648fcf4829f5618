"""Setting up a zygote for its isolation level, and verifying it with the probe (stdlib only; see `_zygote.py`).

`setup(server, config)` returns the hello message: the protections the probe verified from inside, and `missing`:
the ones the level requires that are not in force (then the zygote serves nothing and the parent raises). A step
that fails (for example `unshare` refused) ends the setup at once and names that step and the kernel's answer.

Required by `strict`: as root, an unprivileged uid (`uid_drop`) and the job cgroup (`cgroup_memory_pids`); without
root, no capabilities in a user namespace (`no_capabilities`); in both cases `no_new_privs`, `seccomp`,
`minimal_root`, `readonly_root`, `pid_namespace`, `net_namespace`, `ipc_namespace`, `process_group`, `rlimits`,
`scrubbed_env`, `fresh_workdir`, `stdin_closed`. Required by `rlimits-only`: `process_group`, `rlimits`,
`scrubbed_env`, `fresh_workdir`, `stdin_closed`; it runs programs as the caller, with the caller's view of the
file system.
"""

from __future__ import annotations

import importlib.util
import json
import os

import _cgroup
import _isolation
import _seccomp

COMMON = ("process_group", "rlimits", "scrubbed_env", "fresh_workdir", "stdin_closed")
STRICT = (
    "no_new_privs",
    "seccomp",
    "minimal_root",
    "readonly_root",
    "pid_namespace",
    "net_namespace",
    "ipc_namespace",
)
BY_CONSTRUCTION = ("job_cpu_time", "output_cap")  # enforced by the zygote's and the parent's own code
HOST_PATHS = (
    "/home",
    "/root",
    "/var",
    "/srv",
    "/mnt",
    "/run",
    "/opt",
    "/media",
    "/boot",
    "/dev/shm",
    "/etc/passwd",
    "/sys",
    "/usr/bin",
    "/usr/share",
)


def required(level: str, root_user: bool) -> tuple[str, ...]:
    if level == "rlimits-only":
        return COMMON
    return COMMON + STRICT + (("uid_drop", "cgroup_memory_pids") if root_user else ("no_capabilities",))


class SetupFailed(Exception):
    def __init__(self, step: str, err: BaseException) -> None:
        super().__init__(f"{step}: {err}")
        self.step = step


def _step(name: str, fn, *args):
    try:
        return fn(*args)
    except (OSError, ValueError, ImportError, AttributeError) as e:
        raise SetupFailed(name, e) from None


def _load_pyseccomp(path: str | None, libraries: dict):
    """Import pyseccomp from the parent's environment. Its import looks up libc and libseccomp with
    `ctypes.util.find_library`, which runs `ldconfig -p` each time: the parent's answers (`libraries`) are used."""
    if not path:
        raise ImportError("the pyseccomp package is not installed in the parent's environment (pip install pyseccomp)")
    import ctypes.util

    spec = importlib.util.spec_from_file_location("pyseccomp", path)
    module = importlib.util.module_from_spec(spec)
    find = ctypes.util.find_library
    ctypes.util.find_library = lambda name: libraries[name] if name in libraries else find(name)
    try:
        spec.loader.exec_module(module)
    except RuntimeError as e:  # pyseccomp raises RuntimeError when libseccomp.so is missing
        raise ImportError(f"{e} (install the libseccomp2 system package)") from None
    finally:
        ctypes.util.find_library = find
    return module


def _start_init(install_seccomp) -> int:
    _isolation.new_pid_namespace_for_children()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        _isolation.run_init(ready_w, _isolation.STAGE + "/proc", install_seccomp)
        os._exit(1)
    os.close(ready_w)
    answer = os.read(ready_r, 600).decode("utf-8", "replace")
    os.close(ready_r)
    if answer != "ok":
        raise OSError(answer or "init of the PID namespace died")
    return pid


def _strict(server, config: dict, root_user: bool) -> dict:
    """Namespaces, cgroup, seccomp, minimal root, PID namespace. Returns what the probe should expect."""
    if root_user:
        server.cgroup = _step("cgroup (memory and pids controllers)", _cgroup.JobCgroup.create)
    pyseccomp = _step(
        "seccomp (pyseccomp and libseccomp)", _load_pyseccomp, config.get("pyseccomp"), config.get("libraries", {})
    )
    bpf, skipped = _step("seccomp filter", _seccomp.build_bpf, pyseccomp, _seccomp.ZYGOTE_NEEDS)
    job_layer = _seccomp.Installer(_step("seccomp filter", _seccomp.build_job_bpf, pyseccomp))
    with open("/proc/self/maps") as f:
        maps = f.read()
    plan = _step("minimal root (planning)", _isolation.plan_root, maps)
    _step("namespaces", _isolation.enter_namespaces, root_user)
    _step("minimal root", _isolation.build_root, plan)
    seccomp = _seccomp.Installer(bpf)
    server.init_pid = _step("PID namespace", _start_init, lambda: (seccomp.install(), job_layer.install()))
    if server.cgroup is not None:  # after init's fork: init stays out of the job cgroup
        _step("cgroup (joining)", server.cgroup.join)
    _step("pivot_root", _isolation.pivot_into_root)
    plan.close()
    # The zygote keeps what it needs to enter a fresh IPC namespace per job (`unshare` is left out of its filter;
    # without root, it keeps its capabilities in the user namespace): each child drops its capabilities (as root,
    # the uid change does) and installs the filter's last layer itself, last, before the program runs.
    _step("seccomp", seccomp.install)
    ctx = server.ctx
    ctx.uid = _isolation_uid() if root_user else None
    ctx.nproc_extra = 0 if root_user else 2  # without root the zygote and init share the job's uid
    ctx.confine = ([] if root_user else [_isolation.drop_capabilities]) + [job_layer.install]
    bound = sorted(plan.binds) + plan.devices + plan.masks
    ours = [*bound, "/tmp", "/proc", "/dev"]
    absent = [p for p in (*HOST_PATHS, *config.get("absent", ())) if p != "/" and not any(_under(b, p) for b in ours)]
    tops = {p.split("/")[1] for p in (*plan.binds, *plan.devices, *plan.symlinks)} | {"dev", "proc", "tmp"}
    cgroups = [[ctl, rel] for ctl, rel in server.cgroup.rel.items()] if server.cgroup is not None else []
    return {
        "strict": True,
        "uid": ctx.uid,
        "skipped_syscalls": skipped,
        "absent": absent,
        "top_level": sorted(tops),
        "mount_points": ["/", "/proc", "/tmp", *bound],
        "writable_mounts": ["/proc", "/tmp", *plan.devices],
        "cgroups": cgroups,
        "nproc": ctx.nproc_extra,
    }


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _isolation_uid() -> int:
    from _zygote import UID_BASE

    return UID_BASE + os.getpid()


def setup(server, config: dict) -> dict:
    root_user = os.geteuid() == 0
    level = config["level"]
    need = required(level, root_user)
    with open(os.path.join(config["dir"], "_probe.py")) as f:
        config = dict(config, probe_source=f.read())  # read now: the zygote's own folder is not in the new root
    try:
        if level == "strict":
            expect = _strict(server, config, root_user)
        else:
            _isolation.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of a job come back to us
            expect = {"strict": False, "uid": None, "cgroups": [], "nproc": None}
    except SetupFailed as e:  # nothing of the level is in force: name the step that failed
        return {"k": "hello", "protections": [], "missing": [e.step], "reason": str(e)}
    verified = run_probe(server, expect, config)
    prot = [name for name, ok in verified.items() if ok is True] + list(BY_CONSTRUCTION)
    if server.counts_cpu:  # the kernel counts every process of the job, also those it reaps itself
        prot.append("job_cpu_cgroup")
    missing = [name for name in need if verified.get(name) is not True]
    reason = verified.get("probe") or "; ".join(f"{name}: {verified.get(name, 'not checked')}" for name in missing)
    return {
        "k": "hello",
        "protections": prot,
        "missing": missing,
        "reason": reason,
        "skipped_syscalls": expect.get("skipped_syscalls", []),
    }


def run_probe(server, expect: dict, config: dict) -> dict:
    """Run `_probe.py` as a job through the normal path and return its verdicts."""
    import _harness

    expect = dict(expect, limits=config["probe_limits"])
    call = f"__import__('json').dumps(probe(__import__('json').loads({json.dumps(expect)!r})))"
    program = json.dumps({"code": config["probe_source"], "calls": [call], "script": None}).encode()
    payload = os.memfd_create("job", os.MFD_CLOEXEC)
    os.write(payload, program)
    pipes = [os.pipe() for _ in range(3)]
    job = {"files": [], "limits": config["probe_limits"]}
    done = server.handle(job, [w for _, w in pipes] + [payload], _harness.child_main)
    outputs = []
    for r, _ in pipes:
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
        os.close(r)
        outputs.append(b"".join(chunks))
    if done is None or done.get("error") or done.get("exit") != 0:
        detail = (done or {}).get("error") or outputs[1].decode("utf-8", "replace")[-500:]
        return {"probe": f"the probe did not run: {detail}"}
    for frame in _harness.parse_frames(outputs[2]):
        if frame.get("k") == "call" and frame.get("ok"):
            return json.loads(frame["v"])
        if frame.get("k") in ("call", "code_error"):
            return {"probe": f"the probe failed: {frame.get('e')}"}
    return {"probe": "the probe returned nothing"}
