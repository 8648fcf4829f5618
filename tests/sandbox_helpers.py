"""Shared helpers for the sandbox tests: where the reference LeetCode records are, and small completions."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from sandbox.executor import CheckJob, Limits, execute
from sandbox.problems import Problem, render_leetcode_question

REPO = Path(__file__).resolve().parents[1]
REFERENCE_NAME = "leetcode_test_medhard.jsonl"

# A toy problem in the reference format: honest, wrong and hacking answers are written against it.
ADD = Problem(
    "add",
    render_leetcode_question("Return a + b.", "add", "class Solution:\n    def add(self, a: int, b: int) -> int:\n"),
    ("assert Solution().add(a = 1, b = 2) == 3", "assert Solution().add(a = -4, b = 4) == 0"),
    "from typing import *\n",
    "Solution().add",
    "class Solution:\n    def add(self, a, b):\n        return a + b\n",
    "class Solution:\n    def add(self, a: int, b: int) -> int:\n",
    "medium",
)
HONEST = ADD.canonical_solution
WRONG = "class Solution:\n    def add(self, a, b):\n        return 0\n"


def reference_path() -> Path | None:
    """The 119 reference records: $ROUTED_GRPO_LEETCODE (the file or its folder), else ../shared/data/leetcode."""
    env = os.environ.get("ROUTED_GRPO_LEETCODE")
    base = Path(env) if env else REPO.parent / "shared" / "data" / "leetcode"
    path = base if base.is_file() else base / REFERENCE_NAME
    return path if path.is_file() else None


def require_reference() -> Path:
    path = reference_path()
    if path is None:
        pytest.skip("reference records absent: set ROUTED_GRPO_LEETCODE to leetcode_test_medhard.jsonl or its folder")
    return path


def fenced(code: str) -> str:
    """A response that wraps `code` in a python fence, as a model would."""
    return f"Here is my solution.\n```python\n{code.strip()}\n```\n"


_STRICT: list = []  # cached: None when the strict level is in force here, else the reason it is not


def strict_unavailable_reason() -> str | None:
    """Why the strict isolation level cannot be reached on this machine (None: it can), checked once."""
    if not _STRICT:
        from sandbox.executor import IsolationUnavailable

        try:
            res = execute(CheckJob(code="x = 1", calls=("x",)))
            _STRICT.append(None if res.status == "ok" else f"a trivial program gave {res.status}: {res.error}")
        except IsolationUnavailable as e:
            _STRICT.append(str(e))
    return _STRICT[0]


def require_strict() -> None:
    """Skip (saying why) unless the strict level is verified: hostile programs run only under it."""
    reason = strict_unavailable_reason()
    if reason is not None:
        pytest.skip(f"hostile programs run only under the strict isolation level, unavailable here: {reason}")


# ---- isolation and confinement tests ----
LIMITS = Limits(timeout_s=2.0, memory_mb=256)
PYSECCOMP_DIR = os.path.dirname(importlib.util.find_spec("pyseccomp").origin)


def job_values(code: str, *calls: str, limits: Limits = LIMITS) -> list:
    """The values of `calls` after `code`, in one sandboxed job that must run cleanly."""
    res = execute(CheckJob(code=code, calls=calls), limits)
    assert res.status == "ok", (res.status, res.error, res.stderr[-500:])
    assert all(c.ok for c in res.calls), [c.error for c in res.calls]
    return [c.value for c in res.calls]
