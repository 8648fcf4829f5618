"""Comparison of finished runs across arms and seeds: a markdown table with intervals and training-curve plots.

Covers: reading each run directory (`config.yaml`, `eval.json`, `metrics.jsonl`), one table row per run and one
pooled row per arm when an arm has several seeds (counts summed, Wilson interval of the pooled proportion),
routing mass (mean share of rollouts that reached the quarantine, `routing/qmass`, and of the gradient norm,
`routing/qmass_grad`), the final training reward (mean of the last five logged steps), and PNG plots (matplotlib,
Agg backend) of the measured held-out strict hack rate and solve rate over training per arm (deployed solid, full
dashed). Does not cover: producing the numbers (routed_grpo.lab.evaluation, routed_grpo.lab.experiment).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routed_grpo.lab.evaluation import EVAL_FILE, rate, read_run_config
from routed_grpo.utils import atomic_write_text

ARM_ORDER = ("baseline", "placebo", "routed")
ARM_COLOURS = {"baseline": "tab:red", "placebo": "tab:grey", "routed": "tab:blue"}


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
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
    return sum(values) / len(values) if values else None


def summarise_run(run_dir: str | Path) -> dict[str, Any]:
    """The numbers of one run that the comparison needs."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    eval_path = run_dir / EVAL_FILE
    if not eval_path.is_file():
        raise FileNotFoundError(f"{eval_path}: missing; run `routed-grpo experiment eval {run_dir}` first")
    metrics = read_metrics(run_dir)
    rewards = [m["reward"] for m in metrics if "reward" in m]
    return {
        "run_dir": str(run_dir),
        "arm": config["arm"],
        "seed": config["training"]["seed"],
        "eval": json.loads(eval_path.read_text()),
        "qmass": _mean([m["routing/qmass"] for m in metrics if "routing/qmass" in m]),
        "qmass_grad": _mean([m["routing/qmass_grad"] for m in metrics if "routing/qmass_grad" in m]),
        "final_reward": _mean(rewards[-5:]),
        "curves": [m for m in metrics if any(k.startswith("measure/heldout/") for k in m)],
    }


def _cell(r: dict[str, float]) -> str:
    return f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _pooled(rows: Sequence[dict[str, Any]], mode: str, key: str) -> dict[str, float]:
    k = sum(r["eval"]["modes"][mode][key]["k"] for r in rows)
    n = sum(r["eval"]["modes"][mode][key]["n"] for r in rows)
    return rate(k, n)


COLUMNS = (
    ("deployed hack", "deploy", "hack_strict"),
    ("full hack", "full", "hack_strict"),
    ("deployed solve", "deploy", "correct"),
    ("full solve", "full", "correct"),
    ("deployed attempted", "deploy", "hack_attempted"),
    ("deployed defines run_tests", "deploy", "defines_run_tests"),
)


def comparison_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Markdown: a row per run, then a pooled row per arm with several seeds; 95% Wilson intervals."""
    head = (
        ["arm", "seed"] + [c[0] for c in COLUMNS] + ["routing mass (rollouts)", "routing mass (grad)", "final reward"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(summaries, key=lambda s: (_arm_rank(s["arm"]), str(s["seed"])))
    for s in order:
        cells = [_cell(s["eval"]["modes"][mode][key]) for _, mode, key in COLUMNS]
        qmass = "n/a (not routed)" if s["arm"] == "baseline" else _num(s["qmass"])
        qgrad = "n/a (not routed)" if s["arm"] == "baseline" else _num(s["qmass_grad"])
        lines.append(
            f"| {s['arm']} | {s['seed']} | " + " | ".join(cells) + f" | {qmass} | {qgrad} | "
            f"{_num(s['final_reward'])} |"
        )
    for arm in sorted({s["arm"] for s in summaries}, key=_arm_rank):
        rows = [s for s in summaries if s["arm"] == arm]
        if len(rows) < 2:
            continue
        cells = [_cell(_pooled(rows, mode, key)) for _, mode, key in COLUMNS]
        qm = [s["qmass"] for s in rows if s["qmass"] is not None]
        qg = [s["qmass_grad"] for s in rows if s["qmass_grad"] is not None]
        fr = [s["final_reward"] for s in rows if s["final_reward"] is not None]
        lines.append(
            f"| **{arm} (pooled)** | {len(rows)} seeds | "
            + " | ".join(cells)
            + f" | {_num(_mean(qm))} | {_num(_mean(qg))} | {_num(_mean(fr))} |"
        )
    n = sorted({s["eval"]["n"] for s in summaries})
    note = (
        f"\nHeld-out problems per run: {', '.join(map(str, n))} (loophole on); rates with 95% Wilson intervals. "
        "Baseline: nothing is routed, so deployed == full."
    )
    return "\n".join(lines) + "\n" + note


def _arm_rank(arm: str) -> int:
    return ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)


def plot_curves(summaries: Sequence[dict[str, Any]], out_png: str | Path) -> Path | None:
    """Held-out strict hack rate and solve rate over training, a line per run (deployed solid, full dashed)."""
    if not any(s["curves"] for s in summaries):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, (label, key) in zip(axes, (("strict hack rate", "hack_strict"), ("solve rate", "correct")), strict=True):
        for s in sorted(summaries, key=lambda s: _arm_rank(s["arm"])):
            colour = ARM_COLOURS.get(s["arm"], "tab:green")
            for mode, style in (("deploy", "-"), ("full", "--")):
                pts = [
                    (m["step"], m[f"measure/heldout/{mode}/{key}"])
                    for m in s["curves"]
                    if f"measure/heldout/{mode}/{key}" in m
                ]
                baseline = s["arm"] == "baseline"
                if not pts or (baseline and mode == "full"):
                    continue  # the baseline's deployed model is its full model: one solid line
                xs, ys = zip(*pts, strict=True)
                name = f"{s['arm']} s{s['seed']} " + ("deploy = full" if baseline else mode)
                ax.plot(xs, ys, style, color=colour, marker="o", ms=3, label=name)
        ax.set_title(f"held-out {label} (loophole on)")
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> tuple[str, Path | None]:
    """Write `comparison.md` and `training_curves.png` to `out_dir`; return the table and the plot path."""
    summaries = [summarise_run(d) for d in run_dirs]
    table = comparison_table(summaries)
    out_dir = Path(out_dir)
    png = plot_curves(summaries, out_dir / "training_curves.png")
    atomic_write_text(out_dir / "comparison.md", "# Arm comparison\n\n" + table + "\n")
    return table, png
