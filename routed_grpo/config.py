"""`RoutedGRPOConfig`: TRL's `GRPOConfig` plus the routing fields, with Dr.GRPO defaults."""

from dataclasses import dataclass, field

from trl import GRPOConfig

from routed_grpo.adapter import DEFAULT_TARGETS
from routed_grpo.ladder import DEFAULT_FLAG_PENALTY, INTERVENTIONS, SCORERS
from routed_grpo.sensor import DEFAULT_SENSOR, parse_sensor
from routed_grpo.svd_init import INITS

ROUTING_CHOICES = ("vact", "placebo", "monitor", "none", "diagnostic")


@dataclass
class RoutedGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`RoutedGRPOTrainer`].

    Inherits every parameter from [`trl.GRPOConfig`]. It adds only the routing fields below and changes three
    defaults to what the method needs: `loss_type="dr_grpo"` and `scale_rewards="none"` (Dr.GRPO advantages
    `A = r - mean_group(r)`, no std scaling, no length normalisation) and `disable_dropout=True` (generation runs
    in train mode, and dropout would make behaviour log-probs differ from the policy that sampled).

    Inherited settings with a routing-specific meaning: `beta` (KL coefficient) penalises the divergence from the
    BASE model, both blocks off (the grad-carrying forward keeps each row's masks, so the KL gradient reaches only
    the blocks that row trains); `max_grad_norm` clips the deployed and the quarantine block each by its own norm
    with routing on (other trained parameters by the global norm; `grad_norm` still logs the global pre-clip norm);
    `use_vllm` samples each sampling mode with its own merged weights (colocate or
    server; not yet run on a GPU). Refused: `sync_ref_model`; with routing on also `use_liger_kernel`,
    `disable_dropout=False` and continuous batching with `0 < gen_deploy_frac < 1`; the trainer also refuses
    DeepSpeed (any ZeRO stage) and FSDP with routing on.

    Parameters:
        routing (`str`, *optional*, defaults to `"vact"`):
            Gate direction: `"vact"` (from `vact_path` or extracted from `vact_pairs_path` at start), `"placebo"`
            (a Haar-random direction with the same shapes, seeded by `placebo_seed`), `"monitor"` (a monitor
            function handed to the trainer as `monitor_fn=`, e.g. `routed_grpo.judge.LLMJudge`), `"none"` (no gate, no
            masks: the trainer behaves as stock `GRPOTrainer` with the two-block adapter), or `"diagnostic"`
            (reserved for the DIAGNOSTIC scorers of `routed_grpo.lab.diagnostic`, which read labels: the trainer
            accepts it only with such a scorer handed in as `scorer=`, and such a scorer only with it).
        vact_path (`str`, *optional*):
            A `v_act` file written by `routed-grpo pairs extract`, made for the same model and adapter.
        vact_pairs_path (`str`, *optional*):
            Pairs file or directory; `v_act` is extracted from it with the current adapter at start (when no
            `vact_path` is given) and at every refresh.
        vact_pairs_tags (`list[str]`, *optional*):
            Keep only pairs with any of these tags (e.g. `mode:overwrite_tests`) when extracting from the pairs.
        vact_pairs_exclude_tags (`list[str]`, *optional*):
            Drop pairs with any of these tags (hold a hack mode out of the direction).
        vact_refresh_steps (`int`, *optional*, defaults to `0`):
            Re-extract `v_act` from the pairs every this many optimizer steps (0 = never). The buffer is re-scored,
            not flushed.
        placebo_seed (`int`, *optional*, defaults to `0`):
            Seed of the Haar-random placebo direction.
        route_tail_q (`float`, *optional*, defaults to `0.1`):
            Symmetric tail mass of the gate: `lo = q(route_tail_q)`, `hi = q(1 - route_tail_q)` over the buffer.
        act_buffer_size (`int`, *optional*):
            Capacity (rollouts) of the run-spanning buffer of pooled activations, held in float32 on every
            process's device (`capacity x modules x adapter_rank x 4` bytes each; the start-up log says how much).
            Defaults to every rollout of the run: `max_steps` x the rollouts one optimizer step generates over all
            processes (`per_device_train_batch_size x gradient_accumulation_steps x processes`, divided by
            `num_iterations`, rounded up to whole generation batches). With `max_steps=-1` (train by epochs) the number
            of steps is only known when training starts: the default is then 8192 and the trainer warns at its first
            batch if the run will generate more. A smaller capacity makes the buffer a window of the latest rollouts
            (the thresholds then follow the recent distribution and can drift with a hack that grows); the trainer
            warns once with both numbers.
        gate_warmup_rollouts (`int`, *optional*, defaults to `0`):
            The first this many rollouts of the run (counted over all processes) are all absorbed (both blocks
            train) while their activations fill the buffer; the gate's thresholds then start from their quantiles.
            0 = no warm-up: the first thresholds are the quantiles of the first batch alone, which splits it about
            `route_tail_q` / rest / `route_tail_q` whatever it holds (a 4-rollout batch 25/50/25 by construction).
        gen_deploy_frac (`float`, *optional*, defaults to `0.0`):
            Fraction of rollouts sampled in `deploy` mode (quarantine ablated). 0 is the recommended research
            setting. Whenever the mask's forward mode differs from the sampling mode ("mismatched rows"), `rho`
            compares two policies: full-sampled keep rows (any frac < 1) get `ablated/full`, deploy-sampled absorb
            and route rows (`0 < frac`) get `full/ablated`. Neither is bounded by the one-sided clip for negative
            advantages (measured on the organism: `routing/rho_max/keep` above 1,000). Both are logged per zone
            (`routing/rho_max/<zone>`); `mismatch_ratio_cap` bounds them.
        mismatch_ratio_cap (`float`, *optional*, defaults to `4.0`):
            Truncate `rho` at this value on mismatched rows only (matched rows are untouched): their behaviour
            log-probs become `max(logp_old, logp - log(cap))`, so the ratio is `min(rho, cap)` and the gradient
            keeps its direction. None: no bound (the method as DESIGN.md states it). The default comes from the
            organism study (README, "Results"): without a bound, 3 of the 9 routed, placebo and oracle-direction
            runs collapsed after `routing/rho_max/keep` reached 385-1,233 (reward 0, nothing compiles); with 4,
            none of the 6 routed and placebo runs did.
        share_prompt_forward (`bool`, *optional*, defaults to `False`):
            The loss forward runs the prompt (all but its last token) once per distinct prompt and routing masks,
            then copies its KV cache to the rows that share it (`routed_grpo.prefill.shared_prefix_logps`): with
            `num_generations` samples per prompt and prompts longer than completions, most of the loss forward and
            backward. The same loss and gradient to floating-point rounding, not bit for bit (the gradient sums the
            samples' contributions in another order), so off by default: a run with it does not reproduce one
            without it token for token. Refused with gradient checkpointing (TRL's default): a checkpointed layer
            re-runs its forward in backward, which appends the completion's keys and values to the shared cache
            a second time. Falls back to TRL's forward for multimodal inputs, an MoE aux loss, or batches in which
            no prompt repeats.
        adapter_rank (`int`, *optional*, defaults to `8`):
            Rank of each block (the deployed and the quarantine block each have this rank).
        adapter_alpha (`float`, *optional*):
            LoRA alpha of each block; defaults to `adapter_rank` (scaling 1).
        adapter_targets (`list[str]`, *optional*):
            Names of the target Linear modules; defaults to all attention and MLP projections.
        adapter_init (`str`, *optional*, defaults to `"random"`):
            The blocks' initial values (routed_grpo.svd_init): `random` (PEFT's: `B = 0`, `A` seeded random) or
            `svd` (each target weight's top r singular triplets for the deployed block, the next r for the
            quarantine, PiSSA-scaled, with the frozen initial copies subtracted so the net delta is exactly zero and
            the base weights untouched); `signed` / `signed_reverse` seed one slot with the pairs'
            (`vact_pairs_path`) mean input difference, in the quarantine / in the deployed block.
        adapter_init_seed (`int`, *optional*, defaults to `0`):
            Seed of the blocks' initial `A` matrices; `v_act` files record it and must match (except a residual
            sensor's, which does not depend on the adapter).
        scorer (`str`, *optional*):
            How a rollout becomes a score and a flag (DESIGN.md section 10): `vact`, `placebo` or `monitor`, the
            same choice as `routing` under its ladder name; set one of the two (both set and different is an error;
            neither: `vact`). `diagnostic` is reserved for the lab's DIAGNOSTIC scorers, handed to the trainer.
            Directions flag the gate's top tail (`route_tail_q`), a monitor its scores `>= monitor_threshold`.
        intervention (`str`, *optional*, defaults to `"route"`):
            What a flagged rollout does (`routed_grpo.ladder`): `route` (the zones and masks of DESIGN.md section 3,
            the method), `penalty` (its reward is lowered by `flag_penalty` before the advantages) or `screen` (it
            leaves the loss and its group's mean). `penalty` and `screen` are the baseline plus the flags: both
            blocks train on every row, every row is sampled with both blocks on (`gen_deploy_frac` must be 0),
            clipping is global, and the deployed model is the full model.
        flag_penalty (`float`, *optional*, defaults to `3.0`):
            What `penalty` takes off a flagged rollout's reward: the reference's correctness reward (Ariahw et
            al.: 3.0 for passing, 0.5 for compiling; the organism's `pass_reward` and `compile_reward` are the same),
            so a flagged hack that passes earns what a compiling failure earns.
        monitor_threshold (`float`, *optional*, defaults to `0.5`):
            A monitor flags a rollout whose score is `>=` this value.
        sensor (`str`, *optional*, defaults to `"bottleneck"`):
            What the gate pools per rollout (`routed_grpo.sensor`, DESIGN.md section 10): `bottleneck` (the live
            deployed bottleneck `A_dep x`), `bottleneck_init` (the frozen initial projection `A_dep0 x`, the basis
            `v_act` was fit in) or `residual:L[+L2...]` (the decoder's hidden state after layer L, 0-based). `v_act`
            files record their sensor and are refused with another one.
        vact_sampling_mode (`str`, *optional*, defaults to `"full"`):
            Sampling mode of the forward that extracts `v_act` from the pairs.
    """

    routing: str | None = field(
        default=None, metadata={"help": "Scorer: 'vact' (default), 'placebo', 'monitor' or 'none'."}
    )
    vact_path: str | None = field(default=None, metadata={"help": "v_act file from `routed-grpo pairs extract`."})
    vact_pairs_path: str | None = field(
        default=None, metadata={"help": "Pairs to extract v_act from at start and at each refresh."}
    )
    vact_pairs_tags: list[str] | None = field(default=None, metadata={"help": "Keep pairs with any of these tags."})
    vact_pairs_exclude_tags: list[str] | None = field(
        default=None, metadata={"help": "Drop pairs with any of these tags."}
    )
    vact_refresh_steps: int = field(default=0, metadata={"help": "Re-extract v_act every N steps (0 = never)."})
    placebo_seed: int = field(default=0, metadata={"help": "Seed of the Haar-random placebo direction."})
    route_tail_q: float = field(default=0.1, metadata={"help": "Symmetric gate tail mass, in (0, 0.5)."})
    act_buffer_size: int | None = field(
        default=None, metadata={"help": "Activation buffer capacity (rollouts); default: every rollout of the run."}
    )
    gate_warmup_rollouts: int = field(
        default=0, metadata={"help": "Rollouts absorbed while the buffer fills, before the gate routes (0 = none)."}
    )
    gen_deploy_frac: float = field(
        default=0.0, metadata={"help": "Fraction of rollouts sampled with the quarantine ablated, in [0, 1]."}
    )
    mismatch_ratio_cap: float | None = field(
        default=4.0, metadata={"help": "Truncate rho at this value on mismatched rows only (None: no bound)."}
    )
    share_prompt_forward: bool = field(
        default=False, metadata={"help": "Loss forward: one prompt forward per distinct prompt (rounding differs)."}
    )
    adapter_rank: int = field(default=8, metadata={"help": "Rank of each adapter block."})
    adapter_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha of each block (default: rank)."})
    adapter_targets: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS), metadata={"help": "Target Linear module names."}
    )
    adapter_init: str = field(
        default="random", metadata={"help": "Initial blocks: random, svd, signed or signed_reverse."}
    )
    adapter_init_seed: int = field(default=0, metadata={"help": "Seed of the blocks' initial A matrices."})
    scorer: str | None = field(
        default=None, metadata={"help": "vact, placebo or monitor (replaces routing when set)."}
    )
    intervention: str = field(
        default="route", metadata={"help": "What a flagged rollout does: route, penalty or screen."}
    )
    flag_penalty: float = field(
        default=DEFAULT_FLAG_PENALTY, metadata={"help": "Reward taken off a flagged rollout by intervention=penalty."}
    )
    monitor_threshold: float = field(default=0.5, metadata={"help": "A monitor flags scores >= this value."})
    sensor: str = field(
        default=DEFAULT_SENSOR, metadata={"help": "What the gate pools: bottleneck, bottleneck_init, residual:L."}
    )
    vact_sampling_mode: str = field(default="full", metadata={"help": "Sampling mode for v_act extraction."})

    # Changed defaults (Dr.GRPO, deterministic behaviour policy).
    loss_type: str = field(default="dr_grpo", metadata={"help": "Loss aggregation; the method uses 'dr_grpo'."})
    scale_rewards: str = field(default="none", metadata={"help": "Advantage scaling; the method uses 'none'."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout (behaviour log-probs)."})

    def __post_init__(self):
        super().__post_init__()
        if self.scorer is not None and self.scorer not in (*SCORERS, "diagnostic"):
            raise ValueError(f"scorer must be one of {(*SCORERS, 'diagnostic')}, got scorer={self.scorer!r}")
        if self.scorer is not None and self.routing is not None and self.scorer != self.routing:
            raise ValueError(f"scorer={self.scorer!r} and routing={self.routing!r} disagree; set one of them")
        self.routing = self.routing or self.scorer or "vact"
        if self.routing not in ROUTING_CHOICES:
            raise ValueError(f"routing must be one of {ROUTING_CHOICES}, got routing={self.routing!r}")
        self.scorer = None if self.routing == "none" else self.routing
        if self.intervention not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {INTERVENTIONS}, got intervention={self.intervention!r}")
        if self.intervention != "route" and self.routing == "none":
            raise ValueError(f"intervention={self.intervention!r} needs flags, and routing='none' has no scorer")
        if not self.flag_penalty > 0:
            raise ValueError(f"flag_penalty must be > 0, got flag_penalty={self.flag_penalty}")
        if self.intervention != "route" and self.gen_deploy_frac != 0.0:
            raise ValueError(
                f"intervention={self.intervention!r} samples every rollout with both blocks on; "
                f"gen_deploy_frac={self.gen_deploy_frac} applies to intervention='route' only"
            )
        if not 0.0 <= self.gen_deploy_frac <= 1.0:
            raise ValueError(f"gen_deploy_frac must be in [0, 1], got gen_deploy_frac={self.gen_deploy_frac}")
        if not 0.0 < self.route_tail_q < 0.5:
            raise ValueError(f"route_tail_q must be in (0, 0.5), got route_tail_q={self.route_tail_q}")
        if self.mismatch_ratio_cap is not None and not self.mismatch_ratio_cap > 1.0:
            raise ValueError(f"mismatch_ratio_cap must be > 1 or None, got {self.mismatch_ratio_cap}")
        if self.act_buffer_size is not None and self.act_buffer_size < 1:
            raise ValueError(f"act_buffer_size must be >= 1, got act_buffer_size={self.act_buffer_size}")
        if self.gate_warmup_rollouts < 0:
            raise ValueError(
                f"gate_warmup_rollouts must be >= 0, got gate_warmup_rollouts={self.gate_warmup_rollouts}"
            )
        if self.share_prompt_forward and self.gradient_checkpointing:
            raise ValueError(
                "share_prompt_forward=True needs gradient_checkpointing=False (TRL's default is True): a checkpointed "
                "layer re-runs its forward in backward and would append to the shared prompt's KV cache again"
            )
        if self.adapter_rank < 1:
            raise ValueError(f"adapter_rank must be >= 1, got adapter_rank={self.adapter_rank}")
        if self.adapter_init not in INITS:
            raise ValueError(f"adapter_init must be one of {INITS}, got adapter_init={self.adapter_init!r}")
        if self.adapter_init.startswith("signed") and not self.vact_pairs_path:
            raise ValueError(f"adapter_init={self.adapter_init!r} seeds a slot from the pairs: set vact_pairs_path")
        self.sensor = parse_sensor(self.sensor).spec  # raises naming the field and value; normalises "residual:2+1"
        if self.vact_sampling_mode not in ("deploy", "full"):
            raise ValueError(f"vact_sampling_mode must be 'deploy' or 'full', got {self.vact_sampling_mode!r}")
        if self.routing == "vact" and not (self.vact_path or self.vact_pairs_path):
            raise ValueError("routing='vact' needs vact_path or vact_pairs_path; both are None")
        if self.vact_refresh_steps < 0:
            raise ValueError(f"vact_refresh_steps must be >= 0, got vact_refresh_steps={self.vact_refresh_steps}")
        if self.vact_refresh_steps and not self.vact_pairs_path:
            raise ValueError(
                f"vact_refresh_steps={self.vact_refresh_steps} needs vact_pairs_path to re-extract v_act from"
            )
        if self.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True is not supported: the KL reference (beta != 0) is the base model, both blocks "
                "off through the adapter's hooks, and stays fixed"
            )
        if self.routing != "none" and not self.disable_dropout:
            raise ValueError(
                "disable_dropout=False with routing on: dropout makes the behaviour log-probs of the sampling policy "
                "differ from the loss forward, so rho != 1 on matched rows. Set disable_dropout=True."
            )
        if self.use_transformers_continuous_batching and 0.0 < self.gen_deploy_frac < 1.0:
            raise ValueError(
                f"use_transformers_continuous_batching=True with gen_deploy_frac={self.gen_deploy_frac}: continuous "
                "batching packs rows together and cannot apply per-row sampling modes. Use 0 or 1, or turn it off."
            )
        if self.routing != "none" and self.use_liger_kernel:
            raise ValueError(
                "use_liger_kernel=True with routing on: Liger's kernels replace the model's layer forwards, which the "
                "routing hooks (row masks, activation capture) and the per-token log-prob hook are not tested "
                "with. Set use_liger_kernel=False."
            )
