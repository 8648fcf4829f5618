"""Verdicts do not depend on machine load (issue 11, finding 4): the limit is CPU time, wall clock a backstop.

Covered: with two busy-loop processes keeping both cores loaded, the 119 reference canonical solutions grade
119/119 at the default limits, and a program that needs 70% of its CPU limit is `ok` however long it waits for a
CPU; the CPU limit counts every process of the job; a program may sleep past its CPU limit but not past the
backstop (`wall_factor * timeout_s`), which ends it as a `timeout`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from sandbox_helpers import require_reference, require_strict

from sandbox.executor import CheckJob, Limits, execute, execute_many
from sandbox.verdict import build_check_job, correct_from_result


@pytest.fixture
def both_cores_busy():
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    time.sleep(0.3)
    yield
    for p in loops:
        p.kill()
        p.wait()


def _iterations_per_cpu_second() -> float:
    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < 0.2:
        for _ in range(10000):
            n += 1
    return n / (time.process_time() - t0)


def test_reference_canonical_solutions_grade_correct_under_load(both_cores_busy):
    require_strict()
    rows = [json.loads(line) for line in require_reference().read_text().splitlines() if line.strip()]
    built = [build_check_job(r["setup_code"], r["canonical_solution"], r["gt_answer"]) for r in rows]
    results = execute_many([j for j, _ in built], Limits(), workers=2)
    wrong = [
        (r["id"], res.status, round(res.cpu_seconds, 2), round(res.seconds, 2))
        for (_, specs), res, r in zip(built, results, rows, strict=True)
        if not correct_from_result(specs, res, r["setup_code"])
    ]
    assert len(rows) == 119 and wrong == []


def test_a_busy_machine_does_not_turn_a_program_into_a_timeout(both_cores_busy):
    require_strict()
    n = int(0.7 * _iterations_per_cpu_second())
    code = (
        f"def work():\n    n = 0\n    for _ in range({n // 10000}):\n"  # the calibration's loop, in a function
        "        for _ in range(10000):\n            n += 1\n    return n\n"
    )
    res = execute(CheckJob(code=code, calls=("work()",)), Limits(timeout_s=1.0))
    assert res.status == "ok", (res.status, res.cpu_seconds, res.seconds)
    assert res.cpu_seconds < 1.0


def test_cpu_limit_counts_every_process_of_the_job():
    require_strict()
    code = (
        "import os, time\nkids = [os.fork() for _ in range(2)]\nif 0 in kids:\n    while True:\n        pass\n"
        "time.sleep(30)\n"
    )
    # a wide backstop: on a loaded machine the sleeping main process must not reach it before the CPU limit
    res = execute(CheckJob(code=code, calls=("1",)), Limits(timeout_s=1.0, wall_factor=20.0))
    assert res.status == "timeout" and 1.0 <= res.cpu_seconds < 1.6, (res.status, res.cpu_seconds)


def test_sleeping_is_bounded_by_the_backstop_not_by_the_cpu_limit():
    require_strict()
    nap = execute(CheckJob(code="import time\ntime.sleep(1.5)\nx = 1", calls=("x",)), Limits(timeout_s=1.0))
    assert nap.status == "ok" and nap.seconds >= 1.5 and nap.cpu_seconds < 0.5, (nap.status, nap.seconds)
    t0 = time.monotonic()
    stuck = execute(CheckJob(code="import time\ntime.sleep(60)", calls=("1",)), Limits(timeout_s=0.5))
    assert stuck.status == "timeout" and 1.5 <= time.monotonic() - t0 < 10, (stuck.status, stuck.seconds)
