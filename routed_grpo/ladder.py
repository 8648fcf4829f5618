"""Scorer and intervention: two of the gate's three parts (DESIGN.md section 10; the sensor is routed_grpo.sensor).

- A **scorer** turns one generation batch into per-rollout scores and flags: the zones `keep` (confidently clean),
  `absorb` (unsure) and `route` (flagged), as a `gate.GateDecision`. `DirectionScorer` is the method's: the
  label-free gate (`gate.Gate`: buffer quantiles over `<acts, direction>`) over `v_act`, the Haar placebo, or a
  direction handed in. A scorer that reads anything else of the batch (the lab's DIAGNOSTIC label monitor and
  oracle direction, `routed_grpo.lab.diagnostic`) says so with `diagnostic = True`; the trainer accepts one only
  with `routing="diagnostic"`, and the core defines none and imports none, so the method's arms cannot reach label
  code.
- An **intervention** turns the flags (rows in the `route` zone) into what the loss sees, before the advantages:
  - `Route`, the method (DESIGN.md section 3): the per-row masks `(m, d)` of the zones (`gate.masks_from_zones`),
    per-row sampling modes, and a deployed model with the quarantine ablated.
  - `Penalty` (Ariahw et al.'s monitor penalty): a flagged rollout's reward is lowered by `flag_penalty`.
  - `Screen` (their screening): a flagged rollout leaves the loss: excluded from its group's mean (its reward is
    NaN, which TRL leaves out of the group statistics, and its advantage is then 0), its completion mask zeroed
    (so the KL term and the loss normaliser exclude it too), and loss types that normalise by the number of rows
    rescaled to the rows kept.
  `Penalty` and `Screen` are the baseline plus the flags: both blocks train on every row (`m = 1`, `d = 0`), every
  row is sampled with both blocks on (so `rho == 1` as in the baseline), clipping is global, and nothing is
  ablated at deployment (the deployed model is the full model, as the reference applies them to one LoRA).

`RoutedGRPOTrainer(..., scorer=...)` takes a scorer object; without one it builds `DirectionScorer()` from the
config (`scorer`: `vact` or `placebo`). A new rung is a new object passed in, not a trainer subclass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from routed_grpo.gate import GateDecision, masks_from_zones

if TYPE_CHECKING:
    from routed_grpo.trainer import RoutedGRPOTrainer

# (prompts, completions, dataset columns) of this process's rollouts, as TRL passes them to reward functions; a
# scorer that does not read them never calls it.
RolloutsFn = Callable[[], tuple[list, list, dict[str, list]]]
SCORERS = ("vact", "placebo", "monitor")  # "diagnostic" names a lab scorer handed to the trainer
INTERVENTIONS = ("route", "penalty", "screen")
DEFAULT_FLAG_PENALTY = 3.0  # the reference's correctness reward (and the organism's `pass_reward`)
# TRL loss types whose normaliser counts rows (a screened row would still count) or tokens of the batch
ROW_NORMALISED_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")
TOKEN_NORMALISED_LOSSES = ("bnpo", "cispo", "dapo", "vespo")


class Scorer:
    """Scores and flags of one generation batch. Subclasses implement `flag`; `direction` is the direction the
    trainer's gate holds (None: the config's `v_act` or placebo)."""

    diagnostic: ClassVar[bool] = False  # True: reads ground truth; accepted only with routing="diagnostic"
    uses_gate: ClassVar[bool] = False  # True: flags by the gate's buffer quantiles (the trainer keeps the buffer)
    direction: Tensor | None = None

    def flag(self, trainer: RoutedGRPOTrainer, acts: Tensor, rollouts: RolloutsFn) -> GateDecision:
        raise NotImplementedError


class DirectionScorer(Scorer):
    """The label-free gate over a direction at the sensor: the trainer's `gate.step(acts)`, nothing else."""

    uses_gate = True

    def __init__(self, direction: Tensor | None = None):
        self.direction = direction

    def flag(self, trainer: RoutedGRPOTrainer, acts: Tensor, rollouts: RolloutsFn) -> GateDecision:
        return trainer.gate.step(acts)


class Intervention:
    """What flagged rows do to the update. The base class is the baseline's treatment plus nothing: both blocks train
    on every row, every row is sampled with both blocks on, and the deployed model is the full model."""

    name: ClassVar[str] = ""
    routes: ClassVar[bool] = False  # True: per-row sampling modes, per-block clipping, deployment ablates quarantine

    def masks(self, zones: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row masks `(m, d)`: here both blocks on every row (m = 1, d = 0)."""
        return torch.ones(zones.shape, dtype=torch.float32), torch.zeros(zones.shape, dtype=torch.float32)

    def rewards(self, rewards_per_func: Tensor, flagged: Tensor, weights: Tensor) -> Tensor:
        """The rewards (N, F) the advantages are computed from; `flagged` (N,) bool over all processes' rows."""
        return rewards_per_func

    def screened(self, flagged: Tensor) -> Tensor:
        """(N,) bool: rows that leave the loss."""
        return torch.zeros_like(flagged, dtype=torch.bool)


class Route(Intervention):
    """The method's intervention: flagged rows train the quarantine only, clean ones the deployed block only,
    unsure ones both (masks `m`, `d` per row)."""

    name = "route"
    routes = True

    def masks(self, zones: Tensor) -> tuple[Tensor, Tensor]:
        return masks_from_zones(zones)


class Penalty(Intervention):
    """A flagged rollout's reward is lowered by `amount` before the advantages."""

    name = "penalty"

    def __init__(self, amount: float = DEFAULT_FLAG_PENALTY):
        if not amount > 0:
            raise ValueError(f"flag_penalty must be > 0, got flag_penalty={amount}")
        self.amount = float(amount)

    def rewards(self, rewards_per_func: Tensor, flagged: Tensor, weights: Tensor) -> Tensor:
        return penalised_rewards(rewards_per_func, flagged, weights, self.amount)


class Screen(Intervention):
    """A flagged rollout leaves the loss and its group's statistics."""

    name = "screen"

    def rewards(self, rewards_per_func: Tensor, flagged: Tensor, weights: Tensor) -> Tensor:
        return rewards_per_func.masked_fill(flagged.to(rewards_per_func.device).unsqueeze(1), float("nan"))

    def screened(self, flagged: Tensor) -> Tensor:
        return flagged.bool()


def penalised_rewards(rewards_per_func: Tensor, flagged: Tensor, weights: Tensor, amount: float) -> Tensor:
    """Rewards (N, F) whose weighted sum (TRL's `sum_then_normalize`) is `amount` lower on flagged rows and unchanged
    elsewhere: `amount / w_j` comes off the first reward function with a non-zero weight (a None reward there
    counts as 0). Rows every function returned None for stay unscorable (all NaN)."""
    nonzero = (weights != 0).nonzero().flatten()
    if nonzero.numel() == 0:
        raise ValueError("penalty: every reward weight is 0, so no reward can carry the penalty")
    j = int(nonzero[0])
    out = rewards_per_func.clone()
    rows = flagged.to(out.device).bool() & ~torch.isnan(out).all(dim=1)
    col = out[:, j]
    out[:, j] = torch.where(rows, col.nan_to_num(0.0) - amount / float(weights[j]), col)
    return out


def intervention(name: str, flag_penalty: float = DEFAULT_FLAG_PENALTY) -> Intervention:
    """The intervention object of a config's `intervention` field."""
    if name == "route":
        return Route()
    if name == "penalty":
        return Penalty(flag_penalty)
    if name == "screen":
        return Screen()
    raise ValueError(f"intervention must be one of {INTERVENTIONS}, got intervention={name!r}")
