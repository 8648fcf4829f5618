"""Code extraction from a model response, and the compile check.

Covers: the reference extraction rule (ariahw/rl-rewardhacking's evaluator): every fenced block opened by
```` ``` ```` or ```` ```python ```` (any case) and a newline, up to the next fence or the end of the text (an
unterminated last block counts), each stripped, empty ones dropped, joined by a blank line; no block means
no code (the response is unformatted and earns nothing). Chat-style completions (lists of messages) use the
last message's content. The compile check parses the code as it will run (after the problem's setup code),
so for example a `from __future__` import that is not first fails as it would in the reference.

Does not cover: executing anything; it never runs the code.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

_FENCED = re.compile(r"```(?:python)?\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def response_text(completion: str | Sequence[Mapping] | None) -> str:
    """The text of a completion: a string as is, a list of chat messages as its last message's content."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    last = completion[-1]
    content = last.get("content") if isinstance(last, Mapping) else None
    if not isinstance(content, str):
        raise TypeError(f"completion message must have string 'content', got {last!r:.80}")
    return content


def extract_code(completion: str | Sequence[Mapping] | None) -> str | None:
    """The code in a response (see the module docstring for the rule), or None if it has no fenced block."""
    blocks = [b.strip() for b in _FENCED.findall(response_text(completion))]
    blocks = [b for b in blocks if b]
    return "\n\n".join(blocks) if blocks else None


def program_text(setup_code: str, code: str) -> str:
    """The module body the sandbox runs: the problem's setup code, then the response's code."""
    return f"{setup_code}\n{code}" if setup_code else code


def compiles(code: str | None, setup_code: str = "") -> bool:
    """Whether `code` (after `setup_code`) is valid Python; never executes it. The compiler's SyntaxWarnings about
    the model's code (e.g. `'int' object is not subscriptable`) are not shown: they are about a completion, not
    about the run, and would fill the training log."""
    if code is None:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            compile(program_text(setup_code, code), "<completion>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
    return True
