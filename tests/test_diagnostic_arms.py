"""The DIAGNOSTIC label-reading arms: explicit label sources, the simulated monitor, label routing, the oracle
direction fit, and the structural separation from the method's arms (routed, placebo)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model
from trainer_utils import TOKENIZER, config, dataset, reward_len, trainer

from routed_grpo.gate import ABSORB, KEEP, ROUTE
from routed_grpo.lab import diagnostic
from routed_grpo.lab.diagnostic import (
    LabelScorer,
    OracleDirectionScorer,
    balanced_sample,
    fit_oracle_direction,
    noisy_monitor,
    resolve_label_fn,
    save_oracle_direction,
)
from routed_grpo.lab.experiment import ExperimentArguments
from routed_grpo.ladder import DirectionScorer
from routed_grpo.sensor import Sensor
from routed_grpo.trainer import RoutedGRPOTrainer
from routed_grpo.vact import VactError, load_vact

PAIRS = Path(__file__).resolve().parents[1] / "pairs" / "organism"


def _parity_labels(prompts, completions, **columns):
    """Label = parity of the rollout's position in the batch: a deterministic stand-in for a monitor."""
    return [float(i % 2) for i in range(len(completions))]


def _label_trainer(tmp_path, **kw):
    kw.setdefault("label_fn", _parity_labels)
    args = config(tmp_path, routing="diagnostic", max_steps=1, learning_rate=0.0)
    return RoutedGRPOTrainer(
        model=make_model(len(TOKENIZER)),
        reward_funcs=reward_len,
        args=args,
        train_dataset=dataset(),
        processing_class=TOKENIZER,
        scorer=LabelScorer(**kw),
    )


def _spy_zones(t):
    seen, original = [], t.scorer.flag

    def spy(trainer, acts, rollouts):
        decision = original(trainer, acts, rollouts)
        seen.append((decision, rollouts()[1]))
        return decision

    t.scorer.flag = spy
    return seen


@pytest.mark.parametrize("negative, zone", [("absorb", ABSORB), ("keep", KEEP)])
def test_label_arm_routes_exactly_the_flagged_rows(tmp_path, negative, zone):
    t = _label_trainer(tmp_path, label_negative_zone=negative)
    seen = _spy_zones(t)
    t.train()
    ((decision, rows),) = seen
    want = torch.tensor([ROUTE if i % 2 else zone for i in range(len(rows))])
    assert torch.equal(decision.zones.cpu(), want)
    assert torch.equal(decision.m.cpu(), (want != KEEP).float()) and torch.equal(
        decision.d.cpu(), (want == ROUTE).float()
    )
    assert t.state.log_history[0]["diagnostic/monitor_recall"] == 1.0


def test_monitor_recall_and_false_positive_rate():
    truth = torch.arange(20000) % 2 == 0
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(noisy_monitor(truth, 1.0, 0.0, gen), truth)
    flagged = noisy_monitor(truth, 0.7, 0.1, gen)
    assert abs(flagged[truth].float().mean().item() - 0.7) < 0.02
    assert abs(flagged[~truth].float().mean().item() - 0.1) < 0.02
    again = noisy_monitor(truth, 0.7, 0.1, torch.Generator().manual_seed(5))
    assert torch.equal(again, noisy_monitor(truth, 0.7, 0.1, torch.Generator().manual_seed(5))), "seeded"
    with pytest.raises(ValueError, match="label_recall"):
        noisy_monitor(truth, 1.5, 0.0, gen)


def test_label_arms_refuse_to_start_without_an_explicit_source(tmp_path):
    with pytest.raises(ValueError, match="needs an explicit label_source"):
        ExperimentArguments(arm="labels")
    with pytest.raises(ValueError, match="needs an explicit oracle_rollouts"):
        ExperimentArguments(arm="oracle_direction")
    with pytest.raises(ValueError, match="read only by a DIAGNOSTIC arm"):
        ExperimentArguments(arm="routed", label_source="measure:hack_strict")
    with pytest.raises(ValueError, match="explicit label_source"):
        resolve_label_fn(None, None)
    with pytest.raises(ValueError, match="unknown label"):
        resolve_label_fn("measure:hackz", None)
    with pytest.raises(ValueError, match="cannot import"):
        resolve_label_fn("no_such_module:fn", None)
    with pytest.raises(ValueError, match="explicit label_fn"):
        LabelScorer(None)


def test_diagnostic_routing_and_a_diagnostic_scorer_need_each_other(tmp_path):
    def build(routing, scorer):
        return RoutedGRPOTrainer(
            model=make_model(len(TOKENIZER)),
            reward_funcs=reward_len,
            args=config(tmp_path, routing=routing),
            train_dataset=dataset(),
            processing_class=TOKENIZER,
            scorer=scorer,
        )

    with pytest.raises(ValueError, match="reserved for the DIAGNOSTIC scorers"):
        build("diagnostic", None)  # the method's trainer alone never routes by labels
    with pytest.raises(ValueError, match="reserved for the DIAGNOSTIC scorers"):
        build("placebo", LabelScorer(_parity_labels))  # a label scorer never runs under a method's name
    with pytest.raises(ValueError, match="brings its own direction under routing='placebo'"):
        build("placebo", DirectionScorer(torch.ones(14, 4)))  # nor a direction from elsewhere
    with pytest.raises(ValueError, match="handed in with routing='none'"):
        build("none", DirectionScorer())


def test_balanced_sample_takes_every_minority_row():
    labels = torch.tensor([True, False, False, False, True, False])
    idx = balanced_sample(labels, torch.Generator().manual_seed(0))
    assert labels[idx].sum() == 2 and (~labels[idx]).sum() == 2 and {0, 4} <= set(idx.tolist())
    with pytest.raises(ValueError, match="need both"):
        balanced_sample(torch.zeros(4, dtype=torch.bool), torch.Generator())


def test_oracle_direction_separates_the_labelled_rollouts(tmp_path, monkeypatch):
    """Planted activations: hack rollouts are shifted along a known direction; the fit recovers it."""
    planted = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    rows = [{"prompt": [], "completion": f"c{i}", "mode": "full", "step": i // 10,
             "labels": {"hack_strict": float(i % 3 == 0)}} for i in range(60)]  # fmt: skip

    def acts(adapter, tokenizer, prompts, completions, mode):
        out = torch.randn(len(completions), 3, 4, generator=torch.Generator().manual_seed(2)) * 0.1
        hack = torch.tensor([int(c[1:]) % 3 == 0 for c in completions])
        return out + hack[:, None, None] * planted

    monkeypatch.setattr(diagnostic, "pooled_completion_activations", acts)
    adapter = type("A", (), {"sensor_names": ["a", "b", "c"], "sensor": Sensor()})()
    direction, info = fit_oracle_direction(adapter, None, rows, seed=0)
    assert torch.nn.functional.cosine_similarity(direction, planted, dim=-1).min() > 0.95
    assert info["n_fit"] == 40 and info["n_positive"] == 20 and info["steps"] == [0, 1, 2, 3, 4, 5]
    assert info["sensor"] == "bottleneck"
    path = save_oracle_direction(tmp_path / diagnostic.ORACLE_FILE, direction, info)
    with pytest.raises(VactError, match="no 'vact' tensor"):
        load_vact(path)  # never usable as a vact_path


def test_oracle_trainer_uses_the_given_direction_in_the_gate(tmp_path):
    direction = torch.nn.functional.normalize(torch.randn(14, 4), dim=-1)
    t = RoutedGRPOTrainer(
        model=make_model(len(TOKENIZER)),
        reward_funcs=reward_len,
        args=config(tmp_path, routing="diagnostic"),
        train_dataset=dataset(),
        processing_class=TOKENIZER,
        scorer=OracleDirectionScorer(direction),
    )
    assert tuple(t.gate.vact.shape) == tuple(direction.shape)
    torch.testing.assert_close(t.gate.vact.cpu(), direction)


@pytest.mark.parametrize("routing, init", [("vact", "random"), ("placebo", "random"), ("placebo", "signed")])
def test_method_arms_never_reach_label_code(tmp_path, monkeypatch, routing, init):
    """I8 for the arms of the method: with every label function of the environment and every function of the
    DIAGNOSTIC module made to raise, routed and placebo still train (the signed adapter init reads the pairs only),
    and neither module gets imported."""
    for name in [n for n in dir(diagnostic) if callable(getattr(diagnostic, n)) and not n[0].isupper()]:
        monkeypatch.setattr(diagnostic, name, _forbidden(f"routed_grpo.lab.diagnostic.{name}"))
    import sandbox.labels as labels

    for name in ("label_many", "label_completion", "with_run_tests"):
        monkeypatch.setattr(labels, name, _forbidden(f"sandbox.labels.{name}"))
    monkeypatch.setattr(labels.MeasurementLabeler, "__call__", _forbidden("MeasurementLabeler"))
    extra = {"vact_pairs_path": str(PAIRS)} if routing == "vact" or init != "random" else {}
    t = trainer(tmp_path, routing=routing, max_steps=1, adapter_init=init, **extra)
    assert t.adapter.adapter_init == init
    t.train()
    assert "routing/zone_frac/route" in t.state.log_history[0]


def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"the method's arm reached label code: {name}")

    return fail


def test_core_trainer_modules_do_not_import_the_diagnostic_module():
    code = (
        "import sys, routed_grpo.trainer, routed_grpo.gate, routed_grpo.config\n"
        "print('LOADED', sorted(m for m in sys.modules if m.startswith('routed_grpo.lab') or m == 'sandbox.labels'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "LOADED []"
