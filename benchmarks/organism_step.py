"""Seconds per training step of one CPU-organism run (routed arm), this tree against another, interleaved.

    git archive c8e4a50 | tar -x -C /tmp/base      # the tree to compare against (any checkout of the project)
    OMP_NUM_THREADS=1 python benchmarks/organism_step.py --baseline /tmp/base --steps 20 --repeats 3

Each repeat runs the baseline tree and this tree once, one after the other (order alternating from repeat to
repeat), each as its own process with `OMP_NUM_THREADS=1`: the organism recipe `recipes/organism/routed.yaml` of
that tree, `--max_steps STEPS`, seed 0, no checkpoints, the same organism cache (`--organism-dir`, built once by the
first run; `--new-args` adds recipe arguments to the measured tree's runs only). A step is one optimizer step
(generation, rewards, gate, measurement labels, loss forward and backward, optimizer), timed from `on_step_begin`
to `on_step_end` by a callback; the held-out measurement that runs every
`measure_every` steps comes after `on_step_end` and is not in it. Per tree the figure is the median over the
measured steps of all repeats, the first `--skip` steps of each run left out (warm-up). The run's wall time
(`train_runtime`, with the held-out measurements) is reported beside it, and so is the training process's own CPU
time per step (`cpu_ratio`: it leaves out the sandbox's processes, and moves less than wall time on a shared
machine).

Results check: every repeat's `metrics.jsonl` of each tree is compared with the first baseline run's, step by step,
on the training numbers (loss, reward, its std, grad norm, completion lengths, sandbox compile/correct/hinted
fractions, routing zones, measure/... labels); the largest absolute difference per key is printed, and
`identical` says whether all are exactly equal. Timing keys (`timing/...`, `step_time`, `sandbox/seconds_mean`)
are left out.

The last line printed is one JSON object: {"baseline_s", "new_s", "ratio" (new / baseline), "cpu_ratio",
"baseline_runtime_s", "new_runtime_s", "identical", "max_abs_diff", "load_avg_before", "load_avg_after",
"steps_measured"}.
The machine's load averages are printed beside every run: on a shared machine compare only back-to-back figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("timing/", "step_time", "sandbox/seconds_mean", "train_", "total_flos", "epoch", "learning_rate")


def _child(tree: Path, out: Path, steps: int, organism_dir: Path, extra: list[str]) -> None:
    """Runs inside the child process, with `tree` first on sys.path: one routed organism run, step times to `out`."""
    from transformers import TrainerCallback

    from routed_grpo.lab import experiment

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.c0, self.seconds, self.cpu = 0.0, 0.0, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    timer = StepTimer()
    build = experiment.build_trainer

    def build_timed(*args, **kwargs):
        trainer, adapter = build(*args, **kwargs)
        trainer.add_callback(timer)  # before the metrics writer and the held-out measurement: they are not timed
        return trainer, adapter

    experiment.build_trainer = build_timed
    run_dir = out.with_suffix("")
    argv = ["--config", str(tree / "recipes/organism/routed.yaml"), "--output_dir", str(run_dir)]
    argv += ["--organism_dir", str(organism_dir), "--max_steps", str(steps), "--seed", "0"]
    argv += ["--disable_tqdm", "true", "--save_strategy", "no", "--report_to", "none", *extra]
    script, training, model_args = experiment.parse_recipe(argv)
    t0 = time.perf_counter()
    experiment.run_experiment(script, training, model_args)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    runtime = next((r["train_runtime"] for r in rows if "train_runtime" in r), wall)
    import routed_grpo

    source = str(Path(routed_grpo.__file__).resolve().parents[1])
    record = {"step_seconds": timer.seconds, "step_cpu": timer.cpu, "train_runtime": runtime, "metrics": rows}
    record["source"] = source
    out.write_text(json.dumps(record))


def _run(tree: Path, out: Path, steps: int, organism_dir: Path, extra: str = "") -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(tree),
        str(out),
        str(steps),
        str(organism_dir),
        extra,
    ]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run in {tree} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _training_numbers(rows: list[dict]) -> dict[tuple[int, str], float]:
    out = {}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "arm") or key.startswith(TIMING_KEYS) or not isinstance(value, (int, float)):
                continue
            out[(row["step"], key)] = float(value)
    return out


def compare(reference: list[dict], other: list[dict]) -> dict[str, float]:
    """Largest absolute difference per metric key (a key missing on one side counts as infinite)."""
    a, b = _training_numbers(reference), _training_numbers(other)
    diff: dict[str, float] = {}
    for step_key in a.keys() | b.keys():
        key = step_key[1]
        d = abs(a[step_key] - b[step_key]) if step_key in a and step_key in b else float("inf")
        diff[key] = max(diff.get(key, 0.0), d)
    return diff


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="source tree to compare against (e.g. main)")
    ap.add_argument("--new", type=Path, default=HERE, help="source tree measured (default: this one)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", type=int, default=2, help="first steps of each run left out of the median")
    ap.add_argument("--organism-dir", type=Path, default=Path(tempfile.gettempdir()) / "routed_grpo_organism")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument(
        "--new-args",
        default="",
        help="recipe arguments for the measured tree only, e.g. '--share_prompt_forward true'",
    )
    args = ap.parse_args()
    trees = {"baseline": args.baseline.resolve(), "new": args.new.resolve()}
    work = Path(args.out or tempfile.mkdtemp(prefix="organism_step_"))
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, list[float]] = {"baseline": [], "new": []}
    cpu: dict[str, list[float]] = {"baseline": [], "new": []}
    runtimes: dict[str, list[float]] = {"baseline": [], "new": []}
    records: dict[str, list[dict]] = {"baseline": [], "new": []}
    load_before = load()
    for rep in range(args.repeats):
        order = ["baseline", "new"] if rep % 2 == 0 else ["new", "baseline"]
        for name in order:
            before = load()
            extra = args.new_args if name == "new" else ""
            rec = _run(trees[name], work / f"{name}{rep}.json", args.steps, args.organism_dir.resolve(), extra)
            if Path(rec["source"]) != trees[name]:
                sys.exit(f"the {name} run imported routed_grpo from {rec['source']}, not {trees[name]}")
            secs = rec["step_seconds"][args.skip :]
            steps[name] += secs
            cpu[name] += rec["step_cpu"][args.skip :]
            runtimes[name].append(rec["train_runtime"])
            records[name].append(rec)
            print(
                f"repeat {rep} {name:8s}: median step {statistics.median(secs):.3f} s (CPU "
                f"{statistics.median(rec['step_cpu'][args.skip :]):.3f} s), runtime "
                f"{rec['train_runtime']:.1f} s, load {before} -> {load()}",
                flush=True,
            )
    reference = records["baseline"][0]["metrics"]
    diff: dict[str, float] = {}
    for rec in records["baseline"][1:] + records["new"]:
        for key, d in compare(reference, rec["metrics"]).items():
            diff[key] = max(diff.get(key, 0.0), d)
    worst = sorted(diff.items(), key=lambda kv: -kv[1])[:8]
    print("largest differences against the first baseline run:", ", ".join(f"{k}={v:.3g}" for k, v in worst))
    base, new = statistics.median(steps["baseline"]), statistics.median(steps["new"])
    result = {
        "baseline_s": round(base, 4),
        "new_s": round(new, 4),
        "ratio": round(new / base, 4),
        "cpu_ratio": round(statistics.median(cpu["new"]) / statistics.median(cpu["baseline"]), 4),
        "baseline_runtime_s": round(statistics.median(runtimes["baseline"]), 1),
        "new_runtime_s": round(statistics.median(runtimes["new"]), 1),
        "identical": all(v == 0.0 for v in diff.values()),
        "max_abs_diff": {k: v for k, v in worst if v},
        "load_avg_before": load_before,
        "load_avg_after": load(),
        "steps_measured": {k: len(v) for k, v in steps.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        tree = Path(sys.argv[2])
        sys.path.insert(0, str(tree))
        _child(tree, Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), shlex.split(sys.argv[6]))
    else:
        main()
