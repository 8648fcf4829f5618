"""Flags before advantages: where `RoutedGRPOTrainer` scores a generation batch and applies the intervention.

TRL computes each rollout's rewards (`_calculate_rewards`), then the group advantages from them. The scorer runs
inside `_calculate_rewards`, right after the reward functions: by then the sampling pass (or TRL's own old-log-prob
forward, run in sampling modes) has pooled the sensor's activations, so the flags exist before the advantages and
the intervention can change the rewards they are computed from (`penalty`, `screen`; `route` leaves them as they
are). Where no sampling pass could be observed, one teacher-forced forward in sampling modes supplies the behaviour
log-probs and the activations here (built from the same token ids as TRL's batch, and checked against it after).

Logged per batch: `env_reward` (the reward functions' weighted sum before the intervention: what the environment
paid, which the report and the collapse rule read; TRL's `reward` is what training used, penalised or without the
screened rows), `routing/flag_rate` (rows in the `route` zone), the gate's zones and thresholds, and with a
`measure_fn` the measurement labels with the AUROC of the score and the precision and recall of the flags
(measurement only: called after the flags exist; nothing it returns reaches the scorer, the rewards or the loss).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import pad

from routed_grpo.behaviour import completion_pool_mask
from routed_grpo.gate import ROUTE
from routed_grpo.ladder import ROW_NORMALISED_LOSSES, TOKEN_NORMALISED_LOSSES
from routed_grpo.vact import auroc


class FlagStep(GRPOTrainer):
    """Mixin for `RoutedGRPOTrainer` (which sets `scorer`, `intervention`, `measure_fn` and the behaviour hooks)."""

    _scoring = False  # True inside a training batch's `_generate_and_score_completions` with routing on
    _prompt_ids_list: list | None = None  # the prompts' token ids of the latest generation
    _flags: dict[str, Any] | None = None  # what `_calculate_rewards` decided for the batch being scored

    def _check_intervention(self) -> None:
        """Refuse what the intervention cannot apply exactly."""
        if self.intervention.routes or self.scorer is None:
            return
        name = self.intervention.name
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"intervention={name!r} changes the summed reward; multi_objective_aggregation="
                f"{self.multi_objective_aggregation!r} would normalise it per reward function (use "
                "'sum_then_normalize')"
            )
        if name == "screen":
            if self.loss_type not in (*ROW_NORMALISED_LOSSES, *TOKEN_NORMALISED_LOSSES):
                raise ValueError(f"intervention='screen' does not know the normaliser of loss_type={self.loss_type!r}")
            if self.loss_type in ROW_NORMALISED_LOSSES and (self._entropy_bonus_enabled or self.aux_loss_enabled):
                raise ValueError(
                    f"intervention='screen' rescales the loss of loss_type={self.loss_type!r} to the rows kept, which "
                    "would also rescale the entropy bonus / auxiliary loss; turn those off or use loss_type='dapo'"
                )

    # ---- inside TRL's `_generate_and_score_completions` ------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if not self._scoring:
            return rewards_per_func
        t0 = time.perf_counter()
        weights = self.reward_weights.to(rewards_per_func.device)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        env = (rewards_per_func * weights).nansum(dim=1).masked_fill(unscorable, float("nan"))
        self._metrics["train"]["env_reward"].append(torch.nanmean(env).item())
        full = self._sampling_full.to(self.accelerator.device)
        ids, mask = self._completion_tensors(completion_ids_list)
        old, acts = self._observed_behaviour(ids.size(1), mask)
        if acts is None:  # no sampling pass to read: one teacher-forced forward in sampling modes gives both
            old, acts = self._sampling_mode_forward(ids, mask, full)
        t1 = time.perf_counter()
        columns = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")}
        decision = self.scorer.flag(self, acts, lambda: (prompts, completions, columns))
        t2 = time.perf_counter()
        flagged = self.accelerator.gather((decision.zones == ROUTE).long()).bool()  # (N,) every process's rows
        rewards = self.intervention.rewards(rewards_per_func, flagged, weights)
        self._flags = {
            "rollouts": (prompts, completions, columns),
            "old": old,
            "decision": decision,
            "flagged": flagged,
            "completion_mask": mask,
            "seconds": {"behaviour_forward": t1 - t0, "gate": t2 - t1},
        }
        self._metrics["train"]["routing/flag_rate"].append(flagged.float().mean().item())
        return rewards

    def _padded(self, seqs: list, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of token-id lists padded as TRL pads them (`trl.trainer.utils.pad`, its pad token and
        `pad_to_multiple_of`), on the device."""
        ids = [torch.tensor(x) for x in seqs]
        kw = dict(padding_side=side, pad_to_multiple_of=self.pad_to_multiple_of)
        padded = pad(ids, padding_value=self._tokenizer.pad_token_id, **kw)
        mask = pad([torch.ones_like(x, dtype=torch.long) for x in ids], padding_value=0, **kw)
        return padded.to(self.accelerator.device), mask.to(self.accelerator.device)

    def _completion_tensors(self, completion_ids_list) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's padded `completion_ids` and `completion_mask` of the batch (checked against its own afterwards)."""
        padded, mask = self._padded(completion_ids_list, "right")
        if self.mask_truncated_completions:
            ends = [*self.eos_token_ids, self._tokenizer.pad_token_id]
            truncated = torch.tensor([x[-1] not in ends for x in completion_ids_list], device=mask.device)
            mask = mask * (~truncated).unsqueeze(1).int()
        return padded, mask

    def _sampling_mode_forward(self, completion_ids, completion_mask, full):
        """`behaviour.sampling_mode_forward` on the batch: (logps (B, T), acts (B, M, r) or None)."""
        prompt_ids, prompt_mask = self._padded(self._prompt_ids_list, "left")
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        pool_mask = completion_pool_mask(completion_ids, completion_mask, self._tokenizer.pad_token_id)
        return self._forward_in_sampling_modes(input_ids, attention_mask, completion_ids.size(1), full, pool_mask)

    # ---- after TRL's advantages ---------------------------------------------------------------------------------
    def _take_flags(self, output: dict[str, Any]) -> dict[str, Any]:
        """The batch's flags, checked to be about TRL's batch; screened rows leave the loss (`output` in place)."""
        flags, self._flags = self._flags, None
        if flags is None:
            raise RuntimeError("TRL scored this batch without calling _calculate_rewards: no flags were computed")
        if not torch.equal(flags["completion_mask"], output["completion_mask"]):
            raise RuntimeError(
                "the completion mask routed_grpo rebuilt for the scorer differs from TRL's (its padding changed?): "
                "the activations and behaviour log-probs would not line up with the batch"
            )
        n = len(output["completion_ids"])
        screened = self.intervention.screened(flags["flagged"])
        if screened.any():
            start = self.accelerator.process_index * n
            local = screened[start : start + n].to(output["completion_mask"].device)
            output["completion_mask"] = output["completion_mask"].masked_fill(local.unsqueeze(1), 0)
            mask = output["completion_mask"] * output.get("tool_mask", 1)
            output["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
        kept = max(int((~screened).sum()), 1)
        rescale = len(screened) / kept if self.loss_type in ROW_NORMALISED_LOSSES else 1.0
        output["routing_loss_scale"] = torch.full((n,), rescale, device=output["completion_mask"].device)
        self._metrics["train"]["routing/screened_frac"].append(float(screened.float().mean()))
        return flags

    def _log_gate(self, decision, full, seconds: dict[str, float]) -> None:
        metrics = self._metrics["train"]
        for name, frac in decision.zone_frac.items():
            metrics[f"routing/zone_frac/{name}"].append(frac)
        scores = self.accelerator.gather(decision.scores.float())
        metrics["routing/threshold_lo"].append(decision.lo)
        metrics["routing/threshold_hi"].append(decision.hi)
        stats = torch.stack([scores.mean(), scores.std() if scores.numel() > 1 else scores.new_zeros(())])
        sampled_full = self.accelerator.gather(full.float()).mean()
        score_mean, score_std, full_frac = torch.cat([stats, sampled_full.view(1)]).tolist()
        metrics["routing/score_mean"].append(score_mean)
        metrics["routing/score_std"].append(score_std)
        metrics["routing/qmass"].append(decision.zone_frac["absorb"] + decision.zone_frac["route"])
        metrics["routing/buffer_size"].append(float(decision.buffer_size))
        metrics["routing/sampling_deploy_frac"].append(1.0 - full_frac)
        for key, value in seconds.items():
            metrics[f"timing/{key}"].append(value)

    def _log_measurements(self, rollouts, decision) -> None:
        """Measurement only: labels from `measure_fn` are logged with the AUROC of the score and the precision and
        recall of the flags (the route zone) for each label; called after the flags exist, never used to flag."""
        prompts, completions, columns = rollouts  # as TRL passed them to the reward functions
        labels = self.measure_fn(prompts=prompts, completions=completions, **columns)
        all_scores = self.accelerator.gather(decision.scores.float()).cpu()
        routed = self.accelerator.gather(decision.zones).cpu() == ROUTE
        metrics = self._metrics["train"]
        for key, values in labels.items():
            y = self.accelerator.gather(torch.tensor(values, dtype=torch.float32, device=decision.scores.device))
            y = y.cpu() > 0.5
            metrics[f"measure/{key}"].append(y.float().mean().item())
            if y.any() and (~y).any():
                metrics[f"measure/auroc_{key}"].append(auroc(all_scores[y], all_scores[~y]))
            if routed.any():
                metrics[f"measure/precision_at_route_{key}"].append((routed & y).sum().item() / routed.sum().item())
            if y.any():
                metrics[f"measure/recall_at_route_{key}"].append((routed & y).sum().item() / y.sum().item())
