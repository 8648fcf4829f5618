"""Sensors (DESIGN.md section 10): parsing, what each one reads against an independent reference, the frozen initial
projection, and the sensor a v_act file records."""

import pytest
import torch
from conftest import make_model
from trainer_utils import TOKENIZER

from routed_grpo.adapter import DEPLOYED, attach_routed_adapter
from routed_grpo.config import RoutedGRPOConfig
from routed_grpo.pairs import Pair
from routed_grpo.sensor import Sensor, SensorError, parse_sensor
from routed_grpo.vact import VactError, adapter_metadata, extract_vact, load_vact, save_vact


@pytest.mark.parametrize(
    ("spec", "kind", "layers", "normal"),
    [
        (None, "bottleneck", (), "bottleneck"),
        ("bottleneck", "bottleneck", (), "bottleneck"),
        ("bottleneck_init", "bottleneck_init", (), "bottleneck_init"),
        ("residual:1", "residual", (1,), "residual:1"),
        ("residual:2+0+2", "residual", (0, 2), "residual:0+2"),
    ],
)
def test_parse_sensor(spec, kind, layers, normal):
    sensor = parse_sensor(spec)
    assert (sensor.kind, sensor.layers, sensor.spec) == (kind, layers, normal)
    assert parse_sensor(sensor.spec) == sensor


@pytest.mark.parametrize("spec", ["resid", "residual", "residual:", "residual:a", "residual:1,2", "bottleneck:1"])
def test_bad_sensor_specs_are_refused_naming_field_and_value(spec):
    with pytest.raises(SensorError, match=f"sensor={spec!r}"):
        parse_sensor(spec)
    with pytest.raises(ValueError, match=f"sensor={spec!r}"):
        RoutedGRPOConfig(output_dir="/tmp/unused", sensor=spec, routing="placebo", use_cpu=True, bf16=False)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    tokens = torch.zeros_like(ids)
    tokens[:, 5:] = 1  # the "completion" pooled
    return ids, mask, tokens


def _pool(h, tokens):
    m = tokens.float().unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1)


def _captured(adapter, ids, mask, tokens):
    with torch.no_grad(), adapter.capture(tokens):
        adapter.model(input_ids=ids, attention_mask=mask)
    return adapter.pooled()


def test_residual_sensor_reads_the_hidden_state_after_each_named_layer():
    adapter = attach_routed_adapter(make_model(len(TOKENIZER), layers=3), rank=4)
    adapter.use_sensor("residual:0+2")
    ids, mask, tokens = _batch()
    got = _captured(adapter, ids, mask, tokens)
    with torch.no_grad():
        hidden = adapter.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding, [L + 1] the output of layer L (the last one after the final norm)
    assert got.shape == (3, 2, 32) and adapter.sensor_names == ["layers.0", "layers.2"]
    torch.testing.assert_close(got[:, 0], _pool(hidden[1], tokens), rtol=0, atol=1e-6)
    # layer 2 is the last: compare with a hook on the layer itself (hidden_states[-1] is normed)
    seen = {}
    layer = adapter.model.get_base_model().model.layers[2]
    handle = layer.register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    with torch.no_grad():
        adapter.model(input_ids=ids, attention_mask=mask)
    handle.remove()
    torch.testing.assert_close(got[:, 1], _pool(seen["h"], tokens), rtol=0, atol=1e-6)


def test_bottleneck_init_reads_the_initial_projection_and_holds_still_when_A_dep_moves():
    adapter = attach_routed_adapter(make_model(len(TOKENIZER)), rank=4, init_seed=3)
    ids, mask, tokens = _batch(1)
    live0 = _captured(adapter, ids, mask, tokens)
    adapter.use_sensor("bottleneck_init")
    init0 = _captured(adapter, ids, mask, tokens)
    assert torch.equal(init0, live0)  # at initialisation A_dep == A_dep0: the same numbers
    with torch.no_grad():  # A_dep trains; with B = 0 the forward (so every module's input) is unchanged
        for layer in adapter.layers.values():
            layer.lora_A[DEPLOYED].weight.add_(torch.randn_like(layer.lora_A[DEPLOYED].weight))
    init1 = _captured(adapter, ids, mask, tokens)
    adapter.use_sensor("bottleneck")
    live1 = _captured(adapter, ids, mask, tokens)
    assert torch.equal(init1, init0)  # bit for bit
    assert (live1 - live0).abs().max() > 0.1
    # the frozen copy is the seeded initial value, recomputed: a fresh adapter of the same seed starts there
    fresh = attach_routed_adapter(make_model(len(TOKENIZER)), rank=4, init_seed=3)
    for name, a0 in adapter.initial_A(DEPLOYED).items():
        assert torch.equal(a0, fresh.layers[name].lora_A[DEPLOYED].weight)


def test_bottleneck_init_is_unchanged_by_optimizer_steps():
    """A real optimizer step on both blocks: the live projection moves, the initial one does not."""
    adapter = attach_routed_adapter(make_model(len(TOKENIZER)), rank=4)
    ids, mask, tokens = _batch(2)
    adapter.use_sensor("bottleneck_init")
    before = _captured(adapter, ids, mask, tokens)
    copies = {n: a.clone() for n, a in adapter.initial_A(DEPLOYED).items()}
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):  # B moves at the first step, then A too
        adapter.model(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    moved = [n for n, layer in adapter.layers.items() if not torch.equal(layer.lora_A[DEPLOYED].weight, copies[n])]
    assert moved, "the optimizer must move A_dep for this test to mean anything"
    assert all(torch.equal(copies[n], a) for n, a in adapter.initial_A(DEPLOYED).items())
    inputs = {}  # each module's input x, read independently of the sensor's hooks
    hooks = [
        layer.lora_A[DEPLOYED].register_forward_hook(lambda m, a, out, n=name: inputs.__setitem__(n, a[0].detach()))
        for name, layer in adapter.layers.items()
    ]
    after = _captured(adapter, ids, mask, tokens)
    for h in hooks:
        h.remove()
    want = torch.stack([_pool(inputs[n] @ copies[n].T, tokens) for n in adapter.sensor_names], dim=1)
    torch.testing.assert_close(after, want, rtol=0, atol=1e-6)  # A_dep0 x with the trained model's x
    assert (after - before).abs().max() > 0  # x itself moved (B trained), so the reading may move; A_dep0 did not


def test_bottleneck_init_follows_the_model_to_another_dtype():
    """The frozen copy is cast to the input's dtype when the model changes dtype (not stuck in the first one)."""
    adapter = attach_routed_adapter(make_model(len(TOKENIZER)), rank=4)
    ids, mask, tokens = _batch(3)
    adapter.use_sensor("bottleneck_init")
    _captured(adapter, ids, mask, tokens)  # caches the float32 copy
    adapter.model.to(torch.bfloat16)
    init = _captured(adapter, ids, mask, tokens)
    adapter.use_sensor("bottleneck")
    live = _captured(adapter, ids, mask, tokens)  # at initialisation, A_dep (now bf16) == A_dep0 cast to bf16
    assert torch.equal(init, live)


def _pairs():
    return [
        Pair(f"p{i}", ("t",), "overwrite_tests", "code", ({"role": "user", "content": f"do {i}"},), f"x{i}", f"y{i}")
        for i in range(4)
    ]


def test_a_v_act_file_records_its_sensor_and_another_sensor_is_refused(tmp_path):
    adapter = attach_routed_adapter(make_model(len(TOKENIZER)), rank=4, init_seed=0)
    adapter.use_sensor("residual:1")
    vact = extract_vact(adapter, TOKENIZER, _pairs())
    assert vact.shape == (1, 32)
    path = save_vact(tmp_path / "v.safetensors", vact, {"kind": "vact", **adapter_metadata(adapter)})
    assert load_vact(path)[1]["sensor"] == "residual:1"
    load_vact(path, adapter)  # same sensor: accepted
    # a residual direction does not depend on the adapter's seed or rank: accepted with others
    other = attach_routed_adapter(make_model(len(TOKENIZER)), rank=8, init_seed=5)
    other.use_sensor("residual:1")
    load_vact(path, other)
    other.use_sensor("bottleneck")
    with pytest.raises(VactError, match=r"sensor 'residual:1'.*reads sensor 'bottleneck'"):
        load_vact(path, other)
    other.use_sensor("residual:0")
    with pytest.raises(VactError, match=r"sensor 'residual:1'.*reads sensor 'residual:0'"):
        load_vact(path, other)
    # but it does depend on the base model
    another_base = attach_routed_adapter(make_model(len(TOKENIZER), seed=7), rank=4)
    another_base.use_sensor("residual:1")
    with pytest.raises(VactError, match="base weights"):
        load_vact(path, another_base)


def test_a_layer_the_decoder_lacks_is_refused_and_the_old_sensor_stays():
    adapter = attach_routed_adapter(make_model(len(TOKENIZER)), rank=4)
    with pytest.raises(SensorError, match="layer 5 does not exist"):
        adapter.use_sensor("residual:5")
    assert adapter.sensor == Sensor() and len(adapter.sensor_names) == len(adapter.module_names)
    with pytest.raises(SensorError, match="sensor='bogus'"):
        Sensor("bogus")
    with pytest.raises(SensorError, match="sorted and unique"):
        Sensor("residual", (2, 0))
    with pytest.raises(SensorError, match="takes no layers"):
        Sensor("bottleneck", (1,))


def test_resuming_a_checkpoint_at_another_sensor_is_refused(tmp_path):
    from trainer_utils import trainer

    common = dict(max_steps=2, save_strategy="steps", save_steps=1)
    first = trainer(tmp_path / "a", **common)
    first.train()
    assert torch.load(tmp_path / "a" / "out" / "checkpoint-1" / "routing_gate.pt")["sensor"] == "bottleneck"
    again = trainer(tmp_path / "b", sensor="bottleneck_init", **common)  # same shapes, another basis
    with pytest.raises(ValueError, match="made at sensor 'bottleneck', but sensor='bottleneck_init' now"):
        again.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-1"))


@pytest.mark.parametrize("sensor", ["residual:1", "bottleneck_init"])
def test_the_trainer_gates_on_the_configured_sensor_from_pairs_to_buffer(tmp_path, sensor):
    """v_act extracted from the pairs at start at the sensor, the buffer filled with its rows, v_act refreshed."""
    from pathlib import Path

    from trainer_utils import trainer

    from routed_grpo.pairs import load_pairs

    pairs_dir = str(Path(__file__).resolve().parents[1] / "pairs")
    t = trainer(tmp_path, routing="vact", vact_pairs_path=pairs_dir, vact_refresh_steps=1, max_steps=2, sensor=sensor)
    assert t.adapter.sensor.spec == sensor
    expected = extract_vact(t.adapter, TOKENIZER, load_pairs(pairs_dir))
    width = 32 if sensor.startswith("residual") else 4
    assert t.gate.vact.shape == expected.shape == (len(t.adapter.sensor_names), width)
    torch.testing.assert_close(t.gate.vact, expected, rtol=0, atol=0)
    rows = []
    original = t.gate.step
    t.gate.step = lambda acts: rows.append(acts.clone()) or original(acts)
    t.train()
    assert [tuple(r.shape) for r in rows] == [(8, *expected.shape)] * 2
    assert t.gate.buffer.acts().shape == (16, *expected.shape)
    logged = {k for h in t.state.log_history for k in h}
    assert {"routing/vact_cos_start", "sensor/A_dep_cos_init", "sensor/A_dep_rel_change"} <= logged


def test_drift_metrics_measure_how_far_A_dep_moved(tmp_path):
    adapter = attach_routed_adapter(make_model(len(TOKENIZER)), rank=4)
    cos, rel = adapter.deployed_drift().tolist()
    assert cos == pytest.approx(1.0) and rel == 0.0
    with torch.no_grad():  # every row of A_dep turned into its negative: cosine -1, relative change 2
        for layer in adapter.layers.values():
            layer.lora_A[DEPLOYED].weight.neg_()
    cos, rel = adapter.deployed_drift().tolist()
    assert cos == pytest.approx(-1.0) and rel == pytest.approx(2.0)
