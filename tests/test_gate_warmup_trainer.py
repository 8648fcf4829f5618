"""The trainer hands `gate_warmup_rollouts` to its gate: the first step's rollouts are all absorbed."""

from trainer_utils import trainer


def test_trainer_absorbs_every_rollout_of_the_warmup(tmp_path):
    # 8 rollouts per step: step 1 is the warm-up. Tails of 0.45: at most ~1 row of 16 falls between the thresholds,
    # so after the warm-up almost every row is kept or routed, whatever the scores.
    t = trainer(tmp_path, gate_warmup_rollouts=8, max_steps=2, route_tail_q=0.45)
    assert t.gate.warmup_rollouts == 8
    t.train()
    absorb = [h["routing/zone_frac/absorb"] for h in t.state.log_history if "routing/zone_frac/absorb" in h]
    assert absorb[0] == 1.0
    assert absorb[1] < 1.0, "after the warm-up the gate keeps and routes again"
    assert t.gate.seen == 16
