"""`routed-grpo experiment eval | compare` and the top-level `routed-grpo demo` (the organism end to end).

Covers the command-line surface only; the work is in routed_grpo.lab.evaluation (deployment evaluation),
routed_grpo.lab.report (comparison) and routed_grpo.lab.experiment (training one arm). Bad input (a directory that
is not a finished run, an unknown recipe key) prints the error and exits 2.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer

from routed_grpo.lab import ORGANISM_RECIPES as RECIPES

app = typer.Typer(no_args_is_help=True)
ARMS = ("baseline", "routed", "placebo")


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _env() -> None:
    for key, value in (("HF_HUB_OFFLINE", "1"), ("WANDB_MODE", "offline"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory written by recipes/train.py."),
    n: int = typer.Option(None, "--n", help="Held-out problems (default: the recipe's eval_n)."),
    seed: int = typer.Option(1234, help="Sampling seed of the evaluation."),
    workers: int = typer.Option(2, help="Parallel sandbox runs."),
    as_json: bool = typer.Option(False, "--json", help="Print eval.json instead of the table."),
) -> None:
    """Deployed (quarantine ablated) and full hack/solve/compile rates on held-out problems; writes eval.json."""
    _env()
    from routed_grpo.lab.evaluation import eval_table, evaluate_run

    try:
        result = evaluate_run(run_dir, n=n, seed=seed, workers=workers, progress=True)
    except (OSError, ValueError, KeyError) as err:  # OSError: transformers cannot resolve the base model id
        _fail(err)
    typer.echo(json.dumps(result, indent=2) if as_json else eval_table(result))
    typer.echo(f"\nwrote {run_dir / 'eval.json'}")


@app.command("compare")
def compare_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Evaluated run directories (any arms and seeds)."),
    out: Path = typer.Option(
        None, help="Where comparison.md and training_curves.png go (default: first run's parent)."
    ),
) -> None:
    """Markdown table across arms and seeds, and PNG plots of hack and solve rate over training."""
    from routed_grpo.lab.report import compare_runs

    try:
        table, png = compare_runs(run_dirs, out or run_dirs[0].parent)
    except (FileNotFoundError, ValueError, KeyError) as err:
        _fail(err)
    typer.echo(table)
    typer.echo(f"\nwrote {(out or run_dirs[0].parent) / 'comparison.md'}" + (f" and {png}" if png else ""))


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory of the three runs and the report."),
    organism_dir: Path = typer.Option(Path(".cache/organism"), help="Cache of the built organism."),
    steps: int = typer.Option(None, help="Override max_steps of the three recipes."),
    seed: int = typer.Option(0, help="Training seed (the same for every arm)."),
    eval_n: int = typer.Option(None, help="Held-out problems per evaluation (default: the recipes' eval_n)."),
    recipes: Path = typer.Option(RECIPES, help="Directory holding baseline.yaml, routed.yaml, placebo.yaml."),
    force: bool = typer.Option(False, help="Retrain arms whose run directory is already evaluated."),
) -> None:
    """The CPU model organism end to end: build (cached), baseline, routed and placebo arms, deployment
    evaluation and the comparison report."""
    _env()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from routed_grpo.lab.evaluation import eval_table, evaluate_run
    from routed_grpo.lab.experiment import parse_recipe, run_experiment
    from routed_grpo.lab.report import compare_runs

    t0 = time.time()
    run_dirs = []
    for i, arm in enumerate(ARMS, 1):
        run_dir = out / arm
        run_dirs.append(run_dir)
        if (run_dir / "eval.json").is_file() and not force:
            typer.echo(f"[{i}/3] {arm}: already trained and evaluated in {run_dir} (use --force to retrain)")
            continue
        argv = [
            "--config",
            str(recipes / f"{arm}.yaml"),
            "--output_dir",
            str(run_dir),
            "--organism_dir",
            str(organism_dir),
            "--seed",
            str(seed),
        ]
        argv += ["--max_steps", str(steps)] if steps else []
        try:
            script, training, model_args = parse_recipe(argv)
        except (ValueError, FileNotFoundError) as err:
            _fail(err)
        typer.echo(f"[{i}/3] {arm}: training {training.max_steps} steps -> {run_dir}  ({time.time() - t0:.0f}s)")
        run_experiment(script, training, model_args)
        typer.echo(f"[{i}/3] {arm}: deployment evaluation  ({time.time() - t0:.0f}s)")
        typer.echo(eval_table(evaluate_run(run_dir, n=eval_n, progress=True)))
    table, png = compare_runs(run_dirs, out)
    typer.echo(f"\n# Arm comparison ({time.time() - t0:.0f}s total)\n\n{table}\n")
    typer.echo(f"wrote {out / 'comparison.md'}" + (f" and {png}" if png else ""))
