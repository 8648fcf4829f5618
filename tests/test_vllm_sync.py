"""vLLM generation per sampling mode (issue 8, item 2), on CPU with a stand-in for TRL's `VLLMGeneration`.

vLLM itself is not installable here: these tests check which weights each mode pushes, how many syncs a step makes,
that rows are split by mode and reassembled in order, and, end to end through the trainer, that the behaviour
log-probs (and TRL's importance-sampling correction) use the HF forward in each row's sampling mode.
"""

import copy

import torch
from conftest import make_model
from trainer_utils import DEPLOYED, QUARANTINE, TOKENIZER, perturb_quarantine, trainer

from routed_grpo.adapter import attach_routed_adapter
from routed_grpo.vllm_sync import PerModeGeneration, mode_weights, rows_by_mode


def _adapter():
    adapter = attach_routed_adapter(make_model(len(TOKENIZER)), rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in (DEPLOYED, QUARANTINE):
            for p in adapter.parameters(block):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter


def test_each_mode_pushes_base_plus_its_blocks():
    adapter = _adapter()
    plain = make_model(len(TOKENIZER)).state_dict()
    for mode, blocks in (("deploy", [DEPLOYED]), ("full", [DEPLOYED, QUARANTINE])):
        merged_model = copy.deepcopy(adapter.model)
        if mode == "deploy":
            merged_model.delete_adapter(QUARANTINE)
        expected = merged_model.merge_and_unload(adapter_names=blocks).state_dict()
        pushed = dict(mode_weights(adapter, mode))
        assert set(pushed) <= set(plain) and set(pushed) >= set(plain) - {"lm_head.weight"}, "vLLM's names"
        for name, weight in pushed.items():
            torch.testing.assert_close(weight, expected[name], rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")
    deploy, full = dict(mode_weights(adapter, "deploy")), dict(mode_weights(adapter, "full"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(deploy[name], full[name]), "the quarantine's delta is in full mode only"
    assert all(".lora_" not in n for n in deploy)


class FakeVLLM:
    """TRL's `VLLMGeneration` interface: `sync_weights()` pulls `_iter_named_params()`; `generate` answers each prompt
    with [weights id, prompt length, first prompt token] and log-probs -1, so a test can see which weights sampled
    which row."""

    def __init__(self, probe: str):
        self.probe, self.syncs, self.calls, self.loaded = probe, [], [], None

    def _iter_named_params(self):  # replaced by PerModeGeneration
        raise AssertionError("TRL's own merge of all adapters must not be used")

    def sync_weights(self):
        weights = dict(self._iter_named_params())
        self.loaded = round(float(weights[self.probe].double().sum()), 4)
        self.syncs.append(self.loaded)

    def generate(self, prompts, images, num_generations, profiler=None):
        self.calls.append(len(prompts))
        completions = [[self.loaded, len(p), p[0]] for p in prompts]
        return prompts, completions, [[[-1.0]] * 3 for _ in prompts], None


PROBE = "model.layers.0.self_attn.q_proj.weight"
LOGP = -5.7  # about log(1/300): the tiny random model's per-token log-probs, so TRL's clip keeps most rows


def _weights_id(adapter, mode):
    return round(float(dict(mode_weights(adapter, mode))[PROBE].double().sum()), 4)


def test_rows_are_generated_with_their_modes_weights_and_reassembled_in_order():
    adapter = _adapter()
    fake = FakeVLLM(PROBE)
    gen = PerModeGeneration(fake, adapter)
    prompts = [[10 + i] * (i + 1) for i in range(6)]
    full = torch.tensor([True, False, False, True, False, True])
    assert rows_by_mode(full) == {"deploy": [1, 2, 4], "full": [0, 3, 5]}
    completions, logprobs = gen.generate(prompts, full, step=0, global_counts=lambda counts: counts)
    ids = {"deploy": _weights_id(adapter, "deploy"), "full": _weights_id(adapter, "full")}
    assert ids["deploy"] != ids["full"]
    for i, (c, f) in enumerate(zip(completions, full.tolist(), strict=True)):
        assert c == [ids["full" if f else "deploy"], i + 1, 10 + i], f"row {i}"
    assert logprobs == [[-1.0] * 3] * 6
    assert len(fake.syncs) == 2, "two modes: two syncs"
    gen.generate(prompts, full, step=0, global_counts=lambda counts: counts)
    assert len(fake.syncs) == 3, "same step: the mode still loaded goes first and is not pushed again"
    gen.generate(prompts, full, step=1, global_counts=lambda counts: counts)
    assert len(fake.syncs) == 5, "a new step: both modes again"


def test_one_sync_when_every_row_has_the_same_mode_and_padding_for_other_processes():
    adapter = _adapter()
    fake = FakeVLLM(PROBE)
    gen = PerModeGeneration(fake, adapter)
    prompts = [[5, 6], [7], [8, 9, 9]]
    out, _ = gen.generate(prompts, torch.zeros(3, dtype=torch.bool), 0, lambda counts: counts)  # frac = 1
    assert fake.syncs == [_weights_id(adapter, "deploy")] and len(out) == 3
    fake.syncs.clear()
    fake.calls.clear()
    # another process holds 5 full rows and 1 deploy row: every process pads to the largest count of each mode
    out, _ = gen.generate(prompts, torch.ones(3, dtype=torch.bool), 1, lambda counts: [1, 5])
    assert fake.calls == [5, 1], "full rows padded to 5; a deploy call with padding only"
    assert [c[1:] for c in out] == [[2, 5], [1, 7], [3, 8]], "padding rows are dropped"


def test_trainer_generates_per_mode_and_scores_in_each_rows_sampling_mode(tmp_path):
    """The trainer's vLLM path end to end with the stand-in: per-mode sampling, then TRL's importance-sampling
    correction, whose old-log-prob forward runs in each row's sampling mode and also pools the gate's activations."""
    t = trainer(tmp_path, gen_deploy_frac=0.5, route_tail_q=0.3, per_device_train_batch_size=16)
    perturb_quarantine(t.adapter)

    class SampledVLLM(FakeVLLM):
        def generate(self, prompts, images, num_generations, profiler=None):
            self.calls.append(len(prompts))
            completions = [[(p[-1] * 7 + k) % 250 + 3 for k in range(4)] + [TOKENIZER.eos_token_id] for p in prompts]
            return prompts, completions, [[[LOGP]] * 5 for _ in prompts], None

    fake = SampledVLLM(PROBE)
    t.use_vllm, t.vllm_generation, t.vllm_importance_sampling_correction = True, fake, True
    t._vllm_modes = PerModeGeneration(fake, t.adapter)
    records = []
    original = t._generate_and_score_completions

    def spy(inputs):
        out = original(inputs)
        records.append(out)
        return out

    t._generate_and_score_completions = spy
    t.model.train()
    t._prepare_inputs(next(iter(t.get_train_dataloader())))
    out = records[0]
    assert len(fake.syncs) == 2 and sum(fake.calls) == 16
    full = out["sampling_full"].bool()
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    keep = out["completion_ids"].size(1)
    from trl import GRPOTrainer

    with torch.no_grad():
        full_lp = GRPOTrainer._get_per_token_logps_and_entropies(t, t.model, ids, mask, keep)[0]
        with t.adapter.deployment_ablation():
            deploy_lp = GRPOTrainer._get_per_token_logps_and_entropies(t, t.model, ids, mask, keep)[0]
    expected = torch.where(full.unsqueeze(1), full_lp, deploy_lp)
    tokens = out["completion_mask"].bool()
    torch.testing.assert_close(out["old_per_token_logps"][tokens], expected[tokens], rtol=1e-5, atol=1e-6)
    assert t.vllm_importance_sampling_mode == "sequence_mask"  # TRL 1.16's default: kept where within the clip
    ratio = out["importance_sampling_ratio"].squeeze(1)  # (B,)
    expected_ratio = torch.exp(((expected - LOGP) * out["completion_mask"]).sum(1))  # HF in sampling modes vs vLLM
    kept = ratio > 0
    assert kept.sum() >= 4, "most sequences within TRL's clip range"
    torch.testing.assert_close(ratio[kept], expected_ratio[kept], rtol=1e-4, atol=0)
    assert out["routing_zone"].numel() == 16
