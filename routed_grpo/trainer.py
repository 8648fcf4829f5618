"""`RoutedGRPOTrainer`: TRL's `GRPOTrainer` with gradient routing by an activation direction `v_act`."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from trl import GRPOTrainer

from routed_grpo.adapter import DEPLOYED, QUARANTINE
from routed_grpo.behaviour import BaseModelReference, SamplingPassPool, completion_pool_mask, sampling_mode_forward
from routed_grpo.compact_head import scored_positions_only
from routed_grpo.config import RoutedGRPOConfig
from routed_grpo.flags import FlagStep
from routed_grpo.gate import Gate
from routed_grpo.ladder import DirectionScorer, Scorer, intervention
from routed_grpo.loss import (
    block_grad_norms,
    cap_mismatched_ratio,
    draw_sampling_modes,
    grad_qmass,
    mismatched_rows,
)
from routed_grpo.monitor import MonitorFn, MonitorScorer
from routed_grpo.prefill import shared_prefix_logps, shared_prompt_prefill
from routed_grpo.routing_state import RoutingState, buffer_capacity, routed_adapter, without_trl_kl_reference
from routed_grpo.update import RoutedUpdate
from routed_grpo.vllm_sync import PerModeGeneration

MeasureFn = Callable[..., dict[str, list[float]]]
log = logging.getLogger(__name__)


class RoutedGRPOTrainer(FlagStep, RoutedUpdate, RoutingState):
    """GRPO with a deployed and a quarantine adapter block and a label-free gate (DESIGN.md section 3).

    What differs from `trl.GRPOTrainer`:
    - `__init__` attaches the two-block adapter (`routed_grpo.adapter`) to the model (a model id is loaded first);
      `peft_config` is not accepted, because the adapter is part of the method. With `beta != 0` the KL reference is
      the base model, both blocks off through the adapter's own hooks (`BaseModelReference`), not a PEFT "ref" adapter.
    - `_generate_single_turn`: each rollout gets a sampling mode (`deploy` with probability `gen_deploy_frac`,
      seeded); one `generate` call samples both modes through per-row quarantine masks and, on the way, reads the
      deployed bottleneck pooled over each completion and each sampled token's log-prob
      (`routed_grpo.behaviour.SamplingPassPool`). With `use_vllm`, each mode is generated with its own merged
      weights (`routed_grpo.vllm_sync`).
    - `_calculate_rewards` (routed_grpo.flags): right after TRL's reward functions and before its advantages, the
      scorer (by default the gate: the pooled activations scored against `v_act`, appended to the buffer,
      thresholds over the whole buffer) flags the batch and the intervention may change the rewards (`penalty`,
      `screen`); `_generate_and_score_completions` then returns zones and masks (batch keys `routing_m`,
      `routing_d`, `routing_zone`, `sampling_full`, and `routing_loss_scale`). Behaviour log-probs
      `old_per_token_logps` are the sampler's, in each row's sampling mode; matched rows (`routing_logp_from_loss`)
      instead take the grad-carrying forward's detached log-probs before the first update, which is exactly their
      behaviour policy (rho == 1 bit for bit). No extra forward runs: where TRL computes old log-probs itself
      (several optimizer steps per generation batch, or vLLM's importance-sampling correction), its forward runs
      in each row's sampling mode and supplies both log-probs and activations; only where no sampling pass can be
      observed does one teacher-forced forward in sampling modes supply them (with a warning).
    - `compute_loss` sets the masks for the grad-carrying forward and fails if the log-prob hook did not run;
      `training_step` clears the masks only after backward (gradient checkpointing re-runs the forward hooks), then
      logs the routing mass of the gradient norm (one fused reduction).
    - `_clip_grad_norm` clips the deployed and the quarantine block each by its own norm (stock: every parameter by
      one global norm), so neither block's step depends on the other's gradient; `grad_norm` is still the pre-clip
      norm of all trained parameters, and `routing/clip_coef/<block>` logs each block's coefficient
      (`routed_grpo.update`). `routing/rho_max/<zone>` is the maximum over all rows of all processes, micro-batches
      and steps of a logging window, `routing/rho_mean/<zone>` the row-weighted mean (reduced in `log`).
    - The gate's buffer spans the run by default (`act_buffer_size`); a non-finite pooled activation raises.
    - Checkpoints also hold the gate buffer and `v_act` (`routing_gate.pt`, once) and each process's sampling RNG
      (the deployed block is a stock PEFT adapter in `checkpoint-N/deployed/`); resuming restores them and keeps
      both blocks active. Adapter blocks get no weight decay, and a block parameter with an exactly zero gradient
      gets no optimizer step (no momentum drift): no gradient means no change.
    - Rejected with routing on: tools / environment_factory / rollout_func, vision-language models, FSDP and every
      DeepSpeed stage (untested, and DeepSpeed neither fills `param.grad` nor steps the hooked optimizer).
    - `mismatch_ratio_cap` truncates `rho` on rows whose training mode differs from their sampling mode.
    - Speed, every number unchanged: `generate` runs one prompt forward per distinct prompt (`routed_grpo.prefill`;
      not while sampling modes are mixed within a batch), and TRL's fused LM head scores only the completion tokens
      on the CPU as it does on CUDA (`routed_grpo.compact_head`). Opt-in, rounding differs: `share_prompt_forward`
      runs the loss forward's prompt once per distinct prompt and routing masks (`routed_grpo.prefill`).
    The zones come from the scorer (`routed_grpo.ladder`): by default `DirectionScorer`, the gate over `v_act` or
    the placebo and nothing else; the masks from the intervention (`route`). The lab's DIAGNOSTIC scorers (label
    monitor, oracle direction) are objects handed in as `scorer=` and accepted only with `routing="diagnostic"`,
    which in turn needs one, so the method's arms (`vact`, `placebo`) have no path to labels.
    Inherited unchanged: data loading, reward computation, advantages, the clipped surrogate, the KL term and their
    aggregation, evaluation. With `routing="none"` the trainer is stock GRPO with the adapter.
    An optional `measure_fn(prompts, completions, **columns) -> {"hack_strict": [...]}` is called after the gate
    has decided, only to log `measure/...` (the AUROC of the score); nothing it returns reaches the gate or loss.
    """

    _tag_names = ["trl", "grpo", "routed-grpo"]

    def __init__(
        self,
        model,
        reward_funcs,
        args: RoutedGRPOConfig,
        *pos,
        measure_fn: MeasureFn | None = None,
        scorer: Scorer | None = None,
        monitor_fn: MonitorFn | None = None,
        **kw,
    ):
        if not isinstance(args, RoutedGRPOConfig):
            raise TypeError(f"args must be a RoutedGRPOConfig, got {type(args).__name__}")
        if monitor_fn is not None:
            if scorer is not None:
                raise ValueError("pass monitor_fn= or scorer=, not both")
            scorer = MonitorScorer(monitor_fn, args.monitor_threshold)
        if (args.routing == "monitor") != isinstance(scorer, MonitorScorer):
            raise ValueError(
                "routing='monitor' (scorer='monitor') needs monitor_fn= (or scorer=MonitorScorer(...)), and a monitor "
                f"needs routing='monitor' (routing={args.routing!r}, scorer {type(scorer).__name__ if scorer else ''})"
            )
        diagnostic = scorer is not None and scorer.diagnostic
        if (args.routing == "diagnostic") != diagnostic:
            raise ValueError(
                "routing='diagnostic' is reserved for the DIAGNOSTIC scorers of routed_grpo.lab.diagnostic, handed "
                "in as scorer=, and such a scorer needs it; the method routes by 'vact' or 'placebo' "
                f"(routing={args.routing!r}, scorer {type(scorer).__name__ if scorer else None})"
            )
        if scorer is not None and args.routing == "none":
            raise ValueError(f"scorer {type(scorer).__name__} was handed in with routing='none' (nothing is scored)")
        if scorer is not None and scorer.direction is not None and not diagnostic:
            raise ValueError(
                f"scorer {type(scorer).__name__} brings its own direction under routing={args.routing!r}, which takes "
                "its direction from the config (vact_path / vact_pairs_path / placebo_seed); a direction from "
                "elsewhere is a DIAGNOSTIC scorer's (routing='diagnostic')"
            )
        if kw.get("peft_config") is not None:
            raise ValueError("peft_config is not accepted: RoutedGRPOTrainer attaches its own two-block adapter")
        self.adapter = routed_adapter(model, args, kw.get("processing_class"))
        with without_trl_kl_reference(args):
            super().__init__(self.adapter.model, reward_funcs, args, *pos, **kw)
        self.beta = args.beta
        self.ref_model = BaseModelReference(self.adapter) if self.beta != 0.0 else None
        self._reject_unsupported()
        self.measure_fn = measure_fn
        self._sampling_rng = torch.Generator().manual_seed(args.seed + self.accelerator.process_index)
        self._sampling_full: torch.Tensor | None = None  # (B,) of the last generation
        self._sampling_pool: SamplingPassPool | None = None
        self._trl_behaviour = False  # True while TRL's own old-log-prob forward may run (in sampling modes)
        self._acts: torch.Tensor | None = None  # (B, M, r) pooled by TRL's old-log-prob forward
        self._updated_since_generation = False
        self._stash_logps = False
        self._loss_logps: torch.Tensor | None = None  # (B, T) detached log-probs of the last loss forward
        self._loss_old_logps: torch.Tensor | None = None  # (B, T) behaviour log-probs that loss used
        self._uncapped_old_logps: torch.Tensor | None = None  # (B, T) the same before mismatch_ratio_cap
        self._loss_inputs: dict[str, Any] | None = None
        self._trl_old_logps: torch.Tensor | None = None  # (B, T) of TRL's old-log-prob forward, in sampling modes
        self._last_refresh = 0
        self._warned_fallback = False
        self._buffer_span_checked = False  # once, at the first gated batch (max_steps is known by then)
        self.gate = None
        self._vllm_modes = None
        self.scorer = None if args.routing == "none" else scorer or DirectionScorer()
        self.intervention = intervention(args.intervention, args.flag_penalty)
        self._check_intervention()
        if self.scorer is not None:
            self.gate = Gate(
                self._initial_vact(),
                args.route_tail_q,
                buffer_capacity(args, self.adapter) if self.scorer.uses_gate else 1,  # 1: the buffer is never read
                self.accelerator,
                self.accelerator.device,
                warmup_rollouts=args.gate_warmup_rollouts,
                module_names=list(self.adapter.sensor_names),
                step_fn=lambda: self.state.global_step,
            )
            self._vact_start = self.gate.vact.clone()  # for routing/vact_cos_start after a refresh
            if self.use_vllm:
                self._vllm_modes = PerModeGeneration(self.vllm_generation, self.adapter)
        if self.use_vllm and self.adapter.subtracted and self._vllm_modes is None:
            raise ValueError(
                f"adapter_init={args.adapter_init!r} with use_vllm and routing='none': TRL's own vLLM weight sync "
                "merges s B A without subtracting the initial copies' s B0 A0; use routing on, or use_vllm=False"
            )

    # ---- generation: sampling modes -------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        n = len(prompt_ids)
        routed = self.model.training and self.gate is not None
        modes = routed and self.intervention.routes  # penalty / screen: every row with both blocks on
        full = draw_sampling_modes(n, self.args.gen_deploy_frac, self._sampling_rng) if modes else None
        self._sampling_full = full if full is not None else torch.ones(n, dtype=torch.bool)
        self._sampling_pool, self._prompt_ids_list = None, prompt_ids
        full = self._sampling_full
        if self._vllm_modes is not None:
            return self._vllm_generate(prompt_ids, self._sampling_full if routed else None)
        if not routed:
            with shared_prompt_prefill(self.adapter.model.get_base_model()):
                return super()._generate_single_turn(
                    prompt_ids, images, multimodal_fields, num_generations, has_tool_images
                )
        pool = self._new_sampling_pool()
        one_mode = bool(full.all()) or not bool(full.any())  # mixed modes: per-row masks index the whole batch
        with self._sampling_modes(full):
            with pool.attached() if pool is not None else contextlib.nullcontext():
                lm = self.adapter.model.get_base_model()
                with shared_prompt_prefill(lm) if one_mode else contextlib.nullcontext():
                    completion_ids, logprobs = super()._generate_single_turn(
                        prompt_ids, images, multimodal_fields, num_generations, has_tool_images
                    )
            if pool is not None:  # the last token of each completion, never fed back while sampling
                pool.finish(completion_ids, self.model, self.args.gradient_checkpointing_kwargs)
        self._sampling_pool = pool
        return completion_ids, logprobs

    @contextlib.contextmanager
    def _sampling_modes(self, full: torch.Tensor):
        """Forward in each row's sampling mode: `full` (B,) bool, True = both blocks on."""
        if bool(full.all()):
            yield
        elif not bool(full.any()):
            with self.adapter.deployment_ablation():
                yield
        else:
            on = full.to(self.accelerator.device)
            self.adapter.set_row_masks(on.float(), torch.zeros_like(on, dtype=torch.float32))  # deploy rows: m = 0
            try:
                yield
            finally:
                self.adapter.clear_row_masks()

    def _new_sampling_pool(self) -> SamplingPassPool | None:
        """A pool for the activations of the coming `generate` call, or None where none can be observed there."""
        cfg = self.generation_config
        if self._trl_behaviour or self.use_transformers_continuous_batching:
            return None  # TRL's own old-log-prob forward pools them / packed rows
        if cfg.cache_implementation is not None or (cfg.num_beams or 1) != 1 or cfg.use_cache is False:
            return None
        return SamplingPassPool(self.adapter, self.eos_token_ids, self._tokenizer.pad_token_id, self.temperature)

    def _vllm_generate(self, prompt_ids, full: torch.Tensor | None):
        """vLLM: each sampling mode's rows with that mode's weights (`full` None: every row in full mode)."""
        step = self.state.global_step
        full = torch.ones(len(prompt_ids), dtype=torch.bool) if full is None else full

        def global_counts(counts: list[int]) -> list[int]:
            local = torch.tensor(counts, device=self.accelerator.device)
            return self.accelerator.gather(local).view(-1, len(counts)).max(0).values.tolist()

        completion_ids, logprobs = self._vllm_modes.generate(prompt_ids, full, step, global_counts)
        return completion_ids, logprobs

    # ---- behaviour log-probs and gate -------------------------------------------------------------------------------
    def _trl_computes_old_logps(self) -> bool:
        """TRL's own condition for computing `old_per_token_logps` in `_generate_and_score_completions`."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        is_correction = self.use_vllm and self.vllm_importance_sampling_correction
        return self.args.gradient_accumulation_steps % generate_every != 0 or is_correction

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if self.gate is None or not self.model.training:
            return super()._generate_and_score_completions(inputs)
        self._maybe_refresh_vact()
        if not self._buffer_span_checked and self.scorer.uses_gate:
            self._buffer_span_checked = True
            self._check_buffer_span()
        expected = self._trl_computes_old_logps()
        self._acts, self._trl_behaviour, self._scoring, self._flags = None, expected, True, None
        t0 = time.perf_counter()
        try:  # the scorer flags inside, before the advantages (routed_grpo.flags)
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._trl_behaviour, self._scoring = False, False
        if ("old_per_token_logps" in output) != expected:  # TRL's condition, copied above, no longer matches
            raise RuntimeError(
                f"TRL {'did not compute' if expected else 'computed'} old log-probs where routed_grpo expected "
                "otherwise (its condition changed?): they would not be in each row's sampling mode"
            )
        flags = self._take_flags(output)
        seconds = dict(flags["seconds"])  # behaviour_forward and gate ran inside TRL's generate-and-score
        seconds["generate_and_score"] = time.perf_counter() - t0 - sum(seconds.values())
        self._updated_since_generation = False
        full = self._sampling_full.to(self.accelerator.device)
        decision = flags["decision"]
        old = flags["old"].masked_fill(flags["completion_mask"] == 0, 0.0)  # pad positions: 0, as the loss forward's
        m, d = self.intervention.masks(decision.zones)
        m, d = m.to(full.device), d.to(full.device)
        output["old_per_token_logps"] = old  # the behaviour policy: rho = exp(logp - logp_old)
        output["routing_logp_from_loss"] = ~mismatched_rows(m, full)
        output["routing_m"], output["routing_d"] = m, d
        output["routing_zone"], output["sampling_full"] = decision.zones.to(full.device), full.float()
        self._log_gate(decision, full, seconds)
        self._log_sensor_drift()
        if self.measure_fn is not None:
            t4 = time.perf_counter()
            self._log_measurements(flags["rollouts"], decision)
            self._metrics["train"]["timing/measure"].append(time.perf_counter() - t4)
        return output

    def _observed_behaviour(self, width: int, completion_mask) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Behaviour log-probs (B, width) and pooled activations (B, M, r) observed on the way: from TRL's
        old-log-prob forward (run in sampling modes) or from the sampling pass; (None, None) where neither was."""
        pool, self._sampling_pool = self._sampling_pool, None
        if self._acts is not None:
            acts, self._acts = self._acts, None
            return self._trl_old_logps, acts
        if pool is not None and pool.problem is None:
            return pool.logps(width), pool.pooled(completion_mask)
        if not self._warned_fallback:
            why = pool.problem if pool is not None else "the generation backend exposes no sampling pass"
            log.warning("routing: behaviour log-probs and activations from an extra teacher-forced forward (%s)", why)
            self._warned_fallback = True
        return None, None

    def _forward_in_sampling_modes(self, input_ids, attention_mask, logits_to_keep, full, pool_mask):
        def logps_fn(ids, mask, keep):
            with scored_positions_only():
                out = GRPOTrainer._get_per_token_logps_and_entropies(self, self.model, ids, mask, keep, ids.size(0))
            return out[0]

        chunk, checkpointing = self.args.per_device_train_batch_size, self.args.gradient_checkpointing_kwargs
        batch = (input_ids, attention_mask, logits_to_keep, full, chunk, pool_mask)
        return sampling_mode_forward(logps_fn, self.adapter, self.model, *batch, checkpointing)

    def _log_sensor_drift(self) -> None:
        """`sensor/A_dep_cos_init` and `sensor/A_dep_rel_change`: how far the deployed bottleneck's basis (where
        `v_act` was fit) has moved; the `bottleneck` sensor reads in the moved basis, `bottleneck_init` does not."""
        cos, rel = self.adapter.deployed_drift().tolist()
        self._metrics["train"]["sensor/A_dep_cos_init"].append(cos)
        self._metrics["train"]["sensor/A_dep_rel_change"].append(rel)

    # ---- log-probs: KL reference, TRL's old-log-prob forward, the loss forward -----------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        with scored_positions_only():  # on the CPU too, TRL's fused head scores only the completion tokens
            return self._logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)

    def _logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if isinstance(model, BaseModelReference):  # the KL reference: the base model, both blocks off
            with self.adapter.base_model_only():
                return super()._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
                )
        if self._trl_behaviour and not self._stash_logps:  # TRL's old-log-prob forward: each row in its sampling mode
            full = self._sampling_full.to(input_ids.device)
            k = logits_to_keep
            pool = completion_pool_mask(input_ids[:, -k:], attention_mask[:, -k:], self._tokenizer.pad_token_id)
            logps, self._acts = self._forward_in_sampling_modes(input_ids, attention_mask, k, full, pool)
            self._trl_old_logps = logps
            return logps, None, None
        out = self._shared_prompt_forward(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if out is None:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        if self._stash_logps:
            self._stash_loss_logps(out[0].detach())
        return out

    def _shared_prompt_forward(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """`share_prompt_forward`: the grad-carrying forward with one prompt forward per distinct prompt and masks
        (routed_grpo.prefill.shared_prefix_logps); None where it does not apply (TRL's forward runs instead)."""
        if not self.args.share_prompt_forward:
            return None
        known = ("batch_size", "compute_entropy", "compute_aux_loss")
        other = [v for k, v in kwargs.items() if k not in known and v is not None]  # multimodal inputs
        if args or other or kwargs.get("compute_aux_loss"):
            return None
        masks = self._loss_inputs if self._stash_logps else None  # routing on: this forward's row masks
        keys = None if masks is None else torch.stack([masks["routing_m"] != 0, masks["routing_d"] != 0], dim=1)

        @contextlib.contextmanager
        def prefix_rows(keep):  # the prompt forward runs with the kept rows' masks
            self.adapter.set_row_masks(masks["routing_m"][keep], masks["routing_d"][keep])
            try:
                yield
            finally:
                self.adapter.set_row_masks(masks["routing_m"], masks["routing_d"])

        lm, entropy = self.adapter.model.get_base_model(), kwargs.get("compute_entropy", False)
        with self.accelerator.autocast():
            rows = prefix_rows if masks is not None else None
            out = shared_prefix_logps(model, lm, input_ids, attention_mask, logits_to_keep, keys, rows, entropy)
        return None if out is None else (*out, None)

    def _stash_loss_logps(self, logps: torch.Tensor) -> None:
        """Complete the loss's behaviour log-probs (TRL's `_compute_loss` reads them from the copied batch dict next).

        Before the first update after generation, a matched row's behaviour policy IS the current policy in the same
        mode, so its `logp_old` is this forward's detached log-probs (rho == 1 exactly). Mismatched rows keep their
        behaviour log-probs in their sampling mode (the sampler's, or TRL's / the fallback's sampling-mode forward);
        `mismatch_ratio_cap` then bounds their ratio. The uncapped ones are kept for the `routing/rho_*` metrics.
        """
        inputs = self._loss_inputs
        if not self._updated_since_generation:
            from_loss = inputs["routing_logp_from_loss"].bool().unsqueeze(1)  # (B, 1)
            inputs["old_per_token_logps"] = torch.where(from_loss, logps, inputs["old_per_token_logps"])
        self._uncapped_old_logps = inputs["old_per_token_logps"]
        if self.args.mismatch_ratio_cap is not None:
            self._cap_mismatched(inputs, logps)
        self._loss_logps, self._loss_old_logps = logps, inputs["old_per_token_logps"]

    def _cap_mismatched(self, inputs: dict[str, Any], logps: torch.Tensor) -> None:
        """Replace the loss's behaviour log-probs so that `rho <= mismatch_ratio_cap` on mismatched rows."""
        rows = mismatched_rows(inputs["routing_m"], inputs["sampling_full"])
        old, capped = cap_mismatched_ratio(logps, inputs["old_per_token_logps"], rows, self.args.mismatch_ratio_cap)
        inputs["old_per_token_logps"] = old
        tokens = (inputs["completion_mask"].bool() & rows.unsqueeze(1)).sum()
        frac = (capped & inputs["completion_mask"].bool()).sum() / tokens.clamp_min(1)
        self._metrics["train"]["routing/rho_capped_frac"].append(self.accelerator.gather(frac).mean().item())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "routing_m" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.adapter.set_row_masks(inputs["routing_m"], inputs["routing_d"])  # cleared in training_step
        self._stash_logps, self._loss_logps, self._loss_old_logps = True, None, None
        self._loss_inputs = dict(inputs)  # a copy: completed / capped logp_old must not reach TRL's buffered batch
        try:
            loss = super().compute_loss(model, self._loss_inputs, return_outputs, num_items_in_batch)
        finally:
            self._stash_logps, self._loss_inputs = False, None
        if self._loss_logps is None:
            raise RuntimeError(
                "the loss never called _get_per_token_logps_and_entropies: this loss path bypasses the hook that "
                "completes the behaviour log-probs and measures rho, so routing cannot run on it"
            )
        self._check_finite(loss, inputs)
        return loss * inputs["routing_loss_scale"][0]  # screen: rows kept / all (1.0 otherwise, so bit-identical)

    def training_step(self, model, inputs, num_items_in_batch):
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.adapter.clear_row_masks()  # only now: backward with checkpointing has re-run the hooks
        if self.accelerator.sync_gradients:  # the optimizer steps after this micro-step
            self._updated_since_generation = True
            if self.gate is not None:  # the accumulated, all-reduced gradient of this optimizer step
                norms = block_grad_norms(
                    [p.grad for p in self.adapter.parameters(DEPLOYED)],
                    [p.grad for p in self.adapter.parameters(QUARANTINE)],
                )
                self._metrics["train"]["routing/qmass_grad"].append(grad_qmass(norms).item())
        return loss
