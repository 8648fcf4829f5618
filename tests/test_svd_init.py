"""SVD-space blocks with subtracted initial copies (`adapter_init`: svd, signed, signed_reverse): the factors, I1
and I2 exactly, row masks, vLLM's merged weights, the fingerprint, reload of `final/` and resume, and the signed
pair's symmetry."""

from pathlib import Path

import pytest
import torch
from conftest import make_model
from peft import PeftModel
from trainer_utils import TOKENIZER, snapshot, trainer

from routed_grpo.adapter import DEPLOYED, QUARANTINE, RoutedAdapter, attach_routed_adapter, fingerprint_mismatch
from routed_grpo.initial import INITIAL_FILE
from routed_grpo.svd_init import factors_digest, signed_slots, svd_slots
from routed_grpo.vllm_sync import mode_weights

IDS = torch.tensor([[1, 5, 9, 33, 60, 7, 2], [4, 4, 8, 15, 16, 23, 42]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _hack_in(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(layer.in_features, generator=g) for n, layer in adapter.layers.items()}


def _attached(init: str, rank: int = 4):
    model = make_model(len(TOKENIZER))
    ref = _logits(model).clone()
    adapter = attach_routed_adapter(model, rank=rank, init="random")
    if init != "random":
        adapter.set_initial(init, adapter.compute_initial(init, _hack_in(adapter)))
    return adapter, ref


def _perturb(adapter, scale=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in (DEPLOYED, QUARANTINE):
            for p in adapter.parameters(block):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_svd_slots_are_the_top_singular_triplets_with_a_fixed_sign():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 9, generator=g)
    a, b, s = svd_slots(w, rank=2, scaling=0.5)
    u, sv, vh = torch.linalg.svd(w.double())
    approx = (u[:, :4] * sv[:4]) @ vh[:4]
    torch.testing.assert_close((0.5 * b.double() @ a.double()), approx, rtol=1e-5, atol=1e-5)  # s B A = U S V^T
    torch.testing.assert_close(s, sv[:4].float())
    peak = b.abs().argmax(dim=0)
    assert (b[peak, torch.arange(4)] > 0).all()  # the sign convention
    a2, b2, _ = svd_slots(-w, rank=2, scaling=0.5)  # -W: the same U up to sign, fixed by the convention
    torch.testing.assert_close(b2, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a2, -a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 x rank = 10"):
        svd_slots(w, rank=5, scaling=1.0)


@pytest.mark.parametrize("init", ["svd", "signed", "signed_reverse"])
def test_i1_and_i2_exactly_with_subtracted_copies(init):
    adapter, ref = _attached(init)
    assert torch.equal(_logits(adapter.model), ref)  # I1: logits equal the base model's at init, bit for bit
    b_q = adapter.layers[adapter.module_names[0]].lora_B[QUARANTINE]
    assert b_q.weight.abs().sum() > 0  # B0 != 0: the subtraction is what makes I1 hold
    _perturb(adapter)
    full = _logits(adapter.model)
    with adapter.deployment_ablation():
        deploy = _logits(adapter.model)
    with adapter.base_model_only():
        assert torch.equal(_logits(adapter.model), ref)
    assert not torch.allclose(full, deploy)
    adapter.set_row_masks(torch.tensor([0.0, 1.0]), torch.zeros(2))  # m = 0: row 0 in deploy mode
    mixed = _logits(adapter.model)
    adapter.clear_row_masks()
    assert torch.equal(mixed[0], deploy[0]) and torch.equal(mixed[1], full[1])
    adapter.reset_quarantine()  # I2: ablation == the quarantine back at its initial value
    assert torch.equal(_logits(adapter.model), deploy)


def test_vllm_weights_and_the_fingerprint_know_the_subtracted_copies():
    adapter, ref = _attached("svd")
    base = make_model(len(TOKENIZER)).state_dict()
    for name, weight in mode_weights(adapter, "full"):  # at init the net delta is exactly zero here too
        assert torch.equal(weight, base[name]), name
    _perturb(adapter)
    with adapter.deployment_ablation():
        want = _logits(adapter.model)
    plain = make_model(len(TOKENIZER))
    plain.load_state_dict(dict(mode_weights(adapter, "deploy")), strict=False)
    torch.testing.assert_close(_logits(plain), want, rtol=1e-4, atol=1e-5)
    random, _ = _attached("random")
    parts = adapter.fingerprint_parts()
    assert parts["init"].startswith("svd:") and random.fingerprint_parts()["init"] is None
    assert fingerprint_mismatch(random.fingerprint_parts(), parts) == ["init"]
    from routed_grpo.vact import describe_mismatch

    text = describe_mismatch(random.fingerprint_parts(), parts, ["init"], "this adapter")
    assert text.startswith("adapter init") and "svd:" in text


def test_the_reverse_control_differs_only_in_which_block_holds_the_seeded_slot():
    adapter, _ = _attached("random")
    hack = _hack_in(adapter)
    signed = adapter.compute_initial("signed", hack)
    reverse = adapter.compute_initial("signed_reverse", hack)
    r = adapter.rank
    for name, layer in adapter.layers.items():
        u_in = hack[name] / hack[name].norm()

        a_s = torch.cat([signed[DEPLOYED][name][0], signed[QUARANTINE][name][0]])  # (2r, d_in): every slot
        a_r = torch.cat([reverse[DEPLOYED][name][0], reverse[QUARANTINE][name][0]])
        along_s, along_r = a_s @ u_in, a_r @ u_in
        assert along_s.abs().argmax() == r and along_r.abs().argmax() == r - 1  # quarantine / deployed slot
        assert (along_s.abs() > 1e-3).sum() == 1  # every other slot is orthogonal to u_in
        swapped = a_r.clone()
        swapped[[r - 1, r]] = a_r[[r, r - 1]]
        assert torch.equal(swapped, a_s)  # the same slots, one pair exchanged between the blocks
        w = layer.get_base_layer().weight.detach().double()
        u_out = (w @ u_in.double()) / (w @ u_in.double()).norm()
        b_seed = signed[QUARANTINE][name][1][:, 0].double()
        torch.testing.assert_close(b_seed / b_seed.norm(), u_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the pairs' hack direction"):
        adapter.compute_initial("signed", None)
    a, b, s = svd_slots(torch.randn(8, 6), 2, 1.0)
    with pytest.raises(ValueError, match="zero or not finite"):
        signed_slots(a, b, s, torch.randn(8, 6), torch.zeros(6), 2, 1.0, reverse=False)


def test_reloading_final_uses_the_saved_factors(tmp_path):
    adapter, _ = _attached("svd")
    _perturb(adapter)
    want = _logits(adapter.model)
    adapter.model.save_pretrained(str(tmp_path / "final"))
    assert adapter.save_initial(tmp_path / "final") == tmp_path / "final" / INITIAL_FILE
    model = PeftModel.from_pretrained(make_model(len(TOKENIZER)), str(tmp_path / "final" / DEPLOYED), DEPLOYED)
    model.load_adapter(str(tmp_path / "final" / QUARANTINE), adapter_name=QUARANTINE)
    model.base_model.set_adapter([DEPLOYED, QUARANTINE])
    reloaded = RoutedAdapter.of(model)
    assert not torch.allclose(_logits(model), want, atol=1e-3)  # without the copies: not the trained model
    reloaded.load_initial(tmp_path / "final" / INITIAL_FILE)
    assert torch.equal(_logits(model), want)
    assert factors_digest(reloaded._initial) == factors_digest(adapter._initial)


def test_resume_with_subtracted_copies_matches_the_uninterrupted_run(tmp_path):
    common = dict(max_steps=2, save_strategy="steps", save_steps=1, adapter_init="svd", learning_rate=1e-3)
    first = trainer(tmp_path / "a", **common)
    first.train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-1"
    assert (ckpt / INITIAL_FILE).is_file()
    resumed = trainer(tmp_path / "b", **common)
    other = {b: {n: (a0 * 1.001, b0) for n, (a0, b0) in f.items()} for b, f in resumed.adapter._initial.items()}
    resumed.adapter.set_initial("svd", other)  # as if another device's SVD had rounded differently
    resumed.train(resume_from_checkpoint=str(ckpt))
    for block in (DEPLOYED, QUARANTINE):
        torch.testing.assert_close(snapshot(resumed.adapter, block), snapshot(first.adapter, block))
    assert factors_digest(resumed.adapter._initial) == factors_digest(first.adapter._initial)
    plain = trainer(tmp_path / "c", max_steps=2, save_strategy="no")
    with pytest.raises(ValueError, match="adapter_init='random' but the checkpoint has routed_init"):
        plain.train(resume_from_checkpoint=str(ckpt))


def test_the_signed_direction_comes_from_every_module_of_the_pairs():
    from dataclasses import replace

    from routed_grpo.activations import pair_input_differences
    from routed_grpo.pairs import load_pairs

    adapter, _ = _attached("random")
    pairs = load_pairs(Path(__file__).resolve().parents[1] / "pairs" / "organism")[:3]
    diff = pair_input_differences(adapter, TOKENIZER, pairs)
    assert set(diff) == set(adapter.layers) and all(d.abs().sum() > 0 for d in diff.values())
    same = pair_input_differences(adapter, TOKENIZER, [replace(p, clean=p.hack) for p in pairs])
    assert all(torch.equal(d, torch.zeros_like(d)) for d in same.values())  # hack == clean: no direction
