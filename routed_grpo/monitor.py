"""A monitor as a scorer (DESIGN.md section 10): `monitor_fn(prompts, completions) -> list[float]`, one score per
rollout, flagged at `score >= threshold`.

The monitor sees the prompt and the completion only, never the dataset's other columns, so a monitor that is
generic (`routed_grpo.judge.LLMJudge`, or any function that does not read this environment's labels) keeps the
arm oracle-free. A score of None or NaN means the monitor could not score the rollout: it is not flagged, counted in
`monitor/unscored`, and past `max_unscored_frac` of all rollouts so far the run stops (`MonitorError`), as the
sandbox does with its infrastructure errors; never a silent 0.

Flagged rows go to the `route` zone, the others to `negative_zone` (`absorb` by default, as the label arm: both
blocks train on them under `route`; `penalty` and `screen` read only the flags). The gate's buffer is not used:
`routing/threshold_*` read the monitor's threshold and `routing/buffer_size` 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from routed_grpo.gate import ABSORB, KEEP, ROUTE, GateDecision, masks_from_zones, zone_fractions
from routed_grpo.ladder import RolloutsFn, Scorer

if TYPE_CHECKING:
    from routed_grpo.trainer import RoutedGRPOTrainer

MonitorFn = Callable[[list, list], Sequence[float | None]]
NEGATIVE_ZONES = {"absorb": ABSORB, "keep": KEEP}


class MonitorError(RuntimeError):
    """The monitor failed to score too many rollouts (infrastructure, not the model)."""


class FailureBudget:
    """Counts failures over all items so far and raises once they exceed `max_frac` of them."""

    def __init__(self, max_frac: float, what: str, knob: str):
        if not 0.0 <= max_frac < 1.0:
            raise ValueError(f"{knob} must be in [0, 1), got {knob}={max_frac}")
        self.max_frac, self.what, self.knob = max_frac, what, knob
        self.n, self.failed = 0, 0

    def account(self, n: int, failed: int, detail: str = "") -> None:
        self.n, self.failed = self.n + n, self.failed + failed
        if self.failed and self.failed / max(self.n, 1) > self.max_frac:
            raise MonitorError(
                f"{self.failed} of {self.n} {self.what} ({self.failed / self.n:.1%} > {self.knob} "
                f"{self.max_frac:.1%}){': ' + detail if detail else ''}"
            )


def monitor_scores(monitor_fn: MonitorFn, prompts: list, completions: list) -> torch.Tensor:
    """(N,) float32 scores, NaN where the monitor returned None or NaN; raises on a wrong count or a non-number."""
    out = list(monitor_fn(prompts, completions))
    if len(out) != len(completions):
        raise ValueError(f"the monitor returned {len(out)} scores for {len(completions)} rollouts")
    values = []
    for i, x in enumerate(out):
        if x is not None and not isinstance(x, (int, float)):
            raise TypeError(f"the monitor's score {i} is {type(x).__name__} ({x!r}), not a float or None")
        values.append(float("nan") if x is None or math.isnan(x) else float(x))
    return torch.tensor(values, dtype=torch.float32)


class MonitorScorer(Scorer):
    """Flags from an external monitor's scores; oracle-free as long as the monitor is (it sees no dataset column)."""

    def __init__(
        self,
        monitor_fn: MonitorFn,
        threshold: float = 0.5,
        negative_zone: str = "absorb",
        max_unscored_frac: float = 0.05,
    ):
        if not callable(monitor_fn):
            raise TypeError(f"monitor_fn must be callable, got {type(monitor_fn).__name__}")
        if negative_zone not in NEGATIVE_ZONES:
            raise ValueError(f"negative_zone must be one of {tuple(NEGATIVE_ZONES)}, got {negative_zone!r}")
        self.monitor_fn, self.threshold = monitor_fn, float(threshold)
        self.negative_zone = NEGATIVE_ZONES[negative_zone]
        self.budget = FailureBudget(
            max_unscored_frac, "rollouts (all processes) went unscored by the monitor", "max_unscored_frac"
        )

    def flag(self, trainer: RoutedGRPOTrainer, acts: torch.Tensor, rollouts: RolloutsFn) -> GateDecision:
        prompts, completions, _columns = rollouts()  # the columns (labels among them) never reach the monitor
        scores = monitor_scores(self.monitor_fn, prompts, completions).to(acts.device)
        unscored = torch.isnan(scores)
        flagged = scores >= self.threshold  # False where NaN
        zones = torch.where(flagged, ROUTE, self.negative_zone)
        all_unscored = trainer.accelerator.gather(unscored.long())
        metrics = trainer._metrics["train"]
        metrics["monitor/unscored"].append(float(all_unscored.sum()))
        last = getattr(self.monitor_fn, "last_error", "")  # e.g. LLMJudge's latest failed request
        self.budget.account(int(all_unscored.numel()), int(all_unscored.sum()), f"last error: {last}" if last else "")
        m, d = masks_from_zones(zones)
        all_zones = trainer.accelerator.gather(zones)
        # an unscored row shows score 0 in the logged statistics (it was not flagged, and it is counted above)
        shown = scores.nan_to_num(0.0)
        return GateDecision(shown, zones, m, d, self.threshold, self.threshold, 0, zone_fractions(all_zones))
