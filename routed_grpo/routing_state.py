"""`RoutingState`: how `RoutedGRPOTrainer` is set up and what it keeps across steps (a mixin of `GRPOTrainer`).

Covers: the model with its two blocks (`routed_adapter`), TRL's construction without its PEFT KL reference
(`without_trl_kl_reference`), the settings refused with routing on (`_reject_unsupported`), `v_act` (loaded,
extracted from pairs at start, refreshed every `vact_refresh_steps` without flushing the gate's buffer), the
optimizer rule ("no gradient means no change": no weight decay on the blocks, no step for a block parameter whose
gradient is exactly zero), the gate buffer's size (`buffer_capacity`: by default every rollout of the run; its
memory in the start-up log, a warning when it is a window or large), and checkpoints of the routing state (the
gate's buffer and `v_act` once per checkpoint, the sampling RNG per process) and of both blocks. Does not cover:
generation, the gate's decisions and the loss (routed_grpo.trainer).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer

from routed_grpo.adapter import DEPLOYED, QUARANTINE, RoutedAdapter, attach_routed_adapter
from routed_grpo.config import RoutedGRPOConfig
from routed_grpo.initial import INITIAL_FILE
from routed_grpo.loss import zero_grad_flags
from routed_grpo.pairs import load_pairs
from routed_grpo.sensor import parse_sensor
from routed_grpo.vact import extract_vact, haar_placebo, load_vact

FALLBACK_BUFFER = 8192  # rollouts, when the run's length is not known at start (max_steps=-1)
BUFFER_MEMORY_BOUND = 2 * 1024**3  # bytes per process above which the start-up log warns
GATE_FILE = "routing_gate.pt"  # the gate's state, identical on every process: written once per checkpoint
log = logging.getLogger(__name__)


def run_rollouts(args: RoutedGRPOConfig, max_steps: int) -> int | None:
    """Rollouts a run of `max_steps` optimizer steps generates over all processes (None when `max_steps <= 0`).

    TRL generates `generation_batch_size` rollouts (all processes) every `steps_per_generation x num_iterations`
    micro-steps, and an optimizer step is `gradient_accumulation_steps` micro-steps."""
    if max_steps <= 0:
        return None
    every = args.steps_per_generation * args.num_iterations
    generations = -(-max_steps * args.gradient_accumulation_steps // every)
    return generations * args.generation_batch_size


def buffer_capacity(args: RoutedGRPOConfig, adapter: RoutedAdapter) -> int:
    """`act_buffer_size`, or every rollout of the run; logs its memory, warns once when it passes the bound."""
    capacity = args.act_buffer_size or run_rollouts(args, args.max_steps) or FALLBACK_BUFFER
    row = len(adapter.sensor_names) * adapter.sensor_width * 4  # float32 bytes per rollout
    gib = capacity * row / 1024**3
    log.info("routing: activation buffer of %d rollouts, %.3f GiB on each process's device", capacity, gib)
    if capacity * row > BUFFER_MEMORY_BOUND:
        log.warning(
            "routing: the activation buffer (%d rollouts x %d sensor sites x width %d, float32) takes %.2f GiB on "
            "each process's device, above %.0f GiB; set act_buffer_size lower to bound it (the buffer becomes a "
            "window of the latest rollouts, see act_buffer_size)",
            capacity, len(adapter.sensor_names), adapter.sensor_width, gib, BUFFER_MEMORY_BOUND / 1024**3,
        )  # fmt: skip
    return capacity


class RoutingState(GRPOTrainer):
    """Mixin for `RoutedGRPOTrainer` (which sets `adapter`, `gate`, `_sampling_rng`, `_last_refresh`)."""

    def _reject_unsupported(self) -> None:
        if self.args.routing == "none":
            return
        if self.tools or self.environment_factories is not None or self.rollout_func is not None:
            raise ValueError(
                "tools, environment_factory and rollout_func are not supported with routing on: multi-turn "
                "generation re-enters generation for a subset of rows, so sampling modes and masks lose alignment"
            )
        if self._is_vlm:
            raise ValueError("vision-language models are not supported with routing on (untested)")
        if self.is_deepspeed_enabled:
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            raise ValueError(
                f"DeepSpeed (ZeRO stage {stage}) is not supported with routing on: DeepSpeed keeps gradients in its "
                "own partitioned buffers and steps its own optimizer, so `param.grad` stays empty, the "
                "'no gradient means no change' rule and routing/qmass_grad would silently do nothing. "
                "Use DDP (recipes/accelerate_configs/ddp.yaml)."
            )
        if self.is_fsdp_enabled:
            raise ValueError(
                "FSDP is not supported yet with routing on: the gate's gradient metrics, the checkpoint resume of "
                "both blocks and the activation hooks are untested on sharded parameters. Use DDP "
                "(recipes/accelerate_configs/ddp.yaml)."
            )

    def _check_buffer_span(self) -> None:
        """At the first gated batch (the run's length is known then): warn once if the buffer holds fewer rollouts
        than the run will generate."""
        needed, capacity = run_rollouts(self.args, self.state.max_steps), self.gate.buffer.capacity
        if needed is not None and needed > capacity:
            log.warning(
                "routing: act_buffer_size %d < the %d rollouts this run generates (%d steps): the buffer is a window "
                "of the latest %d rollouts, not the whole run. The gate's thresholds are then quantiles of the recent "
                "rollouts only: the early (clean) rollouts that anchor the low tail leave it, and a behaviour that "
                "grows can move the thresholds with it (DESIGN.md section 3, step 5).",
                capacity, needed, self.state.max_steps, capacity,
            )  # fmt: skip

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
        """The gate's direction: the scorer's own (checked against the sensor's row shape), else the config's."""
        args = self.args
        need = (len(self.adapter.sensor_names), self.adapter.sensor_width)
        if self.scorer.direction is not None:
            if tuple(self.scorer.direction.shape) != need:
                raise ValueError(
                    f"the scorer's direction has shape {tuple(self.scorer.direction.shape)}; the sensor "
                    f"{self.adapter.sensor.spec} needs {need}"
                )
            return self.scorer.direction
        if args.routing in ("diagnostic", "monitor"):
            return torch.zeros(need)  # a scorer without a direction (labels, a monitor): the gate is not read
        if args.routing == "vact" and args.vact_path:
            return load_vact(args.vact_path, self.adapter)[0]
        if args.routing == "vact":
            return self._extract_vact()
        return haar_placebo(torch.zeros(need), args.placebo_seed)

    def _maybe_refresh_vact(self) -> None:
        step, every = self.state.global_step, self.args.vact_refresh_steps
        if self.args.routing != "vact" or not every or step - self._last_refresh < every:
            return
        old = self.gate.vact.clone()
        self.gate.set_vact(self._extract_vact())
        self._last_refresh = step
        new = self.gate.vact.to(old.device)
        cos = torch.nn.functional.cosine_similarity(old, new, dim=-1).mean().item()
        self._metrics["train"]["routing/vact_refresh_cos"].append(cos)
        start = torch.nn.functional.cosine_similarity(self._vact_start.to(old.device), new, dim=-1).mean().item()
        self._metrics["train"]["routing/vact_cos_start"].append(start)

    def create_optimizer(self, *args, **kwargs):
        """TRL's optimizer plus a step pre-hook: a block parameter whose gradient is exactly zero gets no step at all.

        Without it AdamW would still move such a parameter by the momentum of earlier steps (for example the
        deployed block in a step where every rollout was routed). With it, "no gradient" means "no change". The
        check is one fused reduction and one host synchronisation per step, whatever the number of parameters.
        """
        optimizer = super().create_optimizer(*args, **kwargs)
        blocks = [*self.adapter.parameters(DEPLOYED), *self.adapter.parameters(QUARANTINE)]
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate may wrap it later; hook the torch one

        def drop_zero_grads(opt, args, kwargs):
            with_grad = [p for p in blocks if p.grad is not None]
            for p, zero in zip(with_grad, zero_grad_flags([p.grad for p in with_grad]).tolist(), strict=True):
                if zero:
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
        rank = self.accelerator.process_index
        torch.save(state, os.path.join(folder, f"routing_state_rank{rank}.pt"))
        if self.gate is not None and self.args.should_save:  # identical on every process: one copy
            state = {**self.gate.state_dict(), "sensor": self.adapter.sensor.spec}  # rows are in its coordinates
            torch.save(state, os.path.join(folder, GATE_FILE))
        if self.args.should_save:
            self.adapter.save_initial(folder)  # subtracted initial copies: PEFT's state holds only A and B
        # The parent's PEFT save already wrote `folder/deployed/`: a stock LoRA adapter of the deployed block.

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Load both blocks and keep both active and trainable.

        transformers' own PEFT resume loads only the first active adapter as trainable and then calls
        `set_adapter(first)`, which would silently drop the quarantine block from the forward.
        """
        for block in (DEPLOYED, QUARANTINE):
            path = os.path.join(resume_from_checkpoint, block, "adapter_model.safetensors")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: the checkpoint has no '{block}' block")
            set_peft_model_state_dict(self.adapter.model, load_file(path), adapter_name=block)
        self.adapter.model.base_model.set_adapter([DEPLOYED, QUARANTINE])
        initial = os.path.join(resume_from_checkpoint, INITIAL_FILE)
        if self.adapter.subtracted != os.path.exists(initial):
            raise ValueError(
                f"{resume_from_checkpoint}: adapter_init={self.args.adapter_init!r} but the checkpoint "
                f"{'has no' if self.adapter.subtracted else 'has'} {INITIAL_FILE}; resume with the run's adapter_init"
            )
        if self.adapter.subtracted:
            self.adapter.load_initial(initial)  # the factors training used, not a recomputation

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
            gate_path = os.path.join(checkpoint, GATE_FILE)
            if os.path.exists(gate_path):
                gate_state = torch.load(gate_path, map_location="cpu", weights_only=True)
            elif "gate" in state:  # checkpoints written before the gate state had its own file
                gate_state = state["gate"]
            else:
                raise FileNotFoundError(f"{gate_path}: the checkpoint has no gate state")
            stored = parse_sensor(gate_state.get("sensor"))  # checkpoints before sensors: the bottleneck
            if stored != self.adapter.sensor:
                raise ValueError(
                    f"{gate_path}: the checkpoint's gate buffer and v_act were made at sensor {stored.spec!r}, but "
                    f"sensor={self.adapter.sensor.spec!r} now; resume with the checkpoint's sensor"
                )
            self.gate.load_state_dict(gate_state)
            self.gate.route_tail_q = self.args.route_tail_q  # the config, not the checkpoint, sets the tail mass


def routed_adapter(model, args: RoutedGRPOConfig, tokenizer: Any = None) -> RoutedAdapter:
    """Load `model` if it is an id, then attach the two blocks (or reuse them if the model already has them), at
    `adapter_init` (the signed inits read the pairs with `tokenizer`)."""
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        if DEPLOYED not in peft_config or QUARANTINE not in peft_config:
            raise ValueError(f"the model already has PEFT adapters {list(peft_config)}; pass the base model instead")
        model.base_model.set_adapter([DEPLOYED, QUARANTINE])  # both active and trainable
        adapter = RoutedAdapter.of(model, init_seed=args.adapter_init_seed)
        if adapter.adapter_init != args.adapter_init:
            raise ValueError(
                f"the model's blocks were made with adapter_init={adapter.adapter_init!r}, the config says "
                f"{args.adapter_init!r}; pass the base model, or load the run's routed_init.safetensors first"
            )
    else:
        adapter = attach_routed_adapter(
            model, args.adapter_rank, args.adapter_alpha, args.adapter_targets, args.adapter_init_seed
        )
        if args.adapter_init != "random":
            hack_in = hack_inputs(adapter, args, tokenizer)
            adapter.set_initial(args.adapter_init, adapter.compute_initial(args.adapter_init, hack_in))
            adapter.broadcast_initial()  # every rank takes rank 0's factors
    if adapter.sensor.spec != parse_sensor(args.sensor).spec:
        adapter.use_sensor(args.sensor)
    return adapter


def hack_inputs(adapter: RoutedAdapter, args: RoutedGRPOConfig, tokenizer: Any) -> dict[str, torch.Tensor] | None:
    """The signed inits' hack direction per module, from the pairs only (None for svd)."""
    if not args.adapter_init.startswith("signed"):
        return None
    if tokenizer is None:
        raise ValueError(f"adapter_init={args.adapter_init!r} reads the pairs: pass processing_class= (a tokenizer)")
    from routed_grpo.activations import pair_input_differences

    pairs = load_pairs(args.vact_pairs_path, tags=args.vact_pairs_tags, exclude_tags=args.vact_pairs_exclude_tags)
    return pair_input_differences(adapter, tokenizer, pairs)


@contextlib.contextmanager
def without_trl_kl_reference(args: RoutedGRPOConfig):
    """`GRPOTrainer.__init__` with `beta = 0`: with `beta != 0` and a PEFT model it would clone a "ref" adapter from
    "default" (which this model does not have). The trainer sets its own KL reference, the base model, afterwards."""
    beta, args.beta = args.beta, 0.0
    try:
        yield
    finally:
        args.beta = beta
