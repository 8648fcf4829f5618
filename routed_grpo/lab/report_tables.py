"""The markdown tables and notes of a report (routed_grpo.lab.report), and the per-arm statistics of report.json.

Covers: per arm the mean over seeds with a 95% t interval over seeds and each seed's value (collapsed runs marked
`*`); the paired comparisons; seed spread beside the evaluation's own noise (per-run standard error, problems as
clusters, and the pooled Wilson interval, labelled as evaluation noise only); the routing-score table; every run
(each cell with that run's own Wilson interval, also evaluation noise only); dropping rate columns identical in
every run. Does not cover: reading runs or choosing comparisons (routed_grpo.lab.report, routed_grpo.lab.verdict).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from routed_grpo.lab.evaluation import rate
from routed_grpo.lab.report import DIAGNOSTIC_MARK, DIRECTION, RATES, _mean, value
from routed_grpo.lab.stats import eval_se, t_interval
from routed_grpo.lab.verdict import METRICS, TEST_NAME, fmt_diff, fmt_p

Row = dict[str, Any]
COMPARISON_NOTE = (
    "Difference = the arm's rate minus the reference's at the same seed (same organism, data order and evaluation "
    f"problems); mean over seeds with a 95% t interval over seeds; p: {TEST_NAME} exact permutation test over all "
    "2^n sign patterns of the n per-seed differences. Without collapsed runs: a pair is dropped when either run "
    "collapsed."
)
NOISE_NOTE = (
    "Seed SD: standard deviation over seeds of the run's rate (the spread the t intervals above use). Eval SE: the "
    "evaluation's own standard error of one run's rate (root mean square over the arm's runs), with the held-out "
    "problems as clusters when eval.json records per-problem counts (several samples of one problem are not "
    "independent), binomial over samples otherwise. Pooled Wilson: counts summed over seeds, a 95% Wilson "
    "interval: evaluation noise only, not an interval for the arm."
)
DIRECTION_NOTE = (
    "Means over training (train: every batch's rollouts; held-out: the periodic held-out samples, scored with the "
    "run's current adapter and direction; route threshold: the gate's). Each seed in parentheses."
)
RUN_NOTE = (
    "Each cell: the run's rate with its 95% Wilson interval over its evaluation samples (evaluation noise only). "
    "Collapsed: see 'Collapsed runs'. s/step: median training step time."
)


def num(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _wilson_cell(r: dict[str, float]) -> str:
    return f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def title(rows: Sequence[Row]) -> str:
    return rows[0]["arm"] + (DIAGNOSTIC_MARK if rows[0]["diagnostic"] else "")


def constant_columns(summaries: Sequence[Row]) -> list[tuple[str, str]]:
    """[(column, its value)] of the rate columns with the same value in every run (only with two runs or more);
    the verdict's metrics (deployed hack and solve) always stay."""
    if len(summaries) < 2:
        return []
    out = []
    for column, mode, key in RATES:
        if column in {label for label, _, _ in METRICS}:
            continue
        values = {value(r, mode, key) for r in summaries}
        if len(values) == 1:
            out.append((column, num(values.pop())))
    return out


def seed_cell(rows: Sequence[Row], mode: str, key: str) -> str:
    """`0.55 [0.10, 1.00] (0.00*, 0.85, 0.79)`: mean over seeds, t interval, each seed (`*`: collapsed)."""
    ci = t_interval([value(r, mode, key) for r in rows])
    per_seed = ", ".join(num(value(r, mode, key)) + ("*" if r["collapse_reason"] else "") for r in rows)
    interval = " [n/a]" if ci["lo"] is None else f" [{ci['lo']:.2f}, {ci['hi']:.2f}]"
    return f"{num(ci['mean'])}{interval} ({per_seed})"


def mass(rows: Sequence[Row]) -> str:
    if rows[0]["base_arm"] == "baseline":
        return "not routed"
    if rows[0].get("intervention", "route") != "route":
        return "not routed (both blocks train on every row)"
    return f"{num(_mean([r['qmass'] for r in rows]))} / {num(_mean([r['qmass_grad'] for r in rows]))}"


def _collapsed(rows: Sequence[Row]) -> str:
    seeds = [str(r["seed"]) for r in rows if r["collapse_reason"]]
    return f"{len(seeds)}" + (f" (seed {', '.join(seeds)})" if seeds else "")


def arm_table(groups: dict[str, list[Row]], columns: Sequence[tuple[str, str, str]]) -> str:
    head = ["arm", "seeds", "collapsed", *[c for c, _, _ in columns], "routing mass (rollouts / grad)", "final reward"]
    body = []
    for rows in groups.values():
        cells = [seed_cell(rows, mode, key) for _, mode, key in columns]
        reward = num(_mean([r["final_reward"] for r in rows]))
        body.append([title(rows), str(len(rows)), _collapsed(rows), *cells, mass(rows), reward])
    return _table(head, body)


def arm_note(summaries: Sequence[Row], dropped: Sequence[tuple[str, str]]) -> str:
    sizes = sorted({(s["eval"]["n"], s["eval"].get("samples", 1)) for s in summaries})
    per_run = ", ".join(f"{n} problems x {k} sample{'s' if k > 1 else ''}" for n, k in sizes)
    text = (
        f"Held-out evaluation per run: {per_run} (loophole on). Each cell: the mean over seeds with a 95% t interval "
        "over seeds (the seed is the unit of replication), each seed's rate in parentheses (`*`: a collapsed run, "
        "included). Routing mass: mean share of rollouts whose update reached the quarantine / share of the "
        "gradient norm. Baseline: nothing is routed, so deployed == full. "
        f"Rows marked{DIAGNOSTIC_MARK} read ground-truth labels: upper bounds, not the method."
    )
    if dropped:
        text += " Not shown, identical in every run: " + ", ".join(f"{c} ({v})" for c, v in dropped) + "."
    return text


def collapse_text(collapsed: Sequence[Row], total: int) -> str:
    from routed_grpo.lab.report import COLLAPSE_RULE

    rule = f"Rule: {COLLAPSE_RULE}. The verdict uses all seeds; figures without collapsed runs stand beside it."
    if not collapsed:
        return f"None of the {total} runs collapsed. {rule}"
    items = "; ".join(f"{r['arm']} seed {r['seed']} ({r['collapse_reason']})" for r in collapsed)
    return f"{len(collapsed)} of {total} runs collapsed: {items}. {rule}"


def comparison_table(comps: Sequence[Row]) -> str:
    labels = [label for label, _, _ in METRICS]
    head = ["comparison", "seeds", *labels, "smallest p", "without collapsed: seeds", *labels]
    body = []
    for c in comps:
        mark = DIAGNOSTIC_MARK if c["diagnostic"] else ""
        m = c["metrics"]
        allp, kept = m[labels[0]]["all"], m[labels[0]]["without_collapsed"]
        body.append(
            [f"{c['arm']}{mark} - {c['reference']}", str(allp["n"])]
            + [fmt_diff(m[x]["all"]) for x in labels]
            + [fmt_p(allp["p_min"]), str(kept["n"])]
            + [fmt_diff(m[x]["without_collapsed"]) for x in labels]
        )
    return _table(head, body) if body else "No comparisons (the study needs a baseline or a placebo)."


def _run_se(run: Row, mode: str, key: str) -> float | None:
    ev = run["eval"]
    counts = ev.get("per_problem", {}).get(mode, {}).get(key)
    k = ev.get("samples", 1)
    per_problem = [c / k for c in counts] if counts else None
    return eval_se(value(run, mode, key), ev["modes"][mode][key]["n"], per_problem)


def pooled(rows: Sequence[Row], mode: str, key: str) -> dict[str, float]:
    """Counts summed over runs, Wilson interval: evaluation noise only."""
    modes = [r["eval"]["modes"][mode][key] for r in rows]
    return rate(sum(m["k"] for m in modes), sum(m["n"] for m in modes))


def noise(rows: Sequence[Row], mode: str, key: str) -> dict[str, Any]:
    ses = [_run_se(r, mode, key) for r in rows]
    ses = [s for s in ses if s is not None]
    return {
        "seed_sd": t_interval([value(r, mode, key) for r in rows])["sd"],
        "eval_se": math.sqrt(sum(s * s for s in ses) / len(ses)) if ses else None,
        "pooled_wilson": pooled(rows, mode, key),
    }


def noise_table(groups: dict[str, list[Row]]) -> str:
    head = ["arm", "samples per run"]
    for label, _, _ in METRICS:
        head += [f"{label}: seed SD", f"{label}: eval SE", f"{label}: pooled Wilson (evaluation noise only)"]
    body = []
    for rows in groups.values():
        sizes = sorted({r["eval"]["modes"]["deploy"]["hack_strict"]["n"] for r in rows})
        cells = [title(rows), ", ".join(map(str, sizes))]
        for _, mode, key in METRICS:
            n = noise(rows, mode, key)
            cells += [num(n["seed_sd"]), num(n["eval_se"]), _wilson_cell(n["pooled_wilson"])]
        body.append(cells)
    return _table(head, body)


def direction_table(groups: dict[str, list[Row]]) -> str | None:
    """Arms whose rollouts were scored by a direction (not the baseline, not the label monitor)."""
    with_dir = {a: rows for a, rows in groups.items() if rows[0]["base_arm"] not in ("baseline", "labels")}
    if not with_dir:
        return None
    body = []
    for rows in with_dir.values():
        cells = []
        for _, key in DIRECTION:
            per_seed = [r["direction"][key] for r in rows]
            seeds = ", ".join(num(v) for v in per_seed)
            cells.append(num(_mean(per_seed)) + (f" ({seeds})" if len(rows) > 1 else ""))
        body.append([title(rows), *cells])
    return _table(["arm", *[c for c, _ in DIRECTION]], body)


def run_table(groups: dict[str, list[Row]], columns: Sequence[tuple[str, str, str]]) -> str:
    head = ["arm", "seed", "collapsed", *[c for c, _, _ in columns], "routing mass (rollouts / grad)"]
    head += ["final reward", "s/step"]
    body = []
    for rows in groups.values():
        for r in rows:
            cells = [_wilson_cell(r["eval"]["modes"][mode][key]) for _, mode, key in columns]
            body.append(
                [title([r]), str(r["seed"]), "yes" if r["collapse_reason"] else "no", *cells, mass([r])]
                + [num(r["final_reward"]), num(r["step_time_median"])]
            )
    return _table(head, body)


def arm_stats(groups: dict[str, list[Row]]) -> dict[str, Any]:
    """report.json's per-arm statistics: every rate's t interval over seeds and each seed's value, and noise."""
    out = {}
    for arm, rows in groups.items():
        rates = {}
        for column, mode, key in RATES:
            ci = t_interval([value(r, mode, key) for r in rows])
            rates[column] = {**ci, "per_seed": {str(r["seed"]): value(r, mode, key) for r in rows}}
        out[arm] = {
            "diagnostic": bool(rows[0]["diagnostic"]),
            "seeds": [r["seed"] for r in rows],
            "collapsed_seeds": [r["seed"] for r in rows if r["collapse_reason"]],
            "rates": rates,
            "noise": {label: noise(rows, mode, key) for label, mode, key in METRICS},
            "final_reward": _mean([r["final_reward"] for r in rows]),
        }
    return out


def verdict_text(lines: Sequence[str], missing: Sequence[str]) -> str:
    if not lines:
        text = "No comparison: the study has no baseline and no placebo of the same variant."
    else:
        text = "\n".join(f"- {line}" for line in lines)
    text += (
        "\n\nGenerated from the runs: each figure is the mean per-seed difference (arm minus reference) with its "
        "95% t interval over seeds; `routed` gates with `v_act`, `placebo` with a Haar-random direction."
    )
    if missing:
        text += "\n\n" + "\n".join(f"- {m}." for m in missing)
    return text


# ---- scorer x intervention -----------------------------------------------------------------------------------------
INTERVENTION_NOTE = (
    "Rows: the flags (the scorer with its variants); columns: what a flagged rollout does. `route` is the method "
    "(zones and masks, the quarantine ablated at deployment); `penalty` lowers a flagged rollout's reward before the "
    "advantages; `screen` drops it from the loss and its group's mean. `penalty` and `screen` train both blocks on "
    "every row and deploy the full model, as the baseline does. Each cell: mean over seeds with a 95% t interval "
    "over seeds. Route minus X: paired by seed, with the test and intervals of the paired comparisons above (all "
    "seeds); a negative hack and a positive solve difference favour routing."
)


def split_intervention(arm: str) -> tuple[str, str]:
    """`labels@recall=0.7,intervention=penalty` -> (`labels@recall=0.7`, `penalty`); no intervention: `route`."""
    from routed_grpo.ladder import INTERVENTIONS

    base, _, rest = arm.partition("@")
    keep, iv = [], "route"
    for part in filter(None, rest.split(",")):
        key, _, val = part.partition("=")
        if key == "intervention" and val in INTERVENTIONS:
            iv = val
        else:
            keep.append(part)
    return base + ("@" + ",".join(keep) if keep else ""), iv


def _mean_ci(rows: Sequence[Row], mode: str, key: str) -> str:
    ci = t_interval([value(r, mode, key) for r in rows])
    return num(ci["mean"]) + ("" if ci["lo"] is None else f" [{ci['lo']:.2f}, {ci['hi']:.2f}]")


def intervention_section(groups: dict[str, list[Row]]) -> tuple[str | None, dict[str, Any]]:
    """(markdown of the scorer x intervention table and the route-minus-X comparisons, their report.json data);
    (None, {}) when no flags are applied by more than one intervention."""
    from routed_grpo.lab.verdict import compare
    from routed_grpo.ladder import INTERVENTIONS

    cells: dict[str, dict[str, str]] = {}  # scorer -> intervention -> arm
    for arm, rows in groups.items():
        if rows[0]["base_arm"] != "baseline":
            scorer, iv = split_intervention(arm)
            cells.setdefault(scorer, {})[iv] = arm
    if not any(len(ivs) > 1 for ivs in cells.values()):
        return None, {}
    present = [iv for iv in INTERVENTIONS if any(iv in ivs for ivs in cells.values())]
    head = ["flags"] + [f"{iv}: deployed {m}" for iv in present for m in ("hack", "solve")]
    body, comps = [], []
    for scorer, ivs in cells.items():
        row = [title(groups[next(iter(ivs.values()))]).replace(next(iter(ivs.values())), scorer)]
        for iv in present:
            rows = groups.get(ivs.get(iv, ""), [])
            row += [_mean_ci(rows, "deploy", k) if rows else "-" for k in ("hack_strict", "correct")]
        body.append(row)
        if "route" in ivs:
            comps += [compare(groups, ivs["route"], ivs[iv]) for iv in present if iv != "route" and iv in ivs]
    diff_head = ["route minus", "deployed hack", "deployed solve", "seeds"]
    diff_body = [
        [f"{c['reference']}", *[fmt_diff(c["metrics"][label]["all"]) for label, _, _ in METRICS],
         str(c["metrics"]["deployed hack"]["all"]["n"])]
        for c in comps
    ]  # fmt: skip
    text = _table(head, body) + "\n\n" + (_table(diff_head, diff_body) + "\n\n" if comps else "") + INTERVENTION_NOTE
    return text, {"table": {s: dict(ivs) for s, ivs in cells.items()}, "route_minus": comps}
