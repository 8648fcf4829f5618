"""Scorer and intervention: two of the gate's three parts (DESIGN.md section 10; the sensor is routed_grpo.sensor).

- A **scorer** turns one generation batch into per-rollout scores and flags: the zones `keep` (confidently clean),
  `absorb` (unsure) and `route` (flagged), as a `gate.GateDecision`. `DirectionScorer` is the method's: the
  label-free gate (`gate.Gate`: buffer quantiles over `<acts, direction>`) over `v_act`, the Haar placebo, or a
  direction handed in. A scorer that reads anything else of the batch (the lab's DIAGNOSTIC label monitor and
  oracle direction, `routed_grpo.lab.diagnostic`) says so with `diagnostic = True`; the trainer accepts one only
  with `routing="diagnostic"`, and the core defines none and imports none, so the method's arms cannot reach label
  code.
- An **intervention** turns the flags into what the loss sees. `Route` is the method (DESIGN.md section 3): the
  per-row masks `(m, d)` of the zones (`gate.masks_from_zones`).

`RoutedGRPOTrainer(..., scorer=...)` takes a scorer object; without one it builds `DirectionScorer()` from the
config (`scorer`: `vact` or `placebo`). A new rung is a new object passed in, not a trainer subclass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from routed_grpo.gate import GateDecision, masks_from_zones

if TYPE_CHECKING:
    from routed_grpo.trainer import RoutedGRPOTrainer

# (prompts, completions, dataset columns) of this process's rollouts, as TRL passes them to reward functions; a
# scorer that does not read them never calls it.
RolloutsFn = Callable[[], tuple[list, list, dict[str, list]]]
SCORERS = ("vact", "placebo")  # the method's; "diagnostic" names a lab scorer handed to the trainer
INTERVENTIONS = ("route",)


class Scorer:
    """Scores and flags of one generation batch. Subclasses implement `flag`; `direction` is the direction the
    trainer's gate holds (None: the config's `v_act` or placebo)."""

    diagnostic: ClassVar[bool] = False  # True: reads ground truth; accepted only with routing="diagnostic"
    direction: Tensor | None = None

    def flag(self, trainer: RoutedGRPOTrainer, acts: Tensor, rollouts: RolloutsFn) -> GateDecision:
        raise NotImplementedError


class DirectionScorer(Scorer):
    """The label-free gate over a direction at the sensor: the trainer's `gate.step(acts)`, nothing else."""

    def __init__(self, direction: Tensor | None = None):
        self.direction = direction

    def flag(self, trainer: RoutedGRPOTrainer, acts: Tensor, rollouts: RolloutsFn) -> GateDecision:
        return trainer.gate.step(acts)


class Route:
    """The method's intervention: flagged rows train the quarantine only, clean ones the deployed block only,
    unsure ones both (masks `m`, `d` per row)."""

    name = "route"

    def masks(self, zones: Tensor) -> tuple[Tensor, Tensor]:
        return masks_from_zones(zones)


def intervention(name: str) -> Any:
    """The intervention object of a config's `intervention` field."""
    if name == "route":
        return Route()
    raise ValueError(f"intervention must be one of {INTERVENTIONS}, got intervention={name!r}")
