"""The value channel, read in the parent: frames the harness writes on fd 3, checked against what it may write.

The harness (`_harness.run_job`) writes, in this order: either one `code_error` frame, or one `call` frame per call
(indexes 0, 1, 2, ... each once), then at most one `script` frame, then one `end` frame; a run cut short stops
anywhere in that sequence. Each kind has a fixed set of fields of fixed types, and values use the tags of
`_harness.encode`. Anything else on the channel (bad lengths, bad JSON, unknown kinds, fields or tags, indexes out
of range or repeated, frames out of order, a `setup_error` frame) can only come from the program, so it is not an
infrastructure error: the run is a `crash` (unless it also timed out or ran out of memory) and no call value is
kept. A program that writes well-formed frames in the right order can still claim values: correctness compares
them with expected values that never enter the child.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any


class ChannelError(ValueError):
    pass


class NodeList(list):
    """The value list of a ListNode / TreeNode returned by the program (`kind` says which)."""

    kind: str = "ListNode"


@dataclass(frozen=True)
class CallOutcome:
    """The plain-data value of one call (or its error), as decoded in the parent."""

    ok: bool
    value: Any | None
    error: str | None = None
    eq_always_true: bool = False
    kind: str | None = None  # "ListNode" / "TreeNode" when `value` is such a structure's value list


NOT_EVALUATED = CallOutcome(False, None, "not evaluated")
_FIELDS = {
    "code_error": ({"k", "e", "mem"},),
    "call": ({"k", "i", "ok", "e", "mem"}, {"k", "i", "eqt", "ok", "v"}, {"k", "i", "eqt", "ok", "e", "mem"}),
    "script": ({"k", "ok"}, {"k", "ok", "e", "mem"}),
    "end": ({"k"},),
}
_TYPES = {"i": int, "ok": bool, "e": str, "mem": bool, "eqt": bool}


def decode_value(obj: Any) -> Any:
    """Tagged JSON from the child -> Python plain data. Raises ChannelError on anything unexpected."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode_value(x) for x in obj]
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ChannelError(f"bad value encoding: {type(obj).__name__}")
    ((tag, body),) = obj.items()
    try:
        if tag == "t":
            return tuple(decode_value(x) for x in _as_list(body))
        if tag in ("s", "f"):
            items = [decode_value(x) for x in _as_list(body)]
            return set(items) if tag == "s" else frozenset(items)
        if tag == "d":
            return {decode_value(k): decode_value(v) for k, v in _as_list(body)}
        if tag in ("L", "T"):
            out = NodeList(decode_value(x) for x in _as_list(body))
            out.kind = "ListNode" if tag == "L" else "TreeNode"
            return out
        if tag == "I":
            return int(body, 16)
        if tag == "F":
            return float(body)
        if tag == "b":
            return bytes.fromhex(body)
        if tag == "c":
            return complex(float(body[0]), float(body[1]))
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise ChannelError(f"bad value for tag {tag!r}: {e}") from None
    raise ChannelError(f"unknown value tag {tag!r}")


def _as_list(body: Any) -> list:
    if not isinstance(body, list):
        raise ChannelError(f"bad value body: {type(body).__name__}")
    return body


def parse_frames(buf: bytes) -> list[dict]:
    frames, pos = [], 0
    while pos < len(buf):
        if pos + 4 > len(buf):
            raise ChannelError("truncated frame header")
        (n,) = struct.unpack("!I", buf[pos : pos + 4])
        if pos + 4 + n > len(buf):
            raise ChannelError("truncated frame")
        try:
            frame = json.loads(buf[pos + 4 : pos + 4 + n])
        except (ValueError, RecursionError) as e:
            raise ChannelError(f"malformed frame: {e}") from None
        if not isinstance(frame, dict):
            raise ChannelError("frame is not an object")
        frames.append(frame)
        pos += 4 + n
    return frames


def _check_frame(frame: dict) -> str:
    kind = frame.get("k")
    if kind not in _FIELDS:
        raise ChannelError(f"unknown frame kind {str(kind)[:40]!r}")
    if set(frame) not in _FIELDS[kind]:
        raise ChannelError(f"unexpected fields in a {kind} frame: {sorted(frame)[:10]}")
    for name, typ in _TYPES.items():
        if name in frame and type(frame[name]) is not typ:
            raise ChannelError(f"field {name!r} of a {kind} frame is not {typ.__name__}")
    return kind


def _outcome(frame: dict) -> CallOutcome:
    eqt = frame.get("eqt", False)
    if not frame["ok"]:
        return CallOutcome(False, None, frame["e"], eqt)
    try:
        value = decode_value(frame["v"])
    except RecursionError:
        raise ChannelError("value nested too deeply") from None
    return CallOutcome(True, value, None, eqt, value.kind if isinstance(value, NodeList) else None)


@dataclass
class Channel:
    """What the channel says, once checked."""

    calls: tuple[CallOutcome, ...]
    script_ok: bool | None = None
    reached_end: bool = False
    memory: bool = False
    code_error: str | None = None
    error: str | None = None  # set when the channel broke the harness's grammar: nothing else is kept


def read_channel(buf: bytes, n_calls: int) -> Channel:
    try:
        return _read(parse_frames(buf), n_calls)
    except ChannelError as e:
        return Channel(calls=(NOT_EVALUATED,) * n_calls, error=f"value channel: {e}")


def _read(frames: list[dict], n_calls: int) -> Channel:
    calls: list[CallOutcome] = []
    out = Channel(calls=())
    stage = "start"  # start -> calls -> script -> end; code_error only at the start and alone
    for frame in frames:
        kind = _check_frame(frame)
        if stage in ("end", "code_error") or (kind == "code_error" and stage != "start"):
            raise ChannelError(f"{kind} frame after the {stage} frame")
        out.memory = out.memory or frame.get("mem") is True
        if kind == "call":
            if stage not in ("start", "calls") or frame["i"] != len(calls) or frame["i"] >= n_calls:
                raise ChannelError(f"call frame with index {frame['i']} where {len(calls)} was due")
            calls.append(_outcome(frame))
            stage = "calls"
        elif kind == "script":
            if stage == "script" or len(calls) != n_calls:
                raise ChannelError("script frame out of order")
            out.script_ok = frame["ok"]
            stage = "script"
        elif kind == "end":
            if len(calls) != n_calls:
                raise ChannelError(f"end frame after {len(calls)} of {n_calls} calls")
            out.reached_end, stage = True, "end"
        else:
            out.code_error, stage = f"code_error: {frame['e']}", "code_error"
    out.calls = tuple(calls) + (NOT_EVALUATED,) * (n_calls - len(calls))
    return out
