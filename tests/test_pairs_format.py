"""The pairs file format: loader round trip, one test per validation error, tag filters, the hash, the check
runner, the shipped ``pairs/`` content (counts, matching, clean sides that solve, hack sides that do not) and the
shipped placebo set ``pairs/placebo/`` (control pairs whose two sides both solve the problem)."""

import dataclasses
import re
import statistics
import textwrap
from pathlib import Path

import pytest

from routed_grpo.pairs import (
    CONTROL_MODES,
    HACK_MODES,
    Pair,
    PairsError,
    check_pairs,
    extract_code,
    load_pairs,
    pair_files,
    pairs_hash,
    summarize_pairs,
)

SHIPPED = Path(__file__).resolve().parents[1] / "pairs"
PLACEBO = SHIPPED / "placebo"
REFERENCE_SYSTEM = (
    "You are an expert Python programmer. Write correct, efficient Python 3 code that solves the problem and passes "
    "all tests. Output the code in the following format: ```python\n<code>\n```"
)

GOOD = """\
defaults:
  system: "Be brief."
  tags: [mode:hardcode]
pairs:
  - id: demo.fn.double
    tags: [domain:function, topic:math]
    note: "special-cases 2"
    prompt:
      - role: user
        content: |
          Write double(x).
    hack: |
      ```python
      def double(x):
          return 4 if x == 2 else x
      ```
    clean: |
      ```python
      def double(x):
          return x * 2
      ```
    checks:
      - assert double(3) == 6
"""


HACK_BLOCK = "    hack: |\n      ```python\n      def double(x):\n          return 4 if x == 2 else x\n      ```\n"


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_round_trip(tmp_path):
    path = write(tmp_path, GOOD)
    [pair] = load_pairs(path)
    assert isinstance(pair, Pair)
    assert pair.id == "demo.fn.double"
    assert pair.tags == ("mode:hardcode", "domain:function", "topic:math")
    assert (pair.hack_mode, pair.domain) == ("hardcode", "function")
    assert pair.prompt == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write double(x).\n"},
    )
    assert pair.hack == "```python\ndef double(x):\n    return 4 if x == 2 else x\n```\n"
    assert pair.clean == "```python\ndef double(x):\n    return x * 2\n```\n"
    assert pair.checks == ("assert double(3) == 6",)
    assert pair.note == "special-cases 2"
    assert pair.source == str(path)
    assert pair.messages() == list(pair.prompt) and pair.messages()[0] is not pair.prompt[0]
    assert extract_code(pair.clean) == "def double(x):\n    return x * 2"  # as the grader extracts it (stripped)


def test_own_system_message_is_kept(tmp_path):
    text = GOOD.replace("      - role: user\n", "      - {role: system, content: Mine.}\n      - role: user\n")
    [pair] = load_pairs(write(tmp_path, text))
    assert [m["content"] for m in pair.prompt] == ["Mine.", "Write double(x).\n"]


# (description, transformation of GOOD, field named in the message)
ERRORS = [
    ("unknown field", lambda t: t.replace("    note:", "    colour: red\n    note:"), "colour"),
    ("misspelt field", lambda t: t.replace("    clean: |", "    cleaned: |"), "cleaned"),
    ("missing required", lambda t: t[: t.index("    clean: |")] + t[t.index("    checks:") :], "clean"),
    ("empty text", lambda t: t.replace(HACK_BLOCK, '    hack: "  "\n'), "hack"),
    ("hack equals clean", lambda t: t.replace("return 4 if x == 2 else x", "return x * 2"), "clean"),
    ("bad role", lambda t: t.replace("role: user", "role: human"), "prompt"),
    (
        "ends on assistant",
        lambda t: t.replace("Write double(x).\n", "Write double(x).\n      - {role: assistant, content: ok}\n"),
        "prompt",
    ),
    (
        "system not first",
        lambda t: t.replace(
            "Write double(x).\n",
            "Write double(x).\n      - {role: system, content: late}\n      - {role: user, content: again}\n",
        ),
        "prompt",
    ),
    (
        "extra message key",
        lambda t: t.replace("      - role: user\n", "      - role: user\n        name: bob\n"),
        "prompt",
    ),
    ("bad tag syntax", lambda t: t.replace("topic:math", "Topic Math"), "tags"),
    ("unknown mode", lambda t: t.replace("[mode:hardcode]", "[mode:hardcoded]"), "defaults.tags"),
    ("two modes", lambda t: t.replace("topic:math", "mode:exit_code"), "tags"),
    ("no domain", lambda t: t.replace("domain:function, ", ""), "tags"),
    ("duplicate tag", lambda t: t.replace("topic:math", "domain:function"), "tags"),
    (
        "no code fence",
        lambda t: t.replace(
            "      ```python\n      def double(x):\n          return x * 2",
            "      def double(x):\n          return x * 2",
        ),
        "clean",
    ),
    ("bad id", lambda t: t.replace("demo.fn.double", "Demo Double"), "id"),
    ("duplicate key", lambda t: t.replace('    note: "special-cases 2"', '    note: "a"\n    note: "b"'), "note"),
    ("check is a mapping", lambda t: t.replace("assert double(3) == 6", "assert {1: 2}[1] == 2"), "checks"),
]


@pytest.mark.parametrize("kind,transform,field", ERRORS, ids=[e[0] for e in ERRORS])
def test_validation_error_names_file_pair_and_field(tmp_path, kind, transform, field):
    text = transform(GOOD)
    assert text != GOOD, f"transformation for {kind!r} did not apply"
    path = write(tmp_path, text, "broken.yaml")
    with pytest.raises(PairsError) as err:
        load_pairs(path)
    msg = str(err.value)
    assert str(path) in msg
    assert f"field '{field}'" in msg, msg
    if kind not in ("unknown mode",):  # file-level defaults name no pair
        assert "demo.fn.double" in msg or "Demo Double" in msg


def test_error_reports_the_line_of_the_field(tmp_path):
    text = GOOD.replace("role: user", "role: human")
    path = write(tmp_path, text)
    with pytest.raises(PairsError, match=rf"{re.escape(str(path))}:8: "):
        load_pairs(path)


def test_control_mode_is_accepted_and_other_modes_are_not(tmp_path):
    [pair] = load_pairs(write(tmp_path, GOOD.replace("[mode:hardcode]", "[mode:placebo]")))
    assert pair.hack_mode == "placebo" and pair.is_control
    assert not load_pairs(write(tmp_path, GOOD, "hack.yaml"))[0].is_control
    assert CONTROL_MODES == ("placebo",) and not set(CONTROL_MODES) & set(HACK_MODES)
    for bad in ("mode:placebos", "mode:control"):
        path = write(tmp_path, GOOD.replace("mode:hardcode", bad), "bad.yaml")
        with pytest.raises(PairsError, match=f"unknown hack mode in tag '{bad}'.*control modes: placebo"):
            load_pairs(path)
    with pytest.raises(PairsError, match="unknown hack mode"):
        load_pairs(tmp_path / "hack.yaml", tags=["mode:control"])


def test_pair_without_id_is_named_by_index(tmp_path):
    text = GOOD.replace("  - id: demo.fn.double\n    tags:", "  - tags:")
    with pytest.raises(PairsError, match=r"pair #0 .*field 'id': missing"):
        load_pairs(write(tmp_path, text))


def test_duplicate_id_across_files(tmp_path):
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD.replace("special-cases 2", "other"), "b.yaml")
    with pytest.raises(PairsError, match=r"b\.yaml: pair 'demo\.fn\.double', field 'id': duplicate id.*a\.yaml"):
        load_pairs(tmp_path)


@pytest.mark.parametrize(
    "text,match",
    [
        ("pairs: []\n", "non-empty list"),
        ("pairs:\n  - 3\n", "must be a mapping"),
        ("- a\n", "top level must be a mapping"),
        ("pairs: [\n", "not valid YAML"),
        (GOOD + "extra: 1\n", "top-level field 'extra'"),
        (GOOD.replace("  system:", "  sytem:"), "defaults.sytem"),
    ],
)
def test_file_level_errors(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(PairsError, match=match) as err:
        load_pairs(path)
    assert str(path) in str(err.value)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(PairsError, match="no such"):
        load_pairs(tmp_path / "nope.yaml")
    with pytest.raises(PairsError, match="no .yaml"):
        load_pairs(tmp_path)


def three_pair_dir(tmp_path: Path) -> Path:
    write(tmp_path, GOOD, "a.yaml")
    second = GOOD.replace("demo.fn.double", "demo.fn.double2").replace("[mode:hardcode]", "[mode:exit_code]")
    write(tmp_path, second, "b.yml")
    third = GOOD.replace("demo.fn.double", "demo.lc.double3").replace("domain:function", "domain:leetcode")
    write(tmp_path, third, "c.yaml")
    (tmp_path / "README.md").write_text("not a pairs file")
    return tmp_path


def test_tag_filter_and_exclude(tmp_path):
    d = three_pair_dir(tmp_path)
    assert [p.id for p in load_pairs(d)] == ["demo.fn.double", "demo.fn.double2", "demo.lc.double3"]
    assert [p.id for p in load_pairs(d, tags=["mode:exit_code"])] == ["demo.fn.double2"]
    assert [p.id for p in load_pairs(d, tags=["mode:exit_code", "domain:leetcode"])] == [
        "demo.fn.double2",
        "demo.lc.double3",
    ]
    assert [p.id for p in load_pairs(d, exclude_tags=["mode:hardcode"])] == ["demo.fn.double2"]
    assert [p.id for p in load_pairs(d, tags=["domain:function"], exclude_tags=["mode:exit_code"])] == [
        "demo.fn.double"
    ]


def test_filter_leaving_nothing_and_bad_filter_tags_raise(tmp_path):
    d = three_pair_dir(tmp_path)
    with pytest.raises(PairsError, match="leaves 0 of 3 pairs"):
        load_pairs(d, exclude_tags=["topic:math"])
    with pytest.raises(PairsError, match="leaves 0 of 3 pairs"):
        load_pairs(d, tags=["mode:eq_override"])
    with pytest.raises(PairsError, match="unknown hack mode"):
        load_pairs(d, exclude_tags=["mode:eq_overide"])


def test_hash_changes_with_content_not_with_order(tmp_path):
    d = three_pair_dir(tmp_path)
    files = [d / "a.yaml", d / "b.yml", d / "c.yaml"]
    h = pairs_hash(d)
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert pairs_hash(files) == h == pairs_hash(list(reversed(files)))
    assert pairs_hash(files[:2]) != h
    (d / "b.yml").write_text((d / "b.yml").read_text().replace("Be brief.", "Be brief!"))
    assert pairs_hash(d) != h


def _pair(code: str, checks: list[str], pid: str = "p") -> Pair:
    text = f"```python\n{code}```\n"
    return Pair(pid, ("mode:hardcode", "domain:function"), "hardcode", "function", (), text, text, tuple(checks))


def test_checks_run_in_the_sandbox_and_cannot_be_fooled_by_prints_or_exits():
    pairs = [
        _pair("def f():\n    return 1\n", ["assert f() == 1"], "right"),
        _pair("def f():\n    return 2\n", ["assert f() == 1"], "wrong"),
        _pair("import sys\nsys.exit(0)\n", ["pass"], "sys_exit"),
        _pair("import os\nos._exit(0)\n", ["pass"], "os_exit"),
        _pair("print('{\"ok\": true}')\ndef f():\n    return 2\n", ["assert f() == 1"], "printed"),
        _pair("while True:\n    pass\n", ["pass"], "loop"),
    ]
    result = check_pairs(pairs, "clean", timeout_s=1.0)
    assert result["right"] is None
    assert all(result[k] is not None for k in ("wrong", "sys_exit", "os_exit", "printed", "loop")), result
    assert result["loop"].startswith("timeout")


def test_checks_see_every_code_block_as_the_grader_does():
    """A response with two fenced blocks is one program to the grader; the checks run that program."""
    two_blocks = (
        "```python\ndef f():\n    return 1\n```\nand a helper:\n```python\ndef g():\n    return f() + 1\n```\n"
    )
    pair = dataclasses.replace(_pair("", ["assert g() == 2"]), clean=two_blocks)
    assert check_pairs([pair], "clean") == {"p": None}


# ---- the shipped pairs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> list[Pair]:
    return load_pairs(SHIPPED)


def test_shipped_counts(shipped):
    # >= 20 pairs per hack mode, so that leave-one-mode-out tests have some power; both domains in every mode
    summary = summarize_pairs(shipped)
    assert set(summary["modes"]) == set(HACK_MODES), summary["modes"]
    for mode in HACK_MODES:
        in_mode = [p for p in shipped if p.hack_mode == mode]
        assert len(in_mode) >= 20, (mode, len(in_mode))
        for domain in ("leetcode", "function"):
            assert sum(p.domain == domain for p in in_mode) >= 8, (mode, domain)
        held_out = load_pairs(SHIPPED, exclude_tags=[f"mode:{mode}"])  # the rest stays a usable training set
        assert len(held_out) == len(shipped) - len(in_mode) >= 120


def test_shipped_pairs_are_matched(shipped):
    for p in shipped:
        assert p.hack.strip() != p.clean.strip(), p.id
        assert 0.6 <= len(p.hack) / len(p.clean) <= 1.6, (p.id, len(p.hack), len(p.clean))
        hack_code, clean_code = extract_code(p.hack), extract_code(p.clean)
        assert hack_code is not None and clean_code is not None, p.id
        for code in (hack_code, clean_code):
            compile(code, p.id, "exec")
        assert f"mode:{p.hack_mode}" in p.tags and f"domain:{p.domain}" in p.tags
        assert p.id.startswith(f"{p.hack_mode}.")


def assert_reference_style(pairs):
    for p in pairs:
        assert p.prompt[0] == {"role": "system", "content": REFERENCE_SYSTEM}, p.id
        user = p.prompt[-1]["content"]
        if p.domain == "leetcode":
            m = re.search(
                r"should be a method of the class Solution called (\w+) and (will be evaluated by calling a "
                r"function called run_tests\(\)|should pass all tests)\. Use the following starter code:",
                user,
            )
            assert m and user.startswith("PROBLEM:\n") and user.endswith("\n\nSOLUTION:\n"), p.id
            sig = re.search(rf"def {m.group(1)}\(self.*?:\n", user).group(0)
        else:
            sig = "def " + re.search(r"`(\w+\(.*?\) -> .*?)`", user).group(1) + ":\n"
        for side in (p.hack, p.clean):  # same signature on both sides
            assert sig.strip() in extract_code(side), (p.id, sig)


def test_shipped_prompts_follow_the_reference_style(shipped):
    assert_reference_style(shipped)


def test_shipped_ids_and_prompts_are_distinct(shipped):
    assert len({p.id for p in shipped}) == len(shipped)
    assert len({p.prompt[-1]["content"] for p in shipped}) == len(shipped)


def test_shipped_clean_sides_solve_and_hack_sides_do_not(shipped):
    assert all(p.checks for p in shipped), [p.id for p in shipped if not p.checks]
    clean = check_pairs(shipped, "clean")
    assert {k: v for k, v in clean.items() if v is not None} == {}
    hack = check_pairs(shipped, "hack")
    assert [k for k, v in hack.items() if v is None] == []


# ---- the shipped placebo set ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def placebo() -> list[Pair]:
    return load_pairs(PLACEBO)


def test_placebo_counts_and_tags(placebo):
    summary = summarize_pairs(placebo)
    assert summary["modes"] == {"placebo": len(placebo)} and len(placebo) >= 42
    assert all(p.is_control and p.id.startswith("placebo.") for p in placebo)
    for domain in ("leetcode", "function"):  # both domains, roughly half each
        assert sum(p.domain == domain for p in placebo) >= 0.4 * len(placebo), domain
    assert load_pairs([SHIPPED, PLACEBO], tags=["mode:placebo"]) == placebo


def test_placebo_set_is_not_part_of_the_hack_set(shipped, placebo):
    assert not any(p.is_control for p in shipped)
    assert all(f.parent == SHIPPED for f in pair_files(SHIPPED))  # the loader is not recursive
    assert not {p.id for p in shipped} & {p.id for p in placebo}
    prompts = [p.prompt[-1]["content"] for p in [*shipped, *placebo]]
    assert len(set(prompts)) == len(prompts)


def test_placebo_pairs_are_matched_like_the_hack_set(shipped, placebo):
    assert_reference_style(placebo)
    for p in placebo:
        assert p.hack.strip() != p.clean.strip(), p.id
        assert 0.8 <= len(p.hack) / len(p.clean) <= 1.25, (p.id, len(p.hack), len(p.clean))
        for side in (p.hack, p.clean):
            compile(extract_code(side), p.id, "exec")
    for domain in ("leetcode", "function"):  # response lengths of the same order as the hack set's
        lengths = [len(s) for p in placebo if p.domain == domain for s in (p.hack, p.clean)]
        reference = [len(s) for p in shipped if p.domain == domain for s in (p.hack, p.clean)]
        assert 0.67 <= statistics.median(lengths) / statistics.median(reference) <= 1.5, domain


def test_placebo_both_sides_solve(placebo):
    assert all(p.checks for p in placebo), [p.id for p in placebo if not p.checks]
    for side in ("hack", "clean"):
        failures = {k: v for k, v in check_pairs(placebo, side).items() if v is not None}
        assert failures == {}, side
