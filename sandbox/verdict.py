"""Ground-truth verdict for LeetCode-style asserts, decided in the parent from plain-data values.

Usage::

    from sandbox.verdict import grade_correct
    correct, result = grade_correct(problem.setup_code, model_code, problem.gt_answer, Limits(timeout_s=3))

    # batched: build the jobs, run them with execute_many, decide each in the parent
    job, specs = build_check_job(problem.setup_code, model_code, problem.gt_answer)
    correct = correct_from_result(specs, execute(job), problem.setup_code)

Each assert `assert <expr>` is split into the model-dependent calls (every outermost `Solution().<method>(...)`
in it) and a check expression over placeholders `_v0, _v1, ...`: `assert Solution().f(x = 1) == [2]` becomes the
call `Solution().f(x = 1)` and the check `_v0 == [2]`. Only the calls go into the child; the checks (and so the
expected values) stay here. A check that is `_v0 == <literal>` (12,498 of the 12,592 reference asserts) is
compared directly; any other (`_v0 == -inf`, `is_same_list(_v0, list_node([...]))`) is evaluated in a namespace
built from the problem's `setup_code`, trusted dataset code, where ListNode/TreeNode values are rebuilt with its
`list_node` / `tree_node` (a node value is never equal to a plain list, as in the reference harness).
This module does not run model code itself, and does not grade HumanEval-style `check()` tests (see executor).

The returned values arrive encoded (`_channel.CallOutcome.encoded`). A `_v0 == <literal>` check reads the value
only when its node count equals the expected value's (equal values have equal counts), then compares canonical
forms (`_value.canonical`: Python's `==` exactly, by sorting, with no hashing of the program's data). Any other
check gets plain Python objects, built only for values of at most `max(_EVAL_NODES, 4 * len(check))` items, and a
set or dict whose keys collide in one hash value more than `_value.MAX_SAME_HASH` times fails the check. Nothing
a program returns makes `correct_from_result` raise.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sandbox._value import ChannelError, Encoded, canonical, encode_trusted, to_python, tokens
from sandbox.executor import CallOutcome, CheckJob, ExecutionResult, Limits, execute

_NO_LITERAL = object()
_EVAL_NODES = 1 << 12  # items a value may have for a check other than `_v0 == <literal>` (at least)


@dataclass(frozen=True)
class AssertSpec:
    """One ground-truth assert: calls evaluated in the child; `check` over `_v0, _v1, ...` evaluated here."""

    calls: tuple[str, ...]
    check: str


def _is_solution_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Call)
        and isinstance(node.func.value.func, ast.Name)
        and node.func.value.func.id == "Solution"
    )


class _CallLifter(ast.NodeTransformer):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if _is_solution_call(node):
            self.calls.append(ast.unparse(node))
            return ast.Name(id=f"_v{len(self.calls) - 1}", ctx=ast.Load())
        return self.generic_visit(node)


def parse_asserts(gt_answer: Sequence[str]) -> list[AssertSpec]:
    """Split each `assert` into calls and a check. Raises ValueError naming the assert on anything else."""
    specs = []
    for i, text in enumerate(gt_answer):
        try:
            body = ast.parse(text).body
        except SyntaxError as e:
            raise ValueError(f"gt_answer[{i}] is not valid Python ({e.msg}): {text[:120]!r}") from None
        if len(body) != 1 or not isinstance(body[0], ast.Assert):
            raise ValueError(f"gt_answer[{i}] is not a single assert statement: {text[:120]!r}")
        lifter = _CallLifter()
        test = lifter.visit(body[0].test)
        check = ast.unparse(test)
        if not lifter.calls:
            raise ValueError(f"gt_answer[{i}] calls no Solution().<method>(...): {text[:120]!r}")
        if any(isinstance(n, ast.Name) and n.id == "Solution" for n in ast.walk(test)):
            raise ValueError(f"gt_answer[{i}] uses Solution outside a Solution().<method>(...) call: {text[:120]!r}")
        specs.append(AssertSpec(tuple(lifter.calls), check))
    return specs


@functools.lru_cache(maxsize=65536)
def _literal_rhs(check: str) -> Any:
    """The literal of a `_v0 == <literal>` check, or _NO_LITERAL."""
    test = ast.parse(check, mode="eval").body
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return _NO_LITERAL
    if not (isinstance(test.left, ast.Name) and test.left.id == "_v0"):
        return _NO_LITERAL
    try:
        return ast.literal_eval(test.comparators[0])
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NO_LITERAL


@functools.lru_cache(maxsize=64)
def _setup_namespace(setup_code: str) -> dict:
    ns: dict = {"__name__": "__verdict__"}
    exec(compile(setup_code, "<setup_code>", "exec"), ns)
    return ns


@functools.lru_cache(maxsize=65536)
def _compiled(check: str):
    return compile(check, "<check>", "eval")


@functools.lru_cache(maxsize=4096)
def _expected(check: str) -> tuple[int, tuple] | None:
    """(node count, canonical form) of the literal of a `_v0 == <literal>` check; None when it is not one. A
    literal that no program could return (`...`) gets a count no value has."""
    literal = _literal_rhs(check)
    if literal is _NO_LITERAL:
        return None
    try:
        enc = encode_trusted(literal)
        return enc.nodes, canonical(tokens(enc))
    except (ChannelError, RecursionError):
        return -1, ()


def _encoded(out: CallOutcome) -> Encoded:
    return out.encoded if out.encoded is not None else encode_trusted(out.value)


def _check_passes(spec: AssertSpec, outs: Sequence[CallOutcome], setup_code: str) -> bool:
    """Does the check hold on the calls' values? Builds nothing larger than the expected value from them."""
    values = [_encoded(o) for o in outs]
    expected = None if any(v.has_nodes for v in values) else _expected(spec.check)
    if expected is not None:  # equal values have equal node counts: only a value of the expected size is read
        nodes, canon = expected
        return values[0].nodes == nodes and canonical(tokens(values[0])) == canon
    if any(v.nodes > max(_EVAL_NODES, 4 * len(spec.check)) for v in values):
        return False  # larger than anything the check's text describes
    ns = dict(_setup_namespace(setup_code))
    builders = {"ListNode": ns.get("list_node"), "TreeNode": ns.get("tree_node")}
    try:
        ns.update({f"_v{i}": to_python(v, builders) for i, v in enumerate(values)})
        return bool(eval(_compiled(spec.check), ns))
    except Exception:  # noqa: BLE001 - a check that raises on the returned value is a failed assert
        return False


def correct_from_result(specs: Sequence[AssertSpec], result: ExecutionResult, setup_code: str) -> bool:
    """True iff the program reached its end and every check holds on the values it returned (decided here)."""
    n_calls = sum(len(s.calls) for s in specs)
    if result.status != "ok" or not result.reached_end or result.script_ok is False or len(result.calls) != n_calls:
        return False
    pos = 0
    for spec in specs:
        outs = result.calls[pos : pos + len(spec.calls)]
        pos += len(spec.calls)
        if not all(o.ok and not o.eq_always_true for o in outs):
            return False
        try:
            if not _check_passes(spec, outs, setup_code):
                return False
        except (ChannelError, RecursionError, MemoryError):  # a value the check cannot take fails it
            return False
    return True


def build_check_job(
    setup_code: str, code: str, gt_answer: Sequence[str] | Sequence[AssertSpec]
) -> tuple[CheckJob, list[AssertSpec]]:
    """The CheckJob that evaluates every assert's calls after `setup_code + code`, and the parsed specs."""
    specs = list(gt_answer) if gt_answer and isinstance(gt_answer[0], AssertSpec) else parse_asserts(gt_answer)
    calls = tuple(c for s in specs for c in s.calls)
    return CheckJob(code=f"{setup_code}\n{code}", calls=calls), specs


def grade_correct(
    problem_setup_code: str, code: str, gt_answer: Sequence[str], limits: Limits = Limits()
) -> tuple[bool, ExecutionResult]:
    """Run `code` after the setup code, evaluate the asserts' calls in the sandbox and decide here."""
    job, specs = build_check_job(problem_setup_code, code, gt_answer)
    result = execute(job, limits)
    return correct_from_result(specs, result, problem_setup_code), result
