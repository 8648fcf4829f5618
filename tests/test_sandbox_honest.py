"""Honest but unusual solutions still grade correct under the strict level's confinement: threads, deep recursion in
a thread, big integers, reading stdin, heavy printing, `fractions`, `decimal`, `sqlite3` in memory, a returned float
equal to the int expected, child processes. Each answers the toy problem `add` (tests/sandbox_helpers.py)."""

from __future__ import annotations

import pytest
from sandbox_helpers import ADD, require_strict

from sandbox.executor import Limits
from sandbox.verdict import grade_correct

LIMITS = Limits(timeout_s=5.0, memory_mb=512)


def _solution(body: str, head: str = "") -> str:
    lines = "\n".join("        " + line for line in body.strip().splitlines())
    return f"{head}\nclass Solution:\n    def add(self, a, b):\n{lines}\n"


SOLUTIONS = {
    "threads": _solution(
        "from concurrent.futures import ThreadPoolExecutor\nwith ThreadPoolExecutor(4) as pool:\n"
        "    parts = list(pool.map(lambda x: x, [a, b]))\nreturn sum(parts)"
    ),
    "deep_recursion_in_a_thread": _solution(
        "import sys, threading\nsys.setrecursionlimit(10**6)\nthreading.stack_size(1 << 27)\nout = []\n"
        "def f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\n"
        "t = threading.Thread(target=lambda: out.append(f(100000)))\nt.start()\nt.join()\n"
        "return a + b + out[0] - 100000"
    ),
    "big_integers": _solution("big = 7 ** 40000\nreturn (a + b + big * 3) - 3 * big"),
    "reads_stdin": _solution("import sys\nrest = sys.stdin.read()\nreturn a + b + len(rest)"),
    "heavy_printing": _solution("for i in range(200000):\n    print(i, 'x' * 20)\nreturn a + b"),
    "fractions": _solution("from fractions import Fraction\nreturn int(Fraction(a, 3) * 3 + Fraction(b * 7, 7))"),
    "decimal": _solution(
        "from decimal import Decimal, getcontext\ngetcontext().prec = 60\n"
        "return int((Decimal(a) / Decimal(7) * 7 + Decimal(b)).to_integral_value())"
    ),
    "sqlite3_in_memory": _solution(
        "import sqlite3\nc = sqlite3.connect(':memory:')\nc.execute('create table t(x integer)')\n"
        "c.executemany('insert into t values (?)', [(a,), (b,)])\n"
        "return c.execute('select sum(x) from t').fetchone()[0]"
    ),
    "float_equal_to_int": _solution("return float(a + b)"),
    "child_process": _solution(
        "import os\nr, w = os.pipe()\nif os.fork() == 0:\n    os.write(w, str(a + b).encode())\n    os._exit(0)\n"
        "os.close(w)\nout = int(os.read(r, 100))\nos.wait()\nreturn out"
    ),
    "lru_cache_and_heapq": _solution(
        "import functools, heapq\n@functools.lru_cache(None)\ndef g(x):\n    return x\n"
        "h = [g(a), g(b)]\nheapq.heapify(h)\nreturn heapq.heappop(h) + heapq.heappop(h)"
    ),
}


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_honest_unusual_solution_grades_correct(name):
    require_strict()
    correct, res = grade_correct(ADD.setup_code, SOLUTIONS[name], ADD.gt_answer, LIMITS)
    assert correct, (res.status, res.error, res.stderr[-500:])
