"""`routed-grpo pairs generalise`: the leave-one-tag-out report of `v_act` from cached pair activations.

Covers the command line only (the computation is routed_grpo/generalise.py). Reads a cache written by
`routed-grpo pairs activations`, optionally checked against the pairs it was made from (their hash), and writes
`generalise_<by>.md`, `generalise_<by>.json` and `generalise_<by>.png` into `--out` (atomically, with the user's
umask) after everything has been computed, so bad input leaves no file behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from routed_grpo.cli.common import fail, load_acts, split

_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def generalise(
    acts: Path = typer.Option(..., "--acts", help="A cache written by `routed-grpo pairs activations`."),
    out: Path = typer.Option(..., "--out", help="Directory for generalise_<by>.md, .json and .png."),
    pairs: list[Path] | None = typer.Option(
        None, "--pairs", help="The pairs the cache was made from (repeatable): checks its hash, selects by their tags."
    ),
    by: str = typer.Option("mode", "--by", help="Tag key to hold out by, e.g. mode, topic, domain."),
    tags: list[str] | None = typer.Option(None, "--tags", help="Keep pairs with any of these tags."),
    exclude_tags: list[str] | None = typer.Option(None, "--exclude-tags", help="Drop pairs with any of these tags."),
    n_haar: int = typer.Option(1000, "--n-haar", min=1, help="Haar-random directions in the null."),
    n_perm: int = typer.Option(1000, "--n-perm", min=1, help="Label permutations in the null."),
    seed: int = typer.Option(0, "--seed", help="Seed of both nulls."),
) -> None:
    """Hold out each value of a tag (hack mode by default), fit v_act on the rest, and report the held-out AUROC,
    the share ranked correctly, the cosine with the all-pairs v_act and p-values against Haar and permutation
    nulls."""
    from routed_grpo.generalise import GeneraliseError, leave_one_tag_out, report_json, report_markdown, report_png
    from routed_grpo.utils import atomic_path, atomic_write_text

    if not _KEY_RE.match(by):
        fail(f"--by must be a tag key such as mode or topic (lower case, no ':'); got {by!r}")
    cache = load_acts(acts, pairs, split(tags), split(exclude_tags))
    try:
        report = leave_one_tag_out(cache.hack, cache.clean, cache.tags, by, n_haar, n_perm, seed)
    except (GeneraliseError, ValueError) as e:
        fail(f"{acts}: {e}")
    meta = cache.metadata
    title = (
        f"Leave-one-{by}-out generalisation of v_act: {meta.get('model_name')}, {meta.get('pairs_path')} "
        f"({meta.get('sampling_mode')} mode, {meta.get('dtype')})"
    )
    extra = {
        "acts": str(acts),
        **{
            k: meta.get(k)
            for k in ("model_name", "pairs_path", "pairs_hash", "sampling_mode", "dtype", "adapter_fingerprint")
        },
    }
    markdown, record, png = report_markdown(report, f"## {title}"), report_json(report, extra), report_png(report)
    stem = out / f"generalise_{by}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    with atomic_path(stem.with_suffix(".png")) as tmp:
        tmp.write_bytes(png)
    atomic_write_text(stem.with_suffix(".md"), markdown)
    typer.echo(markdown)
    typer.echo(f"wrote {stem}.md, {stem}.json and {stem}.png")
