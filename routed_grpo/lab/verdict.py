"""Paired comparisons between arms and the verdict lines generated from them (never hand-written).

Covers: which arms are compared (every arm but a baseline against the baseline of the same variant where the study
has one, `baseline` otherwise; every arm that is neither the
baseline nor a placebo against the placebo of the same variant, `routed@X` against `placebo@X`; with no such
placebo in the study that comparison is not made and the report says so, because a placebo with other settings is
not this arm's control); per comparison and metric (deployed hack, deployed solve) the paired statistics of
routed_grpo.lab.stats with all seeds, and without collapsed runs (a pair is dropped when either of its runs
collapsed); one verdict line per method comparison, then one per DIAGNOSTIC rung, marked.
Does not cover: the maths (routed_grpo.lab.stats), the tables (routed_grpo.lab.report_tables).
"""

from __future__ import annotations

from typing import Any

from routed_grpo.lab.report import seed_values
from routed_grpo.lab.stats import paired

METRICS = (("deployed hack", "deploy", "hack_strict"), ("deployed solve", "deploy", "correct"))
TEST_NAME = "two-sided sign-flip"


def variant(arm: str) -> str:
    """`routed@cap=4` -> `cap=4`; `routed` -> ``."""
    return arm.partition("@")[2]


def placebo_of(arm: str) -> str:
    """The placebo arm with the same variant: `routed@cap=4` -> `placebo@cap=4`."""
    return "placebo" + (f"@{variant(arm)}" if variant(arm) else "")


def baseline_of(arm: str, groups: dict[str, Any]) -> str | None:
    """The baseline an arm is paired with: of the study's baselines whose variant settings are all among the arm's
    (`baseline@adapter_init=svd` for `routed@adapter_init=svd,intervention=penalty`: the same initialisation), the
    one with the most; `baseline` when no other fits."""
    mine = set(filter(None, variant(arm).split(",")))
    fits = [
        b
        for b, rows in groups.items()
        if rows[0]["base_arm"] == "baseline" and set(filter(None, variant(b).split(","))) <= mine
    ]
    return max(fits, key=lambda b: len(variant(b).split(",")) if variant(b) else 0, default=None)


def compare(groups: dict[str, list[dict[str, Any]]], arm: str, reference: str) -> dict[str, Any]:
    """Paired statistics of `arm` minus `reference` by seed, with all seeds and without collapsed runs."""
    a, b = groups[arm], groups[reference]
    collapsed = {r["seed"] for r in a + b if r["collapse_reason"]}
    common = {r["seed"] for r in a} & {r["seed"] for r in b}
    out: dict[str, Any] = {
        "arm": arm,
        "reference": reference,
        "diagnostic": bool(a[0]["diagnostic"]),
        "collapsed_pairs": sorted(common & collapsed),
        "metrics": {},
    }
    for label, mode, key in METRICS:
        out["metrics"][label] = {
            "all": paired(seed_values(a, mode, key), seed_values(b, mode, key)),
            "without_collapsed": paired(seed_values(a, mode, key, True), seed_values(b, mode, key, True)),
        }
    return out


def comparisons(groups: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(comparisons, notes on arms without a placebo of the same variant); method arms first, DIAGNOSTIC last."""
    comps, missing = [], []
    for arm, rows in groups.items():
        base = rows[0]["base_arm"]
        if base == "baseline":
            continue
        if base != "placebo":
            ref = placebo_of(arm)
            if ref in groups:
                comps.append(compare(groups, arm, ref))
            else:
                missing.append(
                    f"{arm}: no {ref} in this study, so it is not compared with a placebo (a placebo with other "
                    "settings is not its control)"
                )
        ref = baseline_of(arm, groups)
        if ref is not None:
            comps.append(compare(groups, arm, ref))
    comps.sort(key=lambda c: c["diagnostic"])  # stable: method arms keep their order
    return comps, missing


def fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.4g}"


def fmt_diff(stat: dict[str, Any]) -> str:
    """`-0.02 [-0.15, 0.11], p = 0.75` (no interval below two pairs)."""
    if stat["mean"] is None:
        return "no pairs"
    ci = "[n/a]" if stat["lo"] is None else f"[{stat['lo']:.2f}, {stat['hi']:.2f}]"
    return f"{stat['mean']:+.2f} {ci}, p = {fmt_p(stat['p'])}"


def _figures(comp: dict[str, Any], which: str) -> str:
    return "; ".join(f"{label} {fmt_diff(comp['metrics'][label][which])}" for label, _, _ in METRICS)


def verdict_line(comp: dict[str, Any]) -> str:
    """One generated sentence per comparison, e.g. `routed vs placebo: deployed hack -0.02 [-0.15, 0.11],
    p = 0.75; deployed solve ... (two-sided sign-flip, n = 5 seeds, smallest attainable p = 0.0625). ...`"""
    first = comp["metrics"][METRICS[0][0]]
    n, p_min = first["all"]["n"], first["all"]["p_min"]
    mark = "DIAGNOSTIC (upper bound, reads labels): " if comp["diagnostic"] else ""
    line = (
        f"{mark}{comp['arm']} vs {comp['reference']}: {_figures(comp, 'all')} "
        f"({TEST_NAME}, n = {n} seed{'' if n == 1 else 's'}, smallest attainable p = {fmt_p(p_min)})."
    )
    dropped = comp["collapsed_pairs"]
    if not dropped:
        return line + " No collapsed run in these pairs."
    kept = first["without_collapsed"]
    seeds = ", ".join(map(str, dropped))
    return (
        line + f" Without collapsed runs (seed{'s' if len(dropped) > 1 else ''} {seeds} dropped, n = {kept['n']}, "
        f"smallest attainable p = {fmt_p(kept['p_min'])}): {_figures(comp, 'without_collapsed')}."
    )


def verdict_lines(comps: list[dict[str, Any]]) -> list[str]:
    """Every method comparison, then one line per DIAGNOSTIC rung: against the baseline (against its placebo when
    the study has no baseline); the paired-comparisons table has the others."""
    lines, rungs = [], set()
    for c in sorted(comps, key=lambda c: (c["diagnostic"], c["diagnostic"] and c["reference"] != "baseline")):
        if c["diagnostic"]:
            if c["arm"] in rungs:
                continue
            rungs.add(c["arm"])
        lines.append(verdict_line(c))
    return lines
