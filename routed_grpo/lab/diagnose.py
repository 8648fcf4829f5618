"""`routed-grpo pairs diagnose`: DIAGNOSTIC. Does a direction see hacking in a run's labelled rollouts, per sensor?

READS GROUND-TRUTH LABELS (the `labels` of a finished run's `rollouts.jsonl`), so it lives in the lab, never feeds
a training run, and the method's arms cannot import it (tests/test_oracle_free.py). It measures why a direction
does or does not see hacking (DESIGN.md section 10): the pairs, or the sensor.

For one sensor, given the pairs' pooled hack and clean activations and the rollouts' pooled activations with
their labels, `diagnose` gives per label (strict hack, defines `run_tests`, correct):
- `vact`: the AUROC of `v_act` (fit on all pairs, I5) scoring the rollouts (`gate.score`), positives against
  negatives;
- `loo`: per `mode:` tag of the pairs, the AUROC of the direction fit without that mode's pairs (does one mode
  carry the signal?), for every mode that leaves pairs to fit;
- `oracle_cv`: the cross-validated AUROC of the oracle direction, a per-site unit diff-of-means of positive minus
  negative rollouts, fit on k - 1 folds and scoring the held-out fold (stratified folds, seeded), the scores of
  all folds pooled into one AUROC;
- `null_mean`, `null_q95`: the AUROC of `n_null` Haar-random directions (`vact.haar_placebo`'s law);
- `cos_vact_oracle`: the mean over sites of the cosine between `v_act` and the oracle direction fit on all rows.
`markdown` and `png` render a table and a figure per sensor. Not covered: producing the activations
(routed_grpo.activations) and the command line (routed_grpo/lab/cli/diagnose_cmd.py).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from routed_grpo.gate import score
from routed_grpo.generalise import auroc_rows, tag_groups
from routed_grpo.vact import auroc, unit_mean_difference

LABELS = ("hack_strict", "defines_run_tests", "correct")


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def oracle_direction(acts: Tensor, y: Tensor) -> Tensor:
    """Per site unit(mean acts[y] - mean acts[~y]): (S, w)."""
    return _unit(acts[y].mean(0) - acts[~y].mean(0))


def cv_auroc(acts: Tensor, y: Tensor, folds: int = 5, seed: int = 0) -> float:
    """AUROC of the oracle direction scoring rows it was not fit on: stratified `folds`-fold, scores pooled."""
    gen = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    for cls in (True, False):
        idx = (y == cls).nonzero().flatten()
        fold[idx[torch.randperm(idx.numel(), generator=gen)]] = torch.arange(idx.numel()) % folds
    scores = torch.empty(len(y))
    for k in range(folds):
        test, train = fold == k, fold != k
        if not (y[train].any() and (~y[train]).any()):
            raise ValueError(f"a training fold holds only one class ({int(y.sum())} positives of {len(y)})")
        scores[test] = score(acts[test], oracle_direction(acts[train], y[train]))
    return auroc(scores[y], scores[~y])


def haar_aurocs(acts: Tensor, y: Tensor, n: int, seed: int = 0) -> Tensor:
    """(n,) AUROCs of Haar-random directions (every site's row uniform on its unit sphere)."""
    gen = torch.Generator().manual_seed(seed)
    directions = _unit(torch.randn((n, *acts.shape[1:]), generator=gen, dtype=torch.float64))  # (n, S, w)
    s = torch.einsum("nsw,psw->np", directions, acts.double())  # (n, N)
    return auroc_rows(s[:, y], s[:, ~y])


def diagnose(
    pair_hack: Tensor,
    pair_clean: Tensor,
    pair_tags: Sequence[Sequence[str]],
    acts: Tensor,
    labels: dict[str, Tensor],
    n_null: int = 200,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """`{label: {vact, loo: {mode: auroc}, oracle_cv, null_mean, null_q95, cos_vact_oracle, n, n_positive}}` for
    every label with both classes present (the others are left out). acts: (N, S, w); labels: (N,) bool each."""
    vact = unit_mean_difference(pair_hack, pair_clean)
    groups = tag_groups(pair_tags, "mode").items()  # a mode that every pair carries leaves nothing to fit: skipped
    loo = {m: unit_mean_difference(pair_hack[~g], pair_clean[~g]) for m, g in groups if (~g).any()}
    s = score(acts, vact)  # (N,), shared by every label
    s_loo = {m: score(acts, d) for m, d in loo.items()}
    out: dict[str, dict[str, Any]] = {}
    for key, y in labels.items():
        y = y.bool()
        if not (y.any() and (~y).any()):
            continue
        null = haar_aurocs(acts, y, n_null, seed)
        out[key] = {
            "n": len(y),
            "n_positive": int(y.sum()),
            "vact": auroc(s[y], s[~y]),
            "loo": {m: auroc(sm[y], sm[~y]) for m, sm in s_loo.items()},
            "oracle_cv": cv_auroc(acts, y, folds, seed) if min(int(y.sum()), int((~y).sum())) >= folds else None,
            "null_mean": float(null.mean()),
            "null_q95": float(null.quantile(0.95)),
            "cos_vact_oracle": float((vact * oracle_direction(acts, y)).sum(-1).mean()),
        }
    return out


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(results: dict[str, dict[str, dict[str, Any]]], source: str) -> str:
    """One table per sensor: a row per label."""
    lines = [
        "# `pairs diagnose` (DIAGNOSTIC: reads the rollouts' ground-truth labels)",
        "",
        f"Rollouts: `{source}`. AUROC of each direction scoring the rollouts, positives against negatives. "
        "`oracle (CV)` is fit on labelled rollouts and scores held-out folds; the Haar null is random directions.",
        "",
    ]
    for sensor, rows in results.items():
        modes = sorted({m for r in rows.values() for m in r["loo"]})
        lines += [f"## sensor `{sensor}`", ""]
        head = ["label", "n (pos)", "v_act", "oracle (CV)", "Haar mean", "Haar q95", "cos(v_act, oracle)"]
        head += [f"v_act without {m}" for m in modes]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, r in rows.items():
            cells = [key, f"{r['n']} ({r['n_positive']})", _f(r["vact"]), _f(r["oracle_cv"]), _f(r["null_mean"])]
            cells += [_f(r["null_q95"]), _f(r["cos_vact_oracle"])] + [_f(r["loo"].get(m)) for m in modes]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def png(results: dict[str, dict[str, dict[str, Any]]]) -> bytes:
    """Per sensor and label: v_act's and the oracle's AUROC as bars, the Haar null's q95 as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sensors = list(results)
    fig = Figure(figsize=(3.6 * len(sensors), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sensors), squeeze=False)[0]
    for ax, sensor in zip(axes, sensors, strict=True):
        rows = results[sensor]
        x = torch.arange(len(rows)).float()
        ax.bar((x - 0.2).tolist(), [r["vact"] for r in rows.values()], 0.4, label="v_act", color="#0072B2")
        oracle = [r["oracle_cv"] or 0.0 for r in rows.values()]
        ax.bar((x + 0.2).tolist(), oracle, 0.4, label="oracle (CV)", color="#E69F00", hatch="//", fill=False)
        for i, r in enumerate(rows.values()):
            ax.hlines(r["null_q95"], i - 0.45, i + 0.45, colors="#555555", linestyles="dashed")
        ax.axhline(0.5, color="#999999", lw=0.8)
        ax.set_xticks(x.tolist(), list(rows), fontsize=7)
        ax.set_ylim(0.0, 1.0)
        ax.set_title(f"sensor {sensor}", fontsize=9)
    axes[0].set_ylabel("AUROC (dashed: Haar null q95)")
    axes[0].legend(fontsize=7)
    fig.suptitle("pairs diagnose (DIAGNOSTIC: reads labels)", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
