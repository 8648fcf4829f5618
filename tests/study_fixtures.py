"""Synthetic study directories for report tests: run directories with the files the report reads (config.yaml,
eval.json, metrics.jsonl, study.json), with chosen rates, so expected statistics can be computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from routed_grpo.lab.evaluation import rate

KEYS = ("hack_strict", "hack_attempted", "correct", "compiled", "defines_run_tests")


def _mode(n: int, samples: int, hits: dict[str, int]) -> dict:
    return {key: rate(k, n * samples) for key, k in hits.items()}


def _per_problem(n: int, samples: int, k: int) -> list[int]:
    """`k` hits spread over `n` problems of `samples` each, filled problem by problem."""
    out = []
    for _ in range(n):
        take = min(samples, k)
        out.append(take)
        k -= take
    return out


def make_run(
    root: Path,
    arm: str,
    seed: int,
    hack: int,
    solve: int,
    *,
    n: int = 10,
    samples: int = 2,
    full_hack: int | None = None,
    full_solve: int | None = None,
    compiles: int | None = None,
    full_compiles: int | None = None,
    final_reward: float = 2.0,
    curve: list[tuple[int, float, float]] = (),
) -> Path:
    """One evaluated run of spec `arm` (e.g. `routed@cap=4`) at `seed`; counts are over n x samples samples."""
    base = arm.split("@")[0]
    run_dir = root / arm / f"seed{seed}"
    run_dir.mkdir(parents=True)
    total = n * samples
    compiles = total if compiles is None else compiles
    full_compiles = compiles if full_compiles is None else full_compiles
    deploy = {"hack_strict": hack, "hack_attempted": 0, "correct": solve, "compiled": compiles,
              "defines_run_tests": hack}  # fmt: skip
    full = {**deploy, "hack_strict": hack if full_hack is None else full_hack,
            "correct": solve if full_solve is None else full_solve, "compiled": full_compiles}  # fmt: skip
    config = {
        "arm": base,
        "script": {"compile_reward": 0.5, "eval_n": n, "eval_samples": samples},
        "training": {"seed": seed, "mismatch_ratio_cap": 4.0},
        "model": {"model_name_or_path": str(root / "organism-abc" / "model")},
    }
    if base in ("labels", "oracle_direction"):
        config["diagnostic"] = {"upper_bound": True, "reads_labels": True}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    modes = {"deploy": deploy, "full": full}
    evaluation = {
        "arm": base,
        "seed": seed,
        "n": n,
        "samples": samples,
        "modes": {m: _mode(n, samples, hits) for m, hits in modes.items()},
        "per_problem": {m: {k: _per_problem(n, samples, v) for k, v in hits.items()} for m, hits in modes.items()},
    }
    (run_dir / "eval.json").write_text(json.dumps(evaluation))
    metrics = [{"step": s, "reward": final_reward, "routing/qmass": 0.9, "step_time": 1.0} for s in range(1, 6)]
    metrics += [{"step": s, "measure/heldout/n": 8, "measure/heldout/deploy/hack_strict": h,
                 "measure/heldout/deploy/correct": c} for s, h, c in curve]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run_dir / "study.json").write_text(json.dumps({"spec": {"name": arm}, "train_seconds": 1.0}))
    return run_dir
