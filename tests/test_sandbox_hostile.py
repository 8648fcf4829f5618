"""Hostile battery: programs that try to crash, escape, outlast or fool the executor. One test per program.

Every program is graded against `assert Solution().add(a = 2, b = 3) == 5` (or a call of its own) and must:
not be graded correct, never be an infrastructure error, leave the grading process alive, leave no process of the
job's uid and no file behind, use at most the CPU limit (plus a margin) and end within the wall-clock backstop's
hard cap. Short limits (1 s of CPU) keep the battery fast. The battery runs only where the strict isolation level
is verified; elsewhere it is skipped with the reason (`tests/test_sandbox_isolation.py` then checks that `execute`
refuses).
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from sandbox_helpers import require_strict

from sandbox import executor
from sandbox.executor import CheckJob, Limits, execute
from sandbox.verdict import grade_correct

LIMITS = Limits(timeout_s=1.0, memory_mb=256, max_output_bytes=4096, max_file_mb=4, max_procs=16)
CPU_MARGIN_S = 0.5
GT = ("assert Solution().add(a = 2, b = 3) == 5",)
WRONG = "class Solution:\n    def add(self, a, b):\n        return a - b\n"
SETUP = "import os, sys, time\n"
TOKEN = "hostile-7c1e9b"

HOSTILE = {
    "fork_bomb": "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory_bomb": "x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n",
    "busy_loop": "while True:\n    pass\n",
    "sleep": "time.sleep(60)\n",
    "output_flood": "while True:\n    print('x' * 10000)\n",
    "stderr_flood": "while True:\n    sys.stderr.write('y' * 10000)\n",
    "deep_recursion": "sys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)\n",
    "os_exit_0_before_asserts": "os._exit(0)\n",
    "sys_exit_0_before_asserts": "sys.exit(0)\n",
    "forged_verdict_stdout": (
        "import json\nprint('passed')\nprint(json.dumps({'tests_evaluated': 1, 'tests_passed': 1, 'tests_total': 1, "
        "'test_errors': []}))\nsys.stdout.flush()\nos._exit(0)\n"
    ),
    "forged_end_frame_then_exit": (
        "import json, struct\nd = json.dumps({'k': 'end'}).encode()\nos.write(3, struct.pack('!I', len(d)) + d)\n"
        "os._exit(0)\n"
    ),
    "garbage_on_channel": WRONG + "os.write(3, b'\\xff' * 1000)\n",
    "close_channel_fd": WRONG + "os.close(3)\n",
    "close_stdout": WRONG + "sys.stdout.close()\nos.close(1)\nos.close(2)\n",
    "eq_always_true": (
        "class Any:\n    def __eq__(self, other):\n        return True\n"
        "class Solution:\n    def add(self, a, b):\n        return Any()\n"
    ),
    "int_subclass_eq_true": (
        "class Five(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "class Solution:\n    def add(self, a, b):\n        return Five(0)\n"
    ),
    "patched_builtins": (
        "import builtins, json\nbuiltins.isinstance = lambda *a: True\nbuiltins.type = lambda *a: int\n"
        'json.dumps = lambda *a, **k: \'{"k": "end"}\'\n' + WRONG
    ),
    "patched_harness_encoder": ("g = sys._getframe(1).f_globals\ng['encode'] = lambda v, depth=0: 4\n" + WRONG),
    "patched_os_exit": WRONG + "os._exit = lambda code: None\n",
    "spawn_subprocess": WRONG + "import subprocess\nsubprocess.Popen(['sleep', '30'])\n",
    "setsid_daemon": (
        WRONG
        + "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(30)\n    os._exit(0)\n"
    ),
    "thread_outlives_main": (
        WRONG + "import threading\nthreading.Thread(target=time.sleep, args=(30,), daemon=False).start()\n"
    ),
    "ignore_signals_and_sleep": (
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
        "    signal.signal(s, signal.SIG_IGN)\ntime.sleep(60)\n"
    ),
    "huge_file_write": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'z' * (1 << 20))\n",
    "fd_exhaustion": "fs = [open('/dev/null') for _ in range(10**5)]\n",
    "thread_bomb": "import threading\nwhile True:\n    threading.Thread(target=time.sleep, args=(30,)).start()\n",
    "fork_bomb_then_exit": "for _ in range(100):\n    try:\n        if os.fork() == 0:\n            time.sleep(30)\n"
    "    except OSError:\n        break\nos._exit(0)\n",
    "read_stdin": "input()\n",
    "huge_return_value": "class Solution:\n    def add(self, a, b):\n        return [0] * (10**7)\n",
    "cyclic_linked_list": (
        "class ListNode:\n    def __init__(self):\n        self.val = 5\n        self.next = self\n"
        "class Solution:\n    def add(self, a, b):\n        return ListNode()\n"
    ),
}


@pytest.fixture(autouse=True)
def _strict_only():
    require_strict()


def _job_uids() -> set[int]:
    return {executor.job_uid(z) for zs in executor._IDLE.values() for z in zs}


def _live_uids() -> set[int]:
    uids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            uids.add(int(line.split()[1]))
            except OSError:
                pass
    return uids


def _run_hostile(body: str):
    t0 = time.monotonic()
    correct, res = grade_correct(SETUP, body, GT, LIMITS)
    wall = time.monotonic() - t0
    assert not correct, (res.status, res.error)
    assert res.status != "infra_error", res.error  # nothing a program does is an infrastructure error
    assert res.cpu_seconds <= LIMITS.timeout_s + CPU_MARGIN_S, res.cpu_seconds
    assert wall < 10 * LIMITS.wall_factor * LIMITS.timeout_s, wall  # the zygote's hard cap
    assert len(res.stdout.encode()) <= LIMITS.max_output_bytes and len(res.stderr.encode()) <= LIMITS.max_output_bytes
    if "uid_drop" in res.protections:
        assert not (_job_uids() & _live_uids()), "a process of the job's uid outlived the run"
    return res


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(name):
    res = _run_hostile(HOSTILE[name])
    expected = {
        "busy_loop": "timeout",
        "sleep": "timeout",
        "output_flood": "timeout",
        "ignore_signals_and_sleep": "timeout",
        "memory_bomb": "memory",
        "os_exit_0_before_asserts": "crash",
        "forged_verdict_stdout": "crash",
    }
    if name in expected:
        assert res.status == expected[name], (res.status, res.error)
    if name == "eq_always_true":
        assert res.calls[0].eq_always_true and not res.calls[0].ok
    if name == "os_exit_0_before_asserts":
        assert res.exit_code == 0 and not res.reached_end


def test_write_outside_workdir_leaves_nothing(tmp_path):
    targets = [str(tmp_path / TOKEN), f"/var/tmp/{TOKEN}", f"/work/{TOKEN}", f"/{TOKEN}", f"/dev/shm/{TOKEN}"]
    body = WRONG + "".join(f"try:\n    open({t!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for t in targets)
    _run_hostile(body)
    assert not any(os.path.exists(t) for t in targets)


def test_workdir_is_removed_after_the_run():
    first = execute(CheckJob(code="import os\nopen('f', 'w').write('x')", calls=("os.getcwd()",)), LIMITS)
    assert first.status == "ok" and first.calls[0].ok
    cwd = first.calls[0].value
    assert not os.path.exists(os.path.join(cwd, "f"))
    second = execute(CheckJob(code="import os", calls=(f"os.path.exists({cwd!r})",)), LIMITS)
    assert second.calls[0].value is False


def test_parent_environment_is_not_readable(monkeypatch):
    monkeypatch.setenv("ROUTED_GRPO_TEST_SECRET", TOKEN)
    code = (
        "import os\ndef leak():\n    found = str(dict(os.environ))\n"
        f"    for pid in (os.getppid(), {os.getpid()}):\n        try:\n"
        "            found += open(f'/proc/{pid}/environ').read()\n"
        "        except OSError:\n            pass\n    return found\n"
    )
    res = execute(CheckJob(code=code, calls=("leak()",)), LIMITS)
    assert res.calls[0].ok and TOKEN not in res.calls[0].value


def test_socket_cannot_reach_the_host():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    body = WRONG + (
        "import socket\ns = socket.socket()\ns.settimeout(0.5)\ntry:\n"
        f"    s.connect(('127.0.0.1', {port}))\n    s.sendall(b'{TOKEN}')\nexcept OSError:\n    pass\n"
    )
    res = _run_hostile(body)
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    if "net_namespace" not in res.protections:
        pytest.skip("no network namespace on this OS: " + ", ".join(res.protections))


def test_killing_the_grading_process_fails():
    body = WRONG + (
        f"import signal\nfor target in (os.getppid(), {os.getpid()}):\n"
        "    for sig in (signal.SIGKILL, signal.SIGTERM):\n"
        "        try:\n            os.kill(target, sig)\n        except OSError:\n            pass\n"
        f"try:\n    os.killpg({os.getpgid(0)}, signal.SIGKILL)\nexcept OSError:\n    pass\n"
    )
    _run_hostile(body)
    res = execute(CheckJob(code="x = 1", calls=("x",)), LIMITS)  # the zygote and we are still here
    assert res.status == "ok" and res.calls[0].value == 1


def test_expected_values_never_enter_the_child():
    gt = (f"assert Solution().add(a = 2, b = 3) == '{TOKEN}-expected'",)
    body = (
        "import gc\nclass Solution:\n    def add(self, a, b):\n"
        "        return any(isinstance(o, str) and 'expected' in o and o.startswith('hostile') "
        "for o in gc.get_objects())\n"
    )
    correct, res = grade_correct(SETUP, body, gt, LIMITS)
    assert res.calls[0].ok and res.calls[0].value is False and not correct
