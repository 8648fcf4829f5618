"""`routed-grpo pairs diagnose` (DIAGNOSTIC, reads labels): the command line of routed_grpo.lab.diagnose.

Joined to the core's `pairs` app by routed_grpo/cli/main.py only, so the core never imports it. The adapter is the
run's (rank, targets and init seed from the run's `config.yaml` when `--rollouts` is a run directory; the options
override them) at initialisation, or with a checkpoint's trained blocks (`--checkpoint`). Bad input (no such
rollouts, a row without one of the labels, an unknown sensor) prints the error naming the file or option and exits
2; the outputs are written through temp files, so a failed run leaves none behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from routed_grpo.cli.common import fail, load_adapter, load_pairs, split, targets_list
from routed_grpo.cli.pairs_cmd import EXCLUDE_OPT, TAGS_OPT


def _run_adapter_fields(rollouts: Path) -> dict:
    """The adapter fields of the run whose rollouts these are (its config.yaml), or {}."""
    import yaml

    config = (rollouts if rollouts.is_dir() else rollouts.parent) / "config.yaml"
    if not config.is_file():
        return {}
    training = (yaml.safe_load(config.read_text()) or {}).get("training", {})
    keys = ("adapter_rank", "adapter_targets", "adapter_init_seed", "adapter_init")
    return {k: training[k] for k in keys if k in training}


def _load_blocks(adapter, checkpoint: Path, init: str) -> None:
    """Both blocks' trained weights from a checkpoint (or `final/`) directory, as the trainer resumes them."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from routed_grpo.adapter import DEPLOYED, QUARANTINE

    for block in (DEPLOYED, QUARANTINE):
        path = checkpoint / block / "adapter_model.safetensors"
        if not path.is_file():
            fail(f"{path}: --checkpoint has no '{block}' block (a checkpoint-N/ or final/ directory of the run)")
        set_peft_model_state_dict(adapter.model, load_file(str(path)), adapter_name=block)
    adapter.model.base_model.set_adapter([DEPLOYED, QUARANTINE])
    from routed_grpo.initial import INITIAL_FILE

    if (checkpoint / INITIAL_FILE).is_file():  # the factors training subtracted (an SVD-space init), not recomputed
        adapter.load_initial(checkpoint / INITIAL_FILE)
    elif init != "random":
        fail(f"{checkpoint / INITIAL_FILE}: missing, but the run used adapter_init={init!r} (its final/ has it)")


def diagnose(
    pairs: list[Path] = typer.Option(..., "--pairs", help="Pairs YAML file or directory (repeatable)."),
    model: str = typer.Option(..., "--model", help="Local model directory (the base model of the run)."),
    rollouts: Path = typer.Option(..., "--rollouts", help="A finished run's directory or its rollouts.jsonl."),
    out: Path = typer.Option(..., "--out", help="Output directory: diagnose.md, diagnose.json, diagnose.png."),
    sensor: list[str] = typer.Option(
        None,
        "--sensor",
        help="Sensors to compare (repeatable; residual:mid = the middle layer). Default: bottleneck, residual:mid, "
        "and bottleneck_init with --checkpoint (at initialisation it reads what bottleneck reads).",
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="The run's checkpoint-N/ or final/ directory: read with its trained blocks."
    ),
    rank: int | None = typer.Option(None, "--rank", help="Adapter rank r per block (default: the run's)."),
    targets: str | None = typer.Option(None, "--targets", help="Comma-separated target modules (default: the run's)."),
    init_seed: int | None = typer.Option(None, "--init-seed", help="Adapter init seed (default: the run's)."),
    adapter_init: str | None = typer.Option(
        None, "--adapter-init", help="Adapter init, random or svd (default: the run's; signed needs its pairs)."
    ),
    mode: str = typer.Option("full", "--mode", help="Rollouts of this sampling mode only: full or deploy."),
    tags: list[str] | None = TAGS_OPT,
    exclude_tags: list[str] | None = EXCLUDE_OPT,
    n_null: int = typer.Option(200, "--n-null", min=1, help="Haar-random directions in the null."),
    folds: int = typer.Option(5, "--folds", min=2, help="Folds of the oracle direction's cross-validation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the folds and the null."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, ..."),
    dtype: str = typer.Option("float32", "--dtype", help="auto, float32, bfloat16 or float16."),
) -> None:
    """DIAGNOSTIC (reads labels): per sensor, does v_act (and an oracle direction) see hacking in a run's rollouts?"""
    import torch

    from routed_grpo.activations import pooled_completion_activations, pooled_pair_activations
    from routed_grpo.adapter import DEFAULT_TARGETS
    from routed_grpo.lab.diagnose import LABELS, diagnose, markdown, png
    from routed_grpo.lab.diagnostic import read_rollouts
    from routed_grpo.utils import atomic_write_bytes, atomic_write_text

    try:
        rows = [r for r in read_rollouts(rollouts) if r.get("mode", "full") == mode]
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not rows:
        fail(f"{rollouts}: no {mode}-mode rollouts")
    for i, row in enumerate(rows):
        missing = [k for k in LABELS if k not in row.get("labels", {})]
        if missing:
            fail(
                f"{rollouts}: {mode}-mode row {i}: field 'labels' lacks {missing} (a run of this version writes them)"
            )
    run = _run_adapter_fields(rollouts)
    rank = rank if rank is not None else run.get("adapter_rank", 8)
    target_list = targets_list(targets) if targets else list(run.get("adapter_targets", DEFAULT_TARGETS))
    init_seed = init_seed if init_seed is not None else run.get("adapter_init_seed", 0)
    loaded = load_pairs(pairs, split(tags), split(exclude_tags))
    init = adapter_init or run.get("adapter_init", "random")
    if init not in ("random", "svd") and checkpoint is None:
        fail(f"--adapter-init {init!r} at initialisation: random or svd only (--checkpoint loads the run's factors)")
    attach = init if checkpoint is None else "random"  # with --checkpoint, its routed_init.safetensors sets them
    adapter, tokenizer, _ = load_adapter(model, rank, None, target_list, init_seed, device, dtype, init=attach)
    if checkpoint is not None:
        _load_blocks(adapter, checkpoint, init)
    n_layers = len(adapter.model.get_base_model().get_decoder().layers)
    asked = sensor or ["bottleneck", "residual:mid"] + (["bottleneck_init"] if checkpoint is not None else [])
    specs = list(dict.fromkeys(s.replace("residual:mid", f"residual:{n_layers // 2}") for s in asked))
    labels = {k: torch.tensor([bool(r["labels"][k]) for r in rows]) for k in LABELS}
    results = {}
    for spec in specs:
        try:
            adapter.use_sensor(spec)
        except ValueError as e:
            fail(str(e))
        hack, clean = pooled_pair_activations(adapter, tokenizer, loaded, progress=True)
        acts = pooled_completion_activations(
            adapter, tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], progress=True
        )
        tags_of = [list(p.tags) for p in loaded]
        results[adapter.sensor.spec] = diagnose(hack, clean, tags_of, acts, labels, n_null, folds, seed)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rollouts": str(rollouts),
        "model": model,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "adapter": {"rank": rank, "targets": target_list, "init_seed": init_seed, "init": init},
        "mode": mode,
        "n_pairs": len(loaded),
        "sensors": results,
    }
    where = f"{rollouts}" + (f", adapter from {checkpoint}" if checkpoint else ", adapter at initialisation")
    atomic_write_text(out / "diagnose.json", json.dumps(record, indent=1) + "\n")
    atomic_write_text(out / "diagnose.md", markdown(results, where))
    atomic_write_bytes(out / "diagnose.png", png(results))
    typer.echo(markdown(results, where))
    typer.echo(f"wrote {out}/diagnose.md, diagnose.json, diagnose.png")
