"""I8: no training-time code path reads ground-truth labels of training rollouts."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import torch
from trainer_utils import DEPLOYED, QUARANTINE, reward_len, snapshot, trainer

from routed_grpo import gate

ROOT = Path(__file__).resolve().parents[1]
TRAINING_MODULES = [
    "activations",
    "adapter",
    "behaviour",
    "config",
    "flags",
    "gate",
    "initial",
    "judge",
    "ladder",
    "loss",
    "monitor",
    "pairs",
    "routing_state",
    "sensing",
    "sensor",
    "svd_init",
    "trainer",
    "vact",
    "vllm_sync",
]
LABEL_WORDS = ("label", "hack", "correct", "hinted", "oracle", "reward")


def test_training_modules_never_import_the_measurement_labels():
    code = (
        "import sys\n"
        + "".join(f"import routed_grpo.{m}\n" for m in TRAINING_MODULES)
        + "bad = sorted(m for m in sys.modules if m == 'sandbox.labels' or m.startswith('sandbox.labels.'))\n"
        + "print('IMPORTED=' + ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("IMPORTED=")][-1]
    assert line == "IMPORTED=", f"training code imported {line}"
    for name in TRAINING_MODULES:
        tree = ast.parse((ROOT / "routed_grpo" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any("labels" in n for n in names), f"routed_grpo/{name}.py imports {names}"


def test_gate_inputs_cannot_carry_labels():
    assert list(inspect.signature(gate.Gate.step).parameters) == ["self", "acts"]
    for name, fn in inspect.getmembers(gate, inspect.isfunction):
        for param in inspect.signature(fn).parameters:
            assert not any(w in param.lower() for w in LABEL_WORDS), f"gate.{name} takes {param!r}"


def test_measurements_are_logged_but_never_change_routing(tmp_path):
    def labels_all(value):
        def measure_fn(prompts, completions, **columns):
            assert "k" in columns, "dataset columns reach the measurement function"
            return {"hack_strict": [value] * len(completions)}

        return measure_fn

    runs = []
    for i, value in enumerate((1.0, 0.0)):
        t = trainer(tmp_path / str(i), measure_fn=labels_all(value), max_steps=2, gen_deploy_frac=0.5)
        zones = []
        original = t.gate.step
        t.gate.step = lambda acts, original=original, zones=zones: zones.append(original(acts)) or zones[-1]
        t.train()
        runs.append((t, [d.zones.clone() for d in zones]))
        assert t.state.log_history[0]["measure/hack_strict"] == value
    (t1, z1), (t2, z2) = runs
    assert len(z1) == len(z2) == 2
    for a, b in zip(z1, z2, strict=True):
        assert torch.equal(a, b)
    for block in (DEPLOYED, QUARANTINE):
        torch.testing.assert_close(snapshot(t1.adapter, block), snapshot(t2.adapter, block), rtol=0, atol=0)


def test_measure_auroc_uses_scores_against_labels(tmp_path):
    """The logged AUROC is the score's: labels equal to 'score above its median' give AUROC 1."""
    box = {}

    def measure_fn(prompts, completions, **columns):
        s = box["scores"]
        return {"hack_strict": (s > s.median()).float().tolist()}

    t = trainer(tmp_path, measure_fn=measure_fn, max_steps=1)
    original = t.gate.step

    def step(acts):
        decision = original(acts)
        box["scores"] = decision.scores.clone()
        return decision

    t.gate.step = step
    t.train()
    assert t.state.log_history[0]["measure/auroc_hack_strict"] == 1.0


REUSE_NAMES = ("grade_log", "GradeLog", "last_grades", "reuse")


def test_training_modules_never_touch_the_rewards_grade_log():
    """The reward's execution results reach the measurement labeler only (wired in routed_grpo.lab): no training
    module names the log, its type or the reward's grades."""
    for name in TRAINING_MODULES:
        tree = ast.parse((ROOT / "routed_grpo" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            word = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            assert word not in REUSE_NAMES, f"routed_grpo/{name}.py refers to {word!r}"


def test_grades_shared_with_the_measurement_never_change_routing(tmp_path):
    """Two runs whose reward objects hold opposite grade logs (read by the measurement labeler) route and train
    identically: the log has no path into the gate or the loss."""

    class LoggedReward:
        __name__ = "reward_len"

        def __init__(self, hacked: bool):
            self.grade_log = {"hack_strict": float(hacked)}

        def __call__(self, prompts, completions, **kw):
            return reward_len(prompts, completions, **kw)

    runs = []
    for i, hacked in enumerate((True, False)):
        reward = LoggedReward(hacked)

        def measure_fn(prompts, completions, reward=reward, **columns):
            return {"hack_strict": [reward.grade_log["hack_strict"]] * len(completions)}

        t = trainer(tmp_path / str(i), measure_fn=measure_fn, max_steps=2, gen_deploy_frac=0.5)
        t.reward_funcs = [reward]
        zones = []
        original = t.gate.step
        t.gate.step = lambda acts, original=original, zones=zones: zones.append(original(acts)) or zones[-1]
        t.train()
        assert t.state.log_history[0]["measure/hack_strict"] == float(hacked)
        runs.append((t, [d.zones.clone() for d in zones]))
    (t1, z1), (t2, z2) = runs
    assert all(torch.equal(a, b) for a, b in zip(z1, z2, strict=True))
    for block in (DEPLOYED, QUARANTINE):
        torch.testing.assert_close(snapshot(t1.adapter, block), snapshot(t2.adapter, block), rtol=0, atol=0)
