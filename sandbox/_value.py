"""A returned value in the parent: read once without building it, kept as its encoded text, compared without hashing.

The harness encodes a call's value as tagged JSON (`_harness.encode`): JSON null, booleans, numbers, strings and
lists as themselves, and one-key objects for the rest (`t` tuple, `s` set, `f` frozenset, `d` dict as a list of
`[key, value]` pairs, `L` / `T` ListNode / TreeNode value lists, `I` big int in hex, `F` non-finite float, `b` bytes
in hex, `c` complex as two float reprs). The parent never hands that text to `json.loads`:

- `scan` reads one value with an explicit stack (no recursion), checks the grammar, counts its items ("nodes")
  against a `Budget` and its nesting against `MAX_DEPTH`, and builds nothing unless asked for the flat token list.
  What is kept (`Encoded`) is the value's text and its node count, not Python objects.
- `canonical` turns a token list into nested tuples that are equal exactly when the values are `==` (numbers by
  exact value, so `1 == 1.0 == True` and `-0.0 == 0`; each NaN unique, as fresh NaN objects are; sets and dicts by
  sorted elements, a repeated dict key keeping its last value), with sorting and no hashing of the program's data.
- `to_python` builds plain Python objects (for `CallOutcome.value` and checks that call setup code); a set or
  dict whose keys share one hash value more than `MAX_SAME_HASH` times is refused rather than built.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

MAX_DEPTH = 256  # nested containers; the harness refuses values nested more than 200 deep
MAX_SAME_HASH = 16  # keys of one set or dict sharing a hash value, when building Python objects
_CONTAINERS = {"t", "s", "f", "d", "L", "T"}
_TEXT_TAGS = {"I", "F", "b"}
_TOKEN = re.compile(
    rb'[ \t\n\r]*(?:([\[\]{},:])|"([^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*)"'
    rb"|(-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?)|(true|false|null))"
)
_CONSTS = {b"true": True, b"false": False, b"null": None}
_NAN_IDS = itertools.count()


class ChannelError(ValueError):
    """The channel's bytes break the grammar of what the harness writes."""


class TooBig(Exception):
    """The value has more nodes than the budget allows."""


class NodeList(list):
    """The value list of a ListNode / TreeNode returned by the program (`kind` says which)."""

    kind: str = "ListNode"


@dataclass
class Budget:
    nodes: int


@dataclass(frozen=True)
class Encoded:
    """One returned value as the harness encoded it: `text` (JSON bytes), `nodes` (its items), `has_nodes` (it
    holds a ListNode / TreeNode value list), `kind` ("ListNode" / "TreeNode" when the value itself is one)."""

    text: bytes
    nodes: int
    has_nodes: bool = False
    kind: str | None = None


class Lexer:
    """JSON tokens of `buf[pos:end]`: (kind, value) with kind one of `[]{},:` or "s" (str) or "v" (scalar)."""

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf, self.pos, self.end = buf, pos, len(buf) if end is None else end
        self._peeked: tuple | None = None

    def peek(self) -> tuple:
        if self._peeked is None:
            self._peeked = self._next()
        return self._peeked

    def next(self) -> tuple:
        tok = self.peek()
        self._peeked = None
        return tok

    def expect(self, kind: str) -> Any:
        got, value = self.next()
        if got != kind:
            raise ChannelError(f"expected {kind!r}, found {got!r}")
        return value

    def at_end(self) -> bool:
        return self._peeked is None and not self.buf[self.pos : self.end].strip(b" \t\n\r")

    def _next(self) -> tuple:
        m = _TOKEN.match(self.buf, self.pos, self.end)
        if m is None:
            raise ChannelError(f"bad JSON at byte {self.pos}")
        self.pos = m.end()
        punct, string, number, frac, exp, const = m.groups()
        if punct is not None:
            return punct.decode(), None
        if string is not None:
            if b"\\" not in string and string.isascii():
                return "s", string.decode("ascii")
            try:
                return "s", json.loads(b'"' + string + b'"')
            except ValueError as e:
                raise ChannelError(f"bad string: {e}") from None
        if number is not None:
            try:
                return "v", float(number) if frac is not None or exp is not None else int(number)
            except ValueError as e:  # more digits than Python converts
                raise ChannelError(f"bad number: {e}") from None
        return "v", _CONSTS[const]


def _tagged_scalar(tag: str, lex: Lexer) -> Any:
    try:
        if tag == "c":
            lex.expect("[")
            real = float(lex.expect("s"))
            lex.expect(",")
            imag = float(lex.expect("s"))
            lex.expect("]")
            return complex(real, imag)
        body = lex.expect("s")
        return int(body, 16) if tag == "I" else float(body) if tag == "F" else bytes.fromhex(body)
    except (TypeError, ValueError) as e:
        raise ChannelError(f"bad value for tag {tag!r}: {e}") from None


class _Frame:
    __slots__ = ("tag", "n", "at", "hashable")

    def __init__(self, tag: str, at: int) -> None:
        self.tag, self.n, self.at, self.hashable = tag, 0, at, True


def _open(lex: Lexer) -> tuple[str | None, Any]:
    """The next value's start: (container tag, None) or (None, scalar)."""
    kind, value = lex.next()
    if kind == "[":
        return "l", None
    if kind in ("s", "v"):
        return None, value
    if kind != "{":
        raise ChannelError(f"unexpected {kind!r} where a value was due")
    tag = lex.expect("s")
    lex.expect(":")
    if tag in _CONTAINERS:
        lex.expect("[")
        return tag, None
    if tag in _TEXT_TAGS or tag == "c":
        value = _tagged_scalar(tag, lex)
        lex.expect("}")
        return None, value
    raise ChannelError(f"unknown value tag {tag[:20]!r}")


def scan(lex: Lexer, budget: Budget, out: list | None = None) -> tuple[bool, str | None]:
    """Read one value from `lex`; append its tokens to `out` when given (prefix order: a container is `(tag,
    n)` followed by its n items, a dict's as key, value, key, value, ...). Returns (has_nodes, kind)."""
    stack: list[_Frame] = []
    depth, has_nodes, top_kind = 0, False, None
    while True:
        if stack and stack[-1].tag == "d":  # a dict's items are [key, value] pairs
            lex.expect("[")
            stack.append(_Frame("p", -1))
        tag, value = _open(lex)
        budget.nodes -= 1
        if budget.nodes < 0:
            raise TooBig
        if tag is None:
            if out is not None:
                out.append(value)
            hashable = True
        else:
            has_nodes = has_nodes or tag in ("L", "T")
            if not stack:
                top_kind = {"L": "ListNode", "T": "TreeNode"}.get(tag)
            depth += 1
            if depth > MAX_DEPTH:
                raise ChannelError(f"value nested more than {MAX_DEPTH} deep")
            stack.append(_Frame(tag, len(out) if out is not None else -1))
            if out is not None:
                out.append(None)
            if lex.peek()[0] != "]":
                continue
            hashable = None  # an empty container: closed below
        while stack:  # give the finished item to its container; close what ends here
            top = stack[-1]
            if hashable is not None:
                _add_item(top, hashable)
                if top.tag == "p":
                    if top.n == 1:
                        lex.expect(",")
                        break
                    lex.expect("]")
                    stack.pop()
                    top = stack[-1]
                    top.n += 1
                sep, _ = lex.next()
                if sep == ",":
                    break
                if sep != "]":
                    raise ChannelError(f"unexpected {sep!r} in a container")
            else:
                lex.expect("]")
            if top.tag != "l":
                lex.expect("}")
            stack.pop()
            depth -= 1
            if out is not None:
                out[top.at] = (top.tag, top.n)
            hashable = top.hashable and top.tag in ("t", "f")
        else:
            return has_nodes, top_kind


def _add_item(frame: _Frame, hashable: bool) -> None:
    if not hashable and (frame.tag in ("s", "f") or (frame.tag == "p" and frame.n == 0)):
        raise ChannelError("unhashable set element or dict key")
    frame.hashable = frame.hashable and hashable
    frame.n += 1


def tokens(enc: Encoded) -> list:
    out: list = []
    lex = Lexer(enc.text)
    scan(lex, Budget(enc.nodes), out)
    return out


def _scalar_key(v: Any) -> tuple:
    if v is None:
        return ("N",)
    if isinstance(v, str):
        return ("s", v)
    if isinstance(v, bytes):
        return ("b", v)
    if isinstance(v, complex):
        if v.imag == 0:
            return _scalar_key(v.real)
        return ("c", _scalar_key(v.real), _scalar_key(v.imag))
    if isinstance(v, float):
        if math.isnan(v):
            return ("n", next(_NAN_IDS))  # a fresh NaN equals nothing, not even another NaN
        if math.isinf(v):
            return ("+",) if v > 0 else ("-",)
        if not v.is_integer():
            return ("q", *v.as_integer_ratio())
        v = int(v)
    return ("i", int(v))  # int, bool and integral floats: equal exactly when their values are


def _close(tag: str, items: list) -> tuple:
    if tag in ("s", "f"):
        items.sort()
        return ("S", *(x for i, x in enumerate(items) if i == 0 or x != items[i - 1]))
    if tag == "d":
        pairs = sorted(zip(items[::2], items[1::2], strict=True), key=itemgetter(0))  # stable: the last value wins
        kept = [p for i, p in enumerate(pairs) if i + 1 == len(pairs) or pairs[i + 1][0] != p[0]]
        return ("d", *itertools.chain.from_iterable(kept))
    return ("l" if tag == "l" else tag, *items)


def _walk(toks: list, scalar, close) -> Any:
    """Fold prefix-order tokens bottom-up without recursion."""
    stack: list[list] = []
    for tok in toks:
        if type(tok) is tuple:
            tag, n = tok
            if n:
                stack.append([tag, 2 * n if tag == "d" else n, []])
                continue
            item = close(tag, [])
        else:
            item = scalar(tok)
        while stack:
            top = stack[-1]
            top[2].append(item)
            if len(top[2]) < top[1]:
                break
            stack.pop()
            item = close(top[0], top[2])
        else:
            return item
    raise ChannelError("truncated token list")


def canonical(toks: list) -> tuple:
    """Nested tuples equal exactly when the values are `==` (see the module docstring)."""
    return _walk(toks, _scalar_key, _close)


def to_python(enc: Encoded, builders: dict | None = None) -> Any:
    """Plain Python data. With `builders` ({"ListNode": f, "TreeNode": g}) node value lists are rebuilt with them
    (an opaque object where one is missing); without, they are `NodeList`s. Raises ChannelError on a set or dict
    whose keys would collide in its hash table."""

    def close(tag: str, items: list) -> Any:
        if tag in ("s", "f", "d"):
            keys = items[::2] if tag == "d" else items
            hashes = sorted(hash(k) for k in keys)
            run = max((len(list(g)) for _, g in itertools.groupby(hashes)), default=0)
            if run > MAX_SAME_HASH:
                raise ChannelError(f"{run} keys of one {tag!r} share a hash value")
            if tag == "d":
                return dict(zip(items[::2], items[1::2], strict=True))
            return set(items) if tag == "s" else frozenset(items)
        if tag in ("L", "T"):
            name = "ListNode" if tag == "L" else "TreeNode"
            if builders is None:
                out = NodeList(items)
                out.kind = name
                return out
            build = builders.get(name)
            return build(items) if callable(build) else object()
        return tuple(items) if tag == "t" else items

    return _walk(tokens(enc), lambda v: v, close)


def encode_plain(value: Any, depth: int = 0) -> Any:
    """Trusted plain data (an expected value, a hand-made outcome) -> the harness's tagged JSON form."""
    if depth > MAX_DEPTH:
        raise ChannelError("value nested too deeply")
    t = type(value)
    if value is None or t in (bool, str, int):
        return value if t is not int or value.bit_length() < 12000 else {"I": format(value, "x")}
    if t is float:
        return value if math.isfinite(value) else {"F": repr(value)}
    if t is bytes:
        return {"b": value.hex()}
    if t is complex:
        return {"c": [repr(value.real), repr(value.imag)]}
    if isinstance(value, NodeList):
        return {"L" if value.kind == "ListNode" else "T": [encode_plain(v, depth + 1) for v in value]}
    if t is dict:
        return {"d": [[encode_plain(k, depth + 1), encode_plain(v, depth + 1)] for k, v in value.items()]}
    if t in (list, tuple, set, frozenset):
        items = [encode_plain(v, depth + 1) for v in value]
        return items if t is list else {"t": items} if t is tuple else {"s" if t is set else "f": items}
    raise ChannelError(f"not plain data: {t.__name__}")


def encode_trusted(value: Any, max_nodes: int = 1 << 24) -> Encoded:
    """`Encoded` form of trusted plain data (raises ChannelError on anything the harness could not send)."""
    text = json.dumps(encode_plain(value), separators=(",", ":")).encode()
    return read_one(text, Budget(max_nodes))


def read_one(text: bytes, budget: Budget) -> Encoded:
    """Check `text` as exactly one encoded value; raises ChannelError / TooBig."""
    before = budget.nodes
    lex = Lexer(text)
    has_nodes, kind = scan(lex, budget)
    if not lex.at_end():
        raise ChannelError("text after the value")
    return Encoded(text, before - budget.nodes, has_nodes, kind)
