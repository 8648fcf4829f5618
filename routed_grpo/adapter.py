"""The two-block routed adapter: a deployed block and a quarantine block on every target Linear.

Choice: both blocks are ordinary PEFT LoRA adapters (`"deployed"` and `"quarantine"`, rank r each, dropout 0),
both active at once, attached to any transformers causal LM including bitsandbytes 4-bit/8-bit Linear layers.
PEFT's own initialisation already gives what DESIGN.md section 4 asks: `B = 0`, so the net delta is exactly zero
at initialisation (I1), and `A` is a random projection, so the bottleneck `h = A_dep x` is alive from step 0.
Building on PEFT (rather than a hand-written rank-2r layer with subtracted frozen copies) gives quantised layers
and the deployed export for free: the deployed block *is* a stock LoRA adapter, so
`PeftModel.from_pretrained(base, export_dir)` loads it unchanged.

What this module adds on top of PEFT, all through forward hooks (never by toggling adapters, which in PEFT and
TRL switches every adapter and re-enables gradients on exit):
- per-row output masks `(m, d)` (DESIGN.md section 2): where `m = 0` the quarantine block contributes exact zeros
  (`torch.where`, never a product, so a non-finite quarantine cannot turn into NaN there): the mask is applied to
  its bottleneck `A_q x` (r wide, cheap), or to its output when its `B` holds a non-finite value (one fused check
  per `set_row_masks`); where `d = 1` the deployed block's output stays in the forward unchanged and its gradient
  rows are zeroed in backward (the same gradient as a detach, without a forward copy). Masks are moved to the device
  once per `set_row_masks` call and stay set until `clear_row_masks()`, because gradient checkpointing re-runs the
  forward hooks during backward;
- deployment ablation and sampling modes: the quarantine output is replaced by zeros for every row. Because the
  quarantine's initial value has `B = 0` (or, with an SVD-space `adapter_init`, its frozen copy is subtracted, so
  its net output at init is zero: routed_grpo.initial), this equals resetting the block to its initial value (I2),
  and it stays finite whatever the quarantine's weights hold; `reset_quarantine()` does the reset on the weights;
- the base model (`base_model_only()`): both blocks' outputs replaced by zeros, the reference policy of the KL term
  (no adapter switching);
- capture of the sensor's reading (routed_grpo.sensor; by default the deployed bottleneck `A_dep x`), mean-pooled
  over a token mask: `[batch, n_sites, width]`, or streamed while `generate` samples: the mixin
  `routed_grpo.sensing.SensorCapture` (`use_sensor`, `capture`, `stream_capture`, `pooled`, `initial_A`);
- a seeded, name-keyed initialisation of every `A`, so the same model, rank, targets and `init_seed` give the
  same adapter in every process and every run (`v_act` depends on the initial `A_dep`); `initial_A` recomputes
  that initial value (the frozen initial copy the `bottleneck_init` sensor reads and drift is measured against);
- a fingerprint of "same adapter geometry on the same base model" (seed, rank, targets, module shapes, sampled
  base weights), independent of the dtype and device the weights are loaded in, compared part by part.

Not covered: LoRA variants (DoRA etc.), dropout on the blocks, embedding or conv targets.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from routed_grpo import unscaled_lora
from routed_grpo.initial import InitialCopies
from routed_grpo.sensing import DEPLOYED, QUARANTINE, SensorCapture
from routed_grpo.sensor import Sensor
from routed_grpo.utils import atomic_path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SamplingMode = Literal["deploy", "full"]


def attach_routed_adapter(
    model: torch.nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    init_seed: int = 0,
    init: str = "random",
) -> RoutedAdapter:
    """Wrap `model` in a PeftModel with the deployed and quarantine blocks, both active and trainable; `init`:
    `random` (PEFT's geometry) or `svd` (routed_grpo.initial; the signed inits read pairs: `set_initial`)."""
    if rank < 1:
        raise ValueError(f"adapter rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, adapter_name=DEPLOYED)
    peft_model.add_adapter(QUARANTINE, config)
    peft_model.base_model.set_adapter([DEPLOYED, QUARANTINE])  # both active; makes both trainable
    adapter = RoutedAdapter(peft_model, init_seed=init_seed)
    adapter.reinitialise(DEPLOYED)
    adapter.reinitialise(QUARANTINE)
    if init != "random":
        adapter.set_initial(init, adapter.compute_initial(init))
    return adapter


FINGERPRINT_PARTS = ("seed", "rank", "targets", "init", "module_shapes", "base_weights")
BASE_SAMPLES = 16  # sampled entries per sampled base weight
TINY = 2.0**-14  # smallest normal float16: sampled values below it are flushed to 0
BF16_RTOL = 2.0**-7  # one bf16 ulp, relative: a float16 load rounded to bf16 can differ by this much


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the FINGERPRINT_PARTS in which two `fingerprint_parts()` differ ([] = same adapter and base).

    Base weights match when their hashes are equal, or when their sampled float values agree within one bf16 ulp
    and their quantised bytes (if any) are equal."""
    differ = [k for k in FINGERPRINT_PARTS[:-1] if stored.get(k) != current.get(k)]
    if stored.get("base_weights") != current.get("base_weights"):
        a, b = stored.get("base_sample"), current.get("base_sample")
        close = a is not None and b is not None and len(a) == len(b)
        close = close and stored.get("base_quantised") == current.get("base_quantised")
        if close:
            ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
            close = bool(((ta - tb).abs() <= BF16_RTOL * ta.abs().maximum(tb.abs()) + TINY).all())
        if not close:
            differ.append("base_weights")
    return differ


class _ZeroGradRows(torch.autograd.Function):
    """Identity in the forward (a view, no copy); in backward the gradient of the masked rows is exactly zero."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return torch.where(rows, 0.0, grad), None


class RoutedAdapter(InitialCopies, SensorCapture):
    """Handle on a PeftModel that carries the two blocks: masks, modes, capture (`SensorCapture`), export."""

    def __init__(self, peft_model: PeftModel, init_seed: int = 0):
        for block in (DEPLOYED, QUARANTINE):
            if block not in peft_model.peft_config:
                raise ValueError(f"model has no '{block}' adapter; build it with attach_routed_adapter()")
        if getattr(peft_model, "routed_adapter", None) is not None:
            raise ValueError("this model already has a RoutedAdapter; use RoutedAdapter.of(model)")
        self.model = peft_model
        self.init_seed = init_seed
        self.layers: dict[str, LoraLayer] = {}
        prefix = "base_model.model."
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and DEPLOYED in module.lora_A:
                self.layers[name.removeprefix(prefix)] = module
        self.module_names = list(self.layers)
        self.rank = peft_model.peft_config[DEPLOYED].r
        self.targets = sorted(peft_model.peft_config[DEPLOYED].target_modules)
        self._row_m: torch.Tensor | None = None  # (B, 1, 1) bool on the device: quarantine output kept
        self._row_m_at_output = False  # apply `_row_m` to the quarantine's output (its B is not finite)
        self._finite, self._finite_at = True, None  # cached `_quarantine_finite` and the weight versions it saw
        self._row_d: torch.Tensor | None = None  # (B, 1, 1) bool on the device: deployed output detached
        self._rows_n: int | None = None  # batch size the masks were set for
        self._quarantine_off = 0  # depth of nested ablation contexts
        self._blocks_off = 0  # depth of nested base-model contexts (both blocks off)
        self._token_mask: torch.Tensor | None = None  # (B, T) while capturing
        self._captured: dict[str, torch.Tensor] = {}
        self._stop = False  # capture(stop=True): end the forward once every sensor site is captured
        self._sink = None  # callable(name, (B, L, width) reading) while streaming
        self._sink_wanted = None  # callable() -> bool: whether the sink wants this forward
        self._initial: dict[str, dict[str, tuple]] = {}  # block -> name -> initial (A0, B0 or None), float32
        self._initial_a: dict[str, torch.Tensor] | None = None  # name -> initial A_dep (float32), cached
        self._initial_on: dict[str, torch.Tensor] = {}  # initial A_dep on the device/dtype it is read in
        self._frozen_on: dict[tuple, tuple] = {}  # (block, name) -> (A0, B0) on the device/dtype of the block
        self._frozen_h0: dict[tuple, torch.Tensor] = {}  # (block, name) -> A0 x of the current forward
        self._frozen_handles: list = []
        self._handles = []
        for layer in self.layers.values():
            self._handles.append(layer.lora_A[QUARANTINE].register_forward_hook(self._quarantine_bottleneck_hook))
            self._handles.append(layer.lora_B[QUARANTINE].register_forward_hook(self._quarantine_hook))
            self._handles.append(layer.lora_B[DEPLOYED].register_forward_hook(self._deployed_hook))
            for block in (DEPLOYED, QUARANTINE):  # PEFT's forward less its multiply by a scaling of 1.0 (same bits)
                unscaled_lora.install(layer, block)
        self.sensor = Sensor()
        self.sensor_names: list[str] = []  # one pooled row per name, in this order
        self.sensor_width = self.rank
        self._sensor_handles: list = []
        self.use_sensor(self.sensor)
        peft_model.routed_adapter = self  # one handle per model: hooks are registered once

    @classmethod
    def of(cls, peft_model: PeftModel, init_seed: int = 0) -> RoutedAdapter:
        """The model's existing handle, or a new one (e.g. for a PeftModel loaded from disk)."""
        existing = getattr(peft_model, "routed_adapter", None)
        return existing if existing is not None else cls(peft_model, init_seed=init_seed)

    # ---- parameters -------------------------------------------------------------------------------------------
    def parameters(self, block: str) -> Iterator[torch.nn.Parameter]:
        for layer in self.layers.values():
            yield layer.lora_A[block].weight
            yield layer.lora_B[block].weight

    def parameter_names(self) -> list[str]:
        """Names (as in `model.named_parameters()`) of every parameter of both blocks."""
        return [n for n, _ in self.model.named_parameters() if f".{DEPLOYED}." in n or f".{QUARANTINE}." in n]

    @torch.no_grad()
    def reinitialise(self, block: str) -> None:
        """Set `block` to its initial value (`initial_factors`): by default `A` uniform(+-1/sqrt(d_in)) from a
        name-keyed seed and `B = 0`; with an SVD-space init its `(A0, B0)`."""
        for name, (a0, b0) in self.initial_factors(block).items():
            layer = self.layers[name]
            layer.lora_A[block].weight.copy_(a0)  # cast to the weight's dtype and device
            if b0 is None:
                layer.lora_B[block].weight.zero_()
            else:
                layer.lora_B[block].weight.copy_(b0)

    def reset_quarantine(self) -> None:
        """Deployment ablation on the weights: the quarantine block returns to its initial value (net delta 0)."""
        self.reinitialise(QUARANTINE)

    def fingerprint_parts(self) -> dict[str, Any]:
        """What makes two adapters the same geometry on the same base model, part by part (FINGERPRINT_PARTS).

        `base_weights` hashes a few deterministic samples of base weights (first, middle and last weight matrix;
        `BASE_SAMPLES` evenly spaced entries each) viewed in float32 and rounded to what bf16 keeps, so a float32
        and a bf16 load of the same checkpoint, on any device, give the same value; `base_sample` keeps the sampled
        values themselves, compared within bf16 precision by `fingerprint_mismatch` (a float16 load agrees too).
        Quantised (integer) base weights are sampled as raw bytes (`base_quantised`): they match only the same
        quantisation.
        """
        shapes = [f"{n}:{tuple(self.layers[n].lora_A[DEPLOYED].weight.shape)}" for n in self.module_names]
        floats, raw = self._base_sample()
        return {
            "seed": self.init_seed,
            "rank": self.rank,
            "targets": list(self.targets),
            "init": self.fingerprint_init(),
            "module_shapes": _digest("\n".join(shapes).encode()),
            "base_weights": _digest(floats.numpy().tobytes() + raw),
            "base_sample": [float(x) for x in floats],
            "base_quantised": _digest(raw) if raw else None,
        }

    def fingerprint(self) -> str:
        """One 16-hex summary of `fingerprint_parts()`: same adapter geometry on the same base model, whatever
        dtype or device the weights are loaded in."""
        parts = {k: v for k, v in self.fingerprint_parts().items() if k != "base_sample"}
        return _digest(json.dumps(parts, sort_keys=True).encode())

    def legacy_fingerprint(self) -> str:
        """The fingerprint `v_act` files of routed-grpo <= 0.1 recorded (it hashed a base weight's bytes, so it
        changed with the dtype); kept only to accept such files when it still matches."""
        desc = [f"seed={self.init_seed}", f"rank={self.rank}"]
        desc += [f"{n}:{tuple(self.layers[n].lora_A[DEPLOYED].weight.shape)}" for n in self.module_names]
        digest = hashlib.sha256("\n".join(desc).encode())
        base_weight = self.layers[self.module_names[0]].get_base_layer().weight
        digest.update(base_weight.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    @torch.no_grad()
    def _base_sample(self) -> tuple[torch.Tensor, bytes]:
        """Entries of the first, middle and last base weight matrix (by parameter order, adapter blocks excluded, so
        the sample does not depend on the targets): float ones as float32 rounded to bf16 with tiny ones flushed to
        0, (n,); quantised (integer) ones as raw bytes."""
        mats = [w for n, w in self.model.get_base_model().named_parameters() if "lora_" not in n and w.dim() >= 2]
        floats, raw = [], b""
        for i in sorted({0, len(mats) // 2, len(mats) - 1}):
            w = mats[i].detach().reshape(-1)  # (numel,)
            idx = torch.linspace(0, w.numel() - 1, BASE_SAMPLES, dtype=torch.float64).round().long()
            values = w[idx.to(w.device)].cpu()  # gathered on the weight's own device
            if values.is_floating_point():
                values = values.float().to(torch.bfloat16).float()
                values[values.abs() < TINY] = 0.0  # float16 keeps these only as subnormals
                floats.append(values)
            else:
                raw += values.contiguous().view(torch.uint8).numpy().tobytes()
        return (torch.cat(floats) if floats else torch.zeros(0)), raw

    # ---- masks and modes -----------------------------------------------------------------------------------------
    def set_row_masks(self, m: torch.Tensor, d: torch.Tensor) -> None:
        """Per-row masks for the next forward(s) and their backward; keep them until `clear_row_masks()`.

        `m`, `d` (B,) take values in {0, 1}; pass them on the device of the forward (they are converted there once,
        not in every hook call). The batch size is checked against every forward. A mask that changes nothing (`m`
        all ones, `d` all zeros) is stored as None, which skips its hook's tensor work.
        """
        if m.shape != d.shape or m.dim() != 1:
            raise ValueError(f"masks must be 1-d and equal shapes, got m {tuple(m.shape)} and d {tuple(d.shape)}")
        self._rows_n = m.shape[0]
        on, detach = m.detach() != 0, d.detach() != 0
        self._row_m = None if bool(on.all()) else on.view(-1, 1, 1)
        self._row_d = detach.view(-1, 1, 1) if bool(detach.any()) else None
        # at the output when the quarantine's B0 is subtracted (a zeroed A_q x would leave -B0 A0 x) or B is not finite
        self._row_m_at_output = self._row_m is not None and (self.subtracted or not self._quarantine_finite())

    def clear_row_masks(self) -> None:
        self._row_m = self._row_d = self._rows_n = None
        self._row_m_at_output = False

    def _quarantine_finite(self) -> bool:
        """Whether every quarantine `B` is finite: one fused reduction and one host synchronisation, redone only
        after the weights changed (their in-place version counters moved, e.g. by an optimizer step)."""
        weights = [layer.lora_B[QUARANTINE].weight for layer in self.layers.values()]
        versions = tuple(w._version for w in weights)
        if self._finite_at != versions:
            peaks = torch._foreach_norm(weights, ord=math.inf)
            self._finite = bool(torch.isfinite(torch.stack([p.to(weights[0].device) for p in peaks])).all())
            self._finite_at = versions
        return self._finite

    @contextlib.contextmanager
    def deployment_ablation(self) -> Iterator[None]:
        """Forward as base + deployed delta: the quarantine output is zero for every row."""
        self._quarantine_off += 1
        try:
            yield
        finally:
            self._quarantine_off -= 1

    @contextlib.contextmanager
    def base_model_only(self) -> Iterator[None]:
        """Forward as the base model: both blocks' outputs are zero for every row (the KL reference policy)."""
        self._blocks_off += 1
        try:
            yield
        finally:
            self._blocks_off -= 1

    def sampling_mode(self, mode: SamplingMode) -> contextlib.AbstractContextManager:
        if mode == "deploy":
            return self.deployment_ablation()
        if mode == "full":
            return contextlib.nullcontext()
        raise ValueError(f"sampling mode must be 'deploy' or 'full', got {mode!r}")

    @staticmethod
    def _rows(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The (B, 1, 1) mask shaped and placed for `out` (a view; a copy only for a model split over devices)."""
        if out.dim() != 3:
            mask = mask.view(-1, *([1] * (out.dim() - 1)))
        return mask if mask.device == out.device else mask.to(out.device)

    def _check_rows(self, out: torch.Tensor) -> None:
        if self._rows_n is not None and self._rows_n != out.shape[0]:
            raise RuntimeError(f"row masks are set for {self._rows_n} rows but the forward has {out.shape[0]}")

    def _quarantine_bottleneck_hook(self, module, args, h: torch.Tensor) -> torch.Tensor:
        if self._row_m is None or self._row_m_at_output or self._quarantine_off or self._blocks_off:
            return h
        self._check_rows(h)  # a (B, 1, 1) mask would broadcast a smaller batch up to B rows
        return torch.where(self._rows(self._row_m, h), h, 0.0)  # (B, T, r); B_q times 0 is exactly 0 (finite B_q)

    def _quarantine_hook(self, module, args, out: torch.Tensor) -> torch.Tensor:
        self._check_rows(out)
        if self._quarantine_off or self._blocks_off:
            return torch.zeros_like(out)  # replaced, not multiplied: inf * 0 would be NaN
        if self._row_m is not None and self._row_m_at_output:
            return torch.where(self._rows(self._row_m, out), out, 0.0)  # (B, T, d_out); exact zeros where m = 0
        return out

    def _deployed_hook(self, module, args, out: torch.Tensor) -> torch.Tensor:
        if self._blocks_off:
            return torch.zeros_like(out)
        if self._row_d is None:
            return out
        self._check_rows(out)
        return _ZeroGradRows.apply(out, self._rows(self._row_d, out))  # same value; no gradient where d = 1

    # ---- export ---------------------------------------------------------------------------------------------------
    def export_deployed(self, out_dir: str | Path) -> Path:
        """Save the deployed block as a stock PEFT LoRA adapter (`PeftModel.from_pretrained(base, out_dir)`); with
        subtracted copies, folded: `A = [A; A0]`, `B = [B, -B0]`, rank 2r, alpha doubled (the same scaling)."""
        return self.export_lora(out_dir, (DEPLOYED,))

    def export_lora(self, out_dir: str | Path, blocks: tuple[str, ...]) -> Path:
        """Save `blocks` as ONE stock PEFT LoRA whose delta is theirs (`folded_state`): the deployed block alone, or
        both (the full model, for arms that deploy it)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if blocks == (DEPLOYED,) and not self.subtracted:
            state, parts = get_peft_model_state_dict(self.model, adapter_name=DEPLOYED), 1
            state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        else:
            state, parts = self.folded_state(blocks)
        config = copy.deepcopy(self.model.peft_config[DEPLOYED])
        config.r, config.lora_alpha = parts * config.r, parts * config.lora_alpha
        config.save_pretrained(str(out_dir))
        with atomic_path(out_dir / "adapter_model.safetensors") as tmp:  # safetensors alone would leave it 0600
            save_file(state, str(tmp), metadata={"format": "pt"})
        return out_dir

    def export_merged(self, out_dir: str | Path) -> Path:
        """Save base + deployed delta as a plain transformers checkpoint (a copy of the model is made)."""
        if getattr(self.model.config, "quantization_config", None) is not None:
            raise ValueError("export_merged needs an unquantised base; load the base in full precision first")
        if self.subtracted:
            raise ValueError("export_merged with subtracted initial copies: merge the folded export_deployed instead")
        merged = copy.deepcopy(self.model)
        merged.delete_adapter(QUARANTINE)
        merged = merged.merge_and_unload(adapter_names=[DEPLOYED])
        merged.save_pretrained(str(out_dir))
        return Path(out_dir)
