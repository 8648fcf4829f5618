"""Issue 17: the routed update is isolated under clipping, the gate fails loudly, the buffer spans the run, and the
behaviour log-probs are the policy's (softcapped logits, zero at pad positions)."""

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_model
from trainer_utils import DEPLOYED, QUARANTINE, TOKENIZER, config, snapshot, trainer
from transformers import Gemma2Config, Gemma2ForCausalLM, TrainerCallback

from routed_grpo import routing_state
from routed_grpo.adapter import attach_routed_adapter
from routed_grpo.behaviour import SamplingPassPool
from routed_grpo.gate import KEEP, ROUTE, masks_from_zones

EOS_IDS = [TOKENIZER.eos_token_id, *range(40, 80)]  # many ids end a completion: rows stop at different steps
PAD = TOKENIZER.pad_token_id
ROOT = Path(__file__).resolve().parents[1]


def _force_keep_and_route(t):
    """Every other row keep, the others route (no absorb rows, which legitimately train both blocks)."""
    original = t.gate.step

    def step(acts):
        decision = original(acts)
        zones = torch.tensor([KEEP, ROUTE] * (len(acts) // 2), device=decision.zones.device)
        m, d = masks_from_zones(zones)
        return dataclasses.replace(decision, zones=zones, m=m, d=d)

    t.gate.step = step


def _scale_route_advantages(t, scale: float):
    original = t._generate_and_score_completions

    def generate_and_score(inputs):
        output = original(inputs)
        route = output["routing_zone"] == ROUTE
        output["advantages"] = torch.where(route, output["advantages"] * scale, output["advantages"])
        return output

    t._generate_and_score_completions = generate_and_score


class _Snapshots(TrainerCallback):
    def __init__(self, adapter):
        self.adapter, self.deployed, self.quarantine = adapter, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.deployed.append(snapshot(self.adapter, DEPLOYED))
        self.quarantine.append(snapshot(self.adapter, QUARANTINE))


def _clipped_run(tmp_path, scale: float):
    t = trainer(tmp_path / f"scale{scale}", gen_deploy_frac=1.0, max_grad_norm=1e-3, max_steps=3)
    _force_keep_and_route(t)
    _scale_route_advantages(t, scale)
    snaps = _Snapshots(t.adapter)
    t.add_callback(snaps)
    t.train()
    coefs = [h["routing/clip_coef/deployed"] for h in t.state.log_history if "routing/clip_coef/deployed" in h]
    return snaps, coefs


def test_deployed_trajectory_ignores_route_rows_when_clipping_binds(tmp_path):
    """Deploy-mode sampling, keep and route rows only, max_grad_norm binding, 3 AdamW steps (its first step is
    scale-invariant): scaling the route rows' advantages by 20 changes the quarantine's steps but not the deployed
    block's. With one global clip norm, the quarantine's larger gradient shrank the deployed step."""
    plain, coefs = _clipped_run(tmp_path, 1.0)
    scaled, _ = _clipped_run(tmp_path, 20.0)
    assert (plain.deployed[-1] - plain.deployed[0]).abs().max() > 0, "the deployed block must move"
    assert not torch.equal(plain.quarantine[-1], scaled.quarantine[-1]), "the scaled advantages must matter"
    for step, (a, b) in enumerate(zip(plain.deployed, scaled.deployed, strict=True)):
        assert torch.equal(a, b), f"deployed block differs after step {step + 1}: {(a - b).abs().max().item()}"
    assert len(coefs) == 3 and max(coefs) < 1.0, f"clipping must bind the deployed block at every step: {coefs}"


def test_a_nonfinite_pooled_activation_stops_the_run_naming_step_rows_and_modules(tmp_path):
    t = trainer(tmp_path, max_steps=1)
    original = t._observed_behaviour

    def observed(width, completion_mask):
        old, acts = original(width, completion_mask)
        acts = acts.clone()
        acts[3, 1, 0] = float("nan")
        return old, acts

    t._observed_behaviour = observed
    with pytest.raises(FloatingPointError) as err:
        t.train()
    message = str(err.value)
    assert "at step 0" in message and "rows [3]" in message
    assert t.adapter.module_names[1] in message


def test_buffer_default_holds_every_rollout_of_the_run(tmp_path):
    # 3 steps x 8 rollouts per micro-batch x 2 accumulation x 1 process
    t = trainer(tmp_path, max_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    assert t.gate.buffer.capacity == 48
    assert trainer(tmp_path, max_steps=-1, num_train_epochs=1).gate.buffer.capacity == 8192  # unknown length
    assert trainer(tmp_path, act_buffer_size=5).gate.buffer.capacity == 5


def test_a_buffer_smaller_than_the_run_warns_once_with_both_numbers(tmp_path, caplog):
    t = trainer(tmp_path, max_steps=2, act_buffer_size=4)  # the run generates 2 x 8 = 16 rollouts
    with caplog.at_level(logging.WARNING, logger="routed_grpo.routing_state"):
        t.train()
    warnings = [r.getMessage() for r in caplog.records if "act_buffer_size" in r.getMessage()]
    assert len(warnings) == 1 and "act_buffer_size 4 < the 16 rollouts" in warnings[0], warnings


def test_buffer_memory_is_reported_and_warned_above_the_bound(tmp_path, caplog, monkeypatch):
    adapter = attach_routed_adapter(make_model(len(TOKENIZER)), rank=4)
    args = config(tmp_path, act_buffer_size=1000)
    row = len(adapter.module_names) * 4 * 4  # modules x rank x float32 bytes
    monkeypatch.setattr(routing_state, "BUFFER_MEMORY_BOUND", 1000 * row - 1)
    with caplog.at_level(logging.INFO, logger="routed_grpo.routing_state"):
        assert routing_state.buffer_capacity(args, adapter) == 1000
    messages = [r.getMessage() for r in caplog.records]
    assert any("1000 rollouts" in m and "GiB" in m for m in messages if "activation buffer of" in m), messages
    warned = [m for m in messages if "above" in m]
    assert len(warned) == 1 and f"{1000 * row / 1024**3:.2f} GiB" in warned[0], messages


def test_checkpoint_holds_one_gate_state_not_one_per_process(tmp_path):
    t = trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    t.train()
    folder = tmp_path / "out" / "checkpoint-1"
    assert (folder / "routing_gate.pt").exists()
    rank_state = torch.load(folder / "routing_state_rank0.pt", weights_only=True)
    assert "gate" not in rank_state and "sampling_rng" in rank_state


def _gemma2(softcap: float) -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        final_logit_softcapping=softcap,
        pad_token_id=PAD,
        eos_token_id=EOS_IDS,
    )
    return Gemma2ForCausalLM(cfg).eval()


def test_sampler_logps_are_the_models_softcapped_ones_and_zero_after_eos():
    """Gemma 2 applies `final_logit_softcapping` after the LM head: the sampler's log-probs are those of the
    model's output logits (what TRL's log-prob forward uses), and 0 at every pad position after a row's EOS."""
    adapter = attach_routed_adapter(_gemma2(softcap=0.5), rank=4)  # a cap this low bends every logit
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 300, (8, 5), generator=g)
    prompt_mask = torch.ones_like(input_ids)
    pool = SamplingPassPool(adapter, EOS_IDS, PAD)
    with torch.no_grad(), pool.attached():
        sequences = adapter.model.generate(
            input_ids=input_ids, attention_mask=prompt_mask, max_new_tokens=24, do_sample=True, pad_token_id=PAD
        )
    completions = []
    for row in sequences[:, 5:].tolist():
        ends = [i for i, tok in enumerate(row) if tok in EOS_IDS]
        completions.append(row[: ends[0] + 1] if ends else row)
    pool.finish(completions, adapter.model)
    assert pool.problem is None
    width = sequences.shape[1] - 5
    sizes = [len(c) for c in completions]
    mask = torch.arange(width) < torch.tensor(sizes).unsqueeze(1)  # (B, width)
    assert (~mask).sum() >= 10, f"need a pad tail after EOS: lengths {sizes}"
    logps = pool.logps(width)
    with torch.no_grad():
        logits = adapter.model(input_ids=sequences, attention_mask=torch.ones_like(sequences)).logits
    reference = logits[:, 4:-1].float().log_softmax(-1).gather(-1, sequences[:, 5:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps[mask], reference[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(logps[~mask], torch.zeros(int((~mask).sum())))


def test_behaviour_logps_are_zero_at_pad_positions_with_the_cap_off(tmp_path):
    model = make_model(len(TOKENIZER))
    model.generation_config.eos_token_id = EOS_IDS
    t = trainer(tmp_path, model=model, mismatch_ratio_cap=None, gen_deploy_frac=0.5, max_completion_length=32)
    seen, original = [], t._generate_and_score_completions
    t._generate_and_score_completions = lambda inputs: seen.append(original(inputs)) or seen[-1]
    t.train()
    pads = sum(int((o["completion_mask"] == 0).sum()) for o in seen)
    assert pads >= 50, f"need a long pad tail, got {pads} pad positions"
    for output in seen:
        old = output["old_per_token_logps"]
        assert torch.equal(
            old[output["completion_mask"] == 0], torch.zeros(int((output["completion_mask"] == 0).sum()))
        )


@pytest.mark.parametrize("arm", ["routed", "placebo"])
def test_qwen3_4b_recipe_buffer_spans_the_run_at_8_gpus(arm):
    recipe = yaml.safe_load((ROOT / "recipes" / "qwen3_4b" / f"{arm}.yaml").read_text())
    run = recipe["max_steps"] * recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * 8
    assert recipe["act_buffer_size"] >= run
