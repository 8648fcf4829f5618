"""The parent's comparison of a returned value gives exactly Python's `==` verdicts (issue 18, item 6).

A seeded generator makes expected values of every plain type the channel carries (None, bool, int, big int, float
with -0.0, inf and NaN, complex, str, bytes, list, tuple, set, frozenset, dict, nested) and returned values derived
from them (copies, numbers of another type with the same value, lists turned into tuples, sets into frozensets,
dicts reordered, items changed, dropped or added). The reference verdict is `==` between the expected value and the
returned value as the channel delivers it (every NaN a fresh object); the verdict under test reads the returned
value from a frame, as the harness writes it, and never builds it. Hand-written edge cases come first.
"""

from __future__ import annotations

import ast
import json
import math
import random
import struct

import pytest

from sandbox._channel import read_channel
from sandbox._value import canonical, encode_plain, encode_trusted, tokens
from sandbox.executor import ExecutionResult
from sandbox.verdict import AssertSpec, correct_from_result

NAN = float("nan")
P = 2**61 - 1  # every multiple of it hashes to 0
SCALARS = [
    None, True, False, 0, 1, -1, 2, 7, P, 3 * P, 2**53, 2**53 + 1, 10**30, 2**12001, -(2**12001),
    0.0, -0.0, 1.0, 2.0, 0.5, -2.5, 1e300, float(2**53), float("inf"), float("-inf"), NAN,
    1 + 0j, complex(1, -0.0), 2j, complex(0.5, 0), complex(NAN, 0), complex(1, NAN),
    "", "a", "1", "é", "\ud800", b"", b"a", b"\x00\xff",
]  # fmt: skip
EDGE = [  # (expected, returned)
    (1, 1.0), (1, True), (0, False), (0, -0.0), (1, 1 + 0j), (0.5, complex(0.5, -0.0)), (2**53 + 1, float(2**53)),
    (NAN, NAN), ([NAN], [NAN]), ({1: "a"}, {1.0: "a"}), ({1: "a"}, {True: "a"}), ({1: "a", 2: "b"}, {2: "b", 1: "a"}),
    ({1, 2}, frozenset({2.0, 1})), ([1, 2], (1, 2)), ((1,), [1]), ("a", b"a"), (None, 0), ([], ()), ({}, set()),
    ([[1, [2, (3,)]]], [[1.0, [2, (3.0,)]]]), ({(1, 2): {3}}, {(1.0, 2): {3.0}}), (float("inf"), float("inf")),
    (float("inf"), 10**400), (10**400, 10**400), ({frozenset({1}): 2}, {frozenset({1.0}): 2.0}), ({NAN}, {NAN}),
    ([1, 2, 3], [1, 2]), ({"a": 1}, {"a": 1, "b": 2}), ([0.1 + 0.2], [0.3]), ("\ud800", "\ud800"),
]  # fmt: skip


def fresh(v):
    """`v` as the channel delivers it: every NaN a new object (identity never makes two NaNs equal)."""
    if isinstance(v, float) and math.isnan(v):
        return float("nan")
    if isinstance(v, complex) and (math.isnan(v.real) or math.isnan(v.imag)):
        return complex(fresh(v.real), fresh(v.imag))
    if isinstance(v, dict):
        return {fresh(k): fresh(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return type(v)(fresh(x) for x in v)
    return v


def gen(rng: random.Random, depth: int = 0, hashable: bool = False):
    r = rng.random()
    if depth >= 3 or r < 0.45:
        return rng.choice(SCALARS)
    n = rng.randrange(4)
    if hashable:
        kind = rng.choice(("tuple", "frozenset"))
    else:
        kind = rng.choice(("list", "tuple", "set", "frozenset", "dict"))
    if kind == "dict":
        return {gen(rng, depth + 1, True): gen(rng, depth + 1) for _ in range(n)}
    items = [gen(rng, depth + 1, hashable or kind in ("set", "frozenset")) for _ in range(n)]
    return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](items)


def _same_number(rng: random.Random, v):
    options = [v]
    if type(v) is int and abs(v) < 2**1000:
        options += [float(v), complex(v, 0)] + ([bool(v)] if v in (0, 1) else [])
    if type(v) is float and v.is_integer():
        options += [int(v), complex(v, -0.0)]
    return rng.choice(options)


def mutate(rng: random.Random, v, depth: int = 0):
    """A returned value: mostly equal to `v` (maybe with other types of the same value), sometimes not."""
    r = rng.random()
    if r < 0.04:
        return gen(rng, depth, isinstance(v, (tuple, frozenset)))
    if isinstance(v, (bool, int, float)):
        return _same_number(rng, v)
    if isinstance(v, dict):
        items = [(mutate(rng, k, depth + 1), mutate(rng, x, depth + 1)) for k, x in v.items()]
        rng.shuffle(items)
        if r < 0.08 and items:
            items.pop()
        try:
            return dict(items)
        except TypeError:  # a key turned unhashable
            return v
    if isinstance(v, (list, tuple, set, frozenset)):
        items = [mutate(rng, x, depth + 1) for x in v]
        if r < 0.08:
            items.append(rng.choice(SCALARS))
        kind = type(v)
        if r > 0.92:
            kind = {list: tuple, tuple: list, set: frozenset, frozenset: set}[kind]
        try:
            return kind(items)
        except TypeError:  # a list turned unhashable inside a set
            return v
    return v


def corpus(n: int, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        expected = gen(rng)
        pairs.append((expected, mutate(rng, expected)))
    return EDGE + pairs


def equal_in_parent(expected, returned) -> bool:
    """The comparison the verdict makes: node counts, then canonical forms of the encoded texts."""
    ret = encode_trusted(returned)
    exp = encode_trusted(expected)
    return ret.nodes == exp.nodes and canonical(tokens(ret)) == canonical(tokens(exp))


def test_corpus_has_both_verdicts():
    verdicts = [fresh(r) == e for e, r in corpus(3000)]
    assert 0.3 < sum(verdicts) / len(verdicts) < 0.9


def test_comparison_equals_python_eq_on_the_corpus():
    wrong = [(e, r) for e, r in corpus(3000) if equal_in_parent(e, r) != (fresh(r) == e)]
    assert not wrong, wrong[:5]


def frame(obj) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack("!I", len(data)) + data


def graded(expected_text: str, returned) -> bool:
    """The verdict on `assert Solution().f() == <expected_text>` for a call that returned `returned`."""
    chan = read_channel(frame({"k": "call", "i": 0, "eqt": False, "ok": True, "v": encode_plain(returned)}), 1)
    assert chan.error is None
    result = ExecutionResult(status="ok", calls=chan.calls, reached_end=True)
    return correct_from_result([AssertSpec(("Solution().f()",), f"_v0 == {expected_text}")], result, "")


def _literal(v) -> bool:
    try:
        return ast.literal_eval(repr(v)) == v
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def _expression(v) -> bool:
    """`repr(v)` evaluates (frozensets do, through the eval path; `inf` and `nan` do not)."""
    try:
        eval(repr(v), {})  # noqa: S307 - the test's own values
        return True
    except NameError:
        return False


def test_verdicts_from_frames_equal_python_eq():
    pairs = [(e, r) for e, r in corpus(1500, seed=1) if _literal(e) or _expression(e)]
    assert len(pairs) > 500 and any(not _literal(e) for e, _ in pairs)
    wrong = [(e, r) for e, r in pairs if graded(repr(e), r) != (fresh(r) == e)]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("expected, returned", [p for p in EDGE if _expression(p[0])])
def test_edge_cases_through_the_verdict(expected, returned):
    assert graded(repr(expected), returned) == (fresh(returned) == expected)


def test_nan_never_equals_and_checks_other_than_equality_see_python_values():
    assert not graded("float('nan')", NAN) and not graded("[float('nan')]", [NAN])
    chan = read_channel(frame({"k": "call", "i": 0, "eqt": False, "ok": True, "v": encode_plain([NAN, 2**70])}), 1)
    result = ExecutionResult(status="ok", calls=chan.calls, reached_end=True)
    check = AssertSpec(("Solution().f()",), "math.isnan(_v0[0]) and _v0[1] == 2 ** 70")
    assert correct_from_result([check], result, "import math")
