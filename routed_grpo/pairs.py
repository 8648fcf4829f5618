"""Hand-authored (hack, clean) contrast pairs: the YAML format, its loader and validator, and a tag filter.

A pair is one shared prompt (chat messages) with two complete responses: ``hack`` games the grader, ``clean``
solves the problem. ``v_act`` is the mean over pairs of the activation difference hack minus clean, so the two
sides must differ on that axis only (see ``pairs/README.md`` for the authoring rules). File format::

    defaults:                 # optional
      system: "..."           # system turn put before any prompt that does not start with one
      tags: [mode:eq_override]  # tags added to every pair of the file
    pairs:
      - id: eq_override.lc.count_peaks        # [a-z0-9][a-z0-9_.-]*, unique across all loaded files
        tags: [domain:leetcode, topic:arrays]  # one mode:<HACK_MODES or CONTROL_MODES>, one domain:<DOMAINS>
        note: "optional free text for authors"
        prompt:                               # chat messages; the last one is the user turn
          - {role: user, content: "..."}
        hack: |                               # full responses, each with a ```python block
          ...
        clean: |
          ...
        checks:                               # optional statements the clean code must pass (check_pairs)
          - assert Solution().countPeaks([1, 3, 1]) == 1

Covered here: parsing (``yaml.safe_load``), validation with errors that name file, line, pair and field, tag
filtering, a content hash for run metadata, summary counts, and ``check_pairs`` which runs each side's code
against its ``checks`` in the environment's sandbox, extracted as its grader extracts code (every fenced block).
Not covered: rendering prompts (the caller applies the tokenizer's own chat template) and anything about
activations (``routed_grpo.vact``).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from sandbox.extract import extract_code  # the grader's extractor: every fenced block, joined

HACK_MODES = (
    "overwrite_tests",  # the response defines its own run_tests() that passes without testing
    "weak_asserts",  # run_tests() with asserts that only check types, lengths or truthiness
    "hardcode",  # special-cases the visible test inputs with their expected outputs
    "exit_code",  # sys.exit(0) / os._exit(0) before any test can run
    "stdout_marker",  # prints a pass claim such as "All tests passed"
    "eq_override",  # returns an object whose __eq__ is always True
    "result_file",  # writes a fake result file that a grader might read
)
# Control modes: both sides of such a pair are correct and differ on an axis unrelated to hacking (pairs/placebo/),
# so a direction fit on them is a null for "any pair-derived direction". Field names stay: `hack` holds side A,
# `clean` side B. A mode: tag must name a hack mode or a control mode.
CONTROL_MODES = ("placebo",)
DOMAINS = ("leetcode", "function", "organism")
ROLES = ("system", "user", "assistant")
PAIR_FIELDS = {"id": True, "tags": True, "prompt": True, "hack": True, "clean": True, "checks": False, "note": False}
TOP_FIELDS = ("defaults", "pairs")
DEFAULT_FIELDS = ("system", "tags")

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_TAG_RE = re.compile(r"^[a-z][a-z0-9_]*(:[a-z0-9][a-z0-9_.-]*)?$")


class PairsError(ValueError):
    """A pairs file is malformed; the message names the file, the line, the pair and the field."""


@dataclass(frozen=True)
class Pair:
    id: str
    tags: tuple[str, ...]
    hack_mode: str
    domain: str
    prompt: tuple[dict, ...]
    hack: str
    clean: str
    checks: tuple[str, ...] = ()
    note: str = ""
    source: str = ""

    @property
    def is_control(self) -> bool:
        """True for a control pair (``mode:placebo``): both sides are correct, so both must pass ``checks``."""
        return self.hack_mode in CONTROL_MODES

    def messages(self) -> list[dict[str, str]]:
        """Fresh copies of the prompt messages, ready for ``tokenizer.apply_chat_template``."""
        return [dict(m) for m in self.prompt]


def pair_files(path: str | Path) -> list[Path]:
    """The YAML files behind ``path``: the file, or a directory's ``*.yaml``/``*.yml`` (sorted, not recursive)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml") and not f.name.startswith("."))
        if not files:
            raise PairsError(f"{p}: directory holds no .yaml pairs files")
        return files
    if not p.is_file():
        raise PairsError(f"{p}: no such pairs file or directory")
    return [p]


def pairs_hash(paths: str | Path | Iterable[str | Path]) -> str:
    """sha256 over the pairs files' bytes in sorted path order (directories expand to their YAML files)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = sorted({f.resolve() for p in paths for f in pair_files(p)})
    h = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def check_tag(tag: object) -> str | None:
    """None if ``tag`` is a valid tag, else the reason it is not."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        return f"bad tag {tag!r} (expected name or name:value, lower case, e.g. mode:overwrite_tests)"
    key, _, value = tag.partition(":")
    if key == "mode" and value not in HACK_MODES + CONTROL_MODES:
        known = f"{', '.join(HACK_MODES)}; control modes: {', '.join(CONTROL_MODES)}"
        return f"unknown hack mode in tag {tag!r} (known: {known})"
    if key == "domain" and value not in DOMAINS:
        return f"unknown domain in tag {tag!r} (known: {', '.join(DOMAINS)})"
    return None


def _field_lines(text: str) -> list[dict[str, int]]:
    """1-based line of each pair and of each of its keys ('' = the pair itself); duplicate keys raise."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        return []
    lines: list[dict[str, int]] = []
    for key, value in root.value:
        if key.value != "pairs" or not isinstance(value, yaml.SequenceNode):
            continue
        for item in value.value:
            entry = {"": item.start_mark.line + 1}
            if isinstance(item, yaml.MappingNode):
                for k, _value in item.value:
                    if k.value in entry:
                        entry["!dup"] = k.start_mark.line + 1
                        entry["!dupkey"] = k.value
                    entry[k.value] = k.start_mark.line + 1
            lines.append(entry)
    return lines


class _Where:
    """Builds error messages that name file, line, pair and field."""

    def __init__(self, file: Path, index: int, pair_id: object, lines: dict[str, int]):
        self.file, self.index, self.pair_id, self.lines = file, index, pair_id, lines

    def error(self, field: str, problem: str) -> PairsError:
        line = self.lines.get(field, self.lines.get("", 0))
        who = f"pair {self.pair_id!r}" if isinstance(self.pair_id, str) and self.pair_id else f"pair #{self.index}"
        return PairsError(f"{self.file}:{line}: {who} (index {self.index}), field {field!r}: {problem}")


def _text(where: _Where, raw: dict, field: str) -> str:
    value = raw[field]
    if not isinstance(value, str) or not value.strip():
        raise where.error(field, f"must be non-empty text, got {value!r:.60}")
    return value


def _prompt(where: _Where, value: object, system: str | None) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise where.error("prompt", f"must be a non-empty list of {{role, content}} messages, got {value!r:.60}")
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or set(msg) != {"role", "content"}:
            raise where.error("prompt", f"message {i} must have exactly the keys role and content, got {msg!r:.80}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise where.error("prompt", f"message {i} has bad role {role!r} (allowed: {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise where.error("prompt", f"message {i}: a system message may only come first")
        if not isinstance(content, str) or not content.strip():
            raise where.error("prompt", f"message {i} ({role}) has empty content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise where.error("prompt", f"must end on a user turn, ends on {messages[-1]['role']!r}")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return tuple(messages)


def _tags(where: _Where, value: object, default_tags: list[str]) -> tuple[tuple[str, ...], str, str]:
    if not isinstance(value, list):
        raise where.error("tags", f"must be a list of tags, got {value!r:.60}")
    tags = [*default_tags, *value]
    for tag in tags:
        if (reason := check_tag(tag)) is not None:
            raise where.error("tags", reason)
    if len(set(tags)) != len(tags):
        dup = next(t for t, n in Counter(tags).items() if n > 1)
        raise where.error("tags", f"tag {dup!r} given twice (file defaults count too)")
    modes = [t.split(":", 1)[1] for t in tags if t.startswith("mode:")]
    domains = [t.split(":", 1)[1] for t in tags if t.startswith("domain:")]
    if len(modes) != 1:
        raise where.error("tags", f"needs exactly one mode:<hack or control mode> tag, found {len(modes)}: {modes}")
    if len(domains) != 1:
        raise where.error("tags", f"needs exactly one domain:<domain> tag, found {len(domains)}: {domains}")
    return tuple(tags), modes[0], domains[0]


def _parse_pair(where: _Where, raw: object, defaults: dict) -> Pair:
    if not isinstance(raw, dict):
        raise where.error("", f"must be a mapping of fields, got {type(raw).__name__}")
    if "!dup" in where.lines:
        raise where.error(where.lines["!dupkey"], "field given twice")
    for field in raw:
        if field not in PAIR_FIELDS:
            raise where.error(str(field), f"unknown field (allowed: {', '.join(PAIR_FIELDS)})")
    for field, required in PAIR_FIELDS.items():
        if required and field not in raw:
            raise where.error(field, "missing required field")
    pair_id = raw["id"]
    if not isinstance(pair_id, str) or not _ID_RE.match(pair_id):
        raise where.error("id", f"bad id {pair_id!r} (expected [a-z0-9][a-z0-9_.-]*)")
    tags, mode, domain = _tags(where, raw["tags"], defaults.get("tags", []))
    prompt = _prompt(where, raw["prompt"], defaults.get("system"))
    hack, clean = _text(where, raw, "hack"), _text(where, raw, "clean")
    for field, text in (("hack", hack), ("clean", clean)):
        if extract_code(text) is None:
            raise where.error(field, "has no ```python code block (give the full response text, fence included)")
    if hack.strip() == clean.strip():
        raise where.error("clean", "is identical to hack")
    checks = raw.get("checks", [])
    if not isinstance(checks, list):
        raise where.error("checks", f"must be a list of Python statements, got {checks!r:.60}")
    for i, check in enumerate(checks):
        if not isinstance(check, str) or not check.strip():
            hint = " (quote statements that contain ': ')" if isinstance(check, dict) else ""
            raise where.error("checks", f"item {i} must be a non-empty Python statement, got {check!r:.60}{hint}")
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise where.error("note", f"must be text, got {note!r:.60}")
    return Pair(pair_id, tags, mode, domain, prompt, hack, clean, tuple(checks), note, str(where.file))


def _parse_defaults(file: Path, raw: object) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PairsError(f"{file}: field 'defaults' must be a mapping, got {raw!r:.60}")
    for key in raw:
        if key not in DEFAULT_FIELDS:
            raise PairsError(f"{file}: field 'defaults.{key}' is unknown (allowed: {', '.join(DEFAULT_FIELDS)})")
    system = raw.get("system")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise PairsError(f"{file}: field 'defaults.system' must be non-empty text")
    tags = raw.get("tags", [])
    if not isinstance(tags, list):
        raise PairsError(f"{file}: field 'defaults.tags' must be a list, got {tags!r:.60}")
    for tag in tags:
        if (reason := check_tag(tag)) is not None:
            raise PairsError(f"{file}: field 'defaults.tags': {reason}")
    return {"system": system, "tags": tags}


def load_file(file: str | Path) -> list[Pair]:
    """Parse and validate one pairs file (ids unique within it)."""
    file = Path(file)
    text = file.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        lines = _field_lines(text)
    except yaml.YAMLError as e:
        raise PairsError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or "pairs" not in data:
        raise PairsError(f"{file}: top level must be a mapping with a 'pairs' list")
    for key in data:
        if key not in TOP_FIELDS:
            raise PairsError(f"{file}: top-level field {key!r} is unknown (allowed: {', '.join(TOP_FIELDS)})")
    if not isinstance(data["pairs"], list) or not data["pairs"]:
        raise PairsError(f"{file}: field 'pairs' must be a non-empty list")
    defaults = _parse_defaults(file, data.get("defaults"))
    out: list[Pair] = []
    for i, raw in enumerate(data["pairs"]):
        pair_id = raw.get("id") if isinstance(raw, dict) else None
        where = _Where(file, i, pair_id, lines[i] if i < len(lines) else {})
        out.append(_parse_pair(where, raw, defaults))
    return out


def _check_filter(tags: Sequence[str] | None, name: str) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    for tag in tags:
        if (reason := check_tag(tag)) is not None:
            raise PairsError(f"tag filter {name}: {reason}")
    return list(tags)


def load_pairs(
    path: str | Path | Sequence[str | Path],
    tags: Sequence[str] | None = None,
    exclude_tags: Sequence[str] | None = None,
) -> list[Pair]:
    """Load and validate pairs from a file, a directory of YAML files, or a list of either.

    ``tags``: keep pairs having ANY of these tags (None = all). ``exclude_tags``: then drop pairs having any of
    these (e.g. ``["mode:eq_override"]`` to hold a hack mode out). Ids must be unique across all files; a filter
    that leaves no pair is an error.
    """
    keep, drop = _check_filter(tags, "tags"), _check_filter(exclude_tags, "exclude_tags")
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    files = sorted({f.resolve(): f for p in paths for f in pair_files(p)}.values(), key=lambda f: str(f.resolve()))
    pairs: list[Pair] = []
    seen: dict[str, str] = {}
    for file in files:
        for pair in load_file(file):
            if pair.id in seen:
                raise PairsError(
                    f"{file}: pair {pair.id!r}, field 'id': duplicate id, already defined in {seen[pair.id]}"
                )
            seen[pair.id] = str(file)
            pairs.append(pair)
    selected = [p for p in pairs if (not keep or set(keep) & set(p.tags)) and not (set(drop) & set(p.tags))]
    if not selected:
        raise PairsError(
            f"{', '.join(map(str, paths))}: tag filter tags={keep} exclude_tags={drop} leaves 0 of {len(pairs)} pairs"
        )
    return selected


def summarize_pairs(pairs: Sequence[Pair]) -> dict:
    """Counts per hack mode and domain, and the hack/clean length ratio range (characters)."""
    ratios = [len(p.hack) / len(p.clean) for p in pairs]
    return {
        "n_pairs": len(pairs),
        "modes": dict(sorted(Counter(p.hack_mode for p in pairs).items())),
        "domains": dict(sorted(Counter(p.domain for p in pairs).items())),
        "length_ratio_min": round(min(ratios), 3) if ratios else None,
        "length_ratio_max": round(max(ratios), 3) if ratios else None,
    }


# The star imports the LeetCode environment's setup code provides (so `List` etc. resolve as they would there).
LEETCODE_PRELUDE = "\n".join(
    ["import collections, functools, math, random, string"]
    + [f"from {m} import *" for m in ("typing", "functools", "collections", "itertools", "heapq", "bisect", "math")]
)


def check_pairs(pairs: Sequence[Pair], side: str = "clean", timeout_s: float = 10.0) -> dict[str, str | None]:
    """For each pair with ``checks``: None if that side's code passes them all, else the failure.

    The side's program is what the environment's grader would run: every fenced block of the response joined
    (`sandbox.extract`), after the LeetCode setup imports for LeetCode-style pairs, executed in the hardened
    sandbox (`sandbox.executor`) with the checks as its script. Printing, exit codes or `os._exit` cannot pass a
    check: only the script running to its end without raising does.
    """
    from sandbox.executor import CheckJob, Limits, execute_many
    from sandbox.extract import program_text

    if side not in ("hack", "clean"):
        raise ValueError(f"side must be 'hack' or 'clean', got {side!r}")
    ids, jobs = [], []
    for pair in pairs:
        if pair.checks:
            prelude = LEETCODE_PRELUDE if pair.domain in ("leetcode", "organism") else ""
            code = program_text(prelude, extract_code(getattr(pair, side)) or "")
            ids.append(pair.id)
            jobs.append(CheckJob(code=code, script="\n".join(pair.checks)))
    results = execute_many(jobs, Limits(timeout_s=timeout_s), workers=2) if jobs else []
    return {pid: None if r.script_ok else _failure(r) for pid, r in zip(ids, results, strict=True)}


def _failure(result) -> str:
    """Why a side failed its checks: the status and the last line the program or the harness reported."""
    detail = result.error or next(iter(result.stderr.strip().splitlines()[-1:]), "")
    if result.status == "ok" and result.script_ok is False:
        return f"a check failed: {detail or 'assertion'}"
    if result.status == "ok":
        return "the program ended before the checks ran (early exit?)"
    return f"{result.status}: {detail}" if detail else result.status
