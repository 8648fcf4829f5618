"""`routed-grpo organism ...`: build the CPU model organism, write its contrast pairs.

Covers the command line only; the work is in `routed_grpo.lab.organism` and `routed_grpo.lab.organism_pairs`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


def _parse_settings(items: list[str]) -> dict:
    """`KEY=VALUE` strings -> OrganismConfig overrides (values parsed as JSON, else kept as text)."""
    from routed_grpo.lab.organism import OrganismConfig

    fields = {f.name for f in dataclasses.fields(OrganismConfig)} - {"seed"}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            typer.echo(
                f"error: --set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}", err=True
            )
            raise typer.Exit(2)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@app.command()
def build(
    out: Path = typer.Option(
        Path("organism_cache"), "--out", help="Cache directory (one sub-directory per settings)."
    ),
    seed: int = typer.Option(0, help="Seed of the problem split, warm-start data, model init and SFT order."),
    settings: list[str] = typer.Option([], "--set", help="Override an OrganismConfig field: KEY=VALUE (repeatable)."),
    threads: int = typer.Option(0, help="torch threads for the warm start (0: leave torch's default)."),
) -> None:
    """Build (or reuse from the cache) the tiny model, its tokenizer and the problem files; print their paths."""
    import torch

    from routed_grpo.lab.organism import build_organism

    overrides = _parse_settings(settings)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        paths = build_organism(out, seed=seed, progress=True, **overrides)
    except (TypeError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(paths).items()}))


@app.command()
def pairs(
    out: Path = typer.Option(Path("pairs/organism/overwrite_tests.yaml"), "--out", help="Pairs YAML file to write."),
    n: int = typer.Option(24, help="Number of pairs."),
    seed: int = typer.Option(0, help="Seed of the problem split (pairs use training instances only)."),
) -> None:
    """Write (hack, clean) contrast pairs for the organism domain."""
    from routed_grpo.lab.organism_pairs import write_pairs_yaml

    typer.echo(str(write_pairs_yaml(out, n=n, seed=seed)))
