"""Shared helpers for the sandbox tests: where the reference LeetCode records are, and small completions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
