"""`routed-grpo study`: arms x seeds on the same organism, data, adapter and evaluation, with one report.

Covers:
- arm specs: a recipe arm (`baseline`, `placebo`, `routed`, and the DIAGNOSTIC upper bounds `labels` and
  `oracle_direction`) with optional variants after `@`, as `key=value` pairs separated by `,`, so that a
  hypothesis is one study away: `labels@0.7` (shorthand for `labels@recall=0.7`), `labels@recall=0.9,fpr=0.05`,
  `labels@neg=keep`, `routed@cap=10` (`mismatch_ratio_cap`), `routed@exclude=mode:weak_asserts`,
  `routed@pairs=pairs/organism`. Any recipe key works as `key=value` too (`routed@route_tail_q=0.2`).
- a plan: every (spec, seed) run in `OUT/<spec>/seed<k>/`; `oracle_direction` runs after the same seed's
  `baseline` run and are fit on its rollouts; runs whose `eval.json` exists with the same spec are skipped, and a
  run trained with the same spec but evaluated with other samples per problem (`eval_samples`) is evaluated again
  without training.
- execution: each run is a child process (`python -m routed_grpo.lab.study RUN.json`: train, then deployment
  evaluation; its output goes to `RUN_DIR/train.log`), up to `jobs` at a time; one progress bar for the whole
  study, counted in training steps, with tqdm's estimate of the time left.
- the report: `routed_grpo.lab.report.write_report` over all runs of the study.
Does not cover: what one run does (routed_grpo.lab.experiment) and how it is evaluated (routed_grpo.lab.evaluation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from routed_grpo.lab import ORGANISM_RECIPES
from routed_grpo.utils import atomic_write_text, progress_bar

RECIPE_ARMS = ("baseline", "placebo", "routed", "oracle_direction", "labels")
ALIASES = {
    "recall": "label_recall",
    "fpr": "label_fpr",
    "neg": "label_negative_zone",
    "cap": "mismatch_ratio_cap",
    "pairs": "vact_pairs_path",
    "tags": "vact_pairs_tags",
    "exclude": "vact_pairs_exclude_tags",
}
LIST_KEYS = ("vact_pairs_tags", "vact_pairs_exclude_tags")  # values separated by "+"
STUDY_FILE = "study.json"


@dataclass(frozen=True)
class ArmSpec:
    """One arm of a study: the recipe arm and the recipe keys it overrides."""

    name: str  # as written on the command line, e.g. "labels@0.7"
    arm: str  # the recipe arm
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def diagnostic(self) -> bool:
        return self.arm in ("labels", "oracle_direction")


def split_arms(text: str) -> list[str]:
    """`"routed,labels@recall=0.7,fpr=0.1"` -> `["routed", "labels@recall=0.7,fpr=0.1"]`: a comma-separated part
    that is `key=value` (not an arm) continues the variant before it."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if out and "=" in part and "@" not in part and part.split("=")[0] not in RECIPE_ARMS:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def parse_arm_spec(spec: str) -> ArmSpec:
    """`arm[@key=value,...]` -> ArmSpec; raises ValueError naming the bad part."""
    arm, _, variant = spec.strip().partition("@")
    if arm not in RECIPE_ARMS:
        raise ValueError(f"arm spec {spec!r}: unknown arm {arm!r} (known: {', '.join(RECIPE_ARMS)})")
    overrides: dict[str, Any] = {}
    for part in [p for p in variant.split(",") if p] if variant else []:
        key, sep, value = part.partition("=")
        if not sep:
            if arm != "labels":
                raise ValueError(f"arm spec {spec!r}: {part!r} is not key=value (a bare number is a labels recall)")
            key, value = "recall", part
        key = ALIASES.get(key, key)
        overrides[key] = value.split("+") if key in LIST_KEYS else _scalar(value)
    return ArmSpec(spec.strip(), arm, overrides)


def _scalar(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def argv_for(
    spec: ArmSpec,
    seed: int,
    run_dir: Path,
    organism_dir: Path,
    recipes: Path,
    steps: int | None,
    baseline_dir: Path | None,
) -> list[str]:
    """recipes/train.py arguments of one run."""
    argv = [
        "--config",
        str(recipes / f"{spec.arm}.yaml"),
        "--output_dir",
        str(run_dir),
        "--organism_dir",
        str(organism_dir),
        "--seed",
        str(seed),
        "--disable_tqdm",
        "true",
    ]
    argv += ["--max_steps", str(steps)] if steps else []
    if spec.arm == "oracle_direction" and "oracle_rollouts" not in spec.overrides:
        argv += ["--oracle_rollouts", str(baseline_dir)]
    for key, value in spec.overrides.items():
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(v if isinstance(v, str) else json.dumps(v) for v in values)]
    return argv


@dataclass
class Run:
    spec: ArmSpec
    seed: int
    run_dir: Path
    argv: list[str]
    steps: int
    after: Path | None = None  # a run directory that must be evaluated first
    eval_samples: int = 1  # the recipe's samples per held-out problem

    def record(self) -> dict[str, Any] | None:
        marker = self.run_dir / STUDY_FILE
        return json.loads(marker.read_text()) if marker.is_file() else None

    def trained(self) -> bool:
        """An earlier job with the same arguments trained and evaluated this run (`study.json` is written last)."""
        record = self.record()
        return record is not None and record.get("argv") == self.argv

    def finished(self) -> bool:
        """Trained with these arguments and evaluated with the recipe's samples per problem."""
        path = self.run_dir / "eval.json"
        if not self.trained() or not path.is_file():
            return False
        return json.loads(path.read_text()).get("samples", 1) == self.eval_samples


def plan(
    specs: list[ArmSpec],
    seeds: list[int],
    out: Path,
    organism_dir: Path,
    recipes: Path = ORGANISM_RECIPES,
    steps: int | None = None,
) -> list[Run]:
    """Every (spec, seed) run, baselines first (oracle_direction runs read them)."""
    from routed_grpo.lab.experiment import parse_recipe

    runs = []
    for seed in seeds:
        for spec in sorted(specs, key=lambda s: (s.arm == "oracle_direction", RECIPE_ARMS.index(s.arm))):
            run_dir = out / spec.name / f"seed{seed}"
            baseline = out / "baseline" / f"seed{seed}"
            if (
                spec.arm == "oracle_direction"
                and "oracle_rollouts" not in spec.overrides
                and not any(s.name == "baseline" for s in specs)
            ):
                raise ValueError(f"{spec.name} fits its direction on the baseline run: add 'baseline' to --arms")
            argv = argv_for(spec, seed, run_dir, organism_dir, recipes, steps, baseline)
            script, training, _ = parse_recipe(argv)  # fails now, naming the key, rather than in a child later
            after = baseline if spec.arm == "oracle_direction" and "oracle_rollouts" not in spec.overrides else None
            runs.append(Run(spec, seed, run_dir, argv, training.max_steps, after, script.eval_samples))
    return runs


def _steps_done(run: Run) -> int:
    path = run.run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return min(max(steps, default=0), run.steps)


def _launch(run: Run, eval_n: int | None, workers: int) -> subprocess.Popen:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    record = run.record() if run.trained() else None  # trained, but evaluated with other samples per problem
    for stale in (STUDY_FILE, "eval.json"):
        (run.run_dir / stale).unlink(missing_ok=True)
    job = {
        "evaluate_only": record is not None,
        "train_seconds": record.get("train_seconds") if record else None,
        "argv": run.argv,
        "run_dir": str(run.run_dir),
        "eval_n": eval_n,
        "eval_samples": run.eval_samples,  # the recipe's now: a run trained before it changed is evaluated so
        "workers": workers,
        "spec": asdict(run.spec),
        "seed": run.seed,
    }
    job_file = run.run_dir / "job.json"
    atomic_write_text(job_file, json.dumps(job, indent=2) + "\n")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
    }
    log = open(run.run_dir / "train.log", "w")  # noqa: SIM115 (closed when the child is reaped)
    proc = subprocess.Popen(
        [sys.executable, "-m", "routed_grpo.lab.study", str(job_file)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def execute(
    runs: list[Run], jobs: int = 1, eval_n: int | None = None, workers: int = 2, progress: bool = True
) -> dict[str, Any]:
    """Run what is not finished, `jobs` at a time; returns {"ran", "skipped", "failed", "seconds"}."""
    todo = [r for r in runs if not r.finished()]
    skipped = [r for r in runs if r not in todo]
    steps = {id(r): 0 if r.trained() else r.steps for r in todo}  # a trained run is only evaluated again
    bar = progress_bar(
        sum(steps.values()),
        f"study ({len(todo)} runs, {len(skipped)} skipped)",
        progress,
        leave=True,
        unit="step",
    )
    running: dict[int, tuple[Run, subprocess.Popen]] = {}
    failed: list[tuple[Run, int]] = []
    done_steps: dict[int, int] = {}
    t0 = time.time()
    pending = list(todo)
    while pending or running:
        for run in list(pending):
            if len(running) >= jobs:
                break
            blocker = next((r for r in runs if r.run_dir == run.after), None)
            if blocker is not None and not (blocker.run_dir / "eval.json").is_file():
                if any(f[0] is blocker for f in failed):
                    failed.append((run, -1))
                    pending.remove(run)
                continue
            pending.remove(run)
            running[id(run)] = (run, _launch(run, eval_n, workers))
        time.sleep(2.0)
        for key, (run, proc) in list(running.items()):
            done_steps[key] = min(_steps_done(run), steps[key])
            if proc.poll() is not None:
                proc.log.close()
                del running[key]
                done_steps[key] = steps[key]
                if proc.returncode != 0:
                    failed.append((run, proc.returncode))
        if bar is not None:
            bar.update(sum(done_steps.values()) - bar.n)
            names = ", ".join(f"{r.spec.name}/s{r.seed}" for r, _ in running.values())
            bar.set_postfix_str(f"running: {names}", refresh=False)
    if bar is not None:
        bar.close()
    return {
        "ran": [str(r.run_dir) for r in todo if not any(f[0] is r for f in failed)],
        "skipped": [str(r.run_dir) for r in skipped],
        "failed": [f"{r.run_dir} (exit {code}; see {r.run_dir / 'train.log'})" for r, code in failed],
        "seconds": round(time.time() - t0, 1),
    }


def run_job(job_file: str | Path) -> int:
    """Child process: train one run from its recipe arguments, evaluate it, write `study.json` last."""
    from routed_grpo.utils import quiet_known_noise

    quiet_known_noise()  # before the imports below: bitsandbytes logs its CPU-kernel notice when imported
    from routed_grpo.lab.evaluation import evaluate_run
    from routed_grpo.lab.experiment import parse_recipe, run_experiment

    job = json.loads(Path(job_file).read_text())
    t0 = time.time()
    if not job.get("evaluate_only"):
        script, training, model_args = parse_recipe(job["argv"])
        run_experiment(script, training, model_args)
    t1 = time.time()
    evaluate_run(job["run_dir"], n=job["eval_n"], workers=job["workers"], samples=job.get("eval_samples"))
    train_s = job.get("train_seconds") or 0.0 if job.get("evaluate_only") else t1 - t0  # an earlier job's, if so
    record = {**job, "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t1, 1)}
    atomic_write_text(Path(job["run_dir"]) / STUDY_FILE, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(sys.argv[1]))
