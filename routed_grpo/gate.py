"""The label-free gate: pooled activations -> scores -> buffer-wide quantile thresholds -> zones -> masks.

What it covers (DESIGN.md section 3, steps 4-5, invariant I6):

- `score`: `s_i = sum_m <h_i[m], v_act[m]>` for pooled deployed-block bottleneck activations `h`.
- `quantile_thresholds`: the symmetric global quantiles `lo = q(route_tail_q)`, `hi = q(1 - route_tail_q)`,
  computed over whatever scores it is given (the gate passes the whole buffer, never one batch).
- `zones_from_scores` / `masks_from_zones`: `s <= lo` keep, `s >= hi` route, otherwise absorb;
  keep `(m, d) = (0, 0)`, absorb `(1, 0)`, route `(1, 1)`.
- `ActivationBuffer`: a run-spanning ring buffer of pooled activations (not scores), so a refreshed `v_act`
  re-scores the stored rows without a flush.
- `gather_activations`: every process receives the same rank-ordered concatenation of all processes'
  activations (variable row counts are padded for the collective and trimmed afterwards), so every rank holds
  the same buffer and therefore the same thresholds.
- `Gate` / `GateDecision`: wires the above for one generation batch. With `warmup_rollouts = W > 0`, the first W
  rollouts of the run (counted globally, in order) are all absorbed while their activations fill the buffer, so
  the first thresholds are quantiles of W rollouts rather than of the first batch alone (without a warm-up, the
  first batch is split about `route_tail_q` / rest / `route_tail_q` whatever it holds; a 4-row batch 25/50/25).
  A non-finite activation anywhere in the gathered batch raises on every rank, naming the step, rows and modules.

What it does not cover: producing the activations (routed_grpo/adapter.py captures them), extracting `v_act`
(routed_grpo/vact.py) and applying the masks in the forward (adapter and trainer). Nothing here takes or
reads ground-truth labels (invariant I8): its only inputs are activations and `v_act`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

KEEP, ABSORB, ROUTE = 0, 1, 2
ZONE_NAMES = ("keep", "absorb", "route")


def score(acts: Tensor, vact: Tensor) -> Tensor:
    """Score pooled activations against `v_act`: `s_i = sum_m <acts[i, m], vact[m]>`.

    acts: (N, M, r) pooled activations; vact: (M, r). Returns (N,) in float32.
    """
    if acts.dim() != 3 or vact.dim() != 2 or acts.shape[1:] != vact.shape:
        shapes = f"{tuple(acts.shape)} and {tuple(vact.shape)}"
        raise ValueError(f"score needs acts (N, M, r) and vact (M, r); got {shapes}")
    return torch.einsum("nmr,mr->n", acts.float(), vact.to(acts.device, torch.float32))  # (N,)


def quantile_thresholds(scores: Tensor, route_tail_q: float) -> tuple[float, float]:
    """Return `(lo, hi) = (q(route_tail_q), q(1 - route_tail_q))` over `scores` (linear interpolation)."""
    _check_tail_q(route_tail_q)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"quantile_thresholds needs a non-empty 1-d score tensor; got shape {tuple(scores.shape)}")
    qs = torch.tensor([route_tail_q, 1.0 - route_tail_q], dtype=torch.float32, device=scores.device)
    lo, hi = torch.quantile(scores.float(), qs).tolist()
    return float(lo), float(hi)


def zones_from_scores(scores: Tensor, lo: float, hi: float) -> Tensor:
    """Zone id per score: `s <= lo` KEEP, `s >= hi` ROUTE, otherwise ABSORB. Keep wins a tie when `lo == hi`."""
    if lo > hi:
        raise ValueError(f"thresholds out of order: lo={lo} > hi={hi}")
    zones = torch.full(scores.shape, ABSORB, dtype=torch.long, device=scores.device)
    zones[scores >= hi] = ROUTE
    zones[scores <= lo] = KEEP
    return zones


def masks_from_zones(zones: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row masks `(m, d)` in float32: keep (0, 0), absorb (1, 0), route (1, 1)."""
    bad = (zones < KEEP) | (zones > ROUTE)
    if bool(bad.any()):
        raise ValueError(f"zone ids must be in {{0, 1, 2}}; got {zones[bad][:5].tolist()}")
    m = (zones != KEEP).float()  # quarantine output in the forward
    d = (zones == ROUTE).float()  # deployed output detached
    return m, d


def zone_fractions(zones: Tensor) -> dict[str, float]:
    """Share of rows in each zone, keyed by ZONE_NAMES (all 0.0 for an empty tensor)."""
    n = max(int(zones.numel()), 1)
    return {name: float((zones == zid).sum()) / n for zid, name in enumerate(ZONE_NAMES)}


def _check_tail_q(route_tail_q: float) -> None:
    if not 0.0 < route_tail_q < 0.5:
        raise ValueError(f"route_tail_q must be in (0, 0.5); got {route_tail_q}")


class ActivationBuffer:
    """Ring buffer of pooled activations, shape (capacity, n_modules, rank), float32 on `device`.

    `append` writes rows oldest-first and overwrites the oldest rows once full; `acts()` returns the stored rows in
    chronological order (oldest first).
    """

    def __init__(self, capacity: int = 8192, n_modules: int = 1, rank: int = 1, device: str | torch.device = "cpu"):
        if capacity < 1 or n_modules < 1 or rank < 1:
            raise ValueError(f"capacity, n_modules and rank must be >= 1; got {capacity}, {n_modules}, {rank}")
        self.capacity, self.n_modules, self.rank = capacity, n_modules, rank
        self._data = torch.zeros(capacity, n_modules, rank, dtype=torch.float32, device=device)
        self._next = 0  # slot the next row is written to
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, acts: Tensor) -> None:
        """Append rows (N, n_modules, rank); if N > capacity only the newest `capacity` rows are kept."""
        if acts.dim() != 3 or tuple(acts.shape[1:]) != (self.n_modules, self.rank):
            raise ValueError(
                f"buffer holds rows of shape ({self.n_modules}, {self.rank}); got acts of shape {tuple(acts.shape)}"
            )
        acts = acts.detach().to(self._data.device, torch.float32)[-self.capacity :]
        n = acts.shape[0]
        first = min(n, self.capacity - self._next)  # rows written before wrapping to slot 0
        self._data[self._next : self._next + first] = acts[:first]
        self._data[: n - first] = acts[first:]
        self._next = (self._next + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    def acts(self) -> Tensor:
        """The stored rows, oldest first: (len(self), n_modules, rank)."""
        if self._size < self.capacity:
            return self._data[: self._size]
        return torch.cat([self._data[self._next :], self._data[: self._next]])

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "n_modules": self.n_modules, "rank": self.rank, "acts": self.acts().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stored rows; the capacity may differ (a resumed run with another `max_steps`): a smaller
        buffer keeps the newest rows."""
        shape = (int(state["n_modules"]), int(state["rank"]))
        if shape != (self.n_modules, self.rank):
            raise ValueError(
                f"buffer state has (n_modules, rank) = {shape}; this buffer has {(self.n_modules, self.rank)}"
            )
        self._next, self._size = 0, 0
        self.append(state["acts"])


def _world_size(accelerator: Any | None) -> int:
    dist_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if dist_ready else 1
    if accelerator is not None and accelerator.num_processes > 1 and not dist_ready:
        raise RuntimeError("accelerator reports several processes but torch.distributed is not initialised")
    return world


def gather_with_offset(acts: Tensor, accelerator: Any | None = None) -> tuple[Tensor, int]:
    """All processes' rows concatenated in rank order, plus the offset of this process's rows in it.

    Rows per process may differ: each process pads to the largest count for `all_gather` and the padding is cut off
    again, so every process returns the identical tensor. Single process: `(acts, 0)`.
    """
    world = _world_size(accelerator)
    if world == 1:
        return acts, 0
    dist = torch.distributed
    n_local = torch.tensor([acts.shape[0]], dtype=torch.long, device=acts.device)
    counts = [torch.zeros_like(n_local) for _ in range(world)]
    dist.all_gather(counts, n_local)
    sizes = [int(c.item()) for c in counts]
    if max(sizes) == 0:
        return acts, 0
    padded = acts.new_zeros((max(sizes), *acts.shape[1:]))
    padded[: acts.shape[0]] = acts
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    rank = dist.get_rank()
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]), sum(sizes[:rank])


def gather_activations(acts: Tensor, accelerator: Any | None = None) -> Tensor:
    """Every process gets the same rank-ordered concatenation of all processes' `acts` (N_i, M, r)."""
    return gather_with_offset(acts, accelerator)[0]


@dataclass
class GateDecision:
    """The gate's answer for this process's rows of one batch.

    scores (N,), zones (N,) long, m (N,), d (N,): this process's rows, in the order they were given.
    lo, hi: thresholds over the whole (global) buffer. buffer_size: rows in the buffer after the append.
    warmup_rows: rows of the global batch absorbed by the warm-up (their zones are ABSORB whatever their scores).
    zone_frac: share of the global batch (all processes' rows) in each zone, keyed by ZONE_NAMES.
    """

    scores: Tensor
    zones: Tensor
    m: Tensor
    d: Tensor
    lo: float
    hi: float
    buffer_size: int
    zone_frac: dict[str, float]
    warmup_rows: int = 0  # rows of the global batch absorbed because the warm-up was not over


class Gate:
    """Scores rollouts against `v_act` and assigns zones with thresholds over a run-spanning activation buffer."""

    def __init__(
        self,
        vact: Tensor,
        route_tail_q: float = 0.1,
        capacity: int = 8192,
        accelerator: Any | None = None,
        device: str | torch.device = "cpu",
        warmup_rollouts: int = 0,
        module_names: list[str] | None = None,
        step_fn: Callable[[], int] | None = None,
    ):
        if vact.dim() != 2:
            raise ValueError(f"vact must be (n_modules, rank); got shape {tuple(vact.shape)}")
        _check_tail_q(route_tail_q)
        if warmup_rollouts < 0:
            raise ValueError(f"warmup_rollouts must be >= 0; got {warmup_rollouts}")
        self.route_tail_q = route_tail_q
        self.warmup_rollouts = warmup_rollouts
        self.seen = 0  # rollouts of the run so far (global), the warm-up's clock; not capped by the capacity
        self.accelerator = accelerator
        self.vact = vact.detach().to(device, torch.float32).clone()
        self.buffer = ActivationBuffer(capacity, vact.shape[0], vact.shape[1], device=device)
        self.module_names = module_names  # for error messages only
        self.step_fn = step_fn  # the trainer's optimizer step, for error messages only
        self.calls = 0  # batches gated so far

    def set_vact(self, vact: Tensor) -> None:
        """Replace `v_act`; the buffer keeps its activations and is re-scored at the next `step` (no flush)."""
        if tuple(vact.shape) != tuple(self.vact.shape):
            raise ValueError(f"new vact has shape {tuple(vact.shape)}; the gate needs {tuple(self.vact.shape)}")
        self.vact = vact.detach().to(self.vact.device, torch.float32).clone()

    def thresholds(self) -> tuple[float, float]:
        """`(lo, hi)` over the current buffer re-scored with the current `v_act`."""
        return quantile_thresholds(score(self.buffer.acts(), self.vact), self.route_tail_q)

    def step(self, acts: Tensor) -> GateDecision:
        """Gather `acts` (N, M, r) across processes, append the global batch, re-score the buffer, decide zones.

        A collective under multi-process training: every process must call it once per batch (with N >= 0 rows).
        """
        local = acts.detach().float()
        global_acts, offset = gather_with_offset(local, self.accelerator)
        self._check_finite(global_acts, offset, local.shape[0])
        self.calls += 1
        self.buffer.append(global_acts)
        buffer_scores = score(self.buffer.acts(), self.vact)  # (len(buffer),) oldest first
        lo, hi = quantile_thresholds(buffer_scores, self.route_tail_q)
        n_global = global_acts.shape[0]
        if n_global <= self.buffer.capacity:  # the batch is the newest rows: reuse their buffer scores
            global_scores = buffer_scores[len(self.buffer) - n_global :]
        else:
            global_scores = score(global_acts.to(self.vact.device), self.vact)  # (N_global,)
        global_zones = zones_from_scores(global_scores, lo, hi)
        warm = max(0, min(n_global, self.warmup_rollouts - self.seen))  # leading rows still in the warm-up
        global_zones[:warm] = ABSORB
        self.seen += n_global
        rows = slice(offset, offset + local.shape[0])
        scores, zones = global_scores[rows].to(acts.device), global_zones[rows].to(acts.device)
        m, d = masks_from_zones(zones)
        return GateDecision(scores, zones, m, d, lo, hi, len(self.buffer), zone_fractions(global_zones), warm)

    def _check_finite(self, global_acts: Tensor, offset: int, n_local: int) -> None:
        """Refuse a batch with a non-finite pooled activation, on every rank at once (the batch is the gathered one).

        One NaN would make the quantile thresholds NaN, every comparison false and every later row absorbed, that
        is routing silently off until the row left the buffer."""
        bad = ~torch.isfinite(global_acts)  # (N, M, r)
        if not bool(bad.any()):
            return
        rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
        modules = bad.any(2).any(0).nonzero().flatten().tolist()
        names = [self.module_names[m] for m in modules] if self.module_names else modules
        step = self.step_fn() if self.step_fn is not None else f"(gate call) {self.calls}"
        mine = [r - offset for r in rows if offset <= r < offset + n_local]
        raise FloatingPointError(
            f"non-finite pooled activations at step {step}: rows {rows[:20]} of the global batch of "
            f"{global_acts.shape[0]} ({len(rows)} rows; this process's rows {mine[:20]}), modules {names[:10]} "
            f"({len(modules)} modules). The gate refuses them: a NaN would turn its thresholds into NaN and absorb "
            "every later rollout (routing silently off)."
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "vact": self.vact.clone(),
            "route_tail_q": self.route_tail_q,
            "buffer": self.buffer.state_dict(),
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_vact(state["vact"])
        _check_tail_q(float(state["route_tail_q"]))
        self.route_tail_q = float(state["route_tail_q"])
        self.buffer.load_state_dict(state["buffer"])
        self.seen = int(state.get("seen", len(self.buffer)))  # checkpoints before the warm-up: at least the buffer
