"""Gate maths against hand-computed tensors: scores, buffer-wide quantiles, zones, masks, ring buffer (I6)."""

import pytest
import torch
from torch.testing import assert_close

from routed_grpo.gate import (
    ABSORB,
    KEEP,
    ROUTE,
    ActivationBuffer,
    Gate,
    gather_with_offset,
    masks_from_zones,
    quantile_thresholds,
    score,
    zone_fractions,
    zones_from_scores,
)


def rows(*values: float, n_modules: int = 2, rank: int = 2) -> torch.Tensor:
    """Activations whose (module 0, unit 0) entry is `value`: scored against `E0` they score `value`."""
    acts = torch.zeros(len(values), n_modules, rank)
    acts[:, 0, 0] = torch.tensor(values)
    acts[:, 1, 1] = 7.0  # orthogonal to E0, so it must not leak into the score
    return acts


E0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])


def test_score_is_sum_over_modules_of_dot_products():
    acts = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.5], [0.0, 2.0]]])  # (2, 2, 2)
    vact = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    # row 0: (0.6 + 1.6) + 3.0 = 5.2;  row 1: (-0.6 + 0.4) + 0.0 = -0.2
    assert_close(score(acts, vact), torch.tensor([5.2, -0.2]))


def test_score_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="vact"):
        score(torch.zeros(3, 2, 4), torch.zeros(2, 3))


def test_quantile_thresholds_hand_values():
    assert quantile_thresholds(torch.arange(11.0), 0.1) == pytest.approx((1.0, 9.0))
    assert quantile_thresholds(torch.tensor([10.0, 0.0]), 0.25) == pytest.approx((2.5, 7.5))


@pytest.mark.parametrize("q", [0.0, 0.5, -0.1, 0.7])
def test_quantile_thresholds_rejects_bad_tail(q):
    with pytest.raises(ValueError, match="route_tail_q"):
        quantile_thresholds(torch.arange(5.0), q)


def test_zones_boundaries_are_inclusive():
    zones = zones_from_scores(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]), lo=-1.0, hi=1.0)
    assert zones.tolist() == [KEEP, KEEP, ABSORB, ROUTE, ROUTE]


def test_masks_table():
    m, d = masks_from_zones(torch.tensor([KEEP, ABSORB, ROUTE, KEEP]))
    assert_close(m, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert_close(d, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="zone ids"):
        masks_from_zones(torch.tensor([3]))


def test_zone_fractions():
    assert zone_fractions(torch.tensor([0, 1, 1, 2])) == {"keep": 0.25, "absorb": 0.5, "route": 0.25}


def test_buffer_wraps_around_and_keeps_newest():
    buf = ActivationBuffer(capacity=3, n_modules=2, rank=2)
    buf.append(rows(1.0, 2.0))
    assert len(buf) == 2
    buf.append(rows(3.0, 4.0))
    assert len(buf) == 3
    assert buf.acts()[:, 0, 0].tolist() == [2.0, 3.0, 4.0]
    buf.append(rows(5.0))
    assert buf.acts()[:, 0, 0].tolist() == [3.0, 4.0, 5.0]
    buf.append(rows(6.0, 7.0, 8.0, 9.0, 10.0))  # more rows than capacity
    assert buf.acts()[:, 0, 0].tolist() == [8.0, 9.0, 10.0]
    assert_close(buf.acts()[:, 1, 1], torch.full((3,), 7.0))


def test_buffer_rejects_wrong_row_shape():
    with pytest.raises(ValueError, match="rows of shape"):
        ActivationBuffer(capacity=4, n_modules=2, rank=2).append(torch.zeros(1, 2, 3))


def test_buffer_state_round_trip_continues_identically():
    a = ActivationBuffer(capacity=4, n_modules=2, rank=2)
    a.append(rows(1.0, 2.0, 3.0))
    a.append(rows(4.0, 5.0))  # wrapped
    b = ActivationBuffer(capacity=4, n_modules=2, rank=2)
    b.load_state_dict(a.state_dict())
    assert_close(b.acts(), a.acts())
    a.append(rows(6.0))
    b.append(rows(6.0))
    assert b.acts()[:, 0, 0].tolist() == [3.0, 4.0, 5.0, 6.0]
    assert_close(b.acts(), a.acts())
    smaller = ActivationBuffer(capacity=2, n_modules=2, rank=2)  # a resumed run with another capacity
    smaller.load_state_dict(a.state_dict())
    assert smaller.acts()[:, 0, 0].tolist() == [5.0, 6.0]
    with pytest.raises(ValueError, match="n_modules, rank"):
        ActivationBuffer(capacity=4, n_modules=2, rank=3).load_state_dict(a.state_dict())


def test_thresholds_come_from_the_buffer_not_the_batch():
    gate = Gate(E0, route_tail_q=0.1, capacity=64)
    gate.step(rows(*range(10)))  # scores 0..9
    decision = gate.step(rows(100.0, 101.0))
    # buffer scores 0..9, 100, 101 (12 values): q(0.1) at position 1.1 -> 1.1; q(0.9) at 9.9 -> 9 + 0.9 * 91 = 90.9.
    # Batch-only thresholds would be (100.1, 100.9) and put the 100.0 row in keep.
    assert (decision.lo, decision.hi) == pytest.approx((1.1, 90.9))
    assert decision.zones.tolist() == [ROUTE, ROUTE]
    assert_close(decision.scores, torch.tensor([100.0, 101.0]))
    assert_close(decision.m, torch.ones(2))
    assert_close(decision.d, torch.ones(2))
    assert decision.buffer_size == 12
    assert decision.zone_frac == {"keep": 0.0, "absorb": 0.0, "route": 1.0}


def test_set_vact_rescores_stored_activations_without_flush():
    acts = torch.zeros(10, 1, 2)
    acts[:, 0, 0] = torch.arange(10.0)  # scores under e0: 0..9
    acts[:, 0, 1] = 10.0 * torch.arange(10.0)  # scores under e1: 0, 10, ..., 90
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    gate = Gate(e0, route_tail_q=0.1, capacity=64)
    first = gate.step(acts)
    assert (first.lo, first.hi) == pytest.approx((0.9, 8.1))
    gate.set_vact(e1)
    decision = gate.step(torch.tensor([[[0.0, 50.0]]]))
    # re-scored buffer under e1: 0,10,20,30,40,50,50,60,70,80,90 -> q(0.1) = 10, q(0.9) = 80.
    # (stored old scores would give (1, 9); a flushed buffer would give (50, 50).)
    assert (decision.lo, decision.hi) == pytest.approx((10.0, 80.0))
    assert decision.zones.tolist() == [ABSORB]
    assert decision.buffer_size == 11
    with pytest.raises(ValueError, match="shape"):
        gate.set_vact(torch.zeros(2, 2))


def test_gate_state_round_trip():
    gen = torch.Generator().manual_seed(0)
    a = Gate(E0, route_tail_q=0.2, capacity=16)
    for _ in range(3):
        a.step(torch.randn(7, 2, 2, generator=gen))
    b = Gate(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), route_tail_q=0.2, capacity=16)
    b.load_state_dict(a.state_dict())
    batch = torch.randn(5, 2, 2, generator=gen)
    da, db = a.step(batch), b.step(batch)
    assert (da.lo, da.hi) == (db.lo, db.hi)
    assert_close(da.scores, db.scores)
    assert torch.equal(da.zones, db.zones)


def test_single_process_gather_is_identity():
    acts = torch.randn(3, 2, 2)
    out, offset = gather_with_offset(acts)
    assert offset == 0
    assert torch.equal(out, acts)


def test_warmup_absorbs_every_row_until_its_count_while_the_buffer_fills():
    gate = Gate(E0, route_tail_q=0.25, capacity=64, warmup_rollouts=10)
    first = gate.step(rows(0.0, 1.0, 2.0, 3.0))  # without the warm-up: 25/50/25 (KEEP, ABSORB, ABSORB, ROUTE)
    assert first.zones.tolist() == [ABSORB] * 4 and first.warmup_rows == 4
    assert_close(first.m, torch.ones(4))
    assert_close(first.d, torch.zeros(4))
    assert gate.step(rows(-5.0, 50.0, -6.0, 60.0)).zones.tolist() == [ABSORB] * 4  # extreme scores: still absorbed
    straddle = gate.step(rows(-7.0, 70.0, -8.0, 80.0))  # rollouts 8, 9 in the warm-up; 10, 11 gated
    # the buffer holds all 12 rows: scores 0..3, -5, 50, -6, 60, -7, 70, -8, 80 -> q(0.25) = -5.25, q(0.75) = 52.5
    assert straddle.buffer_size == 12 and straddle.warmup_rows == 2
    assert (straddle.lo, straddle.hi) == pytest.approx((-5.25, 52.5))
    assert straddle.zones.tolist() == [ABSORB, ABSORB, KEEP, ROUTE]
    after = gate.step(rows(-9.0, 90.0))
    assert after.zones.tolist() == [KEEP, ROUTE] and after.warmup_rows == 0
    assert gate.seen == 14


def test_warmup_clock_survives_a_checkpoint_and_is_validated():
    a = Gate(E0, route_tail_q=0.25, capacity=4, warmup_rollouts=6)
    a.step(rows(0.0, 1.0, 2.0, 3.0))
    a.step(rows(4.0, 5.0, 6.0))  # 7 rollouts seen, more than the capacity: the clock is not the buffer size
    b = Gate(E0, route_tail_q=0.25, capacity=4, warmup_rollouts=8)
    b.load_state_dict(a.state_dict())
    assert b.seen == 7
    assert b.step(rows(10.0, 11.0)).zones.tolist() == [ABSORB, ROUTE]  # rollout 7 absorbed, rollout 8 gated
    with pytest.raises(ValueError, match="warmup_rollouts"):
        Gate(E0, warmup_rollouts=-1)


def test_config_rejects_a_negative_warmup(tmp_path):
    from routed_grpo.config import RoutedGRPOConfig

    with pytest.raises(ValueError, match="gate_warmup_rollouts=-4"):
        RoutedGRPOConfig(
            output_dir=str(tmp_path),
            routing="placebo",
            gate_warmup_rollouts=-4,
            use_cpu=True,
            bf16=False,
            report_to="none",
        )
