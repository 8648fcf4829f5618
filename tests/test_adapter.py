"""Invariants I1-I3 of the two-block adapter, capture, export and the quantised base."""

import os

import pytest
import torch
from conftest import make_model
from peft import PeftModel

from routed_grpo.adapter import DEPLOYED, QUARANTINE, attach_routed_adapter

KEEP, ABSORB, ROUTE = (0.0, 0.0), (1.0, 0.0), (1.0, 1.0)


def _ids(tokenizer, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), (n, 12), generator=g)


def _perturb(adapter, seed=0):
    """Give both blocks non-zero B (and shifted A) so every parameter receives a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in (DEPLOYED, QUARANTINE):
            for p in adapter.parameters(block):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _grads(adapter, block):
    return torch.cat(
        [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in adapter.parameters(block)]
    )


def _masked_grads(adapter, ids, masks):
    adapter.model.zero_grad(set_to_none=True)
    m = torch.tensor([x[0] for x in masks])
    d = torch.tensor([x[1] for x in masks])
    adapter.set_row_masks(m, d)
    logits = adapter.model(input_ids=ids).logits  # (B, T, V)
    logits.float().pow(2).mean(dim=(1, 2)).sum().backward()  # a per-row loss summed over rows
    adapter.clear_row_masks()
    return _grads(adapter, DEPLOYED), _grads(adapter, QUARANTINE)


def test_i1_zero_delta_at_init_and_live_bottleneck(tokenizer):
    base = make_model(len(tokenizer), seed=3)
    ids = _ids(tokenizer)
    ref = base(input_ids=ids).logits
    adapter = attach_routed_adapter(make_model(len(tokenizer), seed=3), rank=4)
    torch.testing.assert_close(adapter.model(input_ids=ids).logits, ref, rtol=0, atol=0)
    with adapter.capture(torch.ones_like(ids)):
        adapter.model(input_ids=ids)
    h = adapter.pooled()
    assert h.shape == (3, len(adapter.module_names), 4)
    assert h.abs().min(dim=-1).values.gt(0).all(), "A_dep x must be alive at init on every module"


def test_init_is_seeded_and_name_keyed(tokenizer):
    a = attach_routed_adapter(make_model(len(tokenizer)), rank=4, init_seed=5)
    b = attach_routed_adapter(make_model(len(tokenizer)), rank=4, init_seed=5)
    c = attach_routed_adapter(make_model(len(tokenizer)), rank=4, init_seed=6)
    pa, pb, pc = (torch.cat([p.flatten() for p in x.parameters(DEPLOYED)]) for x in (a, b, c))
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert not torch.equal(pa, pc)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    other_base = attach_routed_adapter(make_model(len(tokenizer), seed=9), rank=4, init_seed=5)
    assert other_base.fingerprint() != a.fingerprint(), "a v_act made on another base must not match"
    qa = torch.cat([p.flatten() for p in a.parameters(QUARANTINE)])
    assert not torch.equal(pa, qa), "the two blocks must not share their initial A"


def test_i2_ablation_is_base_plus_deployed_and_leaves_deployed_alone(tokenizer):
    adapter = attach_routed_adapter(make_model(len(tokenizer)), rank=4)
    _perturb(adapter)
    ids = _ids(tokenizer)
    deployed_before = [p.clone() for p in adapter.parameters(DEPLOYED)]
    with adapter.deployment_ablation():
        ablated = adapter.model(input_ids=ids).logits
    full = adapter.model(input_ids=ids).logits
    assert not torch.allclose(ablated, full), "the quarantine must contribute outside the ablation"
    # Reference: the same weights with the quarantine block reset to its initial value.
    adapter.reset_quarantine()
    torch.testing.assert_close(adapter.model(input_ids=ids).logits, ablated)
    for before, after in zip(deployed_before, adapter.parameters(DEPLOYED), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    # Base + deployed delta computed by hand from PEFT with the quarantine deleted.
    adapter.model.delete_adapter(QUARANTINE)
    adapter.model.base_model.set_adapter([DEPLOYED])
    torch.testing.assert_close(adapter.model(input_ids=ids).logits, ablated)


def test_keep_row_forward_equals_deploy_mode_and_route_row_equals_full(tokenizer):
    adapter = attach_routed_adapter(make_model(len(tokenizer)), rank=4)
    _perturb(adapter)
    ids = _ids(tokenizer, n=2)
    with adapter.deployment_ablation():
        deploy = adapter.model(input_ids=ids).logits
    full = adapter.model(input_ids=ids).logits
    adapter.set_row_masks(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))  # keep, route
    masked = adapter.model(input_ids=ids).logits
    adapter.clear_row_masks()
    torch.testing.assert_close(masked[0], deploy[0])
    torch.testing.assert_close(masked[1], full[1])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_i3_masks_route_gradients_to_the_right_block(tokenizer, checkpointing):
    adapter = attach_routed_adapter(make_model(len(tokenizer)), rank=4)
    _perturb(adapter)
    model = adapter.model
    if checkpointing:
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    ids = _ids(tokenizer, n=3)
    zones = [KEEP, ABSORB, ROUTE]
    per_row = [_masked_grads(adapter, ids[i : i + 1], [z]) for i, z in enumerate(zones)]
    (keep_dep, keep_q), (abs_dep, abs_q), (route_dep, route_q) = per_row
    assert keep_q.abs().max() == 0 and keep_dep.abs().max() > 0, "keep: only the deployed block trains"
    assert route_dep.abs().max() == 0 and route_q.abs().max() > 0, "route: only the quarantine trains"
    assert abs_dep.abs().max() > 0 and abs_q.abs().max() > 0, "absorb: both blocks train"
    mixed_dep, mixed_q = _masked_grads(adapter, ids, zones)
    torch.testing.assert_close(mixed_dep, keep_dep + abs_dep + route_dep, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mixed_q, keep_q + abs_q + route_q, rtol=1e-5, atol=1e-7)


def test_masks_must_match_the_batch(tokenizer):
    adapter = attach_routed_adapter(make_model(len(tokenizer)), rank=2)
    adapter.set_row_masks(torch.ones(2), torch.zeros(2))
    with pytest.raises(RuntimeError, match="2 rows but the forward has 3"):
        adapter.model(input_ids=_ids(tokenizer, n=3))


def test_capture_pools_over_the_token_mask(tokenizer):
    adapter = attach_routed_adapter(make_model(len(tokenizer)), rank=3)
    ids = _ids(tokenizer, n=2)
    mask = torch.zeros_like(ids)
    mask[0, 4:] = 1
    mask[1, 9:] = 1
    name = adapter.module_names[0]
    layer = adapter.layers[name]
    seen = {}
    handle = layer.base_layer.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0].detach()))
    with adapter.capture(mask):
        adapter.model(input_ids=ids)
    handle.remove()
    h = seen["x"] @ layer.lora_A[DEPLOYED].weight.T  # (B, T, r) computed by hand
    expected = torch.stack([h[0, 4:].mean(0), h[1, 9:].mean(0)])
    torch.testing.assert_close(adapter.pooled()[:, 0], expected)


def test_deployed_export_round_trips_through_stock_peft(tokenizer, tmp_path):
    adapter = attach_routed_adapter(make_model(len(tokenizer), seed=7), rank=4)
    _perturb(adapter)
    ids = _ids(tokenizer)
    with adapter.deployment_ablation():
        expected = adapter.model(input_ids=ids).logits
    old_umask = os.umask(0o027)
    try:
        adapter.export_deployed(tmp_path / "deployed")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "deployed" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o640  # the user's umask
    loaded = PeftModel.from_pretrained(make_model(len(tokenizer), seed=7), str(tmp_path / "deployed"))
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    adapter.export_merged(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_4bit_base_forward_and_backward(tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model(len(tokenizer), hidden=128).save_pretrained(tmp_path / "m")  # >= the 4-bit block size
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=quant)
    adapter = attach_routed_adapter(base, rank=4)
    assert adapter.module_names, "the adapter must attach to the 4-bit Linear layers"
    assert "Linear4bit" in type(adapter.layers[adapter.module_names[0]]).__name__
    parts = adapter.fingerprint_parts()
    assert parts["base_quantised"] is not None and len(parts["base_sample"]) > 0  # packed bytes kept apart
    _perturb(adapter)
    ids = _ids(tokenizer, n=2)
    dep, q = _masked_grads(adapter, ids, [KEEP, ROUTE])
    assert dep.abs().max() > 0 and q.abs().max() > 0
    dep_keep, q_keep = _masked_grads(adapter, ids[:1], [KEEP])
    assert q_keep.abs().max() == 0


@pytest.mark.parametrize("poison_b", [True, False])  # B_q non-finite: masked at the output; else at A_q x
def test_deploy_mode_stays_finite_and_exact_with_a_non_finite_quarantine(tokenizer, poison_b):
    """Ablation REPLACES the quarantine's contribution by zeros: inf or NaN weights there cannot reach deploy-mode
    outputs (a product by 0 would turn them into NaN), neither under `deployment_ablation` nor on m = 0 rows."""
    adapter = attach_routed_adapter(make_model(len(tokenizer)), rank=4)
    _perturb(adapter)
    ids = _ids(tokenizer, n=2)
    with adapter.deployment_ablation():
        expected = adapter.model(input_ids=ids).logits  # base + deployed delta
    with torch.no_grad():
        a, b = list(adapter.parameters(QUARANTINE))[-2:]  # the last down_proj: it adds straight to the residual
        a[0, 0] = float("inf")
        if poison_b:
            b[0, 0] = float("nan")
    with adapter.deployment_ablation():
        deploy = adapter.model(input_ids=ids).logits
    assert torch.isfinite(deploy).all()
    torch.testing.assert_close(deploy, expected, rtol=0, atol=0)
    adapter.set_row_masks(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))  # row 0 keep (deploy), row 1 full
    masked = adapter.model(input_ids=ids).logits
    adapter.clear_row_masks()
    torch.testing.assert_close(masked[0], expected[0], rtol=0, atol=0)
    assert not torch.isfinite(masked[1]).all(), "the full-mode row does see the diverged quarantine"


def _routed_and_vanilla(tokenizer, alpha):
    """The same two-block model twice: as attached (UnscaledLora installed) and with PEFT's vanilla forward."""
    fast = attach_routed_adapter(make_model(len(tokenizer)), rank=4, alpha=alpha, init_seed=3)
    vanilla = attach_routed_adapter(make_model(len(tokenizer)), rank=4, alpha=alpha, init_seed=3)
    _perturb(fast), _perturb(vanilla)
    for layer in vanilla.layers.values():
        layer.lora_variant.clear()
    return fast, vanilla


@pytest.mark.parametrize("alpha", [None, 6.0])  # scaling exactly 1.0 (the multiply skipped), and 1.5
def test_unscaled_lora_gives_peft_vanilla_outputs_and_gradients_bit_for_bit(tokenizer, alpha):
    from routed_grpo.unscaled_lora import UnscaledLora

    fast, vanilla = _routed_and_vanilla(tokenizer, alpha)
    assert all(
        isinstance(layer.lora_variant[b], UnscaledLora)
        for layer in fast.layers.values()
        for b in (DEPLOYED, QUARANTINE)
    )
    ids = _ids(tokenizer, n=4)
    results = []
    for adapter in (fast, vanilla):
        adapter.set_row_masks(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 0.0]))
        logits = adapter.model(input_ids=ids).logits
        logits.log_softmax(-1)[..., 5].sum().backward()
        adapter.clear_row_masks()
        results.append((logits.detach(), _grads(adapter, DEPLOYED), _grads(adapter, QUARANTINE)))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_unscaled_lora_runs_no_adapter_multiply_at_scaling_one(tokenizer):
    """At scaling 1.0 PEFT multiplies every block's output by 1.0; the installed variant does not."""
    fast, vanilla = _routed_and_vanilla(tokenizer, None)
    ids = _ids(tokenizer)
    counts = []
    for adapter in (fast, vanilla):
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            adapter.model(input_ids=ids)
        counts.append(sum(e.count for e in prof.key_averages() if e.key == "aten::mul"))
    assert counts[1] - counts[0] == 2 * len(fast.layers), "one multiply per block and layer fewer"


def test_unscaled_lora_merges_as_peft_does(tokenizer):
    fast, vanilla = _routed_and_vanilla(tokenizer, 6.0)
    merged = [a.model.merge_and_unload(adapter_names=[DEPLOYED, QUARANTINE]) for a in (fast, vanilla)]
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.allclose(merged[0](input_ids=ids).logits, merged[1](input_ids=ids).logits, atol=1e-6)
