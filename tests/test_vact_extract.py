"""v_act extraction on a tiny Qwen2 with the routed adapter: I5 against an independent per-pair computation, and the
fast path (prompt once with a KV cache, decoder only, cut short after the last target, length-sorted batches)
against unbatched full-model forwards, row by row."""

import pytest
import torch
from conftest import make_model
from torch.testing import assert_close
from vact_helpers import write_pairs, write_varied_pairs

from routed_grpo.adapter import DEPLOYED, QUARANTINE, attach_routed_adapter
from routed_grpo.pairs import load_pairs
from routed_grpo.vact import (
    VactError,
    adapter_metadata,
    extract_vact,
    load_vact,
    pooled_completion_activations,
    pooled_pair_activations,
    save_vact,
)

TARGETS = ("q_proj", "down_proj")  # two module kinds keep the tiny model's forward cheap


@pytest.fixture
def adapter(tokenizer):
    return attach_routed_adapter(make_model(len(tokenizer)), rank=4, targets=TARGETS, init_seed=0)


@pytest.fixture
def pairs(tmp_path):
    return load_pairs(write_pairs(tmp_path / "pairs.yaml", n=3))


def _reference_pooled(adapter, tokenizer, messages, completion):  # (M, r)
    """One unbatched forward with our own hooks on lora_A['deployed']; mean over the completion positions."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    seen = {}
    hooks = [
        layer.lora_A[DEPLOYED].register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, out[0].detach()))
        for name, layer in adapter.layers.items()
    ]
    try:
        with torch.no_grad():
            adapter.model(input_ids=torch.tensor([p_ids + c_ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([seen[n][len(p_ids) :].mean(dim=0) for n in adapter.module_names])  # (M, r)


def test_extract_matches_independent_unit_mean_difference(adapter, tokenizer, pairs):
    diffs = torch.stack(
        [
            _reference_pooled(adapter, tokenizer, p.messages(), p.hack)
            - _reference_pooled(adapter, tokenizer, p.messages(), p.clean)
            for p in pairs
        ]
    )  # (P, M, r)
    mean = diffs.mean(dim=0)
    expected = mean / mean.norm(dim=-1, keepdim=True)
    vact = extract_vact(adapter, tokenizer, pairs, batch_size=2)  # batched and right-padded
    assert vact.shape == (len(adapter.module_names), 4)
    assert_close(vact, expected, atol=1e-5, rtol=1e-4)
    assert_close(vact.norm(dim=-1), torch.ones(len(adapter.module_names)))


def test_extract_is_forward_only_and_deterministic(adapter, tokenizer, pairs):
    adapter.model.train()
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    a = extract_vact(adapter, tokenizer, pairs, batch_size=3)
    b = extract_vact(adapter, tokenizer, pairs, batch_size=1)
    assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert adapter.model.training  # mode restored
    for n, p in adapter.model.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, before[n]), n


def test_mode_deploy_ablates_the_quarantine(adapter, tokenizer, pairs):
    with torch.no_grad():
        for p in adapter.parameters(QUARANTINE):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    full = pooled_pair_activations(adapter, tokenizer, pairs, mode="full")[0]
    deploy = pooled_pair_activations(adapter, tokenizer, pairs, mode="deploy")[0]
    adapter.reset_quarantine()
    reset = pooled_pair_activations(adapter, tokenizer, pairs, mode="full")[0]
    assert_close(deploy, reset)
    assert not torch.allclose(full, reset)  # the perturbed quarantine did change later layers' inputs


def test_saved_vact_refuses_a_different_adapter(adapter, tokenizer, pairs, tmp_path):
    vact = extract_vact(adapter, tokenizer, pairs)
    path = save_vact(tmp_path / "v.safetensors", vact, {**adapter_metadata(adapter), "kind": "vact"})
    loaded, meta = load_vact(path, adapter)
    assert torch.equal(loaded, vact)
    assert meta["adapter_rank"] == 4 and meta["module_names"] == adapter.module_names
    other_rank = attach_routed_adapter(make_model(len(tokenizer)), rank=2, targets=TARGETS)
    with pytest.raises(VactError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(4,\).*\(2,\)"):
        load_vact(path, other_rank)
    other_seed = attach_routed_adapter(make_model(len(tokenizer)), rank=4, targets=TARGETS, init_seed=1)
    with pytest.raises(VactError, match="fingerprint"):
        load_vact(path, other_seed)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_fast_activations_equal_full_forwards_row_by_row(adapter, tokenizer, tmp_path, share_prompt):
    pairs = load_pairs(write_varied_pairs(tmp_path / "varied.yaml", n=5))
    lengths = [len(p.messages()[0]["content"]) + len(p.hack) for p in pairs]
    assert lengths != sorted(lengths), "the pairs must not come sorted, or the order restoration goes untested"
    with torch.no_grad():  # a live quarantine block: full and deploy mode differ from the second layer on
        for p in adapter.parameters(QUARANTINE):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    for mode in ("full", "deploy"):
        h_hack, h_clean = pooled_pair_activations(adapter, tokenizer, pairs, 2, mode, share_prompt=share_prompt)
        with adapter.sampling_mode(mode):
            ref_hack = torch.stack([_reference_pooled(adapter, tokenizer, p.messages(), p.hack) for p in pairs])
            ref_clean = torch.stack([_reference_pooled(adapter, tokenizer, p.messages(), p.clean) for p in pairs])
        assert_close(h_hack, ref_hack, atol=1e-5, rtol=1e-4)
        assert_close(h_clean, ref_clean, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(h_hack, pooled_pair_activations(adapter, tokenizer, pairs, 2, "full")[0], atol=1e-4)


def test_extraction_runs_neither_the_lm_head_nor_layers_after_the_last_target(tokenizer, pairs):
    adapter = attach_routed_adapter(make_model(len(tokenizer), layers=3), rank=4, targets=("q_proj",))
    base = adapter.model.get_base_model()
    calls = {"lm_head": 0, "last_mlp": 0, "norm": 0, "q_proj_last": 0}
    modules = {
        "lm_head": base.lm_head,
        "last_mlp": base.model.layers[-1].mlp,
        "norm": base.model.norm,
        "q_proj_last": base.model.layers[-1].self_attn.q_proj,
    }
    for key, module in modules.items():
        module.register_forward_pre_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))  # entered
    pooled_completion_activations(adapter, tokenizer, [p.messages() for p in pairs], [p.hack for p in pairs], 2)
    assert calls == {"lm_head": 0, "last_mlp": 0, "norm": 0, "q_proj_last": 2}  # 3 rows in batches of 2
    calls.update(dict.fromkeys(calls, 0))
    pooled_pair_activations(adapter, tokenizer, pairs, batch_size=3)  # one batch of three passes (see _pair_batch)
    assert calls["lm_head"] == 0 and calls["q_proj_last"] == 3
    assert calls["last_mlp"] == 2, "only the two passes that fill the KV cache run the decoder to its end"
