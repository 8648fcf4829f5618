"""DIAGNOSTIC ONLY -- the "oracle direction": an upper bound that uses ground-truth labels. No training arm uses it.

    python scripts/diag_oracle_direction.py RUN_DIR [--n 256] [--save PATH]

Fits, per module, `oracle = unit(mu_hack - mu_clean)` of the pooled deployed bottleneck activations of LABELLED
held-out rollouts (strict hack vs not), on one half of the rollouts, and reports on the other half the AUROC and
precision / recall at the route zone of the oracle and of the run's `v_act`, plus their per-module cosine. It shows
how much separation any single direction could reach, i.e. how far `v_act` is from that bound. It reads
ground-truth labels, so by the oracle-free rule (DESIGN.md section 8) its output must never be used to route:
`--save` writes the tensor under the key `oracle_direction_DIAGNOSTIC` (not `vact`), which `load_vact` refuses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from routed_grpo.gate import score
from routed_grpo.lab.evaluation import labelled_rollouts, score_metrics
from routed_grpo.utils import atomic_write_text
from routed_grpo.vact import VactError, load_vact, unit_mean_difference


def oracle_direction(acts: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """(N, M, r) activations and a boolean label (N,) -> per module unit(mean(h[pos]) - mean(h[neg])) (M, r)."""
    positive = positive.bool()
    if not positive.any() or positive.all():
        raise ValueError(f"need both labels in the fit half; got {int(positive.sum())} of {positive.numel()} positive")
    diff = acts[positive].mean(0, keepdim=True) - acts[~positive].mean(0, keepdim=True)  # (1, M, r)
    return unit_mean_difference(diff, torch.zeros_like(diff))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=256, help="held-out problems (one rollout each)")
    parser.add_argument("--vact", type=Path, default=None, help="v_act to compare (default: RUN_DIR/vact.safetensors)")
    parser.add_argument("--mode", choices=("full", "deploy"), default="full")
    parser.add_argument("--label", default="hack_strict")
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--save", type=Path, default=None, help="write the oracle tensor (diagnostic key) here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        acts, labels, adapter, config = labelled_rollouts(args.run_dir, args.n, args.mode, args.seed, args.workers)
        y = torch.tensor([bool(getattr(lab, args.label)) for lab in labels])
        fit, test = torch.arange(len(y)) % 2 == 0, torch.arange(len(y)) % 2 == 1
        oracle = oracle_direction(acts[fit], y[fit])
        vact_path = args.vact or args.run_dir / "vact.safetensors"
        vact = load_vact(vact_path, adapter)[0] if vact_path.is_file() else None
    except (FileNotFoundError, VactError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tail_q = float(config["training"]["route_tail_q"])
    result = {
        "DIAGNOSTIC": "oracle direction fit on ground-truth labels; an upper bound, never used by a training arm",
        "run_dir": str(args.run_dir),
        "arm": config["arm"],
        "label": args.label,
        "mode": args.mode,
        "n": len(y),
        "n_fit": int(fit.sum()),
        "n_test": int(test.sum()),
        "oracle_test_metrics": score_metrics(score(acts[test], oracle), y[test], tail_q),
        "vact_test_metrics": score_metrics(score(acts[test], vact), y[test], tail_q) if vact is not None else None,
        "cosine_oracle_vact_per_module": (
            torch.nn.functional.cosine_similarity(oracle, vact, dim=-1).tolist() if vact is not None else None
        ),
        "module_names": adapter.module_names,
    }
    out = args.run_dir / "diag_oracle_direction.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    if args.save:
        save_file(
            {"oracle_direction_DIAGNOSTIC": oracle.contiguous()}, str(args.save), metadata={"kind": "diagnostic"}
        )
    o, v = result["oracle_test_metrics"], result["vact_test_metrics"]
    print(f"DIAGNOSTIC (labels used): {result['n_test']} test rollouts, {o['n_pos']} with {args.label}")
    print(f"oracle AUROC {o['auroc']}, precision@route {o['precision_at_route']}, recall@route {o['recall_at_route']}")
    if v is not None:
        cos = result["cosine_oracle_vact_per_module"]
        print(
            f"v_act  AUROC {v['auroc']}, precision@route {v['precision_at_route']}, "
            f"recall@route {v['recall_at_route']}"
        )
        print(f"mean cosine(oracle, v_act) over modules {sum(cos) / len(cos):.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
