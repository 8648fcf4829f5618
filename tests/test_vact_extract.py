"""v_act extraction on a tiny Qwen2 with the routed adapter: I5 against an independent per-pair computation."""

import pytest
import torch
from conftest import make_model
from torch.testing import assert_close
from vact_helpers import write_pairs

from routed_grpo.adapter import DEPLOYED, QUARANTINE, attach_routed_adapter
from routed_grpo.pairs import load_pairs
from routed_grpo.vact import (
    VactError,
    adapter_metadata,
    extract_vact,
    load_vact,
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


def _reference_pooled(adapter, tokenizer, messages, completion):
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
