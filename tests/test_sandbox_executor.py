"""Executor and verdict unit tests: values as plain data, statuses, the channel, assert parsing, the pool."""

from __future__ import annotations

import pytest

from sandbox.executor import CheckJob, Limits, NodeList, decode_value, execute, execute_many
from sandbox.verdict import AssertSpec, build_check_job, correct_from_result, grade_correct, parse_asserts

FAST = Limits(timeout_s=2.0)
SETUP = (
    "class ListNode:\n    def __init__(self, val=0, next=None):\n        self.val = val\n        self.next = next\n"
    "def list_node(values):\n    head = None\n    for v in reversed(values):\n        head = ListNode(v, head)\n"
    "    return head\n"
    "def is_same_list(p, q):\n    while p and q:\n        if p.val != q.val:\n            return False\n"
    "        p, q = p.next, q.next\n    return p is None and q is None\n"
    "class TreeNode:\n    def __init__(self, val=0, left=None, right=None):\n"
    "        self.val, self.left, self.right = val, left, right\n"
    "inf = float('inf')\n"
)


def test_plain_values_round_trip_with_their_types():
    calls = (
        "[1, (2, 3), {4: 'a'}, {5}, frozenset({6}), None, True, 1.5, b'x', 2**20000, -0.0]",
        "float('inf')",
        "float('-inf')",
        "1j + 2",
    )
    res = execute(CheckJob(code="", calls=calls), FAST)
    assert res.status == "ok" and res.reached_end and res.exit_code == 0
    first = res.calls[0].value
    assert first == [1, (2, 3), {4: "a"}, {5}, frozenset({6}), None, True, 1.5, b"x", 2**20000, -0.0]
    assert type(first[1]) is tuple and type(first[3]) is set and type(first[6]) is bool
    assert [c.value for c in res.calls[1:]] == [float("inf"), float("-inf"), 2 + 1j]


def test_non_plain_values_are_refused():
    code = "class X(int):\n    pass\nclass Y:\n    pass\n"
    res = execute(CheckJob(code=code, calls=("X(3)", "Y()", "[Y()]", "lambda: 1")), FAST)
    assert [c.ok for c in res.calls] == [False] * 4
    assert res.calls[0].error == "unserialisable X"


def test_list_and_tree_nodes_come_back_as_value_lists():
    code = SETUP + "t = TreeNode(1, None, TreeNode(2, TreeNode(3)))\n"
    res = execute(CheckJob(code=code, calls=("list_node([1, 2, 3])", "t", "[list_node([4])]")), FAST)
    assert res.calls[0].value == [1, 2, 3] and res.calls[0].kind == "ListNode"
    assert res.calls[1].value == [1, None, 2, 3] and res.calls[1].kind == "TreeNode"
    assert isinstance(res.calls[2].value[0], NodeList) and res.calls[2].value[0].kind == "ListNode"


@pytest.mark.parametrize("bad", [{"zz": 1}, {"t": 1, "s": 2}, {"s": [[1]]}, {"I": "xyz"}])
def test_decoder_rejects_malformed_values(bad):
    with pytest.raises(ValueError):
        decode_value(bad)


def test_statuses_are_distinct_from_wrong_answers():
    assert execute(CheckJob(code="x = 1", calls=("x",)), FAST).status == "ok"
    crash = execute(CheckJob(code="raise ValueError('boom')", calls=("1",)), FAST)
    assert crash.status == "crash" and "ValueError: boom" in crash.error and not crash.reached_end
    busy = execute(CheckJob(code="while True: pass"), Limits(timeout_s=0.5))
    assert busy.status == "timeout" and 0.5 <= busy.cpu_seconds < 1.0, (busy.status, busy.cpu_seconds)
    assert execute(CheckJob(code="x = bytearray(1 << 31)"), Limits(memory_mb=256)).status == "memory"
    call_err = execute(CheckJob(code="", calls=("1 / 0", "2")), FAST)
    assert call_err.status == "ok" and not call_err.calls[0].ok and call_err.calls[1].value == 2


def test_sys_exit_zero_in_the_program_is_not_reaching_the_end():
    res = execute(CheckJob(code="import sys\nsys.exit(0)", calls=("1",)), FAST)
    assert res.exit_code == 0 and not res.reached_end and res.status == "crash"
    assert not res.calls[0].ok


def test_script_outcome_and_files_and_output():
    job = CheckJob(
        code="print('hello')\nopen('out.txt', 'w').write('data')",
        script="assert 1 == 2",
        files_to_return=("out.txt", "missing.txt", "../etc/passwd"),
    )
    res = execute(job, FAST)
    assert res.script_ok is False and res.reached_end and res.exit_code == 1
    assert res.stdout == "hello\n" and res.files == {"out.txt": "data"}
    assert execute(CheckJob(code="", script="x = 1"), FAST).script_ok is True


def test_output_is_capped():
    res = execute(CheckJob(code="print('x' * 100000)", calls=("1",)), Limits(max_output_bytes=1000))
    assert res.status == "ok" and len(res.stdout) == 1000 and res.calls[0].value == 1


def test_protections_are_reported():
    res = execute(CheckJob(code=""), FAST)
    assert {"process_group", "rlimits", "scrubbed_env", "job_cpu_time"} <= set(res.protections)


def test_limits_are_validated():
    for bad in ({"timeout_s": 0}, {"wall_factor": 0.5}, {"isolation": "loose"}):
        with pytest.raises(ValueError):
            Limits(**bad)


def test_execute_many_preserves_order():
    jobs = [CheckJob(code=f"import time\ntime.sleep({0.05 * (i % 3)})", calls=(str(i),)) for i in range(12)]
    res = execute_many(jobs, FAST, workers=3)
    assert [r.calls[0].value for r in res] == list(range(12))


def test_parse_asserts_splits_calls_and_checks():
    specs = parse_asserts(
        [
            "assert Solution().f(n = 7, q = [[0,5]]) == [2, 2]",
            "assert Solution().g(s = 'a') == -inf",
            "assert is_same_list(Solution().h(head = list_node([1, 2])), list_node([2, 1]))",
        ]
    )
    assert specs[0] == AssertSpec(("Solution().f(n=7, q=[[0, 5]])",), "_v0 == [2, 2]")
    assert specs[1].check == "_v0 == -inf"
    assert specs[2] == AssertSpec(("Solution().h(head=list_node([1, 2]))",), "is_same_list(_v0, list_node([2, 1]))")
    for bad in ("x = 1", "assert f(1) == 2", "assert Solution == 1", "assert ("):
        with pytest.raises(ValueError, match="gt_answer"):
            parse_asserts([bad])


def test_verdict_literal_expression_and_node_checks():
    code = (
        "class Solution:\n    def f(self, n):\n        return n * 2\n    def g(self):\n        return -inf\n"
        "    def h(self, head):\n        return list_node([2, 1])\n"
        "    def k(self):\n        return list_node([1])\n"
    )
    gt = [
        "assert Solution().f(n = 2) == 4",
        "assert Solution().g() == -inf",
        "assert is_same_list(Solution().h(head = list_node([1, 2])), list_node([2, 1]))",
    ]
    assert grade_correct(SETUP, code, gt, FAST)[0]
    assert not grade_correct(SETUP, code, ["assert Solution().f(n = 2) == 5"], FAST)[0]
    assert not grade_correct(SETUP, code, ["assert Solution().f(n = 2) == (4,)"], FAST)[0]
    assert not grade_correct(SETUP, code, ["assert Solution().k() == [1]"], FAST)[0]  # a node is not a list
    assert not grade_correct(SETUP, code, ["assert Solution().f(n = 2) == 4.5"], FAST)[0]


def test_verdict_needs_every_call_and_the_end():
    job, specs = build_check_job(
        "",
        "class Solution:\n    def f(self):\n        return 1\n",
        ["assert Solution().f() == 1", "assert Solution().f() == 1"],
    )
    res = execute(job, FAST)
    assert correct_from_result(specs, res, "")
    truncated = type(res)(**{**res.__dict__, "calls": res.calls[:1]})
    assert not correct_from_result(specs, truncated, "")
    not_ended = type(res)(**{**res.__dict__, "reached_end": False, "status": "crash"})
    assert not correct_from_result(specs, not_ended, "")
