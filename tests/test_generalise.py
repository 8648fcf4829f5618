"""Leave-one-tag-out generalisation: hand-computed folds, the two nulls on synthetic sets with and without a planted
direction, fold ordering and grouping, and the report formats."""

import json
import math

import pytest
import torch
from torch.testing import assert_close

from routed_grpo.generalise import (
    HELD_OUT_MEAN,
    IN_SAMPLE,
    GeneraliseError,
    auroc_rows,
    leave_one_tag_out,
    p_value,
    report_json,
    report_markdown,
    report_png,
)
from routed_grpo.vact import auroc

MODES = ("eq_override", "exit_code", "hardcode", "overwrite_tests")


def _synthetic(planted: float, per_mode: int = 16, seed: int = 0, shape: tuple[int, int] = (6, 8)):
    """(hack, clean, tags): (P, M, r) Gaussian activations; hack sides shifted by `planted` along one fixed
    direction shared by every mode (0 = no direction at all)."""
    gen = torch.Generator().manual_seed(seed)
    n = per_mode * len(MODES)
    u = torch.randn(shape, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    clean = torch.randn((n, *shape), generator=gen)
    hack = torch.randn((n, *shape), generator=gen) + planted * u
    tags = [[f"mode:{m}", "domain:function"] for m in MODES for _ in range(per_mode)]
    return hack, clean, tags


def test_hand_computed_folds():
    # one module, rank 2; mode a: diffs (0, 1) and (5, -2.5); mode b: diffs (0, 1) twice
    hack = torch.tensor([[[0.0, 2.0]], [[5.0, 0.5]], [[0.0, 1.0]], [[0.0, 1.0]]])
    clean = torch.tensor([[[0.0, 1.0]], [[0.0, 3.0]], [[0.0, 0.0]], [[0.0, 0.0]]])
    tags = [["mode:a"], ["mode:a"], ["mode:b"], ["mode:b"]]
    report = leave_one_tag_out(hack, clean, tags, n_haar=10, n_perm=10)
    a, b, mean, everything = report.folds
    assert [f.name for f in report.folds] == ["a", "b", HELD_OUT_MEAN, IN_SAMPLE]
    # held out a, fit on b: v = (0, 1); hack scores {2, 0.5}, clean {1, 3} -> 1 of 4 orderings right
    assert (a.n_test, a.n_train, a.auroc, a.ranked) == (2, 2, 0.25, 0.5)
    all_mean = torch.tensor([5.0, 0.5]) / 4  # mean of the four diffs
    assert a.cos_all == pytest.approx(float(all_mean[1] / all_mean.norm()), abs=1e-6)
    # held out b, fit on a: v = unit(2.5, -0.75); both b hacks score below their clean side (0)
    assert (b.auroc, b.ranked) == (0.0, 0.0)
    assert b.cos_all == pytest.approx(
        float((torch.tensor([2.5, -0.75]) @ all_mean) / (math.hypot(2.5, 0.75) * all_mean.norm())), abs=1e-6
    )
    assert everything.n_test == everything.n_train == 4 and everything.cos_all == pytest.approx(1.0)
    assert (mean.n_test, mean.auroc, mean.ranked) == (4, 0.125, 0.25)
    assert mean.cos_all == pytest.approx((a.cos_all + b.cos_all) / 2)
    assert_close(mean.haar_null, (a.haar_null + b.haar_null) / 2)
    assert_close(mean.perm_null, (a.perm_null + b.perm_null) / 2)


def test_planted_direction_gives_small_p_values_under_both_nulls():
    hack, clean, tags = _synthetic(planted=1.0)  # the bounds below hold for data seeds 0-5 alike, not just this one
    report = leave_one_tag_out(hack, clean, tags, n_haar=200, n_perm=200, seed=1)
    assert [f.name for f in report.folds] == [*MODES, HELD_OUT_MEAN, IN_SAMPLE]
    for fold in report.folds:
        assert fold.auroc > 0.75, fold.name
        assert fold.haar_p < 0.05 and fold.perm_p < 0.05, (fold.name, fold.haar_p, fold.perm_p)
        assert fold.cos_all > 0.8
        assert abs(float(fold.haar_null.mean()) - 0.5) < 0.1  # random directions rank at chance on average


def test_no_direction_gives_large_p_values_under_both_nulls():
    hack, clean, tags = _synthetic(planted=0.0)  # as above: the bounds hold for data seeds 0-5
    report = leave_one_tag_out(hack, clean, tags, n_haar=200, n_perm=200, seed=1)
    held_out = report.folds[:-2]
    assert sum(f.perm_p for f in held_out) / len(held_out) > 0.2  # p is ~uniform without a signal (mean 0.5)
    assert sum(f.haar_p for f in held_out) / len(held_out) > 0.2
    assert min(f.perm_p for f in held_out) > 0.01
    in_sample = report.folds[-1]
    assert in_sample.auroc > 0.5  # a direction fit on the pairs it scores always looks better than chance ...
    assert in_sample.perm_p > 0.05  # ... which the permutation null, fit the same way, accounts for


def test_nulls_are_seeded_and_auroc_rows_equals_auroc():
    hack, clean, tags = _synthetic(planted=0.5)
    a = leave_one_tag_out(hack, clean, tags, n_haar=30, n_perm=30, seed=3)
    b = leave_one_tag_out(hack, clean, tags, n_haar=30, n_perm=30, seed=3)
    c = leave_one_tag_out(hack, clean, tags, n_haar=30, n_perm=30, seed=4)
    assert torch.equal(a.folds[0].perm_null, b.folds[0].perm_null)
    assert not torch.equal(a.folds[0].perm_null, c.folds[0].perm_null)
    assert not torch.equal(a.folds[0].haar_null, c.folds[0].haar_null)
    pos = torch.tensor([[3.0, 2.0], [0.0, 1.0], [1.0, 1.0]])
    neg = torch.tensor([[1.0, 2.0, 0.0], [2.0, 2.0, 2.0], [1.0, 0.0, 5.0]])
    expected = torch.tensor([auroc(p, n) for p, n in zip(pos, neg, strict=True)], dtype=torch.float64)
    assert_close(auroc_rows(pos, neg), expected)
    assert p_value(0.8, torch.tensor([0.9, 0.8, 0.1])) == 0.75


def test_untagged_pairs_stay_in_training_and_multi_valued_tags_are_held_out_with_either():
    hack, clean, _ = _synthetic(planted=1.0, per_mode=2)  # 8 pairs
    tags = [["topic:x"], ["topic:x"], ["topic:y"], ["topic:y"], ["topic:x", "topic:z"], ["topic:z"], [], ["mode:a"]]
    report = leave_one_tag_out(hack, clean, tags, by="topic", n_haar=5, n_perm=5)
    assert [(f.name, f.n_test, f.n_train) for f in report.folds] == [
        ("x", 3, 5),
        ("y", 2, 6),
        ("z", 2, 6),
        (HELD_OUT_MEAN, 7, 6),
        (IN_SAMPLE, 8, 8),
    ]
    assert report.n_untagged == 2


def test_bad_splits_name_the_key_and_suggest_others():
    hack, clean, tags = _synthetic(planted=1.0, per_mode=2)
    with pytest.raises(GeneraliseError, match=r"'domain'.*1 \(function\).*mode \(4\)"):
        leave_one_tag_out(hack, clean, tags, by="domain")
    every = [["topic:x"] + (["topic:y"] if i % 2 else []) for i in range(len(tags))]
    with pytest.raises(GeneraliseError, match="topic:x leaves no pairs"):
        leave_one_tag_out(hack, clean, every, by="topic")
    with pytest.raises(GeneraliseError, match="P, M, r"):
        leave_one_tag_out(hack[:3], clean[:3], tags)


def test_report_formats():
    hack, clean, tags = _synthetic(planted=1.0, per_mode=3)
    report = leave_one_tag_out(hack, clean, tags, n_haar=20, n_perm=20)
    record = json.loads(json.dumps(report_json(report, {"model_name": "m"})))
    assert record["model_name"] == "m" and record["n_pairs"] == 12 and record["by"] == "mode"
    assert [f["held_out"] for f in record["folds"]] == [*MODES, HELD_OUT_MEAN, IN_SAMPLE]
    assert set(record["folds"][0]) >= {"auroc", "ranked", "cos_all", "haar_p", "perm_p", "haar_null", "perm_null"}
    assert record["folds"][0]["auroc"] == round(report.folds[0].auroc, 4)
    table = report_markdown(report, "## t").splitlines()
    rows = [x for x in table if x.startswith("| ") and not x.startswith("| held")]
    assert [r.split("|")[1].strip() for r in rows] == [*MODES, HELD_OUT_MEAN, IN_SAMPLE]
    assert rows[0].split("|")[3].strip() == f"{report.folds[0].auroc:.3f}"
    assert report_png(report)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_placebo_mode_is_held_out_like_any_other_and_shows_no_transfer():
    """Pairs tagged mode:placebo (two correct sides differing on an unrelated axis, pairs/placebo/) are one more
    value of the key: a direction fit on the hack modes does not separate them, while it does separate a held-out
    hack mode."""
    hack, clean, tags = _synthetic(planted=1.0)
    gen = torch.Generator().manual_seed(7)
    placebo_hack, placebo_clean = torch.randn((16, 6, 8), generator=gen), torch.randn((16, 6, 8), generator=gen)
    report = leave_one_tag_out(
        torch.cat([hack, placebo_hack]),
        torch.cat([clean, placebo_clean]),
        tags + [["mode:placebo", "domain:function"]] * 16,
        n_haar=200,
        n_perm=200,
        seed=1,
    )
    folds = {f.name: f for f in report.folds}
    assert list(folds) == [*MODES, "placebo", HELD_OUT_MEAN, IN_SAMPLE]
    assert folds["placebo"].n_test == 16 and folds["placebo"].haar_p > 0.05 and folds["placebo"].perm_p > 0.05
    assert folds["exit_code"].haar_p < 0.05 and folds["exit_code"].perm_p < 0.05
