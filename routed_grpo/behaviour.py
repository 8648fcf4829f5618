"""Behaviour log-probs and the gate's pooled activations of one generation batch, without a second full forward.

What it covers (DESIGN.md section 3, step 3, and invariant I4):
- `SamplingPassPool`: reads both WHILE transformers' `generate` samples: the sensor's reading (routed_grpo.sensor;
  by default the deployed bottleneck `h = A_dep x`)
  pooled over each rollout's completion tokens (for the gate), and each sampled token's log-probability under the
  sampling policy, `log_softmax(logits / T)` in float32 of the logits the causal LM returns (after any final
  logit softcapping or scaling the architecture applies, as TRL's log-probs), 0 after a row's EOS (the behaviour
  log-probs). Decoding feeds
  every completion token back through the model except the last one sampled; `finish` runs that one missing decode
  step on the sampler's own KV cache. Against a teacher-forced forward in the same sampling mode, both agree to
  float rounding: in float32 within `atol=1e-5` (activations, and log-probs), with identical gate zones on a fixed
  batch (tests/test_behaviour.py). In bfloat16 the two computations round differently: the log-probs then differ by
  bf16 rounding (rho on a mismatched row by about as much, the same order as TRL's own old-log-prob forward over a
  differently composed batch), and a row sitting on a threshold can change zone (benchmarks/sampling_pass_check.py
  reports how often). Generation runs outside `accelerator.autocast()`: with float32 weights and `bf16=True`, the
  sampler's log-probs (used on mismatched rows only) are float32 while the loss forward runs in bf16.
- `completion_pool_mask`: which tokens are pooled (the completion mask; rows masked out by
  `mask_truncated_completions` pool their non-pad tokens), shared by both sources so they pool the same tokens.
- `sampling_mode_forward`: a no-grad, teacher-forced forward in each row's sampling mode, returning behaviour
  log-probs and, optionally, pooled activations: the source when no sampling pass was observed (vLLM without TRL's
  own old-log-prob forward, continuous batching, a static cache), and the forward that TRL's own old-log-prob call
  is turned into (several optimizer steps per generation, vLLM's importance-sampling correction).
- `BaseModelReference`: the KL reference policy, the policy with both blocks off.

Matched rows' behaviour log-probs are not taken from here before the first update: they ARE the grad-carrying
forward's detached log-probs, so the trainer takes them from there (rho == 1 bit for bit). The sampling-pass values
serve the mismatched rows, whose ratio compares two different policies.

What it does not cover: the gate (routed_grpo.gate), the masks of the grad-carrying forward (routed_grpo.adapter),
and the wiring into TRL's methods (routed_grpo.trainer). With `mask_truncated_completions=True` a truncated row's
activations are read while it was sampled (its own tokens in attention), where the teacher-forced forward masks its
completion out of attention: the one case where the two sources differ by more than rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from trl.models.utils import disable_gradient_checkpointing

from routed_grpo.adapter import RoutedAdapter

LogpsFn = Callable[[Tensor, Tensor, int], Tensor]  # (input_ids, attention_mask, logits_to_keep) -> (B, T_c)


def completion_pool_mask(completion_ids: Tensor, completion_mask: Tensor, pad_id: int) -> Tensor:
    """(B, T_c) tokens whose activations are pooled: the completion mask, or a row's non-pad tokens where that row's
    completion mask is empty (rows masked out by `mask_truncated_completions`)."""
    pool = completion_mask.clone()
    empty = pool.sum(1) == 0
    pool[empty] = (completion_ids[empty] != pad_id).to(pool.dtype)
    return pool


class SamplingPassPool:
    """Mean of the sensor's reading (`A_dep x` by default) over each row's completion tokens and the sampled tokens'
    log-probs, from one `generate`.

    A forward pre-hook on the causal LM sees every decode step's input: step 0 is the prompt (not pooled), step k
    feeds completion token k - 1. A token is pooled while its row has not yet emitted an EOS before it, which is
    exactly TRL's completion (up to and including the first EOS). Two running sums, (2, B, M, r): all such tokens,
    and those that are not the pad token (for rows whose completion mask TRL empties later). A decode step's module
    outputs are only collected while the step runs; one concatenation and one fused multiply-add per step fold them
    into the sums (not a few tensor operations per module and step).

    A forward hook on the causal LM keeps each step's last-position output logits (the model's own, so Gemma's
    softcapping or Cohere's / Granite's logit scale is applied, as in TRL's log-prob forward); when the next step
    feeds the token sampled from them, its log-probability at temperature `temperature` is recorded (TRL's
    definition of a log-prob: no top-k / top-p / penalties), or 0 where the row had already emitted its EOS (a pad
    position: the completion mask is 0 there, and so is the loss forward's log-prob).

    Usage: `with pool.attached(): generate(...)`, then `pool.finish(completion_ids)` inside the same sampling-mode
    context, then `pool.pooled(completion_mask)` and `pool.logps(width)`. `problem` names why the pool is unusable
    (then the caller falls back to a teacher-forced forward); None when it is complete.
    """

    def __init__(self, adapter: RoutedAdapter, eos_token_ids: Sequence[int], pad_token_id: int, temperature=1.0):
        self.adapter = adapter
        self.lm = adapter.model.get_base_model()
        self.eos_ids, self.pad_id, self.temperature = list(eos_token_ids), pad_token_id, temperature
        self._logits: Tensor | None = None  # (B, V) last-position logits of the latest step
        self._logps: list[Tensor] = []  # (B,) per fed completion token
        self.sums: Tensor | None = None  # (2, B, M, r) float32, modules in the order the forward calls them
        self.order: list[str] = []  # module names in that order (fixed by the first decode step)
        self._step_names: list[str] = []  # modules called so far in the current decode step
        self._step_outs: list[Tensor] = []  # their bottlenecks (B, 1, r)
        self.counts: Tensor | None = None  # (2, B) pooled tokens per row
        self._weights: Tensor | None = None  # (2, B, 1) of the current step; None while the prompt runs
        self._finished: Tensor | None = None  # (B,) bool: the row has emitted an EOS
        self._eos: Tensor | None = None
        self._last_kwargs: dict | None = None
        self._steps = 0
        self.problem: str | None = None

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles = [
            self.lm.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.lm.register_forward_hook(self._lm_hook),
        ]
        try:
            with self.adapter.stream_capture(self._add, wanted=lambda: self._weights is not None):  # not the prompt
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _lm_hook(self, module, args, out) -> None:
        logits = getattr(out, "logits", None)  # the model's own output: final softcapping / scaling applied
        self._logits = logits[:, -1] if logits is not None and logits.dim() == 3 else None  # (B, V), kept one step
        self._fold_step()

    def _pre_hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        if args or ids is None or kwargs.get("cache") is None:
            self.problem = "generate called the model without input_ids or a cache as keywords"
            return
        if self._steps == 0:
            self._eos = torch.tensor(self.eos_ids, device=ids.device)
            self._finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            self.counts = torch.zeros(2, ids.shape[0], device=ids.device)
        elif ids.shape[1] != 1:
            self.problem = f"a decode step fed {ids.shape[1]} tokens per row (a cache-less or chunked decode)"
        else:
            self._step_weights(ids[:, 0])
        self._last_kwargs = kwargs
        self._steps += 1

    def _step_weights(self, token: Tensor) -> None:
        """Weights of the token each row feeds now, (B,): pooled iff its row had no EOS before it; and its log-prob
        under the logits it was sampled from."""
        if self._logits is None:
            self.problem = "no logits seen for a fed token"
        else:
            logp = (self._logits.float() / self.temperature).log_softmax(-1)  # (B, V)
            token_logp = logp.gather(1, token.unsqueeze(1)).squeeze(1)  # (B,)
            self._logps.append(token_logp.masked_fill(self._finished, 0.0))  # pad after EOS: 0, as its mask
        live = ~self._finished
        weights = torch.stack([live, live & (token != self.pad_id)]).float()  # (2, B)
        self._weights = weights.unsqueeze(-1)  # (2, B, 1)
        self.counts += weights
        self._finished |= torch.isin(token, self._eos)

    def _add(self, name: str, out: Tensor) -> None:
        if self._weights is None:
            return  # the prompt's forward
        self._step_names.append(name)
        self._step_outs.append(out)  # (B, 1, r): a decode step feeds one token per row (checked by the pre-hook)

    def _fold_step(self) -> None:
        """Add the decode step's collected bottlenecks, weighted, to the sums: (2, B, 1, 1) * (B, M, r)."""
        names, outs = self._step_names, self._step_outs
        self._step_names, self._step_outs = [], []
        if not outs or self.problem is not None:
            return
        if not self.order and len(set(names)) == len(names):
            self.order = names  # fixed once; later steps must repeat it exactly
        if names != self.order:
            self.problem = "the decode steps did not each call every sensor site once, in the same order"
            return
        h = torch.cat(outs, dim=1).detach().float()  # (B, M, r)
        if h.dim() != 3 or h.shape[1] != len(names):
            self.problem = f"sensor readings of a decode step have shape {tuple(outs[0].shape)}, not (B, 1, width)"
            return
        weights = self._weights.unsqueeze(-1)  # (2, B, 1, 1)
        if self.sums is None:
            self.sums = weights * h
        else:
            self.sums.addcmul_(weights, h)

    @torch.no_grad()
    def finish(self, completion_ids: Sequence[Sequence[int]], model, checkpointing_kwargs=None) -> None:
        """Feed the last sampled token of the rows that still miss it (one decode step on the sampler's cache),
        then check that every row pooled exactly its completion's tokens. One host synchronisation."""
        if self.problem is None and self._steps == 0:
            self.problem = "generate never called the model"
        if self.problem is not None:
            return self._release()
        device = self.counts.device
        lengths = torch.tensor([len(c) for c in completion_ids], device=device, dtype=self.counts.dtype)  # (B,)
        last = torch.tensor([c[-1] if len(c) else self.pad_id for c in completion_ids], device=device)  # (B,)
        missing = self.counts[0] < lengths  # (B,): rows whose last token was sampled but never fed
        token = torch.where(missing, last, self.pad_id)
        kwargs = dict(self._last_kwargs)  # the next decode step, as `generate` would build it
        kwargs["input_ids"] = token.unsqueeze(1)  # (B, 1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., -1:] + 1
        if (mask := kwargs.get("attention_mask")) is not None:
            kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        self._finished = ~missing  # pool this step's token only on the rows that miss it
        self._step_weights(token)
        with disable_gradient_checkpointing(model, checkpointing_kwargs), self.adapter.stream_capture(self._add):
            self.lm(**kwargs)
        self._fold_step()
        if not torch.equal(self.counts[0], lengths):
            self.problem = "the pooled token counts differ from the completion lengths"
        self._release()

    def _release(self) -> None:
        self._last_kwargs = self._weights = self._logits = None  # drops the sampler's KV cache and logits
        self._step_names, self._step_outs = [], []

    def logps(self, width: int) -> Tensor:
        """(B, width) float32 log-probs of the sampled tokens under the sampling policy (0 past the sampled ones)."""
        if self.problem is not None:
            raise RuntimeError(f"the sampling pass cannot be read: {self.problem}")
        steps = torch.stack(self._logps[:width], dim=1)  # (B, T_gen)
        return torch.nn.functional.pad(steps, (0, width - steps.size(1)))

    def pooled(self, completion_mask: Tensor) -> Tensor:
        """(B, M, width) float32 in `adapter.sensor_names` order, pooled as `completion_pool_mask` says."""
        if self.problem is not None:
            raise RuntimeError(f"the sampling pass cannot be pooled: {self.problem}")
        names = self.adapter.sensor_names
        missing = [n for n in names if n not in self.order]
        if missing or self.sums is None:
            raise RuntimeError(f"no activations streamed for {len(missing)} sites, e.g. {(missing or names)[0]}")
        empty = (completion_mask.sum(1) == 0).to(self.counts.device)  # (B,)
        counts = self.counts.gather(0, empty.long().view(1, -1)).squeeze(0).clamp_min(1.0)  # (B,)
        rows = torch.arange(empty.numel(), device=empty.device)
        sums = self.sums[empty.long(), rows]  # (B, M, r): all completion tokens, or their non-pad tokens
        index = torch.tensor([self.order.index(n) for n in names], device=sums.device)
        return sums.index_select(1, index) / counts.view(-1, 1, 1)  # (B, M, r) in sensor_names order


@torch.no_grad()
def sampling_mode_forward(
    logps_fn: LogpsFn,
    adapter: RoutedAdapter,
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_to_keep: int,
    full: Tensor,
    chunk: int,
    pool_mask: Tensor | None = None,
    checkpointing_kwargs=None,
) -> tuple[Tensor, Tensor | None]:
    """Behaviour log-probs (B, T_c) of every row in its sampling mode, `full` (B,) bool, and, when `pool_mask`
    (B, T_c) is given, the pooled activations (B, M, r). Chunks of `chunk` rows, as TRL's own old-log-prob forward.
    """
    n = input_ids.size(0)
    logps = torch.empty((n, logits_to_keep), device=input_ids.device)
    acts = None
    with disable_gradient_checkpointing(model, checkpointing_kwargs):
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n), device=input_ids.device)
            tokens = None if pool_mask is None else _prompt_padded(pool_mask[idx], input_ids.size(1))
            adapter.set_row_masks(full[idx].float(), torch.zeros(idx.numel(), device=full.device))
            try:
                with adapter.capture(tokens) if tokens is not None else contextlib.nullcontext():
                    logps[idx] = logps_fn(input_ids[idx], attention_mask[idx], logits_to_keep).float()
            finally:
                adapter.clear_row_masks()
            if tokens is not None:
                h = adapter.pooled()  # (chunk, M, r)
                acts = h.new_zeros(n, *h.shape[1:]) if acts is None else acts
                acts[idx] = h
    return logps, acts


def _prompt_padded(completion_pool: Tensor, width: int) -> Tensor:
    """A (B, T_c) completion pool mask widened to the full (B, T_p + T_c) sequence (prompt tokens not pooled)."""
    prompt = completion_pool.new_zeros(completion_pool.size(0), width - completion_pool.size(1))
    return torch.cat([prompt, completion_pool], dim=1)


class BaseModelReference:
    """The KL reference policy: the policy model with both blocks off (`RoutedAdapter.base_model_only`).

    Stands in for TRL's `ref_model`: the trainer's `_get_per_token_logps_and_entropies` recognises it and runs the
    policy model with both blocks' outputs replaced by zeros, which is the base model exactly (no PEFT "ref" adapter,
    no adapter switching). Calling it runs that forward too.
    """

    def __init__(self, adapter: RoutedAdapter):
        self.adapter = adapter

    def __call__(self, *args, **kwargs):
        with self.adapter.base_model_only():
            return self.adapter.model(*args, **kwargs)

    def __repr__(self) -> str:
        return "BaseModelReference(policy with both blocks off)"
