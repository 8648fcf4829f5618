"""`RoutedGRPOTrainer`: TRL's `GRPOTrainer` with gradient routing by an activation direction `v_act`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from routed_grpo.adapter import DEPLOYED, QUARANTINE, RoutedAdapter, attach_routed_adapter
from routed_grpo.config import RoutedGRPOConfig
from routed_grpo.gate import ROUTE, Gate
from routed_grpo.loss import (
    cap_mismatched_ratio,
    draw_sampling_modes,
    first_nonfinite_zone,
    grad_norm,
    grad_qmass,
    mismatched_rows,
    per_row_rho,
    rho_by_zone,
)
from routed_grpo.pairs import load_pairs
from routed_grpo.vact import auroc, extract_vact, haar_placebo, load_vact

ROUTING_STATE = "routing_state.pt"
MeasureFn = Callable[..., dict[str, list[float]]]


class RoutedGRPOTrainer(GRPOTrainer):
    """GRPO with a deployed and a quarantine adapter block and a label-free gate (DESIGN.md section 3).

    What differs from `trl.GRPOTrainer`:
    - `__init__` attaches the two-block adapter (`routed_grpo.adapter`) to the model (a model id is loaded first);
      `peft_config` is not accepted, because the adapter is part of the method.
    - `_generate_single_turn`: each rollout gets a sampling mode (`deploy` with probability `gen_deploy_frac`,
      seeded); one `generate` call samples both modes through per-row quarantine masks.
    - `_generate_and_score_completions`: after TRL's rewards and Dr.GRPO advantages, one no-grad forward per chunk in
      each rollout's own sampling mode gives the behaviour log-probs `old_per_token_logps` and, through hooks, the
      pooled deployed bottleneck activations; the gate scores them against `v_act`, appends them to the buffer,
      takes thresholds over the whole buffer and returns zones and masks (new batch keys `routing_m`, `routing_d`,
      `routing_zone`, `sampling_full`).
    - `compute_loss` sets the masks for the grad-carrying forward; `training_step` clears them only after backward
      (gradient checkpointing re-runs the forward hooks), then logs the routing mass of the gradient norm.
    - Checkpoints also hold the gate buffer, `v_act` and the sampling RNG state (the deployed block is already a
      stock PEFT adapter in `checkpoint-N/deployed/`); `resume_from_checkpoint` restores them and keeps both blocks
      active. Adapter blocks get no weight decay, and a block parameter with an exactly zero gradient gets no
      optimizer step (no momentum drift): no gradient means no change.
    - Rejected with routing on: tools / environment_factory / rollout_func, FSDP and ZeRO-3 (untested).
    - `mismatch_ratio_cap` truncates `rho` on rows whose training mode differs from their sampling mode.
    The zones come from `_decide_zones(acts, output)`, which calls the gate and nothing else. Only the DIAGNOSTIC
    upper-bound trainers of `routed_grpo.lab.diagnostic` override it (`routing="diagnostic"`, which this class
    refuses), so the method's arms (`vact`, `placebo`) have no path to labels.
    Inherited unchanged: data loading, reward computation, advantages, the clipped surrogate and its aggregation,
    generation itself, logging, evaluation. With `routing="none"` the trainer is stock GRPO with the adapter.
    An optional `measure_fn(prompts, completions, **columns) -> {"hack_strict": [...]}` is called after the gate
    has decided, only to log `measure/...` (the AUROC of the score); nothing it returns reaches the gate or loss.
    """

    _tag_names = ["trl", "grpo", "routed-grpo"]
    _diagnostic = False  # True only in routed_grpo.lab.diagnostic's label-reading subclasses

    def __init__(self, model, reward_funcs, args: RoutedGRPOConfig, *pos, measure_fn: MeasureFn | None = None, **kw):
        if not isinstance(args, RoutedGRPOConfig):
            raise TypeError(f"args must be a RoutedGRPOConfig, got {type(args).__name__}")
        if args.routing == "diagnostic" and not self._diagnostic:
            raise ValueError(
                "routing='diagnostic' is reserved for the DIAGNOSTIC trainers of routed_grpo.lab.diagnostic; "
                "RoutedGRPOTrainer routes by 'vact' or 'placebo'"
            )
        if kw.get("peft_config") is not None:
            raise ValueError("peft_config is not accepted: RoutedGRPOTrainer attaches its own two-block adapter")
        self.adapter = _routed_adapter(model, args)
        super().__init__(self.adapter.model, reward_funcs, args, *pos, **kw)
        self._reject_unsupported()
        self.measure_fn = measure_fn
        self._sampling_rng = torch.Generator().manual_seed(args.seed + self.accelerator.process_index)
        self._sampling_full: torch.Tensor | None = None  # (B,) of the last generation
        self._stash_logps = False
        self._loss_logps: torch.Tensor | None = None
        self._loss_inputs: dict[str, Any] | None = None
        self._last_refresh = 0
        self.gate = None
        if args.routing != "none":
            self.gate = Gate(
                self._initial_vact(),
                args.route_tail_q,
                args.act_buffer_size,
                self.accelerator,
                self.accelerator.device,
                warmup_rollouts=args.gate_warmup_rollouts,
            )

    def _reject_unsupported(self) -> None:
        if self.args.routing == "none":
            return
        if self.tools or self.environment_factories is not None or self.rollout_func is not None:
            raise ValueError(
                "tools, environment_factory and rollout_func are not supported with routing on: multi-turn "
                "generation re-enters generation for a subset of rows, so sampling modes and masks lose alignment"
            )
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if self.is_fsdp_enabled or zero3:
            raise ValueError(
                "FSDP and DeepSpeed ZeRO-3 are not supported yet with routing on: the gate's gradient metrics, the "
                "checkpoint resume of both blocks and the activation hooks are untested on sharded parameters. "
                "Use DDP or ZeRO-2 (recipes/accelerate_configs/ddp.yaml, zero2.yaml)."
            )

    # ---- v_act ----------------------------------------------------------------------------------------------------
    def _extract_vact(self) -> torch.Tensor:
        """Extract on every rank, then take rank 0's, so the gate is identical everywhere even if kernels are not."""
        args = self.args
        pairs = load_pairs(args.vact_pairs_path, tags=args.vact_pairs_tags, exclude_tags=args.vact_pairs_exclude_tags)
        vact = extract_vact(self.adapter, self.processing_class, pairs, mode=self.args.vact_sampling_mode)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            vact = vact.to(self.accelerator.device)
            torch.distributed.broadcast(vact, src=0)
        return vact.cpu()

    def _initial_vact(self) -> torch.Tensor:
        args = self.args
        if args.routing == "vact" and args.vact_path:
            return load_vact(args.vact_path, self.adapter)[0]
        if args.routing == "vact":
            return self._extract_vact()
        like = torch.zeros(len(self.adapter.module_names), self.adapter.rank)
        return haar_placebo(like, args.placebo_seed)

    def _maybe_refresh_vact(self) -> None:
        step, every = self.state.global_step, self.args.vact_refresh_steps
        if self.args.routing != "vact" or not every or step - self._last_refresh < every:
            return
        old = self.gate.vact.clone()
        self.gate.set_vact(self._extract_vact())
        self._last_refresh = step
        cos = torch.nn.functional.cosine_similarity(old, self.gate.vact.to(old.device), dim=-1).mean().item()
        self._metrics["train"]["routing/vact_refresh_cos"].append(cos)

    # ---- generation: sampling modes -------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        n = len(prompt_ids)
        training = self.model.training and self.gate is not None
        full = draw_sampling_modes(n, self.args.gen_deploy_frac, self._sampling_rng) if training else None
        self._sampling_full = full if full is not None else torch.ones(n, dtype=torch.bool)
        if full is None or full.all():
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if not full.any():
            with self.adapter.deployment_ablation():
                return super()._generate_single_turn(
                    prompt_ids, images, multimodal_fields, num_generations, has_tool_images
                )
        self.adapter.set_row_masks(full.float(), torch.zeros(n))  # deploy rows: quarantine output x 0
        try:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        finally:
            self.adapter.clear_row_masks()

    # ---- behaviour forward and gate ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _behaviour_forward(self, input_ids, attention_mask, logits_to_keep, full, pool_mask):
        """Per-token log-probs in each row's sampling mode (B, T_c) and pooled activations (B, M, r)."""
        chunk = self.args.per_device_train_batch_size
        logps, acts = [], []
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for s in range(0, input_ids.size(0), chunk):
                lp, h = self._behaviour_chunk(
                    input_ids[s : s + chunk],
                    attention_mask[s : s + chunk],
                    logits_to_keep,
                    full[s : s + chunk],
                    pool_mask[s : s + chunk],
                )
                logps.append(lp)
                acts.append(h)
        return torch.cat(logps), torch.cat(acts)

    def _behaviour_chunk(self, input_ids, attention_mask, logits_to_keep, full, pool_mask):
        self.adapter.set_row_masks(full.float(), torch.zeros(full.shape))
        try:
            with self.adapter.capture(pool_mask):
                lp, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention_mask, logits_to_keep, batch_size=input_ids.size(0)
                )
        finally:
            self.adapter.clear_row_masks()
        return lp, self.adapter.pooled()

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if self.gate is not None and self.model.training:
            self._maybe_refresh_vact()
        t0 = time.perf_counter()
        output = super()._generate_and_score_completions(inputs)
        if self.gate is None or not self.model.training:
            return output
        t1 = time.perf_counter()
        device = self.accelerator.device
        full = self._sampling_full.to(device)
        prompt_mask, completion_mask = output["prompt_mask"], output["completion_mask"]
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        pool_tokens = completion_mask.clone()  # (B, T_c)
        empty = pool_tokens.sum(1) == 0  # rows masked out by mask_truncated_completions: pool their tokens anyway
        if empty.any():
            pool_tokens[empty] = (output["completion_ids"][empty] != self._tokenizer.pad_token_id).to(
                pool_tokens.dtype
            )
        pool_mask = torch.cat([torch.zeros_like(prompt_mask), pool_tokens], dim=1)  # completion tokens only
        logps, acts = self._behaviour_forward(input_ids, attention_mask, completion_mask.size(1), full, pool_mask)
        t2 = time.perf_counter()
        decision = self._decide_zones(acts, output)
        t3 = time.perf_counter()
        output["old_per_token_logps"] = logps  # the behaviour policy: rho = exp(logp - logp_old)
        output["routing_m"], output["routing_d"] = decision.m.to(device), decision.d.to(device)
        output["routing_zone"], output["sampling_full"] = decision.zones.to(device), full.float()
        self._log_gate(decision, full, {"generate_and_score": t1 - t0, "behaviour_forward": t2 - t1, "gate": t3 - t2})
        if self.measure_fn is not None:
            self._log_measurements(inputs, output, decision)
        return output

    def _decide_zones(self, acts: torch.Tensor, output: dict[str, Any]):
        """Zones and masks of this process's rollouts: the label-free gate on pooled activations (N, M, r)."""
        return self.gate.step(acts)

    def _log_gate(self, decision, full, seconds: dict[str, float]) -> None:
        metrics = self._metrics["train"]
        for name, frac in decision.zone_frac.items():
            metrics[f"routing/zone_frac/{name}"].append(frac)
        scores = self.accelerator.gather(decision.scores.float())
        metrics["routing/threshold_lo"].append(decision.lo)
        metrics["routing/threshold_hi"].append(decision.hi)
        metrics["routing/score_mean"].append(scores.mean().item())
        metrics["routing/score_std"].append(scores.std().item() if scores.numel() > 1 else 0.0)
        metrics["routing/qmass"].append(decision.zone_frac["absorb"] + decision.zone_frac["route"])
        metrics["routing/buffer_size"].append(float(decision.buffer_size))
        metrics["routing/sampling_deploy_frac"].append(1.0 - self.accelerator.gather(full.float()).mean().item())
        for key, value in seconds.items():
            metrics[f"timing/{key}"].append(value)

    def _rollouts(self, inputs, output) -> tuple[list, list, dict[str, list]]:
        """(prompts, completions, dataset columns) of this process's rollouts, as TRL passes them to rewards."""
        prompts = [x["prompt"] for x in inputs]
        texts = self.processing_class.batch_decode(output["completion_ids"], skip_special_tokens=True)
        conversational = isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion")}
        return prompts, completions, columns

    def _log_measurements(self, inputs, output, decision) -> None:
        """Measurement only: labels from `measure_fn` are logged with the AUROC of the score and the precision and
        recall of the route zone for each label; called after the gate has decided, never used to route."""
        prompts, completions, columns = self._rollouts(inputs, output)
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

    # ---- loss: masks during the grad-carrying forward -------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._stash_logps:
            self._loss_logps = out[0].detach()
            if self.args.mismatch_ratio_cap is not None:
                self._cap_mismatched(self._loss_inputs, self._loss_logps)
        return out

    def _cap_mismatched(self, inputs: dict[str, Any], logps: torch.Tensor) -> None:
        """Replace the loss's behaviour log-probs so that `rho <= mismatch_ratio_cap` on mismatched rows.

        TRL's `_compute_loss` reads `old_per_token_logps` after this forward, from the (copied) batch dict."""
        rows = mismatched_rows(inputs["routing_zone"], inputs["sampling_full"])
        old, capped = cap_mismatched_ratio(logps, inputs["old_per_token_logps"], rows, self.args.mismatch_ratio_cap)
        inputs["old_per_token_logps"] = old
        tokens = (inputs["completion_mask"].bool() & rows.unsqueeze(1)).sum()
        frac = (capped & inputs["completion_mask"].bool()).sum() / tokens.clamp_min(1)
        self._metrics["train"]["routing/rho_capped_frac"].append(self.accelerator.gather(frac).mean().item())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "routing_m" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.adapter.set_row_masks(inputs["routing_m"], inputs["routing_d"])  # cleared in training_step
        self._stash_logps = True
        self._loss_inputs = dict(inputs)  # a copy: a capped logp_old must not reach TRL's buffered batch
        try:
            loss = super().compute_loss(model, self._loss_inputs, return_outputs, num_items_in_batch)
        finally:
            self._stash_logps, self._loss_inputs = False, None
        row_mean, row_max = per_row_rho(self._loss_logps, inputs["old_per_token_logps"], inputs["completion_mask"])
        zones = inputs["routing_zone"]
        bad_zone = first_nonfinite_zone(row_mean, row_max, zones)
        bad = torch.tensor(float(bad_zone is not None or not torch.isfinite(loss).all()), device=loss.device)
        if self.accelerator.reduce(bad, reduction="sum").item() > 0:  # every rank raises, none hangs in all-reduce
            where = f"zone '{bad_zone}'" if bad_zone else ("the loss" if not torch.isfinite(loss) else "another rank")
            raise FloatingPointError(
                f"non-finite importance ratio or loss at step {self.state.global_step} in {where} "
                f"(rho_max per row {row_max.tolist()}, loss {loss.item()})"
            )
        for key, value in rho_by_zone(row_mean, row_max, zones).items():
            self._metrics["train"][key].append(value)
        return loss

    def training_step(self, model, inputs, num_items_in_batch):
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.adapter.clear_row_masks()  # only now: backward with checkpointing has re-run the hooks
        if self.gate is not None and self.accelerator.sync_gradients and not self.is_deepspeed_enabled:
            # after the last micro-step's backward: the accumulated, all-reduced gradient of this optimizer step
            dep, quar = grad_norm(self.adapter.parameters(DEPLOYED)), grad_norm(self.adapter.parameters(QUARANTINE))
            self._metrics["train"]["routing/qmass_grad"].append(grad_qmass(dep, quar))
        return loss

    def create_optimizer(self, *args, **kwargs):
        """TRL's optimizer plus a step pre-hook: a block parameter whose gradient is exactly zero gets no step at all.

        Without it AdamW would still move such a parameter by the momentum of earlier steps (for example the
        deployed block in a step where every rollout was routed). With it, "no gradient" means "no change".
        """
        optimizer = super().create_optimizer(*args, **kwargs)
        blocks = [*self.adapter.parameters(DEPLOYED), *self.adapter.parameters(QUARANTINE)]
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate may wrap it later; hook the torch one

        def drop_zero_grads(opt, args, kwargs):
            for p in blocks:
                if p.grad is not None and not p.grad.any():
                    p.grad = None

        if not getattr(inner, "_routed_zero_grad_hook", False) and hasattr(inner, "register_step_pre_hook"):
            inner.register_step_pre_hook(drop_zero_grads)
            inner._routed_zero_grad_hook = True
        return optimizer

    def get_decay_parameter_names(self, model) -> list[str]:
        """No weight decay on the blocks: a block that receives no gradient must not move (DESIGN.md section 4)."""
        blocks = set(self.adapter.parameter_names())
        return [n for n in super().get_decay_parameter_names(model) if n not in blocks]

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state = {"sampling_rng": self._sampling_rng.get_state(), "last_refresh": self._last_refresh}
        if self.gate is not None:
            state["gate"] = self.gate.state_dict()
        rank = self.accelerator.process_index
        torch.save(state, os.path.join(folder, f"routing_state_rank{rank}.pt"))
        # The parent's PEFT save already wrote `folder/deployed/`: a stock LoRA adapter of the deployed block.

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Load both blocks and keep both active and trainable.

        transformers' own PEFT resume loads only the first active adapter as trainable and then calls
        `set_adapter(first)`, which would silently drop the quarantine block from the forward.
        """
        model = model if model is not None else self.model
        for block in (DEPLOYED, QUARANTINE):
            path = os.path.join(resume_from_checkpoint, block, "adapter_model.safetensors")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: the checkpoint has no '{block}' block")
            set_peft_model_state_dict(self.adapter.model, load_file(path), adapter_name=block)
        self.adapter.model.base_model.set_adapter([DEPLOYED, QUARANTINE])

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, f"routing_state_rank{self.accelerator.process_index}.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: the checkpoint has no routing state for this process")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._sampling_rng.set_state(state["sampling_rng"])
        self._last_refresh = state["last_refresh"]
        if self.gate is not None:
            self.gate.load_state_dict(state["gate"])
            self.gate.route_tail_q = self.args.route_tail_q  # the config, not the checkpoint, sets the tail mass


def _routed_adapter(model, args: RoutedGRPOConfig) -> RoutedAdapter:
    """Load `model` if it is an id, then attach the two blocks (or reuse them if the model already has them)."""
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        if DEPLOYED in peft_config and QUARANTINE in peft_config:
            model.base_model.set_adapter([DEPLOYED, QUARANTINE])  # both active and trainable
            return RoutedAdapter.of(model, init_seed=args.adapter_init_seed)
        raise ValueError(f"the model already has PEFT adapters {list(peft_config)}; pass the base model instead")
    return attach_routed_adapter(
        model, args.adapter_rank, args.adapter_alpha, args.adapter_targets, args.adapter_init_seed
    )
