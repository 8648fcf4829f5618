"""Seed-level statistics of a study (DESIGN.md section 11): the training seed is the unit of replication.

Pure functions on per-seed values, no I/O:
- `t_interval`: the mean over seeds with a two-sided Student t interval over seeds (scipy.stats.t); at 5 seeds or
  fewer a bootstrap undercovers, so the t interval is the figure.
- `sign_flip_p`: the two-sided exact sign-flip permutation p-value of a mean paired difference, over all 2^n sign
  patterns of n per-seed differences (scipy.stats.permutation_test with one sample, `n_resamples=inf`).
- `smallest_p`: the smallest p-value n seeds can reach, 2 / 2^n (0.25 at 3 seeds, 0.0625 at 5).
- `paired`: per-seed differences of two arms at the seeds both have, with all of the above.
- `eval_se`: the evaluation's own standard error of one run's rate, with the held-out problems as clusters (the
  samples of one problem are not independent draws), or binomial when per-problem counts are absent.
Does not cover: reading runs or writing reports (routed_grpo.lab.report).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

LEVEL = 0.95


def t_interval(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """{"n", "mean", "sd", "lo", "hi"}: mean over `values` with its two-sided t interval. With one value the
    interval is undefined (lo = hi = None); with zero spread it is the point itself."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None}
    sd = float(x.std(ddof=1))
    if sd == 0.0:
        return {"n": n, "mean": mean, "sd": 0.0, "lo": mean, "hi": mean}
    lo, hi = stats.t.interval(level, df=n - 1, loc=mean, scale=sd / math.sqrt(n))
    return {"n": n, "mean": mean, "sd": sd, "lo": float(lo), "hi": float(hi)}


def sign_flip_p(diffs: Sequence[float]) -> float | None:
    """Two-sided exact sign-flip permutation p-value of mean(diffs) against 0: the share of the 2^n sign patterns
    whose mean is at least as far from 0 as the observed one (the null distribution is symmetric, so this equals
    scipy's 2 x one-sided). None without differences."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return None
    if len(d) == 1 or not np.any(d):
        return 1.0  # one difference: both sign patterns are as far from 0 as the observed one
    res = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=np.inf, alternative="two-sided", vectorized=True
    )
    return float(min(1.0, res.pvalue))


def smallest_p(n: int) -> float | None:
    """The smallest two-sided sign-flip p-value n paired seeds can reach: 2 / 2^n (1 at one seed)."""
    return min(1.0, 2.0 / 2**n) if n > 0 else None


def paired(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> dict[str, Any]:
    """Per-seed differences a - b at the seeds both have: {"seeds", "diffs", "n", "mean", "lo", "hi", "p",
    "p_min"} (t interval of the mean difference, exact sign-flip p-value, its smallest attainable value)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    ci = t_interval(diffs, level)
    return {
        "seeds": seeds,
        "diffs": diffs,
        "n": len(seeds),
        "mean": ci["mean"],
        "lo": ci["lo"],
        "hi": ci["hi"],
        "p": sign_flip_p(diffs),
        "p_min": smallest_p(len(seeds)),
    }


def eval_se(rate: float, n_samples: int, per_problem: Sequence[float] | None = None) -> float | None:
    """Standard error of one run's evaluation rate. With `per_problem` (each held-out problem's rate over its
    samples): the cluster standard error sd(per_problem) / sqrt(n_problems); otherwise binomial over samples."""
    if per_problem is not None and len(per_problem) > 1:
        x = np.asarray(per_problem, dtype=float)
        return float(x.std(ddof=1) / math.sqrt(len(x)))
    if n_samples <= 0 or rate is None or math.isnan(rate):
        return None
    return math.sqrt(rate * (1.0 - rate) / n_samples)
