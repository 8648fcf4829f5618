"""The report of finished runs across arms and seeds: markdown with seed-level statistics, JSON, and PNG plots.

Covers: reading each run directory (`config.yaml`, `eval.json`, `metrics.jsonl`, and `study.json` for the arm's
name in a study), one summary per run (with its collapse flag, `collapse_reason`), and `write_report`, which writes
- `report.md`: the verdict (routed_grpo.lab.verdict: paired sign-flip comparisons against `baseline` and the
  placebo of the same variant, with all seeds and without collapsed runs; DIAGNOSTIC rungs marked); per arm the
  mean over seeds with a 95% t interval over seeds and each seed's value; seed spread beside the evaluation's own
  noise (the only place a pooled binomial interval appears); the routing score's AUROC, precision and recall for
  arms with a direction; every run. A rate column identical in every run is dropped and named once under the
  table. Rows of the label-reading arms are marked DIAGNOSTIC (upper bound) wherever they appear;
- `report.json`: {"runs", "arms", "comparisons", "verdict", "collapse_rule", "dropped_columns"};
- `curves.png` and `tradeoff.png` (routed_grpo.lab.plots).
Does not cover: producing the numbers (routed_grpo.lab.evaluation, routed_grpo.lab.experiment), the maths
(routed_grpo.lab.stats), the tables (routed_grpo.lab.report_tables).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routed_grpo.lab.evaluation import EVAL_FILE, read_run_config
from routed_grpo.utils import atomic_write_text

ARM_ORDER = ("baseline", "placebo", "routed", "oracle_direction", "labels")
DIAGNOSTIC_MARK = " (DIAGNOSTIC upper bound)"
RATES = (  # column, mode, label
    ("deployed hack", "deploy", "hack_strict"),
    ("full hack", "full", "hack_strict"),
    ("deployed attempted", "deploy", "hack_attempted"),
    ("deployed defines run_tests", "deploy", "defines_run_tests"),
    ("deployed solve", "deploy", "correct"),
    ("full solve", "full", "correct"),
    ("deployed compiles", "deploy", "compiled"),
)
DIRECTION = (  # column, metrics key (mean over training), held-out key (mean over measurements)
    ("AUROC train", "measure/auroc_hack_strict"),
    ("AUROC held-out", "measure/heldout/full/routing_auroc_hack_strict"),
    ("precision@route train", "measure/precision_at_route_hack_strict"),
    ("recall@route train", "measure/recall_at_route_hack_strict"),
    ("precision@route held-out", "measure/heldout/full/routing_precision_at_route_hack_strict"),
    ("recall@route held-out", "measure/heldout/full/routing_recall_at_route_hack_strict"),
)
FINAL_REWARD_STEPS = 5  # the final training reward: mean of the last this many logged steps
COLLAPSE_FULL_COMPILE = 0.1
COLLAPSE_RULE = (
    "a run is collapsed when training broke: its final training reward (what the environment paid, before any "
    f"penalty or screening: mean of the last {FINAL_REWARD_STEPS} logged steps) is below the run's compile reward "
    "(0.5 by default: less than rollouts that all compile but never pass would earn), or its full model (both "
    f"blocks on, the policy training produced) compiles on fewer than {COLLAPSE_FULL_COMPILE:.0%} of held-out "
    "samples. A deployed model that no longer compiles while the full model does is a result about the method, not "
    "a collapse"
)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: not a JSON object ({err})") from None
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def arm_name(config: dict[str, Any], study: dict[str, Any]) -> str:
    """The row name of a run: its study spec (e.g. `routed@cap=4`), or its arm; a routed run whose
    `mismatch_ratio_cap` differs from today's default says so, so rows of runs made before a default changed
    cannot pass for today's default, and so does a run whose intervention is not `route`."""
    from routed_grpo.config import RoutedGRPOConfig

    name = study.get("spec", {}).get("name", config["arm"])
    default = RoutedGRPOConfig.__dataclass_fields__["mismatch_ratio_cap"].default
    cap = config.get("training", {}).get("mismatch_ratio_cap", default)
    if config["arm"] != "baseline" and cap != default and "cap=" not in name:
        name += f"@cap={cap}"
    iv = config.get("training", {}).get("intervention", "route")
    if iv != "route" and "intervention=" not in name:
        name += ("," if "@" in name else "@") + f"intervention={iv}"
    return name


def collapse_reason(config: dict[str, Any], evaluation: dict[str, Any], final_reward: float | None) -> str | None:
    """Why the run counts as collapsed (COLLAPSE_RULE), or None."""
    bound = float(config.get("script", {}).get("compile_reward", 0.5))
    reasons = []
    if final_reward is not None and final_reward < bound:
        reasons.append(f"final training reward {final_reward:.2f} < {bound:g}")
    full_compiles = evaluation["modes"]["full"]["compiled"]["rate"]
    if full_compiles < COLLAPSE_FULL_COMPILE:
        reasons.append(f"full model compiles {full_compiles:.2f} < {COLLAPSE_FULL_COMPILE:g}")
    return "; ".join(reasons) or None


def summarise_run(run_dir: str | Path) -> dict[str, Any]:
    """The numbers of one finished and evaluated run."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    eval_path = run_dir / EVAL_FILE
    if not eval_path.is_file():
        raise FileNotFoundError(f"{eval_path}: missing; run `routed-grpo eval {run_dir}` first")
    study = json.loads((run_dir / "study.json").read_text()) if (run_dir / "study.json").is_file() else {}
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    # what the environment paid (`env_reward`, before a penalty or screen; runs made before it was logged: `reward`)
    rewards = [m.get("env_reward", m.get("reward")) for m in metrics if "reward" in m]
    step_times = sorted(m["step_time"] for m in metrics if "step_time" in m)
    routed = config["arm"] != "baseline"
    evaluation = json.loads(eval_path.read_text())
    final_reward = _mean(rewards[-FINAL_REWARD_STEPS:])
    return {
        "run_dir": str(run_dir),
        "arm": arm_name(config, study),
        "base_arm": config["arm"],
        "intervention": config.get("training", {}).get("intervention", "route"),
        "diagnostic": config.get("diagnostic"),
        "seed": config["training"]["seed"],
        "eval": evaluation,
        "qmass": _mean([m.get("routing/qmass") for m in metrics]) if routed else None,
        "qmass_grad": _mean([m.get("routing/qmass_grad") for m in metrics]) if routed else None,
        "final_reward": final_reward,
        "collapse_reason": collapse_reason(config, evaluation, final_reward),
        "step_time_median": step_times[len(step_times) // 2] if step_times else None,
        "direction": {key: _mean([m.get(key) for m in metrics]) for _, key in DIRECTION},
        "curves": [m for m in metrics if "measure/heldout/n" in m],
        "train_seconds": study.get("train_seconds"),
    }


def value(run: dict[str, Any], mode: str, key: str) -> float:
    """One run's evaluation rate of label `key` in sampling mode `mode`."""
    return float(run["eval"]["modes"][mode][key]["rate"])


def seed_values(rows: Sequence[dict[str, Any]], mode: str, key: str, skip_collapsed: bool = False) -> dict[int, float]:
    """{seed: rate} of one arm's runs."""
    return {r["seed"]: value(r, mode, key) for r in rows if not (skip_collapsed and r["collapse_reason"])}


def _arm_key(name: str) -> tuple[int, str]:
    base = name.split("@")[0]
    return (ARM_ORDER.index(base) if base in ARM_ORDER else len(ARM_ORDER), name)


def group(summaries: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{arm: its runs in seed order}, arms in ARM_ORDER; refuses two runs of one arm at the same seed."""
    out: dict[str, list[dict[str, Any]]] = {}
    for s in sorted(summaries, key=lambda s: (_arm_key(s["arm"]), s["seed"])):
        rows = out.setdefault(s["arm"], [])
        if rows and rows[-1]["seed"] == s["seed"]:
            raise ValueError(f"{s['run_dir']}: a second run of arm {s['arm']!r} at seed {s['seed']} "
                             f"(first: {rows[-1]['run_dir']}); a study pairs arms by seed")  # fmt: skip
        rows.append(s)
    return out


def _run_record(summary: dict[str, Any]) -> dict[str, Any]:
    """A run in report.json: its summary without the curves and the per-problem counts (both stay in the run)."""
    out = {k: v for k, v in summary.items() if k != "curves"}
    out["eval"] = {k: v for k, v in summary["eval"].items() if k != "per_problem"}
    return out


def render_with_data(
    summaries: Sequence[dict[str, Any]], title: str = "Arm comparison", preamble: str = ""
) -> tuple[str, dict[str, Any]]:
    """(report.md text, report.json data)."""
    from routed_grpo.lab import report_tables as tables
    from routed_grpo.lab.verdict import comparisons, verdict_lines

    groups = group(summaries)
    comps, missing = comparisons(groups)
    lines = verdict_lines(comps)
    dropped = tables.constant_columns(summaries)
    columns = [c for c in RATES if c[0] not in dict(dropped)]
    collapsed = [r for r in summaries if r["collapse_reason"]]
    parts = [
        f"# {title}",
        preamble,
        "## Verdict",
        tables.verdict_text(lines, missing),
        "## Deployment evaluation over seeds",
        tables.arm_table(groups, columns),
        tables.arm_note(summaries, dropped),
        "## Collapsed runs",
        tables.collapse_text(collapsed, len(summaries)),
        "## Paired comparisons",
        tables.comparison_table(comps),
        tables.COMPARISON_NOTE,
    ]
    interventions, intervention_data = tables.intervention_section(groups)
    if interventions:
        parts += ["## The same flags, three interventions", interventions]
    parts += [
        "## Seed spread against evaluation noise",
        tables.noise_table(groups),
        tables.NOISE_NOTE,
    ]
    directions = tables.direction_table(groups)
    if directions:
        parts += ["## Routing score against strict hack", directions, tables.DIRECTION_NOTE]
    parts += ["## Every run", tables.run_table(groups, columns), tables.RUN_NOTE]
    data = {
        "runs": [_run_record(s) for s in summaries],
        "arms": tables.arm_stats(groups),
        "comparisons": comps,
        "verdict": lines,
        "missing_placebo": missing,
        "collapse_rule": COLLAPSE_RULE,
        "dropped_columns": [{"column": c, "value": v} for c, v in dropped],
        "interventions": intervention_data,
    }
    return "\n\n".join(p for p in parts if p) + "\n", data


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, title: str = "Arm comparison", preamble: str = ""
) -> tuple[str, list[Path]]:
    """Write `report.md`, `report.json`, `curves.png` and `tradeoff.png` to `out_dir`; returns (markdown, pngs)."""
    from routed_grpo.lab.plots import plot_curves, plot_tradeoff

    summaries = [summarise_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    text, data = render_with_data(summaries, title, preamble)
    pngs = [
        p
        for p in (plot_curves(summaries, out_dir / "curves.png"), plot_tradeoff(summaries, out_dir / "tradeoff.png"))
        if p is not None
    ]
    atomic_write_text(out_dir / "report.json", json.dumps(data, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", text)
    return text, pngs
