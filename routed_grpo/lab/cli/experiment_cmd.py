"""`routed-grpo eval | compare | study | demo` (and `experiment eval | compare`): the lab's command line.

Covers the command-line surface only; the work is in routed_grpo.lab.evaluation (deployment evaluation),
routed_grpo.lab.report (the report), routed_grpo.lab.study (arms x seeds) and routed_grpo.lab.experiment (one
arm). Bad input (a directory that is not a finished run, an unknown arm or recipe key) prints the error and exits 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from routed_grpo.lab import ORGANISM_RECIPES
from routed_grpo.utils import atomic_write_bytes

app = typer.Typer(no_args_is_help=True)
DEMO_ARMS = "baseline,placebo,routed,labels"
STUDY_ARMS = "baseline,placebo,routed,oracle_direction,labels"
STUDY_SEEDS = "0,1,2,3,4"


def _fail(err: Exception | str) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _env() -> None:
    for key, value in (("HF_HUB_OFFLINE", "1"), ("WANDB_MODE", "offline"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory written by recipes/train.py."),
    n: int = typer.Option(None, "--n", help="Held-out problems (default: the recipe's eval_n)."),
    samples: int = typer.Option(None, help="Completions per problem (default: the recipe's eval_samples)."),
    seed: int = typer.Option(1234, help="Sampling seed of the evaluation."),
    workers: int = typer.Option(2, help="Parallel sandbox runs."),
    as_json: bool = typer.Option(False, "--json", help="Print eval.json instead of the table."),
) -> None:
    """Deployed (quarantine ablated) and full hack/solve/compile rates on held-out problems; writes eval.json and
    rewrites the run's model card (README.md) with the figures."""
    _env()
    from routed_grpo.lab.evaluation import eval_table, evaluate_run

    try:
        result = evaluate_run(run_dir, n=n, seed=seed, workers=workers, progress=True, samples=samples)
    except (OSError, ValueError, KeyError) as err:  # OSError: transformers cannot resolve the base model id
        _fail(err)
    typer.echo(json.dumps(result, indent=2) if as_json else eval_table(result))
    typer.echo(f"\nwrote {run_dir / 'eval.json'}")


@app.command("compare")
def compare_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Evaluated run directories (any arms and seeds)."),
    out: Path = typer.Option(None, help="Where report.md, report.json and the PNGs go (default: first run's parent)."),
) -> None:
    """The report across arms and seeds: a generated verdict (paired sign-flip tests by seed), per-arm means with t
    intervals over seeds, collapsed runs, evaluation noise, JSON, and PNG plots."""
    from routed_grpo.lab.report import write_report

    out = out or run_dirs[0].parent
    try:
        text, pngs = write_report(run_dirs, out)
    except (FileNotFoundError, ValueError, KeyError) as err:
        _fail(err)
    typer.echo(text)
    typer.echo(f"wrote {out / 'report.md'}" + "".join(f", {p}" for p in pngs))


def _study(
    publish: Path | None,
    out: Path,
    arms: str,
    seeds: str,
    jobs: int,
    steps: int | None,
    eval_n: int | None,
    organism_dir: Path,
    recipes: Path,
    title: str,
) -> None:
    from routed_grpo.lab.report import write_report
    from routed_grpo.lab.study import execute, parse_arm_spec, plan, split_arms

    try:
        specs = [parse_arm_spec(a) for a in split_arms(arms)]
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        runs = plan(specs, seed_list, out, organism_dir, recipes, steps)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(f"{len(runs)} runs ({len(specs)} arms x {len(seed_list)} seeds) in {out}, {jobs} at a time")
    status = execute(runs, jobs=jobs, eval_n=eval_n)
    typer.echo(f"ran {len(status['ran'])}, skipped {len(status['skipped'])} finished, {status['seconds']:.0f} s")
    for failure in status["failed"]:
        typer.echo(f"FAILED: {failure}", err=True)
    finished = [r.run_dir for r in runs if (r.run_dir / "eval.json").is_file()]
    if finished:
        preamble = (
            f"Command: `routed-grpo study --arms {arms} --seeds {seeds} --jobs {jobs}"
            + (f" --steps {steps}" if steps else "")
            + f"`; wall time {status['seconds']:.0f} s "
            f"for {len(status['ran'])} runs ({len(status['skipped'])} reused)."
        )
        text, pngs = write_report(finished, out, title, preamble)
        typer.echo("\n" + text)
        typer.echo(f"wrote {out / 'report.md'}" + "".join(f", {p}" for p in pngs))
        if publish is not None:  # the committed results file: the README quotes only what it holds
            for path in [out / "report.md", out / "report.json", *pngs]:
                atomic_write_bytes(publish / path.name, path.read_bytes())
            typer.echo(f"published {publish / 'report.md'}, report.json and {len(pngs)} plots")
    if status["failed"]:
        raise typer.Exit(1)


def study(
    out: Path = typer.Option(Path("runs/study"), "--out", help="Directory of the runs and the report."),
    arms: str = typer.Option(
        STUDY_ARMS,
        help="Arms, comma-separated; variants as arm@key=value[,key=value] (e.g. labels@0.7, "
        "labels@recall=0.9,fpr=0.05, routed@cap=10, routed@exclude=mode:weak_asserts).",
    ),
    seeds: str = typer.Option(
        STUDY_SEEDS, help="Training seeds, comma-separated (5 by default: the smallest sign-flip p is then 0.0625)."
    ),
    jobs: int = typer.Option(2, help="Runs side by side (each uses one core)."),
    steps: int = typer.Option(None, help="Override max_steps of every recipe."),
    eval_n: int = typer.Option(None, help="Held-out problems per deployment evaluation (default: the recipe's)."),
    organism_dir: Path = typer.Option(Path(".cache/organism"), help="Cache of the built organism."),
    recipes: Path = typer.Option(ORGANISM_RECIPES, help="Directory of the arms' recipes (<arm>.yaml)."),
    publish: Path = typer.Option(
        None, help="Also copy report.md, report.json and the PNGs here (e.g. results/organism)."
    ),
) -> None:
    """Arms x seeds on the organism, finished runs skipped, one progress bar, one report (report.md + PNGs).

    labels and oracle_direction are DIAGNOSTIC upper bounds that read ground-truth labels."""
    _env()
    _study(publish, out, arms, seeds, jobs, steps, eval_n, organism_dir, recipes, "Study")


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory of the runs and the report."),
    organism_dir: Path = typer.Option(Path(".cache/organism"), help="Cache of the built organism."),
    steps: int = typer.Option(None, help="Override max_steps of the recipes."),
    seed: int = typer.Option(0, help="Training seed (the same for every arm)."),
    eval_n: int = typer.Option(None, help="Held-out problems per evaluation (default: the recipes' eval_n)."),
    jobs: int = typer.Option(2, help="Runs side by side."),
) -> None:
    """The CPU model organism end to end: build (cached), baseline, placebo, routed and the DIAGNOSTIC labels arm
    (one seed), deployment evaluation and the report; then prints the full study command."""
    _env()
    from routed_grpo.lab.experiment import parse_recipe
    from routed_grpo.lab.organism import build_organism

    script, _, _ = parse_recipe(["--config", str(ORGANISM_RECIPES / "baseline.yaml")])
    build_organism(organism_dir, seed=script.organism_seed, progress=True, **(script.organism_settings or {}))
    _study(None, out, DEMO_ARMS, str(seed), jobs, steps, eval_n, organism_dir, ORGANISM_RECIPES, "Demo")
    cmd = f"routed-grpo study --arms {STUDY_ARMS} --seeds {STUDY_SEEDS} --jobs 2 --out runs/study"
    typer.echo(f"\nThe full study (all arms, five seeds):\n  {cmd}")
