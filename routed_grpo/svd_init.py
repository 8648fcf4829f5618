"""Initial factors of the two blocks in the base weight's singular basis (`adapter_init`: svd, signed, signed_reverse).

The research notes this project grew from describe the adapter as a rank-2r LoRA whose frozen initial copies are
subtracted, `y = W x + s (B A x - B0 A0 x)`, the deployed block in slots `[:r]` and the quarantine in `[r:]`; their
successor initialises both blocks from the base weight's singular vectors. Here:

- `svd_slots`: the top 2r triplets of `W = U S V^T`, in float64 on the CPU (from the eigendecomposition of the
  Gram matrix of W's smaller side), with PiSSA's scaling: slot k has `A[k] = sqrt(S_k / s) V_k^T` and
  `B[:, k] = sqrt(S_k / s) U_k`, so `s B A = U S V^T` over the slots
  (`s` is the LoRA scaling `alpha / r`). Sign convention: each `U_k` is flipped so that its entry of largest
  magnitude is positive, `V_k` with it (`U_k S_k V_k^T` is unchanged), so the factors do not depend on the sign a
  LAPACK build happens to return. The deployed block takes slots `[:r]` (the top r), the quarantine `[r:2r]`.
- `signed_slots` (optional, on top of `svd`): one slot is seeded with the pairs' hack direction on the Linear's input,
  `u_in = unit(mean(x_hack - x_clean))`, as its row of `A0`, and `u_out = unit(W u_in)` as its column of `B0`,
  scaled like the singular slot it replaces (`sqrt(S_r / s)` on each side: the slot of the first quarantine
  triplet); the other 2r - 1 slots are orthogonalised against `u_in` (A side) and `u_out` (B side). `signed` puts
  it in the quarantine (slot r); its reverse control `signed_reverse` swaps it with the deployed block's last slot
  (r - 1), so the two differ only in which block holds the seeded slot.
- `factors_digest`: a hash of the initial factors (bf16-rounded, so a float32 and a bf16 run agree), recorded in the
  adapter fingerprint that `v_act` files carry.

The factors are computed once per module at start (`RoutedAdapter.initial_factors`), on one process and broadcast by
the trainer, and saved beside the blocks (`routed_init.safetensors`) so a reload or a resume uses the same ones.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

INITS = ("random", "svd", "signed", "signed_reverse")
SUBTRACTED = ("svd", "signed", "signed_reverse")  # inits whose B0 is not zero: frozen copies are subtracted


def top_singular(w: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U (m, k), S (k,), V^T (k, n)) of the top k singular triplets of `w` (float64), from the eigendecomposition of
    the Gram matrix of its smaller side: the same triplets as a full SVD (the singular values agree to ~1e-13 on a
    Qwen2.5-0.5B-shaped MLP weight), about 3.5 times faster on a 4864 x 896 weight (benchmarks/svd_init.py)."""
    tall = w.shape[0] >= w.shape[1]
    gram = w.T @ w if tall else w @ w.T  # (n, n) or (m, m)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    s = evals.flip(0)[:k].clamp_min(0.0).sqrt()
    side = evecs.flip(1)[:, :k]  # V (n, k) if tall else U (m, k)
    other = (w @ side if tall else w.T @ side) / torch.where(s > 0, s, 1.0)  # U or V; 0 where s == 0
    u, v = (other, side) if tall else (side, other)
    return u, s, v.T


def svd_slots(weight: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """(A (2r, d_in), B (d_out, 2r), S (2r,)) float32: the top 2r singular triplets of `weight` as LoRA slots."""
    w = weight.detach().to("cpu", torch.float64)
    k = 2 * rank
    if k > min(w.shape):
        raise ValueError(f"adapter_init svd needs 2 x rank = {k} <= min{tuple(w.shape)} of every target weight")
    u, s, vh = top_singular(w, k)
    peak = u.abs().argmax(dim=0)  # (k,)
    sign = torch.sign(u[peak, torch.arange(k)])
    sign[sign == 0] = 1.0
    u, vh = u * sign, vh * sign.unsqueeze(1)
    root = (s / scaling).sqrt()
    return (root.unsqueeze(1) * vh).float(), (u * root).float(), s.float()


def split_slots(a: Tensor, b: Tensor, rank: int) -> dict[str, tuple[Tensor, Tensor]]:
    """{"deployed": (A0, B0), "quarantine": (A0, B0)}: slots [:r] and [r:2r]."""
    return {"deployed": (a[:rank], b[:, :rank]), "quarantine": (a[rank:], b[:, rank:])}


def signed_slots(
    a: Tensor, b: Tensor, s: Tensor, weight: Tensor, hack_in: Tensor, rank: int, scaling: float, reverse: bool
) -> tuple[Tensor, Tensor]:
    """The svd slots with slot r seeded by the hack direction `hack_in` (d_in,) and the others orthogonalised
    against it; `reverse` swaps the seeded slot with slot r - 1 (the deployed block's last)."""
    u_in = hack_in.detach().to(torch.float64).cpu()
    if not torch.isfinite(u_in).all() or u_in.norm() == 0:
        raise ValueError("signed init: the pairs' mean input difference is zero or not finite at a module")
    u_in = u_in / u_in.norm()
    u_out = weight.detach().to("cpu", torch.float64) @ u_in
    if u_out.norm() == 0:
        raise ValueError("signed init: W u_in is zero at a module (the hack direction is in W's null space)")
    u_out = u_out / u_out.norm()
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    a64 = a64 - (a64 @ u_in).unsqueeze(1) * u_in  # rows orthogonal to u_in
    b64 = b64 - u_out.unsqueeze(1) * (u_out @ b64)  # columns orthogonal to u_out
    root = float((s[rank] / scaling).sqrt())  # the scale of the singular slot it replaces
    a64[rank], b64[:, rank] = root * u_in, root * u_out
    if reverse:
        order = list(range(a64.shape[0]))
        order[rank - 1], order[rank] = rank, rank - 1
        a64, b64 = a64[order], b64[:, order]
    return a64.float(), b64.float()


def factors_digest(factors: dict[str, dict[str, tuple[Tensor, Tensor]]]) -> str:
    """16-hex hash of every block's initial (A0, B0), rounded to bf16 (block -> module name -> factors)."""
    h = hashlib.sha256()
    for block in sorted(factors):
        for name in sorted(factors[block]):
            for t in factors[block][name]:
                h.update(f"{block}:{name}:{tuple(t.shape)}".encode())
                h.update(t.detach().float().cpu().to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
