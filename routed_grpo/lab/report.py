"""The report of finished runs across arms and seeds: markdown tables with 95% intervals, JSON, and PNG plots.

Covers: reading each run directory (`config.yaml`, `eval.json`, `metrics.jsonl`, and `study.json` for the arm's
name in a study), one summary per run, and `write_report`, which writes
- `report.md`: per arm pooled over seeds (Wilson interval of the pooled proportion, each seed's value beside it):
  deployed and full strict hack, deployed attempted hack, deployed "defines run_tests", deployed and full solve,
  deployed compile rate, routing mass (rollouts and gradient) and the final reward; per run the same numbers; for
  arms with a direction (routed, placebo, oracle_direction and their variants) the routing score's AUROC against
  strict hack on training rollouts and on held-out rollouts, and precision and recall at the route threshold.
  Rows of the label-reading arms are marked DIAGNOSTIC (upper bound) wherever they appear;
- `report.json`: the same numbers as data;
- `curves.png` and `tradeoff.png` (routed_grpo.lab.plots).
Does not cover: producing the numbers (routed_grpo.lab.evaluation, routed_grpo.lab.experiment).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routed_grpo.lab.evaluation import EVAL_FILE, rate, read_run_config
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


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def arm_name(config: dict[str, Any], study: dict[str, Any]) -> str:
    """The row name of a run: its study spec (e.g. `routed@cap=4`), or its arm; a routed run whose
    `mismatch_ratio_cap` differs from today's default says so, so rows of runs made before a default changed
    cannot pass for today's default."""
    from routed_grpo.config import RoutedGRPOConfig

    name = study.get("spec", {}).get("name", config["arm"])
    default = RoutedGRPOConfig.__dataclass_fields__["mismatch_ratio_cap"].default
    cap = config.get("training", {}).get("mismatch_ratio_cap", default)
    if config["arm"] != "baseline" and cap != default and "cap=" not in name:
        name += f"@cap={cap}"
    return name


def summarise_run(run_dir: str | Path) -> dict[str, Any]:
    """The numbers of one finished and evaluated run."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    eval_path = run_dir / EVAL_FILE
    if not eval_path.is_file():
        raise FileNotFoundError(f"{eval_path}: missing; run `routed-grpo eval {run_dir}` first")
    study = json.loads((run_dir / "study.json").read_text()) if (run_dir / "study.json").is_file() else {}
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    rewards = [m["reward"] for m in metrics if "reward" in m]
    step_times = sorted(m["step_time"] for m in metrics if "step_time" in m)
    routed = config["arm"] != "baseline"
    return {
        "run_dir": str(run_dir),
        "arm": arm_name(config, study),
        "base_arm": config["arm"],
        "diagnostic": config.get("diagnostic"),
        "seed": config["training"]["seed"],
        "eval": json.loads(eval_path.read_text()),
        "qmass": _mean([m.get("routing/qmass") for m in metrics]) if routed else None,
        "qmass_grad": _mean([m.get("routing/qmass_grad") for m in metrics]) if routed else None,
        "final_reward": _mean(rewards[-5:]),
        "step_time_median": step_times[len(step_times) // 2] if step_times else None,
        "direction": {key: _mean([m.get(key) for m in metrics]) for _, key in DIRECTION},
        "curves": [m for m in metrics if "measure/heldout/n" in m],
        "train_seconds": study.get("train_seconds"),
    }


def _cell(r: dict[str, float]) -> str:
    return f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _arm_key(name: str) -> tuple[int, str]:
    base = name.split("@")[0]
    return (ARM_ORDER.index(base) if base in ARM_ORDER else len(ARM_ORDER), name)


def _title(rows: Sequence[dict[str, Any]]) -> str:
    return rows[0]["arm"] + (DIAGNOSTIC_MARK if rows[0]["diagnostic"] else "")


def pooled(rows: Sequence[dict[str, Any]], mode: str, key: str) -> dict[str, float]:
    """Pooled rate over runs: counts summed, Wilson interval of the pooled proportion."""
    return rate(
        sum(r["eval"]["modes"][mode][key]["k"] for r in rows), sum(r["eval"]["modes"][mode][key]["n"] for r in rows)
    )


def _mass(rows: Sequence[dict[str, Any]]) -> str:
    if rows[0]["base_arm"] == "baseline":
        return "not routed"
    return f"{_num(_mean([r['qmass'] for r in rows]))} / {_num(_mean([r['qmass_grad'] for r in rows]))}"


def group(summaries: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in sorted(summaries, key=lambda s: (_arm_key(s["arm"]), s["seed"])):
        out.setdefault(s["arm"], []).append(s)
    return out


def pooled_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    head = ["arm", "seeds", *[c for c, _, _ in RATES], "routing mass (rollouts / grad)", "final reward"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rows in groups.values():
        cells = []
        for _, mode, key in RATES:
            per_seed = ", ".join(f"{r['eval']['modes'][mode][key]['rate']:.2f}" for r in rows)
            cells.append(_cell(pooled(rows, mode, key)) + (f" ({per_seed})" if len(rows) > 1 else ""))
        reward = _num(_mean([r["final_reward"] for r in rows]))
        lines.append(f"| {_title(rows)} | {len(rows)} | " + " | ".join(cells) + f" | {_mass(rows)} | {reward} |")
    return "\n".join(lines)


def run_table(summaries: Sequence[dict[str, Any]]) -> str:
    head = ["arm", "seed", *[c for c, _, _ in RATES], "routing mass (rollouts / grad)", "final reward", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rows in group(summaries).values():
        for r in rows:
            cells = [_cell(r["eval"]["modes"][mode][key]) for _, mode, key in RATES]
            lines.append(
                f"| {_title([r])} | {r['seed']} | "
                + " | ".join(cells)
                + f" | {_mass([r])} | {_num(r['final_reward'])} | {_num(r['step_time_median'])} |"
            )
    return "\n".join(lines)


def direction_table(groups: dict[str, list[dict[str, Any]]]) -> str | None:
    """Arms whose rollouts were scored by a direction (not the baseline, not the label monitor)."""
    with_dir = {a: rows for a, rows in groups.items() if rows[0]["base_arm"] not in ("baseline", "labels")}
    if not with_dir:
        return None
    head = ["arm", *[c for c, _ in DIRECTION]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rows in with_dir.values():
        cells = []
        for _, key in DIRECTION:
            per_seed = [r["direction"][key] for r in rows]
            seeds = ", ".join(_num(v) for v in per_seed)
            cells.append(_num(_mean(per_seed)) + (f" ({seeds})" if len(rows) > 1 else ""))
        lines.append(f"| {_title(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(summaries: Sequence[dict[str, Any]], title: str = "Arm comparison", preamble: str = "") -> str:
    groups = group(summaries)
    n = sorted({s["eval"]["n"] for s in summaries})
    parts = [
        f"# {title}",
        preamble,
        "## Deployment evaluation, pooled over seeds",
        pooled_table(groups),
        f"Held-out problems per run: {', '.join(map(str, n))} (loophole on). Rates: pooled over seeds with a "
        "95% Wilson interval, each seed's rate in parentheses. Routing mass: mean share of rollouts whose update "
        "reached the quarantine / share of the gradient norm. Baseline: nothing is routed, so deployed == full. "
        f"Rows marked{DIAGNOSTIC_MARK} read ground-truth labels: upper bounds, not the method.",
    ]
    directions = direction_table(groups)
    if directions:
        parts += [
            "## Routing score against strict hack",
            directions,
            "Means over training (train: every batch's rollouts; held-out: the periodic held-out samples, "
            "scored with the run's current adapter and direction; route threshold: the gate's). Each seed in "
            "parentheses.",
        ]
    parts += ["## Every run", run_table(summaries)]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, title: str = "Arm comparison", preamble: str = ""
) -> tuple[str, list[Path]]:
    """Write `report.md`, `report.json`, `curves.png` and `tradeoff.png` to `out_dir`; returns (markdown, pngs)."""
    from routed_grpo.lab.plots import plot_curves, plot_tradeoff

    summaries = [summarise_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    text = render(summaries, title, preamble)
    pngs = [
        p
        for p in (plot_curves(summaries, out_dir / "curves.png"), plot_tradeoff(summaries, out_dir / "tradeoff.png"))
        if p is not None
    ]
    data = [{k: v for k, v in s.items() if k != "curves"} for s in summaries]
    atomic_write_text(out_dir / "report.json", json.dumps(data, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", text)
    return text, pngs
