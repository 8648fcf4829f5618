"""Step time and peak memory: stock `GRPOTrainer` vs `RoutedGRPOTrainer` on the same tiny model, data and seed.

    OMP_NUM_THREADS=1 python benchmarks/step_time.py --steps 12 --warmup 3 --repeats 3

Each arm runs in its own subprocess (so peak memory is that arm's own), arms interleaved over `--repeats` rounds
to spread machine noise evenly. Both arms carry the same two-block adapter; the stock arm trains it with TRL's
`GRPOTrainer`. Prints the median step time over all measured steps, a breakdown (generation, behaviour forward,
gate, loss forward+backward, rest), peak memory (max RSS on CPU, `torch.cuda.max_memory_allocated` on GPU) and
ratios to stock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = {"stock": None, "routed_frac0": 0.0, "routed_frac0.5": 0.5}


def _timed(obj, name: str, bucket: dict[str, float]) -> None:
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            bucket[name] = bucket.get(name, 0.0) + time.perf_counter() - t0

    setattr(obj, name, wrapper)


def run_arm(arm: str, steps: int, warmup: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    from routed_grpo.adapter import attach_routed_adapter
    from routed_grpo.config import RoutedGRPOConfig
    from routed_grpo.lab.organism import OrganismConfig, make_model, train_tokenizer
    from routed_grpo.trainer import RoutedGRPOTrainer

    corpus = [f"class Solution:\n    def f{i}(self, nums):\n        return sum(nums) * {i}\n" for i in range(50)]
    tok = train_tokenizer(corpus, vocab_size=600)
    torch.manual_seed(0)
    model = make_model(OrganismConfig(), tok)  # the CPU model organism's size
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Write f{i % 50}."}]} for i in range(512)])

    def reward(prompts, completions, **kw):
        return [float(len(c[0]["content"]) % 5) for c in completions]

    frac = ARMS[arm]
    args = RoutedGRPOConfig(
        output_dir=str(out / arm),
        routing="none" if frac is None else "placebo",
        gen_deploy_frac=frac or 0.0,
        per_device_train_batch_size=64,
        num_generations=8,
        max_completion_length=64,
        max_steps=warmup + steps,
        learning_rate=2e-4,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        adapter_rank=8,
        save_strategy="no",
        seed=0,
        temperature=1.0,
    )
    if frac is None:
        adapter = attach_routed_adapter(model, rank=8)
        trainer = GRPOTrainer(
            model=adapter.model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok
        )
    else:
        trainer = RoutedGRPOTrainer(
            model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok
        )
    per_step: list[dict[str, float]] = []
    bucket: dict[str, float] = {}
    for name in ("_generate_single_turn", "_prepare_inputs", "_calculate_rewards"):
        _timed(trainer, name, bucket)
    if frac is not None:
        _timed(trainer, "_behaviour_forward", bucket)
        _timed(trainer.gate, "step", bucket)
    original_step = trainer.training_step

    def training_step(*a, **k):
        bucket.clear()
        t0 = time.perf_counter()
        loss = original_step(*a, **k)
        total = time.perf_counter() - t0
        per_step.append({"total": total, **bucket})
        return loss

    trainer.training_step = training_step
    trainer.train()
    measured = per_step[warmup:]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"arm": arm, "steps": measured, "peak_mib": peak}


def breakdown(steps: list[dict[str, float]]) -> dict[str, float]:
    med = lambda key: statistics.median(s.get(key, 0.0) for s in steps)  # noqa: E731
    prepare = med("_prepare_inputs")
    parts = {
        "generation": med("_generate_single_turn"),
        "rewards": med("_calculate_rewards"),
        "behaviour_fwd": med("_behaviour_forward"),
        "gate": med("step"),
    }
    parts["other_prepare"] = max(prepare - sum(parts.values()), 0.0)
    parts["loss_fwd_bwd"] = med("total") - prepare
    parts["total"] = med("total")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="measured steps per arm and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of all arms")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.arm:
        print("RESULT " + json.dumps(run_arm(a.arm, a.steps, a.warmup, Path(a.out))))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    results: dict[str, dict] = {arm: {"steps": [], "peak": []} for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for arm in ARMS:
                cmd = [
                    sys.executable,
                    __file__,
                    "--arm",
                    arm,
                    "--steps",
                    str(a.steps),
                    "--warmup",
                    str(a.warmup),
                    "--out",
                    tmp,
                ]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
                results[arm]["steps"] += res["steps"]
                results[arm]["peak"].append(res["peak_mib"])
                print(
                    f"round {r + 1}/{a.repeats} {arm}: median step {breakdown(res['steps'])['total']:.3f}s",
                    file=sys.stderr,
                )
    rows = {arm: breakdown(v["steps"]) | {"peak_mib": statistics.median(v["peak"])} for arm, v in results.items()}
    cols = ["total", "generation", "rewards", "behaviour_fwd", "gate", "loss_fwd_bwd", "other_prepare", "peak_mib"]
    print(
        f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, {a.repeats} rounds x {a.steps} measured steps per arm "
        f"(after {a.warmup} warm-up), seconds are medians per step"
    )
    print("| arm | " + " | ".join(cols) + " | step ratio | memory ratio |")
    print("|---" * (len(cols) + 3) + "|")
    base = rows["stock"]
    for arm, row in rows.items():
        cells = " | ".join(f"{row[c]:.1f}" if c == "peak_mib" else f"{row[c]:.3f}" for c in cols)
        print(f"| {arm} | {cells} | {row['total'] / base['total']:.3f} | {row['peak_mib'] / base['peak_mib']:.3f} |")


if __name__ == "__main__":
    main()
