"""Nothing a program writes can make its run an infrastructure error (issue 11, finding 3).

Covered: malformed frames written by the program on fd 3, end to end (wrong length, truncated header, bad JSON,
a frame that is not an object, unknown kinds, fields and tags, a `setup_error` frame, indexes out of range,
negative, boolean or repeated, frames out of order, a forged end before the calls), garbage on every descriptor,
and the same grammar checked directly on `read_channel`. Each run's status is ok, crash, timeout or memory, never
infra_error, and the program is never graded correct. Setup success travels on its own pipe (`_harness.SETUP_FD`),
closed before the program starts: a program that writes there finds it closed.

Issue 18 (item 6): hostile values on the channel. A list nested 420, 1,000 or 100,000 deep is a `crash`, never an
exception in the grader (finding 8); 40,000 keys that all hash to 0, in a set, frozenset or dict, are kept and
compared without any hash table of them being built (finding 9); 1, 6 and 30 MiB of `[[],[],...]` leave the
grader's traced peak under 2 MiB (finding 10), and a result keeps a value as its encoded text. The same values
written by a program in the sandbox give `crash` or `memory`.
"""

from __future__ import annotations

import gc
import json
import struct
import tracemalloc

import pytest
from sandbox_helpers import require_strict

from sandbox import verdict
from sandbox._channel import read_channel
from sandbox.executor import CheckJob, ExecutionResult, Limits, execute
from sandbox.verdict import AssertSpec, correct_from_result, grade_correct, parse_asserts

GT = ("assert Solution().add(a = 2, b = 3) == 5", "assert Solution().add(a = 1, b = 1) == 2")
WRONG = "import os, struct, json\nclass Solution:\n    def add(self, a, b):\n        return 0\n"
LIMITS = Limits(timeout_s=2.0)


def frame(obj) -> bytes:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack("!I", len(data)) + data


def good_call(i: int, value=5) -> dict:
    return {"k": "call", "i": i, "eqt": False, "ok": True, "v": value}


MALFORMED = {
    "length_too_long": struct.pack("!I", 1000) + b'{"k": "end"}',
    "length_max": struct.pack("!I", 2**32 - 1) + b"{}",
    "truncated_header": b"\x00\x00",
    "bad_json": frame(b"{not json"),
    "not_an_object": frame([1, 2, 3]),
    "deep_json": frame(b"[" * 100000 + b"]" * 100000),
    "unknown_kind": frame({"k": "verdict", "passed": True}),
    "setup_error": frame({"k": "setup_error", "e": "x"}),
    "unknown_tag": frame(good_call(0, {"zz": 1})) + frame(good_call(1)) + frame({"k": "end"}),
    "bad_tag_body": frame(good_call(0, {"I": "not hex"})) + frame(good_call(1)) + frame({"k": "end"}),
    "extra_field": frame({**good_call(0), "infra": True}),
    "index_out_of_range": frame(good_call(7)),
    "negative_index": frame(good_call(-1)),
    "bool_index": frame({**good_call(0), "i": True}),
    "string_ok": frame({**good_call(0), "ok": "yes"}),
    "duplicate_index": frame(good_call(0)) + frame(good_call(0)),
    "out_of_order": frame(good_call(1)) + frame(good_call(0)),
    "end_before_calls": frame({"k": "end"}),
    "call_after_end": frame(good_call(0)) + frame(good_call(1)) + frame({"k": "end"}) + frame(good_call(1)),
    "two_scripts": frame(good_call(0)) + frame(good_call(1)) + frame({"k": "script", "ok": True}) * 2,
    "code_error_after_call": frame(good_call(0)) + frame({"k": "code_error", "e": "x", "mem": False}),
    "list_as_kind": frame({"k": ["call"]}),
    "ok_call_without_value": frame({"k": "call", "i": 0, "eqt": False, "ok": True, "e": "x", "mem": False}),
    "failed_call_with_value": frame({"k": "call", "i": 0, "eqt": False, "ok": False, "v": 5}),
    "nan_token": frame(b'{"k":"call","i":0,"eqt":false,"ok":true,"v":NaN}'),
    "repeated_field": frame(b'{"k":"call","i":0,"eqt":false,"ok":true,"v":5,"v":5}'),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_from_the_program_are_never_an_infrastructure_error(name):
    require_strict()
    body = WRONG + f"os.write(3, {MALFORMED[name]!r})\n"
    correct, res = grade_correct("", body, GT, LIMITS)
    assert res.status in ("ok", "crash", "timeout", "memory") and res.status != "infra_error", (res.status, res.error)
    assert not correct
    if name not in ("length_too_long", "length_max", "truncated_header"):  # those swallow the harness's frames
        assert res.status == "crash" and "value channel" in (res.error or ""), (res.status, res.error)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_read_channel_rejects_what_the_harness_never_writes(name):
    chan = read_channel(MALFORMED[name], 2)
    assert chan.error is not None and chan.error.startswith("value channel")
    assert not chan.reached_end and all(not c.ok for c in chan.calls)


def test_read_channel_accepts_the_harness_grammar():
    chan = read_channel(frame(good_call(0)) + frame(good_call(1, {"t": [1, 2]})) + frame({"k": "end"}), 2)
    assert chan.error is None and chan.reached_end and chan.calls[1].value == (1, 2)
    cut = read_channel(frame(good_call(0)), 2)  # a run cut short: a prefix of the grammar
    assert cut.error is None and not cut.reached_end and cut.calls[0].ok and not cut.calls[1].ok


def test_garbage_on_every_descriptor_is_not_an_infrastructure_error():
    require_strict()
    body = (
        WRONG + "for fd in range(1024):\n    try:\n        os.write(fd, b'\\xff\\x00' * 512)\n"
        "    except OSError:\n        pass\n"
    )
    correct, res = grade_correct("", body, GT, LIMITS)
    assert res.status == "crash" and not correct, (res.status, res.error)


def test_the_setup_pipe_is_closed_before_the_program_starts():
    require_strict()
    res = execute(
        CheckJob(
            code="import os\ntry:\n    os.write(4, b'ok 1\\n')\n    r = 'wrote'\n"
            "except OSError as e:\n    r = type(e).__name__\n",
            calls=("r",),
        ),
        LIMITS,
    )
    assert res.status == "ok" and res.calls[0].value == "OSError", res.calls[0]


# ------------------------------------------------ hostile values (issue 18, item 6; findings 8, 9 and 10)
P = 2**61 - 1  # every multiple of it hashes to 0
SPECS = parse_asserts(GT)
END = frame({"k": "end"})


def raw_call(i: int, value: bytes) -> bytes:
    return frame(b'{"k":"call","i":%d,"eqt":false,"ok":true,"v":%s}' % (i, value))


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def empty_lists(mib: int) -> bytes:
    return b"[" + b"[]," * ((mib << 20) // 3) + b"[]]"


def grade_channel(buf: bytes, specs=SPECS, setup: str = "") -> tuple[bool, object]:
    """What `execute` and the verdict do with a job's channel bytes (the status as `executor._assemble` sets it)."""
    chan = read_channel(buf, sum(len(s.calls) for s in specs))
    status = "memory" if chan.memory else "ok" if chan.reached_end and chan.error is None else "crash"
    result = ExecutionResult(status=status, calls=chan.calls, reached_end=chan.reached_end, error=chan.error)
    return correct_from_result(specs, result, setup), result


@pytest.mark.parametrize("depth", [420, 1_000, 100_000])
def test_a_deeply_nested_value_is_a_crash_in_the_parent_not_an_exception(depth):  # finding 8
    correct, res = grade_channel(raw_call(0, nested(depth)) + frame(good_call(1, 2)) + END)
    assert not correct and res.status == "crash" and "nested" in res.error, res.error


def test_a_value_as_deep_as_the_harness_writes_is_read():
    deep = (b'{"t":[' * 100 + b"5" + b"]}" * 100).join([b"[" * 100, b"]" * 100])  # 200 containers deep
    correct, res = grade_channel(raw_call(0, deep) + frame(good_call(1, 2)) + END)
    assert res.status == "ok" and not correct
    value = res.calls[0].value
    for _ in range(100):
        value = value[0]
    for _ in range(99):
        value = value[0]
    assert value == (5,)


@pytest.mark.parametrize("tag", ["s", "f", "d"])
def test_keys_that_all_hash_to_zero_build_no_hash_table_in_the_parent(tag):  # finding 9
    items = [[k * P, k] if tag == "d" else k * P for k in range(1, 40_001)]
    buf = raw_call(0, json.dumps({tag: items}).encode()) + frame(good_call(1, 2)) + END
    chan = read_channel(buf, 2)
    assert chan.error is None and chan.calls[0].ok
    reachable, layer = [], list(chan.calls)  # what the result holds (a dict of ints is not in gc.get_objects())
    for _ in range(3):
        layer = gc.get_referents(*layer)
        reachable += layer
    held = [
        o for o in gc.get_objects() + reachable if type(o) in (set, frozenset, dict) and len(o) >= 40_000 and P in o
    ]
    assert not held, "the parent built the program's set or dict"
    literal = "{" + ", ".join(f"{k}: {k}" if tag == "d" else str(k) for k in range(1, 40_001)) + "}"
    specs = [AssertSpec(("Solution().add(a = 2, b = 3)",), f"_v0 == {literal}"), SPECS[1]]
    assert not grade_channel(buf, specs)[0]  # as large as the expected value, and compared without hashing
    small = [[k * P, k] if tag == "d" else k * P for k in range(1, 101)]
    literal = "{" + ", ".join(f"{k * P}: {k}" if tag == "d" else str(k * P) for k in range(100, 0, -1)) + "}"
    specs = [AssertSpec(("Solution().add(a = 2, b = 3)",), f"_v0 == {literal}"), SPECS[1]]
    assert grade_channel(raw_call(0, json.dumps({tag: small}).encode()) + frame(good_call(1, 2)) + END, specs)[0]


def test_a_literal_check_never_builds_the_returned_value(monkeypatch):
    import sandbox._value

    def refuse(*args, **kwargs):
        raise AssertionError("the program's value was built")

    monkeypatch.setattr(sandbox._value, "to_python", refuse)
    monkeypatch.setattr(verdict, "to_python", refuse)
    buf = raw_call(0, json.dumps({"s": [k * P for k in range(1, 1001)]}).encode()) + frame(good_call(1, 2)) + END
    specs = [AssertSpec(("Solution().add(a = 2, b = 3)",), "_v0 == {1, 2, 3}"), SPECS[1]]
    assert grade_channel(buf, specs)[0] is False


def test_colliding_keys_are_refused_when_a_check_needs_python_objects():
    buf = raw_call(0, json.dumps({"s": [k * P for k in range(1, 1001)]}).encode()) + frame(good_call(1, 2)) + END
    specs = [AssertSpec(("Solution().add(a = 2, b = 3)",), "len(_v0) == 1000"), SPECS[1]]
    correct, res = grade_channel(buf, specs)
    assert res.status == "ok" and not correct
    with pytest.raises(ValueError, match="share a hash value"):
        res.calls[0].value  # noqa: B018


@pytest.mark.parametrize("mib", [1, 6, 30])
def test_a_large_value_does_not_raise_the_parents_memory(mib):  # finding 10
    buf = raw_call(0, empty_lists(mib)) + frame(good_call(1, 2)) + END
    tracemalloc.start()
    try:
        correct, res = grade_channel(buf)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not correct and res.status == "memory" and "larger than the grader keeps" in res.error
    assert peak < 2 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_what_a_result_keeps_is_the_encoded_text():
    value = b"[" + b"[]," * 100_000 + b"[]]"  # 100,002 items: within the limits
    buf = raw_call(0, value) + frame(good_call(1, 2)) + END
    tracemalloc.start()
    try:
        chan = read_channel(buf, 2)
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert chan.error is None and chan.calls[0].encoded.nodes == 100_002
    assert kept < len(value) + (64 << 10), f"{kept} bytes kept for a {len(value)}-byte value"
    correct, res = grade_channel(buf)
    assert not correct and res.status == "ok"


HOSTILE_VALUES = {
    "nested_420": nested(420),
    "nested_100k": nested(100_000),
    "colliding_set_40k": json.dumps({"s": [k * P for k in range(1, 40_001)]}).encode(),
    "empty_lists_30mib": empty_lists(30),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_VALUES))
def test_hostile_values_written_by_a_program_give_crash_or_memory(name):
    require_strict()
    forged = raw_call(0, HOSTILE_VALUES[name]) + frame(good_call(1, 2)) + END
    body = WRONG + f"os.write(3, {forged!r})\nos._exit(0)\n"
    correct, res = grade_correct("", body, GT, LIMITS)
    assert not correct and res.status in ("ok", "crash", "memory"), (res.status, res.error)
    if name != "colliding_set_40k":
        assert res.status in ("crash", "memory"), (res.status, res.error)


def test_an_outcome_is_immutable_and_survives_pickle_and_copy():
    import copy
    import pickle

    chan = read_channel(frame(good_call(0, {"s": [1, 2]})) + frame(good_call(1)) + END, 2)
    out = chan.calls[0]
    for twin in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out)):
        assert twin == out and twin.value == {1, 2}
    with pytest.raises(AttributeError):
        out.ok = False
