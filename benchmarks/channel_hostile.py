"""Parent-side cost of reading and grading returned values: hostile ones (issue 18, findings 8-10) and honest ones.

Each case is a job's channel bytes as a program could write them on fd 3 (two calls, then the end frame); the
script times `read_channel` plus `correct_from_result` (what `execute` and the verdict do in the grading process,
no sandbox involved) and, in a second run under `tracemalloc`, their peak traced memory. "honest" grades the
expected value of every assert of the 119 LeetCode reference problems, returned as itself (all correct).

    python benchmarks/channel_hostile.py [--leetcode PATH] [--big]

Run it once on each version of `sandbox/` (for the code before a change: PYTHONPATH pointing at a copy of the old
package) and compare the printed figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import struct
import time
import tracemalloc

from sandbox._channel import read_channel
from sandbox.executor import ExecutionResult
from sandbox.verdict import AssertSpec, correct_from_result, parse_asserts

P = 2**61 - 1  # every multiple of it hashes to 0
SPEC_1 = AssertSpec(("Solution().f(1)",), "_v0 == 2")


def frame(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data


def call(i: int, value: bytes) -> bytes:
    return frame(b'{"k":"call","i":%d,"eqt":false,"ok":true,"v":%s}' % (i, value))


def job(value: bytes) -> bytes:
    return call(0, value) + call(1, b"2") + frame(b'{"k":"end"}')


def grade(buf: bytes, specs: list[AssertSpec]) -> str:
    try:
        chan = read_channel(buf, sum(len(s.calls) for s in specs))
        status = "memory" if chan.memory else "ok" if chan.reached_end and chan.error is None else "crash"
        result = ExecutionResult(status=status, calls=chan.calls, reached_end=chan.reached_end, error=chan.error)
        return f"{status}, correct={correct_from_result(specs, result, '')}"
    except Exception as e:  # noqa: BLE001 - the figure to report
        return f"raised {type(e).__name__}"


def hostile_cases(big: bool) -> dict[str, bytes]:
    cases = {
        "nested_420": b"[" * 420 + b"]" * 420,
        "nested_100k": b"[" * 100_000 + b"]" * 100_000,
        "colliding_set_40k": json.dumps({"s": [k * P for k in range(1, 40_001)]}).encode(),
        "colliding_dict_40k": json.dumps({"d": [[k * P, 0] for k in range(1, 40_001)]}).encode(),
        "empty_lists_30mib": b"[" + b"[]," * ((30 << 20) // 3) + b"[]]",
        "empty_lists_2mib": b"[" + b"[]," * ((2 << 20) // 3) + b"[]]",
        "ints_260k": json.dumps([7] * 260_000).encode(),  # just within the new per-job limits
        "escaped_str_150k": json.dumps(["\u00e9x"] * 150_000).encode(),
    }
    if big:
        cases["colliding_set_80k"] = json.dumps({"s": [k * P for k in range(1, 80_001)]}).encode()
    return cases


def honest_jobs(path: str) -> list[tuple[bytes, list[AssertSpec]]]:
    """One job per problem: every call returns its assert's expected literal, encoded as the harness does."""
    from sandbox._harness import encode

    jobs = []
    with open(path) as f:
        for line in f:
            specs = parse_asserts(json.loads(line)["gt_answer"])
            buf = b""
            for i, spec in enumerate(specs):
                expr = ast.parse(spec.check, mode="eval").body
                try:
                    value = ast.literal_eval(expr.comparators[0])
                except ValueError:  # `-inf` and node checks (graded here without their setup code): not literals
                    value = float("-inf") if "inf" in spec.check else [1]
                buf += frame(json.dumps({"k": "call", "i": i, "eqt": False, "ok": True, "v": encode(value)}).encode())
            jobs.append((buf + frame(b'{"k":"end"}'), specs))
    return jobs


def measure(name: str, run) -> None:
    t0 = time.process_time()
    verdict = run()
    seconds = time.process_time() - t0
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"{name:22s} {seconds:9.3f} s CPU  peak {peak / 2**20:9.1f} MiB  {verdict}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leetcode", default=os.environ.get("ROUTED_GRPO_LEETCODE", ""))
    ap.add_argument("--big", action="store_true", help="also 80,000 colliding ints (about 35 s on the old code)")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}")
    specs = [AssertSpec(("Solution().f(0)",), "_v0 == [1, 2, 3]"), SPEC_1]
    for name, value in hostile_cases(args.big).items():
        buf = job(value)
        measure(name, lambda buf=buf: grade(buf, specs))
    if args.leetcode:
        jobs = honest_jobs(args.leetcode)
        measure("honest_119", lambda: f"{sum(grade(b, s).endswith('True') for b, s in jobs)}/{len(jobs)} correct")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
