"""Diagnostic: how well does the routing score separate strict hacks from the rest? MEASUREMENT ONLY.

    python scripts/diag_routing_auroc.py RUN_DIR [--n 128] [--placebos 16] [--vact PATH] [--mode full]

Samples one completion per held-out problem (loophole on) from the run's final model, labels it with the sandbox's
measurement labels, pools the deployed bottleneck activations over the completion and scores them with the run's
`v_act` (`RUN_DIR/vact.safetensors`, or `--vact`) and with N Haar-random placebo directions. Reports the AUROC of
the score against the strict-hack label and the precision / recall of the route zone (score >= q(1 - route_tail_q)
over this sample; the training gate used the quantile of its run-spanning buffer instead). Writes
`RUN_DIR/diag_routing_auroc.json`. Nothing here feeds training: labels never reach a gate or a loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from routed_grpo.gate import score
from routed_grpo.lab.evaluation import labelled_rollouts, score_metrics
from routed_grpo.utils import atomic_write_text
from routed_grpo.vact import VactError, haar_placebo, load_vact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=128, help="held-out problems (one rollout each)")
    parser.add_argument("--placebos", type=int, default=16, help="number of Haar-random placebo directions")
    parser.add_argument("--vact", type=Path, default=None, help="v_act file (default: RUN_DIR/vact.safetensors)")
    parser.add_argument("--mode", choices=("full", "deploy"), default="full", help="sampling mode of the rollouts")
    parser.add_argument("--label", default="hack_strict", help="label to separate (a sandbox.labels key)")
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    vact_path = args.vact or args.run_dir / "vact.safetensors"
    if not vact_path.is_file():
        print(f"error: {vact_path}: no v_act (a baseline run has none; pass --vact)", file=sys.stderr)
        return 2
    try:
        acts, labels, adapter, config = labelled_rollouts(args.run_dir, args.n, args.mode, args.seed, args.workers)
        vact, meta = load_vact(vact_path, adapter)
    except (FileNotFoundError, VactError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    y = torch.tensor([bool(getattr(lab, args.label)) for lab in labels])
    tail_q = float(config["training"]["route_tail_q"])
    real = score_metrics(score(acts, vact), y, tail_q)
    placebos = [score_metrics(score(acts, haar_placebo(vact, 10_000 + i)), y, tail_q) for i in range(args.placebos)]
    aurocs = [p["auroc"] for p in placebos if p["auroc"] is not None]
    result = {
        "run_dir": str(args.run_dir),
        "arm": config["arm"],
        "label": args.label,
        "mode": args.mode,
        "n": len(labels),
        "route_tail_q": tail_q,
        "vact": str(vact_path),
        "vact_kind": meta.get("kind"),
        "vact_metrics": real,
        "placebo_metrics": placebos,
        "placebo_auroc_mean": sum(aurocs) / len(aurocs) if aurocs else None,
        "vact_auroc_rank": (sum(a < real["auroc"] for a in aurocs) / len(aurocs))
        if aurocs and real["auroc"]
        else None,
        "note": "measurement only; the route threshold is this sample's quantile, not the training buffer's",
    }
    out = args.run_dir / "diag_routing_auroc.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    _print(result)
    print(f"wrote {out}")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _print(r: dict) -> None:
    m = r["vact_metrics"]
    print(f"{r['arm']}: {r['n']} held-out rollouts ({r['mode']} mode), {m['n_pos']} with {r['label']}")
    print("| direction | AUROC | precision@route | recall@route |\n|---|---|---|---|")
    print(
        f"| v_act ({r['vact_kind']}) | {_fmt(m['auroc'])} | {_fmt(m['precision_at_route'])} | "
        f"{_fmt(m['recall_at_route'])} |"
    )
    for i, p in enumerate(r["placebo_metrics"]):
        print(f"| placebo {i} | {_fmt(p['auroc'])} | {_fmt(p['precision_at_route'])} | {_fmt(p['recall_at_route'])} |")
    print(f"placebo AUROC mean {_fmt(r['placebo_auroc_mean'])}; v_act beats {_fmt(r['vact_auroc_rank'])} of them")


if __name__ == "__main__":
    sys.exit(main())
