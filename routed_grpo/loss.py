"""Pure tensor functions the trainer wires in: sampling modes, importance ratios per zone, routing mass.

The clipped surrogate itself is TRL's (`loss_type="dr_grpo"`); `dr_grpo_loss` restates it from DESIGN.md section 3
so a test can check the trainer's loss against a hand-written reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from routed_grpo.gate import ZONE_NAMES


def draw_sampling_modes(n: int, gen_deploy_frac: float, generator: torch.Generator) -> Tensor:
    """(n,) bool, True where the rollout is sampled in `full` mode; `deploy` with probability `gen_deploy_frac`."""
    if gen_deploy_frac <= 0.0:
        return torch.ones(n, dtype=torch.bool)
    if gen_deploy_frac >= 1.0:
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=generator) >= gen_deploy_frac


def per_row_rho(logps: Tensor, old_logps: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Token-mean and token-max of `rho = exp(logp - logp_old)` per row; (B,) each. Inputs (B, T).

    A row without completion tokens (e.g. emptied by TRL's `mask_truncated_completions`) has no ratio; it gets 1.0
    in both, a finite value that enters no loss term."""
    mask = completion_mask.bool()
    rho = torch.exp(logps.detach().float() - old_logps.float())  # (B, T)
    mean = rho.masked_fill(~mask, 0.0).sum(1) / mask.sum(1).clamp_min(1)  # a pad position's ratio never enters
    peak = rho.masked_fill(~mask, float("-inf")).max(1).values
    empty = ~mask.any(1)
    return mean.masked_fill(empty, 1.0), peak.masked_fill(empty, 1.0)


def mismatched_rows(m: Tensor, sampling_full: Tensor) -> Tensor:
    """(B,) bool: rows whose training forward mode differs from their sampling mode.

    `m` (B,) is the quarantine mask of the training forward (0: deploy mode, the route intervention's keep rows;
    1: full mode); `sampling_full` (B,) is True for rows sampled in full mode. These are the rows where `rho`
    compares two different policies.
    """
    return (m > 0) != sampling_full.bool()


def cap_mismatched_ratio(logps: Tensor, old_logps: Tensor, rows: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """Behaviour log-probs that truncate `rho = exp(logp - logp_old)` at `cap` on `rows` only.

    On `rows`, `logp_old' = max(logp_old, logp - log(cap))`, so `exp(logp - logp_old') = min(rho, cap)` while the
    gradient keeps the direction of `grad logp` (a truncated importance weight, as in V-trace), scaled by the capped
    ratio. Other rows are returned bit-identical. logps, old_logps (B, T); rows (B,) bool. Also returns the (B, T)
    bool mask of capped tokens.
    """
    if cap <= 1.0:
        raise ValueError(f"the ratio cap must be > 1, got {cap}")
    floor = logps.detach() - math.log(cap)
    capped = rows.unsqueeze(1) & (floor > old_logps)  # (B, T)
    return torch.where(capped, floor, old_logps), capped


def rho_zone_stats(row_mean: Tensor, row_max: Tensor, zones: Tensor) -> Tensor:
    """(3, 3) float32 per zone in ZONE_NAMES order: [sum of the rows' mean ratios, rows, largest ratio (-inf: no
    row)]. Rows in no zone (zone -1) are left out. Stays on the device: no host synchronisation."""
    onehot = zones.unsqueeze(1) == torch.arange(len(ZONE_NAMES), device=zones.device)  # (B, 3)
    sums = (onehot * row_mean.float().unsqueeze(1)).sum(0)
    peaks = row_max.float().unsqueeze(1).masked_fill(~onehot, float("-inf")).amax(0)
    return torch.stack([sums, onehot.sum(0).float(), peaks], dim=1)


def merge_rho_stats(a: Tensor | None, b: Tensor) -> Tensor:
    """Two `rho_zone_stats` (or a stack of them, (..., 3, 3)) merged: sums and counts add, maxima take the max."""
    if a is None:
        return b
    return torch.cat([a[..., :2] + b[..., :2], torch.maximum(a[..., 2:], b[..., 2:])], dim=-1)


def rho_zone_metrics(stats: Tensor) -> dict[str, float]:
    """`routing/rho_mean/<zone>` (row-weighted) and `routing/rho_max/<zone>` (the true maximum) from (..., 3, 3)
    stats of any number of processes and micro-batches; zones without rows are left out."""
    total = stats.reshape(-1, len(ZONE_NAMES), 3)
    sums, rows, peaks = torch.stack([total[:, :, 0].sum(0), total[:, :, 1].sum(0), total[:, :, 2].amax(0)]).tolist()
    out = {}
    for z, name in enumerate(ZONE_NAMES):
        if rows[z] > 0:
            out[f"routing/rho_mean/{name}"] = sums[z] / rows[z]
            out[f"routing/rho_max/{name}"] = peaks[z]
    return out


def first_nonfinite_zone(row_mean: Tensor, row_max: Tensor, zones: Tensor) -> str | None:
    """Name of the first zone holding a row with a non-finite ratio, or None."""
    bad = ~(torch.isfinite(row_mean) & torch.isfinite(row_max))
    for z, name in enumerate(ZONE_NAMES):
        if (bad & (zones == z)).any():
            return name
    return None


def block_grad_norms(deployed: list[Tensor | None], quarantine: list[Tensor | None]) -> Tensor:
    """L2 norms of the deployed and the quarantine block's gradients, (2,) float32 on the device.

    One fused reduction over all gradients (`torch._foreach_norm`), no host synchronisation; a missing gradient
    (None) counts as zero.
    """
    grads = [g for g in (*deployed, *quarantine) if g is not None]
    owner = [0] * sum(g is not None for g in deployed) + [1] * sum(g is not None for g in quarantine)
    if not grads:
        return torch.zeros(2)
    device = grads[0].device
    norms = torch.stack([n.to(device) for n in torch._foreach_norm(grads)]).float()  # (n_grads,)
    index = torch.tensor(owner, device=device)
    return torch.zeros(2, device=device).index_add_(0, index, norms.pow(2)).sqrt()


def grad_qmass(norms: Tensor) -> Tensor:
    """Share of gradient norm that reached the quarantine block, |g_q| / (|g_dep| + |g_q|); 0 if both are 0.

    norms: (2,) as returned by `block_grad_norms`. Returns a 0-d tensor on the same device.
    """
    total = norms.sum()
    return torch.where(total > 0, norms[1] / total.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


def zero_grad_flags(grads: list[Tensor]) -> Tensor:
    """(n,) bool on the device of the first gradient: True where every entry of that gradient is exactly zero.

    One fused reduction (`torch._foreach_norm` with the max norm, which is 0 exactly when all entries are 0), so the
    caller needs a single host synchronisation to read all flags, not one per parameter.
    """
    if not grads:
        return torch.zeros(0, dtype=torch.bool)
    device = grads[0].device
    return torch.stack([n.to(device) for n in torch._foreach_norm(grads, ord=math.inf)]) == 0


def dr_grpo_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, completion_mask: Tensor, max_len: int, eps: float = 0.2
) -> Tensor:
    """Reference Dr.GRPO clipped surrogate: -sum(min(rho A, clip(rho) A) * mask) / (B * max_len)."""
    rho = torch.exp(logps - old_logps)  # (B, T)
    adv = advantages.unsqueeze(1)  # (B, 1)
    per_token = -torch.min(rho * adv, torch.clamp(rho, 1 - eps, 1 + eps) * adv)
    return (per_token * completion_mask).sum() / (logps.size(0) * max_len)
