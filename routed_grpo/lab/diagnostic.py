"""DIAGNOSTIC upper bounds that READ GROUND-TRUTH LABELS. Never the method; never a default (DESIGN.md section 8).

Two arms, each asked for by name in a recipe (`arm: labels`, `arm: oracle_direction`), each a scorer object
(`routed_grpo.ladder.Scorer` with `diagnostic = True`) handed to `RoutedGRPOTrainer` with `routing="diagnostic"`
(which the trainer accepts only with such a scorer, and such a scorer only with it), so the method's arms
(`routed`, `placebo`) share none of this code and import none of it (`tests/test_oracle_free.py`,
`tests/test_layout.py`):

- `LabelScorer` (SGTM-style): each rollout is routed by an explicit label function that the recipe
  names (`label_source`, no default). A seeded monitor with `label_recall` (share of true positives it flags)
  and `label_fpr` (share of true negatives it flags) simulates a weaker monitor. Flagged rows go to `route`;
  the others to `label_negative_zone` (`absorb` or `keep`). The gate is not used: `routing/threshold_*` read
  0.5 (the monitor's flag is the score), `routing/buffer_size` 0, and `gate_warmup_rollouts` has no effect.
- `OracleDirectionScorer`: the same gate as `v_act` (buffer quantiles, zones), but its direction is fit on
  labelled rollouts of a separate, finished run (`oracle_rollouts`: that run's `rollouts.jsonl`, saved across its
  training by the held-out measurement): `unit(mean h[positive] - mean h[negative])` per module over a
  label-balanced sample, with the activations of this run's initial adapter on the base model (as `v_act` is
  extracted from pairs at start). The direction is written to `oracle_direction_DIAGNOSTIC.safetensors`, which
  `load_vact` refuses, so it can never be passed as a `vact_path`.

Every run directory of these arms records `diagnostic: true` with the label source and knobs (`config.yaml`), and
every report marks their rows as upper bounds.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from routed_grpo.gate import ABSORB, KEEP, ROUTE, GateDecision, masks_from_zones, zone_fractions
from routed_grpo.ladder import DirectionScorer, Scorer
from routed_grpo.trainer import RoutedGRPOTrainer
from routed_grpo.utils import atomic_path
from routed_grpo.vact import pooled_completion_activations, unit_mean_difference

DIAGNOSTIC_ARMS = ("labels", "oracle_direction")
NEGATIVE_ZONES = {"absorb": ABSORB, "keep": KEEP}
ORACLE_FILE = "oracle_direction_DIAGNOSTIC.safetensors"
ORACLE_KEY = "oracle_direction_DIAGNOSTIC"
LabelFn = Callable[..., list[float]]


def noisy_monitor(truth: torch.Tensor, recall: float, fpr: float, generator: torch.Generator) -> torch.Tensor:
    """A simulated monitor: flags each true positive with probability `recall`, each negative with `fpr`. (N,) bool."""
    if not (0.0 <= recall <= 1.0 and 0.0 <= fpr <= 1.0):
        raise ValueError(f"label_recall and label_fpr must be in [0, 1]; got {recall}, {fpr}")
    u = torch.rand(truth.shape, generator=generator)
    return torch.where(truth.bool(), u < recall, u < fpr)


class _LastCall:
    """Memoises the latest call of a labeler, so the label arm's routing and its `measure/` logging of the same
    batch run the sandbox once."""

    def __init__(self, fn: Callable[..., dict[str, list[float]]]):
        self.fn, self._key, self._out = fn, None, None

    def __call__(self, **kw) -> dict[str, list[float]]:
        key = json.dumps([kw.get("completions"), kw.get("problem_id"), kw.get("loophole")], default=str)
        if key != self._key:
            self._key, self._out = key, self.fn(**kw)
        return self._out


def resolve_label_fn(label_source: str | None, labeler: Callable | None) -> LabelFn:
    """`label_source` -> a function `(prompts, completions, **columns) -> [0./1. ...]`.

    `measure:<key>`: the environment's measurement label `<key>` (`sandbox.labels.LABEL_KEYS`, e.g. `hack_strict`)
    from `labeler` (a `sandbox.labels.MeasurementLabeler`); `module.path:function`: a user function with the
    signature of a TRL reward function returning 0/1 floats.
    """
    if not label_source:
        raise ValueError(
            "the DIAGNOSTIC label arms need an explicit label_source (e.g. 'measure:hack_strict'); there is no default"
        )
    kind, sep, name = label_source.partition(":")
    if not sep or not name:
        raise ValueError(f"label_source must be 'measure:<key>' or 'module:function', got {label_source!r}")
    if kind == "measure":
        from sandbox.labels import LABEL_KEYS

        if name not in LABEL_KEYS:
            raise ValueError(f"label_source {label_source!r}: unknown label {name!r} (known: {', '.join(LABEL_KEYS)})")
        return lambda **kw: labeler(**kw)[name]
    try:
        fn = getattr(importlib.import_module(kind), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"label_source {label_source!r}: cannot import {name!r} from {kind!r} ({err})") from None
    if not callable(fn):
        raise ValueError(f"label_source {label_source!r} is not callable")
    return fn


class LabelScorer(Scorer):
    """DIAGNOSTIC: zones from a (simulated) label monitor instead of the gate. Upper bound, reads labels."""

    diagnostic = True

    def __init__(self, label_fn: LabelFn, label_recall=1.0, label_fpr=0.0, label_negative_zone="absorb", seed=0):
        if label_fn is None:
            raise ValueError("the DIAGNOSTIC label scorer needs an explicit label_fn")
        if label_negative_zone not in NEGATIVE_ZONES:
            raise ValueError(
                f"label_negative_zone must be one of {tuple(NEGATIVE_ZONES)}, got {label_negative_zone!r}"
            )
        self.label_fn, self.label_recall, self.label_fpr = label_fn, float(label_recall), float(label_fpr)
        self.negative_zone = NEGATIVE_ZONES[label_negative_zone]
        self.seed = seed
        self._monitor_rng: torch.Generator | None = None  # seeded per process at the first batch

    def flag(self, trainer, acts: torch.Tensor, rollouts) -> GateDecision:
        if self._monitor_rng is None:
            self._monitor_rng = torch.Generator().manual_seed(self.seed + trainer.accelerator.process_index)
        prompts, completions, columns = rollouts()
        truth = torch.tensor(self.label_fn(prompts=prompts, completions=completions, **columns)) > 0.5  # (N,)
        flagged = noisy_monitor(truth, self.label_recall, self.label_fpr, self._monitor_rng)
        zones = torch.where(flagged, ROUTE, self.negative_zone).to(acts.device)
        m, d = masks_from_zones(zones)
        metrics = trainer._metrics["train"]
        all_truth = trainer.accelerator.gather(truth.to(acts.device))
        all_flagged = trainer.accelerator.gather(flagged.to(acts.device))
        metrics["diagnostic/label_rate"].append(all_truth.float().mean().item())
        n_true = all_truth.sum().clamp_min(1)
        metrics["diagnostic/monitor_recall"].append(((all_flagged & all_truth).sum() / n_true).item())
        all_zones = trainer.accelerator.gather(zones)
        # score = the monitor's flag, threshold 0.5; the gate's buffer is not used
        return GateDecision(flagged.float().to(acts.device), zones, m, d, 0.5, 0.5, 0, zone_fractions(all_zones))


class OracleDirectionScorer(DirectionScorer):
    """DIAGNOSTIC: the label-free gate with a direction fit on labelled rollouts of another run. Upper bound."""

    diagnostic = True

    def __init__(self, direction: torch.Tensor):
        if direction is None:
            raise ValueError("the DIAGNOSTIC oracle-direction scorer needs an explicit direction")
        super().__init__(direction)


# ---- the oracle direction ------------------------------------------------------------------------------------------
def read_rollouts(path: str | Path) -> list[dict[str, Any]]:
    """The `rollouts.jsonl` of a finished run (held-out rollouts with labels, saved across its training)."""
    path = Path(path)
    if path.is_dir():
        path = path / "rollouts.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no rollouts (a finished run with measure_every > 0 writes rollouts.jsonl)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: not a JSON object ({err})") from None
    return rows


def balanced_sample(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of all minority-class rows and as many randomly chosen majority-class rows, sorted."""
    pos, neg = labels.nonzero().flatten(), (~labels).nonzero().flatten()
    n = min(pos.numel(), neg.numel())
    if n == 0:
        raise ValueError(f"the rollouts hold {pos.numel()} positives and {neg.numel()} negatives; need both")
    pick = [x[torch.randperm(x.numel(), generator=generator)[:n]] for x in (pos, neg)]
    return torch.cat(pick).sort().values


def fit_oracle_direction(
    adapter, tokenizer, rollouts: list[dict], label: str = "hack_strict", seed: int = 0, mode: str = "full"
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per sensor site unit(mean h[pos] - mean h[neg]) over a label-balanced sample of `rollouts` in sampling `mode`,
    at the adapter's sensor."""
    rows = [r for r in rollouts if r.get("mode", "full") == mode]
    if not rows or label not in rows[0].get("labels", {}):
        raise ValueError(f"no {mode}-mode rollouts with the label {label!r}")
    y = torch.tensor([bool(r["labels"][label]) for r in rows])
    idx = balanced_sample(y, torch.Generator().manual_seed(seed)).tolist()
    acts = pooled_completion_activations(
        adapter, tokenizer, [rows[i]["prompt"] for i in idx], [rows[i]["completion"] for i in idx], mode=mode
    )  # (2n, M, r)
    pos = torch.tensor([bool(y[i]) for i in idx])
    diff = acts[pos].mean(0, keepdim=True) - acts[~pos].mean(0, keepdim=True)  # (1, M, r)
    direction = unit_mean_difference(diff, torch.zeros_like(diff), adapter.sensor_names)
    steps = sorted({int(rows[i].get("step", 0)) for i in idx})
    info = {
        "label": label,
        "n_fit": len(idx),
        "n_available": len(rows),
        "n_positive": int(y.sum()),
        "steps": steps,
        "mode": mode,
        "seed": seed,
        "sensor": adapter.sensor.spec,
    }
    return direction, info


def save_oracle_direction(path: str | Path, direction: torch.Tensor, info: dict[str, Any]) -> Path:
    """Write under the DIAGNOSTIC key (not `vact`), so `load_vact` refuses the file."""
    meta = {"kind": "DIAGNOSTIC oracle direction", **{k: json.dumps(v) for k, v in info.items()}}
    with atomic_path(path) as tmp:
        save_file({ORACLE_KEY: direction.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    return Path(path)


def build_diagnostic_trainer(script, training, model, tokenizer, train_dataset, train_problems, reward, measure):
    """The DIAGNOSTIC arm's trainer (`script.arm` is `labels` or `oracle_direction`); `measure` may be None."""
    from sandbox.labels import MeasurementLabeler

    common = dict(train_dataset=train_dataset, processing_class=tokenizer)
    if script.arm == "labels":
        labeler = _LastCall(MeasurementLabeler(train_problems, workers=script.sandbox_workers))
        scorer = LabelScorer(
            resolve_label_fn(script.label_source, labeler),
            script.label_recall,
            script.label_fpr,
            script.label_negative_zone,
            script.label_seed,
        )
        measure_fn = labeler if measure is not None else None
        return RoutedGRPOTrainer(model, reward, training, **common, measure_fn=measure_fn, scorer=scorer)
    if script.arm != "oracle_direction":
        raise ValueError(f"not a DIAGNOSTIC arm: {script.arm!r}")
    from routed_grpo.routing_state import routed_adapter

    adapter = routed_adapter(model, training, tokenizer)  # at the run's adapter_init
    adapter.use_sensor(training.sensor)  # the direction is fit at the sensor the gate will read
    direction, info = fit_oracle_direction(
        adapter, tokenizer, read_rollouts(script.oracle_rollouts), script.oracle_label, seed=training.seed
    )
    info["source"] = str(script.oracle_rollouts)
    save_oracle_direction(Path(training.output_dir) / ORACLE_FILE, direction, info)
    scorer = OracleDirectionScorer(direction)
    return RoutedGRPOTrainer(adapter.model, reward, training, **common, measure_fn=measure, scorer=scorer)
