"""The value channel, read in the parent: frames the harness writes on fd 3, checked against what it may write.

The harness (`_harness.run_job`) writes, in this order: either one `code_error` frame, or one `call` frame per call
(indexes 0, 1, 2, ... each once), then at most one `script` frame, then one `end` frame; a run cut short stops
anywhere in that sequence. Each kind has a fixed set of fields of fixed types, and values use the tags of
`_harness.encode`. Anything else on the channel (bad lengths, bad JSON, NaN tokens, unknown kinds, fields or tags,
repeated fields, indexes out of range or repeated, frames out of order, a `setup_error` frame, a value nested more
than `_value.MAX_DEPTH` deep) can only come from the program, so it is not an infrastructure error: the run is a
`crash` (unless it also timed out or ran out of memory) and no call value is kept. Returned values larger than the
grader keeps (`MAX_VALUE_BYTES` encoded or `MAX_VALUE_NODES` items, all calls together) make the run `memory`.
A program that writes well-formed frames in the right order can still claim values: correctness compares them
with expected values that never enter the child.

Frames are read one at a time, without `json.loads` and without recursion (`_value.scan`): a call's value is
checked and kept as its encoded text (`CallOutcome.encoded`), never built, so reading costs at most a fixed time
and memory per job whatever the program wrote, and a result kept for a whole batch holds at most
`MAX_VALUE_BYTES` of values.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from sandbox._value import Budget, ChannelError, Encoded, Lexer, NodeList, TooBig, read_one, scan, to_python

__all__ = ["CallOutcome", "Channel", "ChannelError", "NodeList", "decode_value", "read_channel"]
MAX_VALUE_BYTES = 2 << 20  # encoded returned values kept per job, all calls together
MAX_VALUE_NODES = 1 << 18  # items of the returned values per job (a list, each of its elements, ...)
MAX_FRAME_BYTES = MAX_VALUE_BYTES + (64 << 10)
_MAX_MESSAGE = 1000  # characters of an error message kept


class CallOutcome:
    """One call's value (or its error) as read in the parent.

    A value read from the channel is kept as its encoded text (`encoded`): `value` decodes it into plain Python data
    at each access (a `NodeList` for a ListNode / TreeNode), and the verdict compares the text without building it.
    A value given directly (`CallOutcome(True, 3)`) is returned as given."""

    __slots__ = ("ok", "_value", "error", "eq_always_true", "kind", "encoded")

    def __init__(
        self,
        ok: bool,
        value: Any = None,
        error: str | None = None,
        eq_always_true: bool = False,
        kind: str | None = None,
        *,
        encoded: Encoded | None = None,
    ) -> None:
        for name, v in zip(self.__slots__, (ok, value, error, eq_always_true, kind, encoded), strict=True):
            object.__setattr__(self, name, v)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("CallOutcome is immutable")

    @property
    def value(self) -> Any:
        return to_python(self.encoded) if self.encoded is not None else self._value

    def __reduce__(self) -> tuple:  # pickle and copy: through __init__, as attributes cannot be set
        return (_outcome_from, (self.ok, self._value, self.error, self.eq_always_true, self.kind, self.encoded))

    def _key(self) -> tuple:
        return (self.ok, self.error, self.eq_always_true, self.kind, self.encoded, self._value)

    def __eq__(self, other: object) -> bool:
        return type(other) is CallOutcome and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = f"<{self.encoded.nodes} items>" if self.encoded is not None else repr(self._value)
        return f"CallOutcome(ok={self.ok}, value={shown}, error={self.error!r}, eq_always_true={self.eq_always_true})"


def _outcome_from(ok, value, error, eq_always_true, kind, encoded) -> CallOutcome:
    return CallOutcome(ok, value, error, eq_always_true, kind, encoded=encoded)


NOT_EVALUATED = CallOutcome(False, None, "not evaluated")
_FIELDS = {
    "code_error": ({"k", "e", "mem"},),
    "call": ({"k", "i", "ok", "e", "mem"}, {"k", "i", "eqt", "ok", "v"}, {"k", "i", "eqt", "ok", "e", "mem"}),
    "script": ({"k", "ok"}, {"k", "ok", "e", "mem"}),
    "end": ({"k"},),
}
_TYPES = {"i": int, "ok": bool, "e": str, "mem": bool, "eqt": bool}


def decode_value(obj: Any) -> Any:
    """Tagged JSON (as the child encodes a value, already parsed) -> plain Python data. Raises ChannelError on
    anything the harness would not write."""
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise ChannelError(f"bad value encoding: {e}") from None
    try:
        return to_python(read_one(text, Budget(MAX_VALUE_NODES)))
    except TooBig:
        raise ChannelError(f"value of more than {MAX_VALUE_NODES} items") from None


def _frame_at(buf: bytes, start: int, end: int, budget: Budget) -> dict:
    """One frame: a JSON object whose fields are scalars, except `v` (a value, kept as `Encoded`)."""
    lex = Lexer(buf, start, end)
    lex.expect("{")
    frame: dict = {}
    if lex.peek()[0] == "}":
        lex.next()
        return frame
    while True:
        name = lex.expect("s")
        lex.expect(":")
        if name in frame:
            raise ChannelError(f"repeated field {name[:40]!r}")
        if name == "v":
            at, before = lex.pos, budget.nodes
            has_nodes, kind = scan(lex, budget)
            frame[name] = Encoded(buf[at : lex.pos].strip(), before - budget.nodes, has_nodes, kind)
        else:
            kind, frame[name] = lex.next()
            if kind not in ("s", "v"):
                raise ChannelError(f"field {name[:40]!r} is not a scalar")
        sep = lex.next()[0]
        if sep == "}":
            break
        if sep != ",":
            raise ChannelError(f"unexpected {sep!r} in a frame")
    if not lex.at_end():
        raise ChannelError("bytes after the frame's object")
    return frame


def iter_frames(buf: bytes):
    """The frames in `buf`, one at a time (a generator: reading stops where the caller stops)."""
    pos, budget, value_bytes = 0, Budget(MAX_VALUE_NODES), 0
    while pos < len(buf):
        if pos + 4 > len(buf):
            raise ChannelError("truncated frame header")
        (n,) = struct.unpack("!I", buf[pos : pos + 4])
        if pos + 4 + n > len(buf):
            raise ChannelError("truncated frame")
        if n > MAX_FRAME_BYTES:
            raise TooBig
        frame = _frame_at(buf, pos + 4, pos + 4 + n, budget)
        value_bytes += len(frame["v"].text) if "v" in frame else 0
        if value_bytes > MAX_VALUE_BYTES:
            raise TooBig
        yield frame
        pos += 4 + n


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
    if frame["ok"] != ("v" in frame):
        raise ChannelError("a call frame's `ok` disagrees with its fields")
    if not frame["ok"]:
        return CallOutcome(False, None, frame["e"][:_MAX_MESSAGE], eqt)
    enc = frame["v"]
    return CallOutcome(True, None, None, eqt, enc.kind, encoded=enc)


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
    """Check the channel's frames and keep the call values as their encoded text. Never raises: a grammar error
    is a `crash` (`error` set), values past `MAX_VALUE_BYTES` / `MAX_VALUE_NODES` are `memory` (both set)."""
    try:
        return _read(iter_frames(buf), n_calls)
    except ChannelError as e:
        return Channel(calls=(NOT_EVALUATED,) * n_calls, error=f"value channel: {e}")
    except TooBig:
        return Channel(
            calls=(NOT_EVALUATED,) * n_calls,
            memory=True,
            error=f"value channel: returned values larger than the grader keeps ({MAX_VALUE_BYTES >> 20} MiB "
            f"encoded, {MAX_VALUE_NODES} items)",
        )


def _read(frames, n_calls: int) -> Channel:
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
            out.code_error, stage = f"code_error: {frame['e'][:_MAX_MESSAGE]}", "code_error"
    out.calls = tuple(calls) + (NOT_EVALUATED,) * (n_calls - len(calls))
    return out
