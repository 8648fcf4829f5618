"""The behaviour pass without a second full forward (issue 10): each shortcut against the forward it replaces.

- the gate's activations pooled while sampling equal a teacher-forced forward's, and give the same zones;
- matched rows' behaviour log-probs are the grad-carrying forward's own: rho == 1 bit for bit;
- mismatched rows' behaviour log-probs, read from the sampler's logits, match a teacher-forced forward in their
  sampling mode (float32: atol 1e-5);
- where TRL computes old log-probs itself, its forward (in sampling modes) is the only extra forward.
"""

import pytest
import torch
from conftest import make_model
from trainer_utils import TOKENIZER, perturb_quarantine, trainer
from trl import GRPOTrainer

from routed_grpo import trainer as trainer_module
from routed_grpo.adapter import DEPLOYED, QUARANTINE, attach_routed_adapter
from routed_grpo.behaviour import SamplingPassPool, completion_pool_mask, sampling_mode_forward
from routed_grpo.gate import KEEP
from routed_grpo.loss import mismatched_rows

# 40 of the ~300 token ids end a completion, so lengths vary: rows stop on an EOS at different steps, others run to
# max_completion_length, and the EOS list has more than one id (as models with an end-of-turn token do).
EOS_IDS = [TOKENIZER.eos_token_id, *range(40, 80)]
PAD = TOKENIZER.pad_token_id


def _model():
    model = make_model(len(TOKENIZER))
    model.generation_config.eos_token_id = EOS_IDS
    return model


def _completions(sequences: torch.Tensor, prompt_len: int) -> list[list[int]]:
    """TRL's completion lists: everything up to and including the first EOS."""
    out = []
    for row in sequences[:, prompt_len:].tolist():
        ends = [i for i, t in enumerate(row) if t in EOS_IDS]
        out.append(row[: ends[0] + 1] if ends else row)
    return out


def _logps_fn(model):
    def fn(ids, mask, keep):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1].float()  # (B, T_c, V)
        return logits.log_softmax(-1).gather(-1, ids[:, -keep:].unsqueeze(-1)).squeeze(-1)

    return fn


@pytest.mark.parametrize("sensor", ["bottleneck", "bottleneck_init", "residual:0+1"])
def test_sampling_pass_pool_equals_a_teacher_forced_forward(sensor):
    """For every sensor: what the sampling pass pools equals what a teacher-forced forward in sampling modes pools
    (the fallback forward and TRL's own old-log-prob forward are both `sampling_mode_forward`)."""
    torch.manual_seed(0)
    adapter = attach_routed_adapter(_model(), rank=4)
    perturb_quarantine(adapter)  # deploy and full rows differ
    with torch.no_grad():  # the live deployed bottleneck moves away from its initial value
        for layer in adapter.layers.values():
            layer.lora_A[DEPLOYED].weight.add_(0.05 * torch.randn_like(layer.lora_A[DEPLOYED].weight))
    adapter.use_sensor(sensor)
    g = torch.Generator().manual_seed(1)
    lengths = [3, 7, 5, 2, 6, 4, 7, 3]
    prompts = [torch.randint(3, 300, (n,), generator=g) for n in lengths]
    width = max(lengths)
    input_ids = torch.stack([torch.cat([torch.full((width - len(p),), PAD), p]) for p in prompts])  # left-padded
    prompt_mask = (torch.arange(width) >= torch.tensor([width - n for n in lengths]).unsqueeze(1)).long()
    full = torch.tensor([True, False] * 4)
    pool = SamplingPassPool(adapter, EOS_IDS, PAD)
    adapter.set_row_masks(full.float(), torch.zeros(8))  # deploy rows sample with the quarantine off
    with torch.no_grad(), pool.attached():
        sequences = adapter.model.generate(
            input_ids=input_ids, attention_mask=prompt_mask, max_new_tokens=10, do_sample=True, pad_token_id=PAD
        )
    completions = _completions(sequences, width)
    pool.finish(completions, adapter.model)
    adapter.clear_row_masks()
    assert pool.problem is None
    sizes = [len(c) for c in completions]
    assert min(sizes) < 10 and max(sizes) == 10, f"need rows ending on an EOS and rows at the limit, got {sizes}"
    t_c = max(sizes)
    completion_ids = torch.tensor([c + [PAD] * (t_c - len(c)) for c in completions])
    completion_mask = (torch.arange(t_c) < torch.tensor(sizes).unsqueeze(1)).long()
    pooled_mask = completion_mask.clone()
    pooled_mask[0] = 0  # a row masked out by mask_truncated_completions pools its non-pad tokens
    acts = pool.pooled(pooled_mask)
    # Teacher-forced reference: one forward over prompt + completion in each row's sampling mode.
    ids = torch.cat([input_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    tokens = completion_pool_mask(completion_ids, pooled_mask, PAD)
    logps, expected = sampling_mode_forward(
        _logps_fn(adapter.model), adapter, adapter.model, ids, mask, t_c, full, 8, pool_mask=tokens
    )
    assert acts.shape == (8, len(adapter.sensor_names), adapter.sensor_width)
    assert acts.shape[1:] == ((2, 32) if sensor.startswith("residual") else (len(adapter.module_names), 4))
    torch.testing.assert_close(acts, expected, rtol=1e-4, atol=1e-5)  # the stated tolerance (float32)
    sampled = pool.logps(t_c)  # the sampled tokens' log-probs, read from the sampler's logits
    torch.testing.assert_close(sampled[completion_mask.bool()], logps[completion_mask.bool()], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the sampling mode matters: full-mode activations of deploy rows differ
        _, wrong = sampling_mode_forward(
            _logps_fn(adapter.model),
            adapter,
            adapter.model,
            ids,
            mask,
            t_c,
            torch.ones(8, dtype=torch.bool),
            8,
            pool_mask=tokens,
        )
    assert (acts[~full] - wrong[~full]).abs().max() > 1e-3


def test_a_module_called_twice_in_a_decode_step_makes_the_pool_unusable_not_wrong():
    """The pool folds each decode step's bottlenecks in call order; a step that calls an adapter module twice (a
    shared layer) would pool it twice, so the pool reports a problem and the trainer falls back."""
    torch.manual_seed(0)
    adapter = attach_routed_adapter(_model(), rank=4)
    name = adapter.module_names[1]
    pool = SamplingPassPool(adapter, EOS_IDS, PAD)
    again = adapter.layers[name].lora_A[DEPLOYED].register_forward_hook(lambda m, a, out: pool._add(name, out))
    input_ids = torch.randint(3, 300, (2, 4))
    with torch.no_grad(), pool.attached():
        adapter.model.generate(input_ids=input_ids, max_new_tokens=3, do_sample=True, pad_token_id=PAD)
    again.remove()
    assert pool.problem is not None and "once" in pool.problem
    with pytest.raises(RuntimeError, match="cannot be pooled"):
        pool.pooled(torch.ones(2, 3))


def _spy(t, name, records):
    original = getattr(t, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        records.append((args, kwargs, out))
        return out

    setattr(t, name, spy)


def _first_batch(t):
    t.model.train()
    return t._prepare_inputs(next(iter(t.get_train_dataloader())))


def test_zones_from_the_sampling_pass_equal_those_of_the_teacher_forced_forward(tmp_path):
    """Same seed, same rollouts: the sampling pass and the teacher-forced forward (the previous implementation,
    still the fallback) give the same gate decisions and behaviour log-probs."""
    decisions, acts = [], []
    for k, sampling_pass in enumerate((True, False)):
        t = trainer(
            tmp_path / str(k), model=_model(), gen_deploy_frac=0.5, route_tail_q=0.3, per_device_train_batch_size=16
        )
        perturb_quarantine(t.adapter)
        if not sampling_pass:
            t._new_sampling_pool = lambda: None
        records = []
        _spy(t.scorer, "flag", records)
        _first_batch(t)
        (_, batch_acts, _), _, decision = records[0]
        decisions.append(decision)
        acts.append(batch_acts)
    torch.testing.assert_close(acts[0], acts[1], rtol=1e-4, atol=1e-5)
    assert torch.equal(decisions[0].zones, decisions[1].zones)
    assert len(set(decisions[0].zones.tolist())) == 3, "the batch must hold all three zones"
    assert decisions[0].lo == pytest.approx(decisions[1].lo, abs=1e-5)


def _spy_loss(t):
    """What TRL's `_compute_loss` used: this forward's log-probs and the completed behaviour log-probs."""
    records, original = [], t._compute_loss

    def spy(model, inputs):
        loss = original(model, inputs)
        keys = ("routing_m", "routing_zone", "sampling_full", "completion_mask")
        records.append(
            {"logps": t._loss_logps.clone(), "old": inputs["old_per_token_logps"].clone()}
            | {k: inputs[k].clone() for k in keys}
        )
        return loss

    t._compute_loss = spy
    return records


@pytest.mark.parametrize("steps_per_generation", [1, 2])  # 2: TRL computes old log-probs itself
def test_matched_rows_ratio_is_exactly_one_before_the_update(tmp_path, steps_per_generation):
    t = trainer(
        tmp_path,
        model=_model(),
        gen_deploy_frac=0.5,
        route_tail_q=0.3,
        per_device_train_batch_size=16,
        steps_per_generation=steps_per_generation,
        max_steps=1,
    )
    perturb_quarantine(t.adapter)
    records = _spy_loss(t)
    t.train()
    r = records[0]  # the first micro-batch: no update yet
    matched = ~mismatched_rows(r["routing_m"], r["sampling_full"])
    tokens = r["completion_mask"].bool() & matched.unsqueeze(1)
    assert matched.any() and (~matched).any()
    rho = torch.exp(r["logps"] - r["old"])
    assert torch.equal(rho[tokens], torch.ones(int(tokens.sum()))), "bit-identical ratio of 1 on matched rows"
    assert (rho[r["completion_mask"].bool() & ~matched.unsqueeze(1)] - 1).abs().max() > 1e-3


def test_mismatched_rows_logp_old_matches_a_teacher_forced_forward_in_their_sampling_mode(tmp_path):
    """No forward at all: the sampled tokens' log-probs are read from the sampler's logits, in each row's mode."""
    t = trainer(tmp_path, model=_model(), gen_deploy_frac=0.5, route_tail_q=0.3, per_device_train_batch_size=16)
    perturb_quarantine(t.adapter)
    records = []
    _spy(t, "_generate_and_score_completions", records)
    _first_batch(t)
    out = records[0][2]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    keep = out["completion_ids"].size(1)
    with torch.no_grad():
        full_mode = GRPOTrainer._get_per_token_logps_and_entropies(t, t.model, ids, mask, keep)[0]
        with t.adapter.deployment_ablation():
            deploy_mode = GRPOTrainer._get_per_token_logps_and_entropies(t, t.model, ids, mask, keep)[0]
    full = out["sampling_full"].bool()
    mismatched = ~out["routing_logp_from_loss"]
    assert torch.equal(mismatched, mismatched_rows(out["routing_m"], full))
    assert (mismatched & full).any() and (mismatched & ~full).any(), "mismatched rows of both sampling modes"
    expected = torch.where(full.unsqueeze(1), full_mode, deploy_mode)
    other = torch.where(full.unsqueeze(1), deploy_mode, full_mode)
    tokens = out["completion_mask"].bool() & mismatched.unsqueeze(1)
    # read while sampling (KV-cached decode, float32) against the teacher-forced forward: the stated tolerance
    torch.testing.assert_close(out["old_per_token_logps"][tokens], expected[tokens], rtol=1e-5, atol=1e-5)
    assert (out["old_per_token_logps"][tokens] - other[tokens]).abs().max() > 1e-3, "the sampling mode matters"
    assert (out["old_per_token_logps"][tokens] - expected[tokens]).abs().max() > 0, "not the same computation"


@pytest.mark.parametrize("sensor", ["bottleneck", "residual:1"])
def test_trl_old_logps_forward_runs_in_sampling_modes_and_is_the_only_extra_forward(tmp_path, monkeypatch, sensor):
    """steps_per_generation > gradient_accumulation_steps: TRL computes old log-probs; that one forward (in each
    row's sampling mode) also gives the gate's activations (at the sensor), and nothing else runs a behaviour
    forward."""
    calls = []
    original = trainer_module.sampling_mode_forward

    def counted(*args, **kwargs):
        calls.append(args[3].size(0))  # rows of input_ids
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "sampling_mode_forward", counted)
    t = trainer(
        tmp_path,
        model=_model(),
        gen_deploy_frac=0.5,
        route_tail_q=0.3,
        per_device_train_batch_size=8,
        steps_per_generation=2,
        max_steps=2,
        sensor=sensor,
    )
    perturb_quarantine(t.adapter)
    pools, records = [], _spy_loss(t)
    _spy(t, "_new_sampling_pool", pools)
    t.train()
    assert calls == [16], "one forward over all rows of the generation batch (8 x 2): TRL's own"
    width = 32 if sensor.startswith("residual") else 4
    assert t.gate.buffer.acts().shape == (16, len(t.adapter.sensor_names), width)
    assert all(out is None for *_, out in pools), "no sampling-pass capture when TRL's forward pools"
    r = records[0]
    full_rows = r["sampling_full"].bool() & (r["routing_zone"] != KEEP)
    assert full_rows.any() or sensor != "bottleneck"  # the batch holds matched full rows (seen at this seed)


SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


def _count_syncs(tmp_path, monkeypatch, layers: int, hidden: int) -> int:
    t = trainer(
        tmp_path,
        model=make_model(len(TOKENIZER), layers=layers, hidden=hidden),
        gen_deploy_frac=0.5,
        route_tail_q=0.3,
        max_steps=1,
        generation_kwargs={"min_new_tokens": 10},
    )  # same decode steps
    perturb_quarantine(t.adapter)
    count = [0]
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    t.train()
    monkeypatch.undo()
    return count[0], sum(1 for _ in t.adapter.parameters(DEPLOYED)) + sum(1 for _ in t.adapter.parameters(QUARANTINE))


def test_host_synchronisations_of_a_routed_step_do_not_grow_with_the_parameters(tmp_path, monkeypatch):
    small, n_small = _count_syncs(tmp_path / "s", monkeypatch, layers=2, hidden=32)
    large, n_large = _count_syncs(tmp_path / "l", monkeypatch, layers=6, hidden=64)
    assert n_large >= 3 * n_small
    assert small > 0, "the counter must see the step's synchronisations"
    assert large == small, f"{small} host synchronisations with {n_small} block parameters, {large} with {n_large}"


def test_a_changed_trl_condition_for_old_logps_fails_loudly(tmp_path, monkeypatch):
    """The trainer copies TRL's condition for computing old log-probs; if TRL computes them where the copy says it
    does not, that forward ran in full mode for every row: refuse rather than train on it."""
    t = trainer(tmp_path, model=_model(), per_device_train_batch_size=8, steps_per_generation=2, max_steps=1)
    monkeypatch.setattr(t, "_trl_computes_old_logps", lambda: False)
    with pytest.raises(RuntimeError, match="computed old log-probs"):
        t.train()
