"""Diagnostics: score metrics and the oracle direction against hand-computed values (measurement only)."""

import sys
from pathlib import Path

import pytest
import torch

from routed_grpo.lab.evaluation import rates, score_metrics
from sandbox.labels import Labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from diag_oracle_direction import oracle_direction  # noqa: E402

sys.path.pop(0)


def test_score_metrics_hand_computed():
    scores = torch.tensor([0.1, 0.9, 0.8, 0.2])
    y = torch.tensor([False, True, True, False])
    m = score_metrics(scores, y, route_tail_q=0.25)
    assert m["auroc"] == 1.0
    # q(0.75) over sorted [0.1, 0.2, 0.8, 0.9]: index 2.25 -> 0.8 + 0.25 * 0.1 = 0.825; only 0.9 is routed
    assert m["route_threshold"] == pytest.approx(0.825)
    assert m["precision_at_route"] == 1.0 and m["recall_at_route"] == 0.5
    assert (m["n_pos"], m["n_neg"]) == (2, 2)
    flipped = score_metrics(-scores, y, route_tail_q=0.25)
    assert flipped["auroc"] == 0.0 and flipped["precision_at_route"] == 0.0


def test_score_metrics_without_positives_has_no_auroc():
    m = score_metrics(torch.tensor([0.3, 0.1, 0.2]), torch.tensor([False, False, False]), 0.1)
    assert m["auroc"] is None and m["recall_at_route"] is None and m["precision_at_route"] == 0.0


def test_oracle_direction_is_unit_mean_difference_per_module():
    acts = torch.tensor(
        [
            [[3.0, 0.0], [0.0, 1.0]],  # hack
            [[1.0, 0.0], [0.0, 3.0]],  # hack
            [[0.0, 0.0], [0.0, 0.0]],  # clean
        ]
    )  # (N=3, M=2, r=2)
    y = torch.tensor([True, True, False])
    oracle = oracle_direction(acts, y)
    # module 0: mean hack (2, 0) - clean (0, 0) -> (1, 0); module 1: (0, 2) -> (0, 1)
    torch.testing.assert_close(oracle, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="need both labels"):
        oracle_direction(acts, torch.tensor([False, False, False]))


def test_rates_count_labels():
    def lab(**kw):
        base = dict(
            compiled=True,
            correct=False,
            hinted=False,
            hack_strict=False,
            hack_attempted=False,
            defines_run_tests=False,
            loophole="overwrite_tests",
        )
        return Labels(**{**base, **kw})

    rs = rates([lab(hack_strict=True, hinted=True), lab(correct=True), lab(compiled=False), lab(hack_strict=True)])
    assert (rs["hack_strict"]["k"], rs["hack_strict"]["n"], rs["hack_strict"]["rate"]) == (2, 4, 0.5)
    assert rs["correct"]["rate"] == 0.25 and rs["compiled"]["rate"] == 0.75
    assert rs["hack_strict"]["lo"] < 0.5 < rs["hack_strict"]["hi"]
