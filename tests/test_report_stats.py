"""Seed-level statistics (routed_grpo.lab.stats) on hand-computed examples.

Expected values are worked out by hand in the comments (sign patterns enumerated, t quantiles from a table), not
produced by the code under test."""

import math

import pytest

from routed_grpo.lab.stats import eval_se, paired, sign_flip_p, smallest_p, t_interval

T_975 = {2: 4.302652729911275, 3: 3.182446305284263, 4: 2.7764451051977987}  # Student t table, 97.5% quantile


def test_sign_flip_p_on_hand_enumerated_examples():
    # |d| = 1, 2, 3, 4, 6 (x 0.05), signs + + - + +: observed sum 10 of a total 16. Flipping a subset of sum x
    # gives 16 - 2x; |16 - 2x| >= 10 when x <= 3 ({}, {1}, {2}, {3}, {1,2}) or x >= 13 (their 5 complements).
    assert sign_flip_p([0.05, 0.10, -0.15, 0.20, 0.30]) == pytest.approx(10 / 32)
    # |d| = 0.1 .. 0.5, one negative: sum 1.1 of 1.5; x <= 0.2 ({}, {.1}, {.2}) or x >= 1.3 (3 complements): 6/32.
    assert sign_flip_p([0.1, -0.2, 0.3, 0.4, 0.5]) == pytest.approx(6 / 32)
    # |d| = 3, 1, 1, 2; sum 5 of 7: x <= 1 ({}, {1a}, {1b}) or x >= 6 (3 complements): 6/16.
    assert sign_flip_p([3.0, -1.0, 2.0, 1.0]) == pytest.approx(6 / 16)
    # every difference of one sign: only the observed pattern and its mirror image are as extreme: 2 / 2^n.
    assert sign_flip_p([0.3, 0.1, 0.2]) == pytest.approx(2 / 8)
    assert sign_flip_p([-0.01, -0.2, -0.3, -0.04, -0.5]) == pytest.approx(2 / 32)
    assert sign_flip_p([1.0, -1.0]) == pytest.approx(1.0)  # observed mean 0: every pattern is as extreme
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_p([0.4]) == 1.0  # one seed: +0.4 and -0.4 are equally far from 0
    assert sign_flip_p([]) is None


def test_smallest_attainable_p():
    assert smallest_p(3) == 0.25 and smallest_p(5) == 0.0625 and smallest_p(1) == 1.0 and smallest_p(0) is None


def test_t_interval_on_hand_computed_examples():
    # 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); half-width t(2) / sqrt(3) = 2.48414.
    ci = t_interval([1.0, 2.0, 3.0])
    half = T_975[2] / math.sqrt(3)
    assert (ci["n"], ci["mean"], ci["sd"]) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert (ci["lo"], ci["hi"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    # 0.1 .. 0.5: mean 0.3, sd sqrt(0.025), se sqrt(0.025 / 5) = 0.0707107; half-width 2.776445 x 0.0707107.
    ci = t_interval([0.1, 0.2, 0.3, 0.4, 0.5])
    half = T_975[4] * math.sqrt(0.025 / 5)
    assert (ci["lo"], ci["hi"]) == (pytest.approx(0.3 - half), pytest.approx(0.3 + half))
    assert ci["lo"] == pytest.approx(0.103676, abs=1e-6)
    flat = t_interval([0.4, 0.4, 0.4])  # no spread: the interval is the point (up to float rounding)
    assert (flat["lo"], flat["hi"], flat["sd"]) == (
        pytest.approx(0.4),
        pytest.approx(0.4),
        pytest.approx(0, abs=1e-12),
    )
    assert t_interval([0.5, 0.5]) == {"n": 2, "mean": 0.5, "sd": 0.0, "lo": 0.5, "hi": 0.5}
    one = t_interval([0.7])
    assert one["mean"] == 0.7 and one["lo"] is None and one["hi"] is None


def test_paired_uses_the_seeds_both_arms_have():
    a = {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.2}
    b = {0: 0.4, 1: 0.4, 2: 0.4, 4: 0.9}
    out = paired(a, b)
    assert out["seeds"] == [0, 1, 2] and out["n"] == 3
    assert out["diffs"] == pytest.approx([0.1, 0.2, 0.3])
    half = T_975[2] * 0.1 / math.sqrt(3)  # diffs .1 .2 .3: sd 0.1
    assert (out["mean"], out["lo"], out["hi"]) == (
        pytest.approx(0.2),
        pytest.approx(0.2 - half),
        pytest.approx(0.2 + half),
    )
    assert out["p"] == pytest.approx(0.25) and out["p_min"] == 0.25


def test_eval_se_clusters_problems_or_falls_back_to_binomial():
    # per-problem rates 1, 0, .5, .5: mean .5, sample variance (.25 + .25) / 3, se = sd / 2.
    assert eval_se(0.5, 8, [1.0, 0.0, 0.5, 0.5]) == pytest.approx(math.sqrt(0.5 / 3) / 2)
    assert eval_se(0.25, 100) == pytest.approx(math.sqrt(0.25 * 0.75 / 100))
    assert eval_se(0.25, 0) is None
