"""Leave-one-tag-out generalisation of `v_act`, from pooled pair activations, against two nulls.

For each value of a tag key (`mode` by default: `mode:eq_override` -> `eq_override`), the pairs carrying it are
held out, a direction is fit on the other pairs exactly as `v_act` is (I5: per module the unit mean of
hack - clean) and the held-out pairs are scored with `gate.score`. Per held-out value (a fold):

- `auroc`: P(score of a held-out hack side > score of a held-out clean side) over all hack x clean combinations,
  ties counting one half (`vact.auroc`);
- `ranked`: share of held-out pairs whose hack side scores above its own clean side;
- `cos_all`: cosine of the fold's direction with the all-pairs direction (the mean over modules of the per-module
  cosines, which is also the cosine of the two flattened directions, each row being a unit vector);
- two nulls for the held-out AUROC, each with the p-value `(1 + #{null >= observed}) / (N + 1)`:
  `haar`, N directions with every module's row uniform on its unit sphere (`vact.haar_placebo`'s law, one seeded
  draw shared by all folds), and `perm`, N re-fits after swapping hack and clean in a random subset of the
  training pairs (each pair independently with probability 1/2, seeded per fold).

After the held-out folds come two summary rows. `mean of held-out`: the mean of the folds' AUROCs and cosines, the
share ranked over all held-out pairs, and as its nulls the mean over folds of each null draw (the Haar directions
are shared by the folds, the permutation draws are independent across folds, so each averaged draw is a draw of
the mean under the null); it stays informative when every fold is small (one pair per topic). And
`all (in-sample)`, which fits and scores all pairs, with the same nulls; there a permuted fit is scored with
its own (swapped) labels, so the permutation null is fit and scored exactly as the observed direction is, while the
Haar p-value of that row is optimistic (a fit on the pairs it scores beats random directions even without a
signal). Pairs without a tag for the key are never held out (they stay in every training set). A pair with two
values of the key is held out with either. Note that with a strong, consistent signal a re-fit on randomly swapped
labels keeps a random-signed share of it, so the permutation null has mass near AUROC 0 and 1 and its p-value is
bounded below by that mass: it is the conservative one of the two nulls.

Covered: the computation (`leave_one_tag_out`), the JSON record, the Markdown table and a PNG (matplotlib, Agg
canvas, no pyplot state) of each fold's observed AUROC against its null histograms. Not covered: producing the
activations (routed_grpo/activations.py) and the command line (routed_grpo/cli/generalise_cmd.py).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from routed_grpo.gate import score
from routed_grpo.vact import auroc, unit_mean_difference

IN_SAMPLE = "all (in-sample)"
HELD_OUT_MEAN = "mean of held-out"
_BLOCK = 64  # null directions compared at once (bounds the (N, n, n) comparison tensor)


class GeneraliseError(ValueError):
    """The pairs cannot be split by the requested tag key."""


@dataclass
class Fold:
    """One held-out tag value. haar_null, perm_null: (N,) held-out AUROCs of the null directions."""

    name: str
    n_test: int
    n_train: int
    auroc: float
    ranked: float
    cos_all: float
    haar_null: Tensor
    perm_null: Tensor
    haar_p: float = field(init=False)
    perm_p: float = field(init=False)

    def __post_init__(self) -> None:
        self.haar_p, self.perm_p = p_value(self.auroc, self.haar_null), p_value(self.auroc, self.perm_null)


@dataclass
class GeneraliseReport:
    by: str
    folds: list[Fold]  # one per held-out value, sorted by name, then the held-out mean and the in-sample fold
    n_pairs: int
    n_untagged: int
    n_haar: int
    n_perm: int
    seed: int


def p_value(observed: float, null: Tensor) -> float:
    """One-sided permutation p-value `(1 + #{null >= observed}) / (N + 1)`; 1.0 for an empty null."""
    return float((1 + int((null >= observed - 1e-12).sum())) / (null.numel() + 1))


def tag_groups(tags: Sequence[Sequence[str]], by: str) -> dict[str, Tensor]:
    """`{value: (P,) bool membership}` for every `by:value` tag, sorted by value."""
    values = sorted({t.split(":", 1)[1] for ts in tags for t in ts if t.startswith(f"{by}:")})
    return {v: torch.tensor([f"{by}:{v}" in ts for ts in tags], dtype=torch.bool) for v in values}


def tag_keys(tags: Sequence[Sequence[str]]) -> dict[str, int]:
    """Number of distinct values of each `key:value` tag key."""
    keys: dict[str, set[str]] = {}
    for ts in tags:
        for t in ts:
            if ":" in t:
                key, value = t.split(":", 1)
                keys.setdefault(key, set()).add(value)
    return {k: len(v) for k, v in sorted(keys.items())}


def _unit_rows(x: Tensor) -> Tensor:
    """(..., M, r) with every row scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def auroc_rows(pos: Tensor, neg: Tensor) -> Tensor:
    """Row-wise `vact.auroc`: pos (N, n), neg (N, m) -> (N,) float64."""
    out = []
    for s in range(0, pos.shape[0], _BLOCK):
        p, q = pos[s : s + _BLOCK, :, None].double(), neg[s : s + _BLOCK, None, :].double()  # (b, n, 1), (b, 1, m)
        out.append(((p > q).double() + 0.5 * (p == q).double()).mean(dim=(1, 2)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _null_aurocs(directions: Tensor, hack: Tensor, clean: Tensor, flip: Tensor | None = None) -> Tensor:
    """Held-out AUROC under each direction: directions (N, M, r), hack/clean (n, M, r) -> (N,). `flip` (N, n) swaps
    the two sides of a pair for that direction (an in-sample permutation is scored with its own labels)."""
    s_hack = torch.einsum("nmr,pmr->np", directions.double(), hack.double())  # (N, n)
    s_clean = torch.einsum("nmr,pmr->np", directions.double(), clean.double())
    if flip is not None:
        s_hack, s_clean = torch.where(flip, s_clean, s_hack), torch.where(flip, s_hack, s_clean)
    return auroc_rows(s_hack, s_clean)


def _fold(
    name: str,
    hack: Tensor,
    clean: Tensor,
    train: Tensor,
    test: Tensor,
    v_all: Tensor,
    haar: Tensor,
    n_perm: int,
    seed: int,
) -> Fold:
    """train, test: (P,) bool. Fits on train, scores test, and draws the permutation null for this fold."""
    v = unit_mean_difference(hack[train], clean[train])  # (M, r)
    s_hack, s_clean = score(hack[test], v), score(clean[test], v)  # (n,)
    cos = float((v.double() * v_all.double()).sum(-1).mean())
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:perm:{name}".encode()))
    swap = torch.randint(0, 2, (n_perm, hack.shape[0]), generator=gen).bool() & train  # (N, P): hack <-> clean
    signs = 1.0 - 2.0 * swap[:, train].double()  # (N, n_train)
    diffs = (hack[train] - clean[train]).double()  # (n_train, M, r)
    perm = _unit_rows(torch.einsum("np,pmr->nmr", signs, diffs) / diffs.shape[0])  # (N, M, r)
    return Fold(
        name=name,
        n_test=int(test.sum()),
        n_train=int(train.sum()),
        auroc=auroc(s_hack, s_clean),
        ranked=float((s_hack > s_clean).double().mean()),
        cos_all=cos,
        haar_null=_null_aurocs(haar, hack[test], clean[test]).float(),
        perm_null=_null_aurocs(perm, hack[test], clean[test], swap[:, test]).float(),
    )


def _mean_fold(folds: list[Fold]) -> Fold:
    """The `mean of held-out` summary row (see the module docstring); n_train is the folds' mean training size."""
    n = sum(f.n_test for f in folds)
    return Fold(
        name=HELD_OUT_MEAN,
        n_test=n,
        n_train=round(sum(f.n_train for f in folds) / len(folds)),
        auroc=sum(f.auroc for f in folds) / len(folds),
        ranked=sum(f.ranked * f.n_test for f in folds) / n,
        cos_all=sum(f.cos_all for f in folds) / len(folds),
        haar_null=torch.stack([f.haar_null for f in folds]).mean(0),
        perm_null=torch.stack([f.perm_null for f in folds]).mean(0),
    )


def leave_one_tag_out(
    hack: Tensor,
    clean: Tensor,
    tags: Sequence[Sequence[str]],
    by: str = "mode",
    n_haar: int = 1000,
    n_perm: int = 1000,
    seed: int = 0,
) -> GeneraliseReport:
    """hack, clean: (P, M, r) pooled activations; tags: the P pairs' tag lists. See the module docstring."""
    if hack.shape != clean.shape or hack.dim() != 3 or hack.shape[0] != len(tags):
        raise GeneraliseError(
            f"need hack and clean (P, M, r) for {len(tags)} pairs; got {tuple(hack.shape)} and {tuple(clean.shape)}"
        )
    if n_haar < 1 or n_perm < 1:
        raise GeneraliseError(f"n_haar and n_perm must be >= 1; got {n_haar} and {n_perm}")
    groups = tag_groups(tags, by)
    if len(groups) < 2:
        others = {k: n for k, n in tag_keys(tags).items() if n >= 2 and k != by}
        hint = (
            f"; keys with 2 or more values here: {', '.join(f'{k} ({n})' for k, n in others.items())}"
            if others
            else "; no tag key here has 2 or more values"
        )
        raise GeneraliseError(
            f"leave-one-out by {by!r} needs at least 2 values of the tag {by}:<value>; the "
            f"{len(tags)} pairs have {len(groups)} ({', '.join(groups) or 'none'}){hint}"
        )
    v_all = unit_mean_difference(hack, clean)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:haar".encode()))
    haar = _unit_rows(torch.randn((n_haar, *hack.shape[1:]), generator=gen, dtype=torch.float64))  # (N, M, r)
    folds = []
    for name, test in groups.items():
        train = ~test
        if not bool(train.any()):
            raise GeneraliseError(f"holding out {by}:{name} leaves no pairs to fit a direction on")
        folds.append(_fold(name, hack, clean, train, test, v_all, haar, n_perm, seed))
    folds.append(_mean_fold(folds))
    everything = torch.ones(len(tags), dtype=torch.bool)
    folds.append(_fold(IN_SAMPLE, hack, clean, everything, everything, v_all, haar, n_perm, seed))
    untagged = int((~torch.stack(list(groups.values())).any(0)).sum())
    return GeneraliseReport(by, folds, len(tags), untagged, n_haar, n_perm, seed)


# ---- output ------------------------------------------------------------------------------------------------------
def _summary(null: Tensor) -> dict[str, float]:
    q = torch.quantile(null.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {
        "mean": round(float(null.double().mean()), 4),
        "q05": round(q[0], 4),
        "median": round(q[1], 4),
        "q95": round(q[2], 4),
        "max": round(float(null.max()), 4),
    }


def report_json(report: GeneraliseReport, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plain JSON data: settings, then per fold the figures, the p-values and a summary of each null."""
    folds = [
        {
            "held_out": f.name,
            "n_test": f.n_test,
            "n_train": f.n_train,
            "auroc": round(f.auroc, 4),
            "ranked": round(f.ranked, 4),
            "cos_all": round(f.cos_all, 4),
            "haar_p": round(f.haar_p, 4),
            "perm_p": round(f.perm_p, 4),
            "haar_null": _summary(f.haar_null),
            "perm_null": _summary(f.perm_null),
        }
        for f in report.folds
    ]
    return {
        "by": report.by,
        "n_pairs": report.n_pairs,
        "n_untagged": report.n_untagged,
        "n_haar": report.n_haar,
        "n_perm": report.n_perm,
        "seed": report.seed,
        **(extra or {}),
        "folds": folds,
    }


def report_markdown(report: GeneraliseReport, title: str = "") -> str:
    """A Markdown table, one row per fold (held-out values first, then the held-out mean and in-sample rows)."""
    head = (
        f"| held out ({report.by}) | n | AUROC | ranked | cos(all) | Haar null mean [q95] | p Haar "
        "| perm null mean [q95] | p perm |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in report.folds:
        h, p = _summary(f.haar_null), _summary(f.perm_null)
        lines.append(
            f"| {f.name} | {f.n_test} | {f.auroc:.3f} | {f.ranked:.2f} | {f.cos_all:.3f} | "
            f"{h['mean']:.3f} [{h['q95']:.3f}] | {f.haar_p:.3f} | {p['mean']:.3f} [{p['q95']:.3f}] | "
            f"{f.perm_p:.3f} |"
        )
    notes = (
        f"\n{report.n_pairs} pairs; AUROC of held-out hack vs clean scores under the direction fit on the "
        f"other pairs; ranked = share of held-out pairs with hack > clean; p = (1 + #null >= AUROC) / (N + 1) "
        f"with N = {report.n_haar} Haar-random directions and N = {report.n_perm} label permutations "
        f"(seed {report.seed})."
    )
    if report.n_untagged:
        notes += f" {report.n_untagged} pairs have no {report.by}: tag and are never held out."
    return (f"{title}\n\n" if title else "") + "\n".join(lines) + "\n" + notes + "\n"


def report_png(report: GeneraliseReport, title: str = "") -> bytes:
    """PNG bytes: per fold, histograms of both null AUROC distributions and the observed AUROC as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(report.folds)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, f in zip(axes, report.folds, strict=False):
        grid = f.n_test**2 if f.name != HELD_OUT_MEAN else 0  # a fold's AUROC is a multiple of 1 / n_test^2
        bins = torch.linspace(-0.5 / grid, 1 + 0.5 / grid, grid + 2) if 0 < grid <= 60 else torch.linspace(0, 1, 41)
        ax.hist(f.haar_null.tolist(), bins=bins.tolist(), alpha=0.5, label="Haar null", color="tab:gray")
        ax.hist(f.perm_null.tolist(), bins=bins.tolist(), alpha=0.5, label="permutation null", color="tab:blue")
        ax.axvline(f.auroc, color="tab:red", lw=2, label="observed AUROC")
        ax.set_title(f"{f.name} (n={f.n_test})\np Haar {f.haar_p:.3f}, p perm {f.perm_p:.3f}", fontsize=8)
        ax.set_xlim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6)
    fig.suptitle(title or f"leave-one-{report.by}-out AUROC against its nulls", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
