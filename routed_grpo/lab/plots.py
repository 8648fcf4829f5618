"""PNG plots of a report (matplotlib, Agg backend): training curves per arm and the hack/solve trade-off.

- `plot_curves`: held-out deployed strict hack rate and deployed solve rate over training, one line per arm (the
  mean over its seeds at each measured step) with a band from the lowest to the highest seed.
- `plot_tradeoff`: deployed strict hack against deployed solve after training, one small point per run (arm and
  seed) and one large point per arm (the mean over seeds) with 95% t-interval error bars over seeds on both axes,
  so a better arm sits down and to the right.
Every arm has its own colour from a colour-blind-safe palette (Okabe-Ito, then matplotlib's
`tableau-colorblind10`), in report order. DIAGNOSTIC (label-reading) arms keep their colour but are drawn with
dashed lines and hollow markers and are named as upper bounds in the legend. Axes are fitted to the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")
TABLEAU_CB10 = (
    "#006BA4",
    "#FF800E",
    "#ABABAB",
    "#595959",
    "#5F9ED1",
    "#C85200",
    "#898989",
    "#A2C8EC",
    "#FFBC79",
    "#CFCFCF",
)
PALETTE = OKABE_ITO + TABLEAU_CB10


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colours(arms: Sequence[str]) -> dict[str, str]:
    """One distinct colour per arm, in order (the palette repeats only past 18 arms)."""
    return {arm: PALETTE[i % len(PALETTE)] for i, arm in enumerate(arms)}


def _groups(summaries):
    from routed_grpo.lab.report import DIAGNOSTIC_MARK, group

    return group(summaries), DIAGNOSTIC_MARK


def limits(lo: float, hi: float, pad: float = 0.05) -> tuple[float, float]:
    """Axis limits around [lo, hi] with a margin, inside [-0.02, 1.02] (rates), at least 0.1 wide."""
    span = max(hi - lo, 0.1)
    return max(-0.02, lo - pad * span - 0.01), min(1.02, hi + pad * span + 0.01)


def _curve(rows, metric: str) -> dict[int, list[float]]:
    by_step: dict[int, list[float]] = {}
    for r in rows:
        for m in r["curves"]:
            if metric in m:
                by_step.setdefault(int(m["step"]), []).append(float(m[metric]))
    return by_step


def plot_curves(summaries: Sequence[dict[str, Any]], out_png: str | Path) -> Path | None:
    groups, mark = _groups(summaries)
    if not any(s["curves"] for s in summaries):
        return None
    plt = _plt()
    colour = colours(list(groups))
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.6), sharex=True)
    for ax, (label, key) in zip(axes, (("strict hack", "hack_strict"), ("solve", "correct")), strict=True):
        seen: list[float] = []
        for arm, rows in groups.items():
            by_step = _curve(rows, f"measure/heldout/deploy/{key}")
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            low, high = [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps]
            seen += low + high
            diag = bool(rows[0]["diagnostic"])
            ax.plot(
                steps,
                mean,
                "--" if diag else "-",
                color=colour[arm],
                marker="o",
                ms=4,
                markerfacecolor="white" if diag else colour[arm],
                label=f"{arm}{mark if diag else ''} (n={len(rows)})",
            )
            ax.fill_between(steps, low, high, color=colour[arm], alpha=0.12, linewidth=0)
        ax.set_title(f"held-out deployed {label} rate (loophole on)")
        ax.set_xlabel("training step")
        if seen:
            ax.set_ylim(*limits(min(seen), max(seen)))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # beside the plots: over them it hides the curves
    axes[1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle("line: mean over seeds; band: lowest to highest seed", fontsize=9)
    return _save(fig, plt, out_png)


def plot_tradeoff(summaries: Sequence[dict[str, Any]], out_png: str | Path) -> Path | None:
    from routed_grpo.lab.report import value
    from routed_grpo.lab.stats import t_interval

    groups, mark = _groups(summaries)
    if not groups:
        return None
    plt = _plt()
    colour = colours(list(groups))
    fig, ax = plt.subplots(figsize=(10, 5.5))
    xs_all: list[float] = []
    ys_all: list[float] = []
    for arm, rows in groups.items():
        diag = bool(rows[0]["diagnostic"])
        face = "white" if diag else colour[arm]
        xs = [value(r, "deploy", "correct") for r in rows]
        ys = [value(r, "deploy", "hack_strict") for r in rows]
        ax.scatter(xs, ys, s=24, color=colour[arm], alpha=0.55, facecolors=face, linewidths=1.2)
        cx, cy = t_interval(xs), t_interval(ys)
        err = [[c["mean"] - c["lo"], c["hi"] - c["mean"]] if c["lo"] is not None else [0.0, 0.0] for c in (cx, cy)]
        bars = ax.errorbar(
            [cx["mean"]],
            [cy["mean"]],
            xerr=[[err[0][0]], [err[0][1]]],
            yerr=[[err[1][0]], [err[1][1]]],
            fmt="D",
            ms=10,
            color=colour[arm],
            markerfacecolor=face,
            markeredgecolor=colour[arm],
            markeredgewidth=1.6,
            elinewidth=1.4,
            capsize=4,
            label=f"{arm}{mark if diag else ''}",
        )
        if diag:
            for line in bars[2]:
                line.set_linestyle("--")
        xs_all += xs + [cx["mean"] - err[0][0], cx["mean"] + err[0][1]]
        ys_all += ys + [cy["mean"] - err[1][0], cy["mean"] + err[1][1]]
    ax.set_xlim(*limits(min(xs_all), max(xs_all)))
    ax.set_ylim(*limits(min(ys_all), max(ys_all)))
    ax.set_xlabel("deployed solve rate")
    ax.set_ylabel("deployed strict hack rate")
    ax.set_title("after training: small = one seed; diamond = mean over seeds, 95% t interval over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, plt, out_png)


def _save(fig, plt, out_png: str | Path) -> Path:
    from routed_grpo.utils import atomic_path

    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out_png)
