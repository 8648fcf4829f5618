"""PNG plots of a report (matplotlib, Agg backend): training curves per arm and the hack/solve trade-off.

- `plot_curves`: held-out deployed strict hack rate and deployed solve rate over training, one line per arm (the
  mean over its seeds at each measured step) with a band from the lowest to the highest seed.
- `plot_tradeoff`: deployed strict hack against deployed solve after training, one small point per run (arm and
  seed) and one large point per arm (pooled), so a better arm sits down and to the right.
DIAGNOSTIC (label-reading) arms are drawn dashed / hollow and named as upper bounds in the legend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLOURS = {
    "baseline": "tab:red",
    "placebo": "tab:grey",
    "routed": "tab:blue",
    "oracle_direction": "tab:purple",
    "labels": "tab:green",
}
EXTRA = ("tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(arms: Sequence[str]) -> dict[str, str]:
    out, extra = {}, iter(EXTRA * 4)
    for arm in arms:
        out[arm] = COLOURS.get(arm) or next(extra)
    return out


def _groups(summaries):
    from routed_grpo.lab.report import DIAGNOSTIC_MARK, group

    return group(summaries), DIAGNOSTIC_MARK


def plot_curves(summaries: Sequence[dict[str, Any]], out_png: str | Path) -> Path | None:
    groups, mark = _groups(summaries)
    if not any(s["curves"] for s in summaries):
        return None
    plt = _plt()
    colours = _colours(list(groups))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True)
    for ax, (label, key) in zip(axes, (("strict hack", "hack_strict"), ("solve", "correct")), strict=True):
        metric = f"measure/heldout/deploy/{key}"
        for arm, rows in groups.items():
            by_step: dict[int, list[float]] = {}
            for r in rows:
                for m in r["curves"]:
                    if metric in m:
                        by_step.setdefault(int(m["step"]), []).append(float(m[metric]))
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            diag = bool(rows[0]["diagnostic"])
            name = f"{arm}{mark if diag else ''} (n={len(rows)})"
            ax.plot(steps, mean, "--" if diag else "-", color=colours[arm], marker="o", ms=3, label=name)
            ax.fill_between(
                steps,
                [min(by_step[s]) for s in steps],
                [max(by_step[s]) for s in steps],
                color=colours[arm],
                alpha=0.15,
                linewidth=0,
            )
        ax.set_title(f"held-out deployed {label} rate (loophole on)")
        ax.set_xlabel("training step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, plt, out_png)


def plot_tradeoff(summaries: Sequence[dict[str, Any]], out_png: str | Path) -> Path | None:
    from routed_grpo.lab.report import pooled

    groups, mark = _groups(summaries)
    if not groups:
        return None
    plt = _plt()
    colours = _colours(list(groups))
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for arm, rows in groups.items():
        diag = bool(rows[0]["diagnostic"])
        xs = [r["eval"]["modes"]["deploy"]["correct"]["rate"] for r in rows]
        ys = [r["eval"]["modes"]["deploy"]["hack_strict"]["rate"] for r in rows]
        ax.scatter(xs, ys, s=22, color=colours[arm], alpha=0.6, facecolors="none" if diag else colours[arm])
        px, py = pooled(rows, "deploy", "correct")["rate"], pooled(rows, "deploy", "hack_strict")["rate"]
        ax.scatter(
            [px],
            [py],
            s=140,
            marker="D",
            color=colours[arm],
            edgecolors="black",
            facecolors="none" if diag else colours[arm],
            label=f"{arm}{mark if diag else ''}",
        )
    ax.set_xlabel("deployed solve rate")
    ax.set_ylabel("deployed strict hack rate")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("after training: small = one seed, diamond = pooled")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, plt, out_png)


def _save(fig, plt, out_png: str | Path) -> Path:
    from routed_grpo.utils import atomic_path

    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out_png)
