"""Code extraction (the reference's fenced-block rule) and the compile check."""

import pytest

from sandbox.extract import compiles, extract_code


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("```python\nx = 1\n```", "x = 1"),
        ("text\n```Python\nx = 1\n```\nmore\n```\ny = 2\n```", "x = 1\n\ny = 2"),
        ("```python\nx = 1\n", "x = 1"),  # unterminated last block counts
        ("```python\n\n```\n```python\nz = 3\n```", "z = 3"),  # empty blocks dropped
        ("no code at all", None),
        ("x = 1  # bare code, no fence", None),
        ("```python\n   \n```", None),
    ],
)
def test_extract_rule(response, expected):
    assert extract_code(response) == expected


def test_chat_completion_uses_last_message():
    msgs = [{"role": "assistant", "content": "```python\nx = 1\n```"}]
    assert extract_code(msgs) == "x = 1"
    assert extract_code([]) is None and extract_code(None) is None
    with pytest.raises(TypeError):
        extract_code([{"role": "assistant"}])


def test_compiles():
    assert compiles("def f():\n    return 1\n")
    assert not compiles("def f(:\n")
    assert not compiles(None)
    assert not compiles("x = 1\x00")
    assert not compiles("return 5")
    # a __future__ import after the setup code fails as it does when the program runs
    assert compiles("from __future__ import annotations\nx = 1")
    assert not compiles("from __future__ import annotations\nx = 1", setup_code="import math\n")


def test_compiler_warnings_about_a_completion_are_not_shown():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert compiles("x = 1[0]\ny = 1 is 1")  # valid Python; the compiler warns about both lines
    assert not [w for w in seen if issubclass(w.category, SyntaxWarning)]
