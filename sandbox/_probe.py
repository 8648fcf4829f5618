"""The isolation probe: run once per zygote as an ordinary job (same child setup), it reports what is in force.

`probe(expect)` returns {protection name: True, or a string saying why not}. The zygote lists as protections only
the names that came back True; `sandbox.executor` refuses a level whose required names are not all there. Each
check looks from inside, as a program would: the identity and capabilities in `/proc/self/status`, the seccomp
filter (`unshare`, `setpriority` and `flock` must fail with EPERM, a netlink socket with
EAFNOSUPPORT), the PID namespace (only init and this process in `/proc`),
the mount table (every mount is one the zygote made, read-only except `/proc`, `/tmp` and the device nodes), the
top of the root, host paths that must be absent, the network (no interface but a loopback that is down), the
cgroups of this process, the rlimits, the environment and the working directory.
"""

import ctypes
import os
import resource
import socket


def _status() -> dict:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _in_child(fn) -> object:
    """fn() in a forked child: True/False as it returned, or None if the child failed otherwise."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if fn() else 1)
        finally:
            os._exit(2)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return {0: True, 1: False}.get(code)


def _mounts() -> list[tuple[str, str]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            out.append((fields[4], fields[5]))
    return out


def _check_mounts(expect: dict) -> dict:
    got = {}
    writable_ok = set(expect["writable_mounts"])
    mounts = _mounts()
    unknown = [p for p, _ in mounts if p not in set(expect["mount_points"])]
    got["minimal_root"] = True if not unknown else f"unexpected mounts: {unknown[:5]}"
    rw = [p for p, opts in mounts if "rw" in opts.split(",") and p not in writable_ok]
    got["readonly_root"] = True if not rw else f"writable mounts: {rw[:5]}"
    top = sorted(os.listdir("/"))
    if top != sorted(expect["top_level"]):
        got["minimal_root"] = f"/ holds {top}"
    present = [p for p in expect["absent"] if os.path.lexists(p)]
    if present:
        got["minimal_root"] = f"host paths visible: {present[:5]}"
    return got


def _check_identity(expect: dict) -> dict:
    st = _status()
    got = {}
    caps = {k: int(st.get(k, "1"), 16) for k in ("CapEff", "CapPrm", "CapInh", "CapAmb")}
    no_caps = all(v == 0 for v in caps.values())
    if expect["uid"] is not None:
        ok = os.getuid() == os.geteuid() == expect["uid"] and os.getgid() == expect["uid"] and no_caps
        got["uid_drop"] = True if ok else f"uid {os.getuid()}/{os.geteuid()}, caps {caps}"
    else:
        got["no_capabilities"] = True if no_caps else f"caps {caps}"
    got["no_new_privs"] = True if st.get("NoNewPrivs") == "1" else f"NoNewPrivs {st.get('NoNewPrivs')}"
    seccomp = st.get("Seccomp") == "2"
    userns = _in_child(lambda: ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0)  # CLONE_NEWUSER
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)  # allowed without a filter, even unprivileged
        nice = "setpriority allowed"
    except PermissionError:
        nice = True
    refused = _refused_by_filter()
    ok = seccomp and userns is False and nice is True and not refused
    got["seccomp"] = True if ok else f"Seccomp {st.get('Seccomp')}, unshare allowed: {userns}, {nice}, {refused}"
    return got


def _refused_by_filter() -> str:
    """'' when a netlink socket and a file lock are refused as the filter says, else what is not."""
    import errno
    import fcntl

    bad = []
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()
        bad.append("netlink socket allowed")
    except OSError as e:
        if e.errno != errno.EAFNOSUPPORT:
            bad.append(f"netlink socket: {e}")
    fd = os.open("/dev/null", os.O_RDONLY)  # the filter refuses flock before the file matters
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        bad.append("flock allowed")
    except OSError as e:
        if e.errno != errno.EPERM:
            bad.append(f"flock: {e}")
    finally:
        os.close(fd)
    return ", ".join(bad)


def _check_pid_namespace() -> object:
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    me = os.getpid()
    if pids != sorted({1, me}):
        return f"/proc lists {pids[:10]}"
    with open("/proc/1/cmdline", "rb") as f:
        init = f.read()
    return True if init else "no init"


def _check_network() -> object:
    with open("/proc/net/dev") as f:  # not socket.if_nameindex(): it needs a netlink socket, which is refused
        names = [line.split(":", 1)[0].strip() for line in f.read().splitlines()[2:] if ":" in line]
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect(("127.0.0.1", 9))
        return "connected to 127.0.0.1"
    except OSError:
        pass
    finally:
        s.close()
    return True if names == ["lo"] else f"interfaces {names}"


def _check_cgroups(expect: dict) -> object:
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    fields = [line.split(":", 2) for line in lines]

    def member(ctl: str, path: str) -> bool:
        return any(p == path and (ctl in names.split(",") if ctl else names == "") for _, names, p in fields)

    return True if all(member(ctl, path) for ctl, path in expect["cgroups"]) else f"cgroups {lines}"


def _check_process(expect: dict) -> dict:
    got = {}
    lim = expect["limits"]
    mb = 1 << 20
    want = {
        resource.RLIMIT_AS: lim["memory_mb"] * mb,
        resource.RLIMIT_NOFILE: lim["max_open_files"],
        resource.RLIMIT_FSIZE: lim["max_file_mb"] * mb,
        resource.RLIMIT_CORE: 0,
    }
    if expect["nproc"] is not None:
        want[resource.RLIMIT_NPROC] = lim["max_procs"] + expect["nproc"]
    bad = {k: resource.getrlimit(k) for k, v in want.items() if resource.getrlimit(k) != (v, v)}
    cpu = resource.getrlimit(resource.RLIMIT_CPU)[0]
    got["rlimits"] = True if not bad and cpu != resource.RLIM_INFINITY else f"rlimits {bad} cpu {cpu}"
    env = sorted(os.environ)
    got["scrubbed_env"] = True if env == ["HOME", "LANG", "PATH", "TMPDIR"] else f"environment {env}"
    cwd = os.getcwd()
    fresh = not os.listdir(cwd) and os.stat(cwd).st_uid == os.geteuid()
    got["fresh_workdir"] = True if fresh else f"working directory {cwd}"
    stdin = os.fstat(0)
    null = os.stat("/dev/null")
    got["process_group"] = True if os.getsid(0) == os.getpgid(0) == os.getpid() else "not a session leader"
    got["stdin_closed"] = True if (stdin.st_rdev, stdin.st_mode) == (null.st_rdev, null.st_mode) else "stdin"
    return got


def _check_ipc_uts() -> object:
    with open("/proc/sysvipc/shm") as f:
        segments = f.read().splitlines()[1:]
    host = os.uname().nodename
    return True if not segments and host == "sandbox" else f"hostname {host}, {len(segments)} shm segments"


def probe(expect: dict) -> dict:
    got = {}
    got.update(_check_identity(expect))
    if expect["strict"]:
        got.update(_check_mounts(expect))
        got["pid_namespace"] = _check_pid_namespace()
        got["net_namespace"] = _check_network()
        got["ipc_namespace"] = _check_ipc_uts()
    if expect["cgroups"]:
        got["cgroup_memory_pids"] = _check_cgroups(expect)
    got.update(_check_process(expect))
    return got
