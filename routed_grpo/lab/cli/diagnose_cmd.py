"""`routed-grpo pairs diagnose` (DIAGNOSTIC, reads labels): the command line of routed_grpo.lab.diagnose.

Joined to the core's `pairs` app by routed_grpo/cli/main.py only, so the core never imports it. Bad input (no such
rollouts, a label missing, an unknown sensor) prints the error naming the file or option and exits 2; the outputs
are written through temp files, so a failed run leaves none behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from routed_grpo.cli.common import DEFAULT_TARGETS, fail, load_adapter, load_pairs, split, targets_list

DEFAULT_SENSORS = ["bottleneck", "bottleneck_init", "residual:mid"]


def diagnose(
    pairs: list[Path] = typer.Option(..., "--pairs", help="Pairs YAML file or directory (repeatable)."),
    model: str = typer.Option(..., "--model", help="Local model directory (the base model of the run)."),
    rollouts: Path = typer.Option(..., "--rollouts", help="A finished run's directory or its rollouts.jsonl."),
    out: Path = typer.Option(..., "--out", help="Output directory: diagnose.md, diagnose.json, diagnose.png."),
    sensor: list[str] = typer.Option(
        DEFAULT_SENSORS, "--sensor", help="Sensors to compare (repeatable); residual:mid = the middle layer."
    ),
    rank: int = typer.Option(8, "--rank", help="Adapter rank r per block (as the run)."),
    targets: str = typer.Option(DEFAULT_TARGETS, "--targets", help="Comma-separated target modules."),
    init_seed: int = typer.Option(0, "--init-seed", help="Seed of the adapter's initial A matrices (as the run)."),
    mode: str = typer.Option("full", "--mode", help="Rollouts of this sampling mode only: full or deploy."),
    tags: list[str] | None = typer.Option(None, "--tags", help="Keep pairs with any of these tags."),
    exclude_tags: list[str] | None = typer.Option(None, "--exclude-tags", help="Drop pairs with any of these tags."),
    n_null: int = typer.Option(200, "--n-null", min=1, help="Haar-random directions in the null."),
    folds: int = typer.Option(5, "--folds", min=2, help="Folds of the oracle direction's cross-validation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the folds and the null."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, ..."),
    dtype: str = typer.Option("float32", "--dtype", help="auto, float32, bfloat16 or float16."),
) -> None:
    """DIAGNOSTIC (reads labels): per sensor, does v_act (and an oracle direction) see hacking in a run's rollouts?"""
    import torch

    from routed_grpo.activations import pooled_completion_activations, pooled_pair_activations
    from routed_grpo.lab.diagnose import LABELS, diagnose, markdown, png
    from routed_grpo.lab.diagnostic import read_rollouts
    from routed_grpo.utils import atomic_write_bytes, atomic_write_text

    try:
        rows = [r for r in read_rollouts(rollouts) if r.get("mode", "full") == mode]
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not rows:
        fail(f"{rollouts}: no {mode}-mode rollouts")
    missing = [k for k in LABELS if k not in rows[0].get("labels", {})]
    if missing:
        fail(f"{rollouts}: field 'labels' lacks {missing} (a run of this version writes them)")
    loaded = load_pairs(pairs, split(tags), split(exclude_tags))
    adapter, tokenizer, _ = load_adapter(model, rank, None, targets_list(targets), init_seed, device, dtype)
    n_layers = len(adapter.model.get_base_model().get_decoder().layers)
    labels = {k: torch.tensor([bool(r["labels"][k]) for r in rows]) for k in LABELS}
    results = {}
    for spec in sensor:
        spec = spec.replace("residual:mid", f"residual:{n_layers // 2}")
        try:
            adapter.use_sensor(spec)
        except ValueError as e:
            fail(f"--sensor {spec!r}: {e}")
        hack, clean = pooled_pair_activations(adapter, tokenizer, loaded, progress=True)
        acts = pooled_completion_activations(
            adapter, tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], progress=True
        )
        tags_of = [list(p.tags) for p in loaded]
        results[adapter.sensor.spec] = diagnose(hack, clean, tags_of, acts, labels, n_null, folds, seed)
    out.mkdir(parents=True, exist_ok=True)
    record = {"rollouts": str(rollouts), "model": model, "mode": mode, "n_pairs": len(loaded), "sensors": results}
    atomic_write_text(out / "diagnose.json", json.dumps(record, indent=1) + "\n")
    atomic_write_text(out / "diagnose.md", markdown(results, str(rollouts)))
    atomic_write_bytes(out / "diagnose.png", png(results))
    typer.echo(markdown(results, str(rollouts)))
    typer.echo(f"wrote {out}/diagnose.md, diagnose.json, diagnose.png")
