"""RoutedGRPOTrainer end to end on a tiny model: I4, I7, masks to blocks, checkpointing, optimizer, resume."""

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch
from conftest import make_model
from peft import PeftModel
from trainer_utils import (
    DEPLOYED,
    QUARANTINE,
    TOKENIZER,
    config,
    dataset,
    perturb_quarantine,
    reward_len,
    snapshot,
    trainer,
)
from trl import GRPOTrainer

from routed_grpo.config import RoutedGRPOConfig
from routed_grpo.gate import ABSORB, KEEP, ROUTE, masks_from_zones
from routed_grpo.loss import dr_grpo_loss, per_row_rho
from routed_grpo.trainer import RoutedGRPOTrainer


def _spy_loss(t):
    """Record what each grad-carrying forward saw: its log-probs, the behaviour log-probs the loss used, zones,
    sampling modes."""
    records, original = [], t.compute_loss

    def spy(model, inputs, *args, **kwargs):
        loss = original(model, inputs, *args, **kwargs)
        keys = ("completion_mask", "routing_zone", "sampling_full", "advantages")
        used = {"logps": t._loss_logps.clone(), "old_per_token_logps": t._loss_old_logps.clone()}
        records.append(used | {k: inputs[k].clone() for k in keys})
        return loss

    t.compute_loss = spy
    return records


def _force_zone(t, zone: int):
    original = t.gate.step

    def step(acts):
        decision = original(acts)
        zones = torch.full_like(decision.zones, zone)
        m, d = masks_from_zones(zones)
        return dataclasses.replace(decision, zones=zones, m=m, d=d)

    t.gate.step = step


@pytest.mark.parametrize("batch,accum", [(16, 1), (8, 2)])  # (8, 2): the behaviour forward runs in two chunks
def test_i4_rho_is_one_exactly_where_forward_mode_matches_sampling_mode(tmp_path, batch, accum):
    t = trainer(
        tmp_path,
        gen_deploy_frac=0.5,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        route_tail_q=0.3,
        max_steps=1,
    )
    perturb_quarantine(t.adapter)  # otherwise deploy and full policies coincide at init
    records = _spy_loss(t)
    t.train()
    r = {k: torch.cat([rec[k] for rec in records]) for k in records[0]}  # the micro-batches of step 1
    row_mean, _ = per_row_rho(r["logps"], r["old_per_token_logps"], r["completion_mask"])
    full, zones = r["sampling_full"].bool(), r["routing_zone"]
    matched = (full & (zones != KEEP)) | (~full & (zones == KEEP))
    assert matched.any() and (~matched).any(), "the batch must hold matched and mismatched rows"
    torch.testing.assert_close(row_mean[matched], torch.ones(int(matched.sum())), rtol=0, atol=1e-5)
    assert (row_mean[~matched] - 1).abs().min() > 1e-3, "mismatched rows must show the policy difference"
    logged = t.state.log_history[0]
    assert any(k.startswith("routing/rho_mean/") for k in logged), "rho must be logged per zone"


@pytest.mark.parametrize("zone,moves,stays", [(ROUTE, QUARANTINE, DEPLOYED), (KEEP, DEPLOYED, QUARANTINE)])
def test_masks_reach_the_right_block_end_to_end(tmp_path, zone, moves, stays):
    t = trainer(tmp_path, max_steps=1)
    _force_zone(t, zone)
    before = {b: snapshot(t.adapter, b) for b in (DEPLOYED, QUARANTINE)}
    t.train()
    torch.testing.assert_close(snapshot(t.adapter, stays), before[stays], rtol=0, atol=0)
    assert not torch.equal(snapshot(t.adapter, moves), before[moves])


def test_absorb_trains_both_blocks(tmp_path):
    t = trainer(tmp_path, max_steps=1)
    _force_zone(t, ABSORB)
    before = {b: snapshot(t.adapter, b) for b in (DEPLOYED, QUARANTINE)}
    t.train()
    for block in (DEPLOYED, QUARANTINE):
        assert not torch.equal(snapshot(t.adapter, block), before[block])


def _fixed_batch(t):
    batch = next(iter(t.get_train_dataloader()))
    t.model.train()
    return t._prepare_inputs(batch)


def _loss_and_grads(t, inputs, adapter=None):
    adapter = adapter or t.adapter
    t.current_gradient_accumulation_steps = 1  # set by train(); these tests call compute_loss directly
    t.model.zero_grad(set_to_none=True)
    loss = t.compute_loss(t.model, inputs)
    loss.backward()
    adapter.clear_row_masks()
    grads = torch.cat([p.grad.flatten() for b in (DEPLOYED, QUARANTINE) for p in adapter.parameters(b)])
    return loss.detach(), grads


def test_i7_routing_none_loss_equals_stock_grpo_and_the_dr_grpo_formula(tmp_path):
    routed = trainer(tmp_path, routing="none")
    inputs = _fixed_batch(routed)
    assert "routing_m" not in inputs
    stock_model = make_model(len(TOKENIZER))
    stock_args = config(tmp_path, routing="none")
    from routed_grpo.adapter import attach_routed_adapter

    stock_adapter = attach_routed_adapter(stock_model, rank=4)
    stock = GRPOTrainer(
        model=stock_adapter.model,
        reward_funcs=reward_len,
        args=stock_args,
        train_dataset=dataset(),
        processing_class=TOKENIZER,
    )
    stock.model.train()
    loss_routed, grads_routed = _loss_and_grads(routed, inputs)
    loss_stock, grads_stock = _loss_and_grads(stock, inputs, stock_adapter)
    torch.testing.assert_close(loss_routed, loss_stock, rtol=0, atol=0)
    torch.testing.assert_close(grads_routed, grads_stock, rtol=0, atol=0)
    # Dr.GRPO by hand: rho = 1, so loss = -sum(A * mask) / (B * max_completion_length).
    mask = inputs["completion_mask"].float()
    zeros = torch.zeros_like(mask)
    expected = dr_grpo_loss(zeros, zeros, inputs["advantages"], mask, routed.args.max_completion_length)
    torch.testing.assert_close(loss_routed, expected, rtol=1e-5, atol=1e-6)


def test_i7_routed_all_absorb_matches_stock_loss(tmp_path):
    """With every row absorbed and sampled in full mode, the masked forward is the stock forward."""
    t = trainer(tmp_path)
    _force_zone(t, ABSORB)
    inputs = _fixed_batch(t)
    loss_masked, grads_masked = _loss_and_grads(t, inputs)
    plain = {k: v for k, v in inputs.items() if not k.startswith(("routing_", "sampling_"))}
    plain["old_per_token_logps"] = None
    loss_plain, grads_plain = _loss_and_grads(t, plain)
    torch.testing.assert_close(loss_masked, loss_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_masked, grads_plain, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_on_and_off_give_the_same_gradients(tmp_path, reentrant):
    t_off = trainer(tmp_path, gradient_checkpointing=False, gen_deploy_frac=0.5)
    perturb_quarantine(t_off.adapter)
    inputs = _fixed_batch(t_off)
    assert set(inputs["routing_zone"].tolist()) >= {KEEP, ROUTE}
    t_on = trainer(tmp_path, gradient_checkpointing=True, gen_deploy_frac=0.5)
    perturb_quarantine(t_on.adapter)
    t_on.model.train()
    t_on.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    loss_off, g_off = _loss_and_grads(t_off, inputs)
    loss_on, g_on = _loss_and_grads(t_on, inputs)
    torch.testing.assert_close(loss_on, loss_off)
    torch.testing.assert_close(g_on, g_off, rtol=1e-4, atol=1e-7)


def test_optimizer_step_leaves_a_block_without_gradient_unchanged(tmp_path):
    """Weight decay is configured, and the block had momentum from a first step; a zero-gradient step moves nothing."""
    t = trainer(tmp_path, weight_decay=0.1)
    opt = t.create_optimizer()
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not decayed & {id(p) for b in (DEPLOYED, QUARANTINE) for p in t.adapter.parameters(b)}
    with torch.no_grad():
        for p in t.adapter.parameters(DEPLOYED):
            p.add_(0.1)  # non-zero weights, so decay toward zero would visibly move them
    trainable = [p for p in t.model.parameters() if p.requires_grad]
    for p in trainable:  # step 1: every block gets a gradient (builds Adam momentum)
        p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(t.adapter, DEPLOYED)
    for p in trainable:  # step 2: the deployed block gets an exactly zero gradient (e.g. an all-route step)
        p.grad = torch.zeros_like(p)
    for p in t.adapter.parameters(QUARANTINE):
        p.grad = torch.randn_like(p)
    quarantine_before = snapshot(t.adapter, QUARANTINE)
    opt.step()
    torch.testing.assert_close(snapshot(t.adapter, DEPLOYED), before, rtol=0, atol=0)
    assert not torch.equal(snapshot(t.adapter, QUARANTINE), quarantine_before)


def test_resume_restores_buffer_thresholds_vact_and_sampling_rng(tmp_path):
    common = dict(max_steps=3, save_strategy="steps", save_steps=1, gen_deploy_frac=0.5)
    first = trainer(tmp_path / "a", **common)
    first.train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    deployed = PeftModel.from_pretrained(make_model(len(TOKENIZER)), str(ckpt / "deployed"))  # stock PEFT loads it
    assert deployed.peft_config["default"].r == first.adapter.rank
    assert (ckpt / "routing_state_rank0.pt").exists()
    resumed = trainer(tmp_path / "b", **common)
    resumed.train(resume_from_checkpoint=str(ckpt))
    torch.testing.assert_close(resumed.gate.buffer.acts(), first.gate.buffer.acts())
    torch.testing.assert_close(resumed.gate.vact, first.gate.vact, rtol=0, atol=0)
    assert resumed.gate.thresholds() == pytest.approx(first.gate.thresholds())
    assert torch.equal(resumed._sampling_rng.get_state(), first._sampling_rng.get_state())
    for block in (DEPLOYED, QUARANTINE):
        torch.testing.assert_close(snapshot(resumed.adapter, block), snapshot(first.adapter, block))
    assert set(resumed.model.active_adapters) == {DEPLOYED, QUARANTINE}


def test_nonfinite_ratio_raises_naming_step_and_zone(tmp_path):
    # gen_deploy_frac 0: forced keep rows are mismatched (full-sampled); without the ratio cap, which would bound
    # a -inf behaviour log-prob
    t = trainer(tmp_path, max_steps=1, mismatch_ratio_cap=None)
    _force_zone(t, KEEP)
    original = t._observed_behaviour

    def poisoned(*args, **kwargs):
        logps, acts = original(*args, **kwargs)
        return torch.full_like(logps, -float("inf")), acts

    t._observed_behaviour = poisoned
    with pytest.raises(FloatingPointError, match=r"step 0 in zone 'keep'"):
        t.train()


def test_rows_emptied_by_mask_truncated_completions_do_not_count_as_non_finite(tmp_path):
    # The tiny random model rarely ends a completion within 4 tokens: TRL empties the completion mask of every
    # truncated row, and such a row has no ratio at all (it must not read as rho = -inf).
    t = trainer(tmp_path, max_steps=1, max_completion_length=4, mask_truncated_completions=True)
    records = _spy_loss(t)
    t.train()
    assert (records[0]["completion_mask"].sum(1) == 0).any(), "the test needs an emptied row"
    assert all(math.isfinite(v) for k, v in t.state.log_history[0].items() if k.startswith("routing/rho_"))
    row_mean, row_max = per_row_rho(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert row_mean.tolist() == [1.0, 1.0] and row_max.tolist() == [1.0, 1.0]


def test_config_rejects_inconsistent_settings(tmp_path):
    for bad, match in [
        (dict(gen_deploy_frac=1.5), "gen_deploy_frac=1.5"),
        (dict(route_tail_q=0.5), "route_tail_q=0.5"),
        (dict(sync_ref_model=True, beta=0.01), "sync_ref_model=True"),
        (dict(use_liger_kernel=True), "use_liger_kernel=True"),
        (dict(routing="vact"), "vact_path or vact_pairs_path"),
        (dict(routing="oracle"), "routing='oracle'"),
        (dict(vact_refresh_steps=5), "vact_refresh_steps=5"),
        (dict(disable_dropout=False), "disable_dropout=False"),
        (dict(use_transformers_continuous_batching=True, gen_deploy_frac=0.5), "continuous_batching"),
    ]:
        with pytest.raises(ValueError, match=match):
            config(tmp_path, **bad)
    defaults = RoutedGRPOConfig(output_dir=str(tmp_path), routing="none", use_cpu=True, bf16=False)
    assert (defaults.loss_type, defaults.scale_rewards, defaults.beta) == ("dr_grpo", "none", 0.0)


def test_deepspeed_of_any_stage_is_rejected_with_routing_on(tmp_path):
    """DeepSpeed keeps gradients in its own buffers and steps its own optimizer: the zero-gradient rule and
    routing/qmass_grad would silently do nothing, so routing refuses it (a fake accelerator state, no DeepSpeed)."""
    from types import SimpleNamespace

    for stage in (1, 2, 3):
        plugin = SimpleNamespace(zero_stage=stage)
        fake = SimpleNamespace(
            args=config(tmp_path),
            tools=None,
            environment_factories=None,
            rollout_func=None,
            _is_vlm=False,
            is_deepspeed_enabled=True,
            is_fsdp_enabled=False,
            accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        )
        with pytest.raises(ValueError, match=rf"DeepSpeed \(ZeRO stage {stage}\) is not supported with routing on"):
            RoutedGRPOTrainer._reject_unsupported(fake)
        fake.args = config(tmp_path, routing="none")
        RoutedGRPOTrainer._reject_unsupported(fake)  # the baseline may use it


def test_a_loss_path_that_bypasses_the_log_prob_hook_fails_loudly(tmp_path):
    """The stashed log-probs are reset before every loss: a loss that never calls the hook cannot reuse the
    previous micro-batch's log-probs for rho."""
    t = trainer(tmp_path)
    inputs = _fixed_batch(t)
    t.current_gradient_accumulation_steps = 1
    t.compute_loss(t.model, inputs)  # a normal loss stashes this micro-batch's log-probs
    t.adapter.clear_row_masks()
    assert t._loss_logps is not None
    t._compute_loss = lambda model, inputs: torch.zeros((), requires_grad=True)  # a path without the hook
    with pytest.raises(RuntimeError, match="never called _get_per_token_logps_and_entropies"):
        t.compute_loss(t.model, inputs)


# Signatures of the upstream methods RoutedGRPOTrainer overrides, pinned to TRL 1.16.
PINNED = {
    "_generate_single_turn": [
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
        "has_tool_images",
    ],
    "_generate_and_score_completions": ["self", "inputs"],
    "_get_per_token_logps_and_entropies": [
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
        "pixel_values",
        "image_grid_thw",
        "num_images",
        "pixel_attention_mask",
        "spatial_shapes",
        "num_tiles",
        "image_sizes",
        "token_type_ids",
        "mm_token_type_ids",
        "image_position_ids",
    ],
    "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
    "training_step": ["self", "model", "inputs", "num_items_in_batch"],
    "get_decay_parameter_names": ["self", "model"],
    "create_optimizer": ["self", "model"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    "_clip_grad_norm": ["self", "model"],
    "log": ["self", "logs", "start_time"],
}


def test_overridden_upstream_signatures_are_unchanged():
    for name, params in PINNED.items():
        ours = getattr(RoutedGRPOTrainer, name)
        assert ours is not getattr(GRPOTrainer, name), f"{name} is no longer overridden: update PINNED"
        upstream = list(inspect.signature(getattr(GRPOTrainer, name)).parameters)
        assert upstream == params, f"GRPOTrainer.{name} changed upstream: {upstream}"


def test_4bit_base_trains_two_steps(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model(len(TOKENIZER), hidden=128).save_pretrained(tmp_path / "m")  # >= the 4-bit block size
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=quant)
    t = trainer(tmp_path, model=base, max_steps=2)
    before = {b: snapshot(t.adapter, b) for b in (DEPLOYED, QUARANTINE)}
    t.train()
    assert t.state.global_step == 2
    for block in (DEPLOYED, QUARANTINE):
        assert not torch.equal(snapshot(t.adapter, block), before[block])


def test_vact_extracted_from_pairs_at_start_and_refreshed_without_flushing(tmp_path):
    from routed_grpo.pairs import load_pairs
    from routed_grpo.vact import extract_vact

    pairs_dir = str(Path(__file__).resolve().parents[1] / "pairs")
    t = trainer(tmp_path, routing="vact", vact_pairs_path=pairs_dir, vact_refresh_steps=1, max_steps=3)
    expected = extract_vact(t.adapter, TOKENIZER, load_pairs(pairs_dir))
    torch.testing.assert_close(t.gate.vact, expected, rtol=0, atol=0)
    sizes, vacts = [], []
    original = t.gate.step

    def step(acts):
        vacts.append(t.gate.vact.clone())
        decision = original(acts)
        sizes.append(decision.buffer_size)
        return decision

    t.gate.step = step
    t.train()
    assert sizes == [8, 16, 24], "a refresh must re-score the buffer, not flush it"
    assert not torch.equal(vacts[0], vacts[2]), "v_act is re-extracted from the trained adapter"
    assert any(k == "routing/vact_refresh_cos" for h in t.state.log_history for k in h)
