"""The bounded ratio on mismatched rows (`mismatch_ratio_cap`): it bounds exactly those rows and no others."""

import math

import pytest
import torch
from trainer_utils import perturb_quarantine, trainer

from routed_grpo.gate import ABSORB, KEEP, ROUTE
from routed_grpo.loss import cap_mismatched_ratio, mismatched_rows


def test_mismatched_rows_are_those_whose_training_mode_differs_from_sampling():
    zones = torch.tensor([KEEP, ABSORB, ROUTE, KEEP, ABSORB, ROUTE])
    full = torch.tensor([True, True, True, False, False, False])
    # keep trains in deploy mode, absorb/route in full mode
    assert mismatched_rows(zones, full).tolist() == [True, False, False, False, True, True]


def test_cap_truncates_the_ratio_on_the_given_rows_only():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5]])
    old = torch.tensor([[-4.0, -2.1, 0.0], [-4.0, -2.1, 0.0]])  # rho = e^3, e^0.1, e^-0.5 on both rows
    rows = torch.tensor([True, False])
    new, capped = cap_mismatched_ratio(logps, old, rows, cap=2.0)
    rho = torch.exp(logps - new)
    torch.testing.assert_close(rho[0], torch.tensor([2.0, math.exp(0.1), math.exp(-0.5)]))
    assert torch.equal(new[1], old[1]), "rows outside the mask stay bit-identical"
    assert capped.tolist() == [[True, False, False], [False, False, False]]
    assert torch.equal(new[0, 1:], old[0, 1:]), "tokens under the cap keep their behaviour log-prob"
    with pytest.raises(ValueError, match="> 1"):
        cap_mismatched_ratio(logps, old, rows, cap=1.0)


def test_capped_ratio_keeps_the_gradient_direction():
    logps = torch.tensor([[-1.0]], requires_grad=True)
    new, _ = cap_mismatched_ratio(logps, torch.tensor([[-5.0]]), torch.tensor([True]), cap=3.0)
    torch.exp(logps - new).sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[3.0]]))  # d/dlogp of cap * exp(logp - sg(logp))


def _spy_trl_loss(t):
    """What TRL's `_compute_loss` read: the behaviour log-probs before and after it ran, and the batch rows."""
    records, original = [], t._compute_loss

    def spy(model, inputs):
        before = inputs["old_per_token_logps"].clone()
        loss = original(model, inputs)
        used = inputs["old_per_token_logps"].clone()
        keys = ("routing_m", "routing_zone", "sampling_full", "completion_mask")
        records.append({"before": before, "used": used, "logps": t._loss_logps.clone()} | {k: inputs[k] for k in keys})
        return loss

    t._compute_loss = spy
    return records


def test_trainer_caps_mismatched_rows_and_leaves_matched_rows_bit_identical(tmp_path):
    # Two optimizer steps per generation batch: the second micro-batch sees an updated policy, so matched rows
    # have rho != 1 there too and a cap that leaked onto them would change them.
    cap = 1.0005
    t = trainer(
        tmp_path,
        gen_deploy_frac=0.5,
        route_tail_q=0.3,
        max_steps=2,
        per_device_train_batch_size=16,
        steps_per_generation=2,
        mismatch_ratio_cap=cap,
    )
    perturb_quarantine(t.adapter, scale=1.0)  # deploy and full policies differ, so mismatched rows have rho != 1
    records = _spy_trl_loss(t)
    t.train()
    assert len(records) == 2
    for i, r in enumerate(records):
        rows = mismatched_rows(r["routing_m"], r["sampling_full"])
        assert rows.any() and (~rows).any(), "the batch must hold matched and mismatched rows"
        # matched rows are untouched by the cap: before the update their behaviour log-probs are the loss
        # forward's own (rho == 1), after it TRL's old log-probs
        untouched = r["logps"] if i == 0 else r["before"]
        assert torch.equal(r["used"][~rows], untouched[~rows]), "matched rows are untouched"
        mask = r["completion_mask"].bool() & rows.unsqueeze(1)
        assert torch.exp(r["logps"] - r["before"])[mask].max() > cap, "the test needs a ratio above the cap"
        assert torch.exp(r["logps"] - r["used"])[mask].max() <= cap * (1 + 1e-6)
    second = records[1]
    matched = ~mismatched_rows(second["routing_m"], second["sampling_full"])
    matched_tokens = second["completion_mask"].bool() & matched.unsqueeze(1)
    assert torch.exp(second["logps"] - second["before"])[matched_tokens].max() > cap, "matched rows exceed the cap"
    assert "routing/rho_capped_frac" in t.state.log_history[0]
    # the logged ratios are the uncapped ones: the blow-up the cap bounds stays visible (first step: before any
    # update, matched rows have rho == 1, so a logged maximum above the cap comes from a mismatched row)
    first = t.state.log_history[0]
    assert max(v for k, v in first.items() if k.startswith("routing/rho_max/")) > cap
