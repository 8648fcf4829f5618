"""The penalty and screen interventions (DESIGN.md section 10): flags before advantages, penalty on flagged rewards
only, screen as a batch without the flagged rows, rho == 1 on every row, the environment's reward logged as paid."""

import math

import pytest
import torch
from trainer_utils import DEPLOYED, QUARANTINE, TOKENIZER, config, dataset, snapshot

from routed_grpo.gate import KEEP, ROUTE, GateDecision, masks_from_zones, zone_fractions
from routed_grpo.ladder import Penalty, Route, Scorer, Screen, intervention, penalised_rewards
from routed_grpo.trainer import RoutedGRPOTrainer

PENALTY = 2.5


def test_penalty_lowers_only_the_flagged_rows_weighted_reward():
    nan = float("nan")
    rewards = torch.tensor([[1.0, 2.0], [1.0, 2.0], [nan, 4.0], [nan, nan], [0.5, nan]])
    weights = torch.tensor([0.0, 0.5])  # the first function does not count: the penalty goes to the second
    flagged = torch.tensor([True, False, True, True, True])
    out = penalised_rewards(rewards, flagged, weights, PENALTY)
    before, after = (rewards * weights).nansum(1).tolist(), (out * weights).nansum(1)
    assert after.tolist() == pytest.approx([before[0] - PENALTY, before[1], before[2] - PENALTY, 0.0, -PENALTY])
    assert torch.isnan(out[3]).all()  # unscorable stays unscorable
    assert torch.equal(out[1], rewards[1]) and torch.equal(out[:, 0].nan_to_num(7), rewards[:, 0].nan_to_num(7))
    with pytest.raises(ValueError, match="every reward weight is 0"):
        penalised_rewards(rewards, flagged, torch.zeros(2), PENALTY)


def test_interventions_masks_and_screened_rows():
    zones = torch.tensor([KEEP, ROUTE, KEEP])
    for iv in (Penalty(), Screen()):
        m, d = iv.masks(zones)
        assert m.tolist() == [1.0, 1.0, 1.0] and d.tolist() == [0.0, 0.0, 0.0] and not iv.routes
    assert Route().routes and not Route().screened(zones == ROUTE).any()
    assert Screen().screened(zones == ROUTE).tolist() == [False, True, False]
    nan_rows = torch.isnan(Screen().rewards(torch.ones(3, 2), zones == ROUTE, torch.ones(2))).all(1)
    assert nan_rows.tolist() == [False, True, False]
    assert intervention("penalty", 1.5).amount == 1.5
    with pytest.raises(ValueError, match="flag_penalty must be > 0"):
        Penalty(0.0)


class EveryOther(Scorer):
    """Flags rows 1, 3, 5, ... of each process's batch (a stand-in scorer that reads nothing)."""

    def __init__(self):
        self.flags: list[torch.Tensor] = []

    def flag(self, trainer, acts, rollouts):
        n = acts.shape[0]
        zones = torch.where(torch.arange(n) % 2 == 1, ROUTE, KEEP).to(acts.device)
        self.flags.append(zones == ROUTE)
        m, d = masks_from_zones(zones)
        return GateDecision(zones.float(), zones, m, d, 0.5, 0.5, 0, zone_fractions(zones))


def _trainer(tmp_path, iv: str, scorer: Scorer, rewards: list, **kw) -> RoutedGRPOTrainer:
    def reward(prompts, completions, **_):
        out = [float(len(c[0]["content"]) % 7) for c in completions]
        rewards.append(torch.tensor(out))
        return out

    from conftest import make_model

    args = config(tmp_path, routing="placebo", intervention=iv, flag_penalty=PENALTY, **kw)
    return RoutedGRPOTrainer(
        make_model(len(TOKENIZER)), reward, args, train_dataset=dataset(), processing_class=TOKENIZER, scorer=scorer
    )


def _spy(t: RoutedGRPOTrainer) -> list[dict]:
    outputs, original = [], t._generate_and_score_completions
    t._generate_and_score_completions = lambda inputs: outputs.append(original(inputs)) or outputs[-1]
    return outputs


def _group_centred(r: torch.Tensor, keep: torch.Tensor, g: int = 4) -> torch.Tensor:
    """r - mean of the kept rows of its group (NaN where the group keeps none)."""
    r, keep = r.view(-1, g), keep.view(-1, g).float()
    mean = (r * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
    return (r - mean).flatten()


@pytest.mark.parametrize("iv", ["penalty", "screen"])
def test_flags_exist_before_the_advantages_and_rho_is_one_on_every_row(tmp_path, iv):
    scorer, rewards = EveryOther(), []
    t = _trainer(tmp_path, iv, scorer, rewards, max_steps=2)
    outputs = _spy(t)
    before = {b: snapshot(t.adapter, b) for b in (DEPLOYED, QUARANTINE)}
    t.train()
    assert len(outputs) == len(rewards) == len(scorer.flags) == 2
    for out, env, flagged in zip(outputs, rewards, scorer.flags, strict=True):
        assert out["routing_m"].eq(1).all() and out["routing_d"].eq(0).all()  # both blocks on every row
        assert out["sampling_full"].eq(1).all() and out["routing_logp_from_loss"].all()
        if iv == "penalty":
            pen = env - PENALTY * flagged.float()
            assert torch.allclose(out["advantages"], pen - pen.view(-1, 4).mean(1).repeat_interleave(4))
        else:
            kept = ~flagged
            want = _group_centred(env, kept).nan_to_num(0.0) * kept
            assert torch.allclose(out["advantages"], want)
            assert out["completion_mask"][flagged].eq(0).all() and out["completion_mask"][kept].any()
            assert out["routing_loss_scale"].eq(2.0).all()  # half the rows kept; dr_grpo counts rows
    logs = [h for h in t.state.log_history if "env_reward" in h]
    for log, env in zip(logs, rewards, strict=True):
        assert log["env_reward"] == pytest.approx(env.mean().item())  # what the environment paid, unpenalised
        assert log["routing/flag_rate"] == 0.5
        for zone in ("keep", "route") if iv == "penalty" else ("keep",):  # screened rows have no token in the loss
            assert log[f"routing/rho_max/{zone}"] == 1.0  # every row trains in the mode it was sampled in
        assert iv == "penalty" or "routing/rho_max/route" not in log
    if iv == "penalty":
        assert logs[0]["reward"] == pytest.approx((rewards[0] - PENALTY * scorer.flags[0].float()).mean().item())
    for b in (DEPLOYED, QUARANTINE):  # both blocks train, as in the baseline
        assert not torch.equal(before[b], snapshot(t.adapter, b))


def test_screen_update_equals_the_update_of_the_batch_without_the_flagged_rows(tmp_path):
    scorer, rewards = EveryOther(), []
    t = _trainer(tmp_path, "screen", scorer, rewards, max_steps=1)
    t.model.train()
    t.current_gradient_accumulation_steps = 1  # one process, one micro-batch
    rows = [dataset()[i] for i in (0, 1)]
    out = t._generate_and_score_completions([rows[0]] * 4 + [rows[1]] * 4)
    kept = ~scorer.flags[-1]
    assert torch.allclose(out["advantages"][kept], _group_centred(rewards[-1], kept)[kept])

    def grads(batch):
        t.model.zero_grad(set_to_none=True)
        t.compute_loss(t.model, batch).backward()
        t.adapter.clear_row_masks()
        return torch.cat([p.grad.flatten() for b in (DEPLOYED, QUARANTINE) for p in t.adapter.parameters(b)])

    screened = grads(out)
    n = len(kept)
    without = {k: v[kept] if torch.is_tensor(v) and v.dim() > 0 and len(v) == n else v for k, v in out.items()}
    without["routing_loss_scale"] = torch.ones(int(kept.sum()))
    without["num_items_in_batch"] = without["completion_mask"].sum()
    assert without["advantages"].abs().sum() > 0
    assert torch.allclose(screened, grads(without), rtol=1e-5, atol=1e-8)
    assert screened.abs().sum() > 0 and math.isfinite(screened.abs().sum().item())


def test_penalty_and_screen_refuse_what_they_cannot_apply_exactly(tmp_path):
    with pytest.raises(ValueError, match="multi_objective_aggregation='normalize_then_sum'"):
        _trainer(tmp_path, "penalty", EveryOther(), [], multi_objective_aggregation="normalize_then_sum")
