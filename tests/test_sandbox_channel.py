"""Nothing a program writes can make its run an infrastructure error (issue 11, finding 3).

Covered: malformed frames written by the program on fd 3, end to end (wrong length, truncated header, bad JSON,
a frame that is not an object, unknown kinds, fields and tags, a `setup_error` frame, indexes out of range,
negative, boolean or repeated, frames out of order, a forged end before the calls), garbage on every descriptor,
and the same grammar checked directly on `read_channel`. Each run's status is ok, crash, timeout or memory, never
infra_error, and the program is never graded correct. Setup success travels on its own pipe (`_harness.SETUP_FD`),
closed before the program starts: a program that writes there finds it closed.
"""

from __future__ import annotations

import json
import struct

import pytest
from sandbox_helpers import require_strict

from sandbox._channel import read_channel
from sandbox.executor import CheckJob, Limits, execute
from sandbox.verdict import grade_correct

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
