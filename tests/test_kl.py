"""KL to the base model with routing on (issue 8, item 1): the reference is the base model, both blocks off through
the adapter's own hooks, and the KL term's gradient respects each row's masks."""

import dataclasses

import pytest
import torch
from conftest import make_model
from trainer_utils import DEPLOYED, QUARANTINE, TOKENIZER, trainer

from routed_grpo.adapter import attach_routed_adapter
from routed_grpo.behaviour import BaseModelReference
from routed_grpo.gate import KEEP, ROUTE, masks_from_zones


def _perturb_both(adapter, scale=0.3):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in (DEPLOYED, QUARANTINE):
            for p in adapter.parameters(block):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _batch(t):
    t.model.train()
    return t._prepare_inputs(next(iter(t.get_train_dataloader())))


def _logps(logits, ids, keep):
    """Per-token log-probs of the last `keep` tokens of `ids` under `logits` (temperature 1)."""
    return logits[:, -keep - 1 : -1].float().log_softmax(-1).gather(-1, ids[:, -keep:].unsqueeze(-1)).squeeze(-1)


def test_reference_log_probs_are_the_base_models(tmp_path):
    t = trainer(tmp_path, beta=0.1)
    assert isinstance(t.ref_model, BaseModelReference)
    assert set(t.model.peft_config) == {DEPLOYED, QUARANTINE}, "no PEFT 'ref' adapter"
    _perturb_both(t.adapter)
    inputs = _batch(t)
    assert set(t.model.active_adapters) == {DEPLOYED, QUARANTINE}, "no adapter switching"
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = inputs["completion_ids"].size(1)
    base = make_model(len(TOKENIZER))  # the same seeded base weights, no adapter at all
    with torch.no_grad():
        expected = _logps(base(input_ids=ids, attention_mask=mask).logits, ids, keep)
        policy = _logps(t.model(input_ids=ids, attention_mask=mask).logits, ids, keep)
    tokens = inputs["completion_mask"].bool()
    torch.testing.assert_close(inputs["ref_per_token_logps"][tokens], expected[tokens], rtol=1e-5, atol=1e-5)
    assert (policy[tokens] - expected[tokens]).abs().max() > 1e-3, "the blocks must move the policy off the base"


def test_base_model_only_is_exactly_the_base_even_with_non_finite_blocks(tokenizer):
    adapter = attach_routed_adapter(make_model(len(tokenizer)), rank=4)
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    expected = make_model(len(tokenizer))(input_ids=ids).logits
    with torch.no_grad():
        for block in (DEPLOYED, QUARANTINE):
            next(adapter.parameters(block)).fill_(float("inf"))
    with adapter.base_model_only():
        torch.testing.assert_close(adapter.model(input_ids=ids).logits, expected, rtol=0, atol=0)


def _force_zone(t, zone):
    original = t.gate.step

    def step(acts):
        d = original(acts)
        zones = torch.full_like(d.zones, zone)
        m, dd = masks_from_zones(zones)
        return dataclasses.replace(d, zones=zones, m=m, d=dd)

    t.gate.step = step


def _kl_grads(t, inputs):
    t.current_gradient_accumulation_steps = 1
    t.model.zero_grad(set_to_none=True)
    loss = t.compute_loss(t.model, inputs)
    loss.backward()
    t.adapter.clear_row_masks()

    def flat(block):
        return torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in t.adapter.parameters(block)]
        )

    return flat(DEPLOYED), flat(QUARANTINE)


@pytest.mark.parametrize("zone,silent,trained", [(KEEP, QUARANTINE, DEPLOYED), (ROUTE, DEPLOYED, QUARANTINE)])
def test_kl_gradient_respects_the_masks(tmp_path, zone, silent, trained):
    t = trainer(tmp_path, beta=1.0)
    _perturb_both(t.adapter)  # policy != base, so the KL term has a gradient
    _force_zone(t, zone)
    inputs = _batch(t)
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])  # only the KL term is left in the loss
    grads = dict(zip((DEPLOYED, QUARANTINE), _kl_grads(t, inputs), strict=True))
    assert grads[silent].abs().max() == 0, f"{'keep' if zone == KEEP else 'route'} rows: no KL gradient on {silent}"
    assert grads[trained].abs().max() > 0
    assert t._metrics["train"]["kl"][-1] > 0


def test_the_baseline_trains_with_kl_to_the_base_model(tmp_path):
    """routing='none' with beta != 0 (the 4B baseline): stock GRPO whose KL reference is the base model."""
    t = trainer(tmp_path, routing="none", beta=0.1, max_steps=1)
    assert t.gate is None and isinstance(t.ref_model, BaseModelReference)
    t.train()
    assert "kl" in t.state.log_history[0]
