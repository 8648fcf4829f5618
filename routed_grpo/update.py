"""`RoutedUpdate`: how `RoutedGRPOTrainer` clips its update and reduces its ratio metrics (a mixin of `GRPOTrainer`).

- `_clip_grad_norm` (transformers' clipping hook; the trainer calls it once per optimizer step when
  `max_grad_norm > 0`): with routing on, the deployed and the quarantine block are each clipped by their OWN norm,
  so that a block's step never depends on the gradient that reached the other block (with one global norm, the
  quarantine's gradient from route rows would shrink the deployed block's step whenever clipping binds, and the
  deployed update would depend on rollouts routed away from it). Any other parameter the user trains keeps the
  global clip (the norm of all trained parameters). The fp16 gradient scaler is unscaled once, before any norm.
  The value returned, which the trainer logs as `grad_norm`, is unchanged in meaning: the norm before clipping of
  all trained parameters together. Each block's clip coefficient, `min(1, max_grad_norm / (norm + 1e-6))`, is
  logged as `routing/clip_coef/deployed` and `routing/clip_coef/quarantine` (1.0: the block was not clipped).
- `routing/rho_max/<zone>` and `routing/rho_mean/<zone>`: each loss forward adds its rows' statistics to a running
  (3, 3) tensor on the device (`_record_rho`); `log`, where the trainer hands metrics to TRL (whose own `log`
  averages every metric over micro-batches and steps), gathers it from every process and logs the maximum over
  every row of every process, micro-batch and step of the logging window, and the row-weighted mean.
- `_check_finite`: after each loss forward, every process raises if a ratio the loss used, or the loss, is
  non-finite on any process.
Does not cover: the loss, the masks and the behaviour log-probs (routed_grpo.trainer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm
from trl import GRPOTrainer

from routed_grpo.adapter import DEPLOYED, QUARANTINE
from routed_grpo.loss import first_nonfinite_zone, merge_rho_stats, per_row_rho, rho_zone_metrics, rho_zone_stats

EPS = 1e-6  # torch's clip_grad_norm_ adds it to the norm


class RoutedUpdate(GRPOTrainer):
    """Mixin for `RoutedGRPOTrainer` (which sets `adapter` and `gate`; `gate is None` means routing none)."""

    _rho_stats: torch.Tensor | None = None  # (3, 3) of the logging window so far, on the device

    def _clip_grad_norm(self, model):
        """Clip each block by its own norm and everything else by the global norm; return the global norm."""
        if self.gate is None or not self.intervention.routes:  # penalty / screen clip as the baseline does
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # fp16: once (a second unscale would raise); a no-op otherwise
        blocks = [
            [p for p in self.adapter.parameters(DEPLOYED) if p.grad is not None],
            [p for p in self.adapter.parameters(QUARANTINE) if p.grad is not None],
        ]
        in_blocks = {id(p) for group in blocks for p in group}
        others = [p for p in model.parameters() if p.grad is not None and id(p) not in in_blocks]
        groups = [*blocks, others]
        device = next((g[0].grad.device for g in groups if g), self.accelerator.device)
        norms = torch.stack(
            [get_total_norm([p.grad for p in g]).to(device) if g else torch.zeros((), device=device) for g in groups]
        ).float()  # (3,): deployed, quarantine, the rest
        total = torch.linalg.vector_norm(norms)
        max_norm = self.args.max_grad_norm
        for group, norm in zip(groups, [norms[0], norms[1], total], strict=True):
            if group:
                clip_grads_with_norm_(group, max_norm, norm)
        coefs = (max_norm / (norms[:2] + EPS)).clamp(max=1.0).tolist()  # one host synchronisation
        self._metrics["train"]["routing/clip_coef/deployed"].append(coefs[0])
        self._metrics["train"]["routing/clip_coef/quarantine"].append(coefs[1])
        return total

    def _check_finite(self, loss: torch.Tensor, inputs: dict[str, Any]) -> None:
        """Raise on every rank if a ratio the loss used, or the loss, is non-finite on any rank; log rho per zone
        before `mismatch_ratio_cap` (the blow-up the cap bounds stays visible in `routing/rho_max/<zone>`)."""
        mask = inputs["completion_mask"]
        row_mean, row_max = per_row_rho(self._loss_logps, self._loss_old_logps, mask)
        zones = torch.where(mask.bool().any(1), inputs["routing_zone"], -1)  # rows without tokens: in no zone
        finite = torch.isfinite(row_mean).all() & torch.isfinite(row_max).all() & torch.isfinite(loss).all()
        if self.accelerator.reduce((~finite).float(), reduction="sum").item() > 0:  # no rank hangs in all-reduce
            bad_zone = first_nonfinite_zone(row_mean, row_max, zones)
            where = f"zone '{bad_zone}'" if bad_zone else ("the loss" if not torch.isfinite(loss) else "another rank")
            raise FloatingPointError(
                f"non-finite importance ratio or loss at step {self.state.global_step} in {where} "
                f"(rho_max per row {row_max.tolist()}, loss {loss.item()})"
            )
        if self.args.mismatch_ratio_cap is not None:
            row_mean, row_max = per_row_rho(self._loss_logps, self._uncapped_old_logps, mask)
        self._record_rho(row_mean, row_max, zones)

    def _record_rho(self, row_mean: torch.Tensor, row_max: torch.Tensor, zones: torch.Tensor) -> None:
        """Add one loss forward's rows (per-row mean and max ratio, zones; -1 = no zone) to the logging window."""
        self._rho_stats = merge_rho_stats(self._rho_stats, rho_zone_stats(row_mean, row_max, zones))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The ratio metrics of the window over all processes, then TRL's `log` (which averages the other metrics).

        Every process calls `log` at the same points and holds a window whenever another does (they run the same
        micro-steps), so the gather is entered by all of them."""
        if not self.model.training:  # an evaluation's log: the training window goes on
            return super().log(logs, start_time)
        stats, self._rho_stats = self._rho_stats, None
        if stats is not None:
            logs.update(rho_zone_metrics(self.accelerator.gather(stats.unsqueeze(0))))
        super().log(logs, start_time)
