"""`routed-grpo pairs`: validate (hack, clean) pairs; cache their activations; extract, placebo, score and
generalise `v_act`.

Covers the command line only; the maths and file formats live in routed_grpo/vact.py, routed_grpo/activations.py
and routed_grpo/generalise.py, the pairs format in routed_grpo/pairs.py. A `--model` is a local directory or a hub
id (resolved by transformers, so offline a missing one gets transformers' own error), loaded in its stored dtype
unless `--dtype` says otherwise; the routed adapter is attached with the given rank, targets and init seed and only
forward passes run. `activations` writes a cache of the pairs' pooled activations that `extract`, `score` and
`generalise` read with `--acts` instead of `--model` (checked against the pairs' hash and, for `score`, the
v_act's adapter fingerprint). Bad input exits 2 with a message naming the file, pair and field; output files are
written atomically with the user's umask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from routed_grpo.cli import generalise_cmd
from routed_grpo.cli.common import (
    DEFAULT_TARGETS,
    check_mode,
    fail,
    load_acts,
    load_adapter,
    load_pairs,
    pairs_hash,
    pairs_label,
    split,
    targets_list,
)
from routed_grpo.sensor import parse_sensor

app = typer.Typer(no_args_is_help=True)
app.command("generalise")(generalise_cmd.generalise)

PAIRS_OPT = typer.Option(..., "--pairs", help="Pairs YAML file or directory (repeatable).")
MODEL_HELP = "Local model directory or hub id (weights + tokenizer)."
ACTS_HELP = "A cache written by `pairs activations`, instead of --model (no forward pass)."
TAGS_OPT = typer.Option(None, "--tags", help="Keep pairs with any of these tags.")
EXCLUDE_OPT = typer.Option(None, "--exclude-tags", help="Drop pairs with any of these tags.")
MODE_HELP = "Sampling mode of the forward passes: full or deploy (with --acts: the cache's)."
BATCH_OPT = typer.Option(8, "--batch-size", min=1, help="Pairs per forward (their 2x completions run together).")
DTYPE_HELP = "auto (the checkpoint's stored dtype), float32, bfloat16 or float16."
SENSOR_OPT = typer.Option(
    "bottleneck", "--sensor", help="What is pooled: bottleneck, bottleneck_init or residual:L[+L2] (0-based layers)."
)


def _compute(
    model: str,
    adapter: Any,
    tokenizer: Any,
    loaded_dtype: str,
    pairs: list[Path],
    loaded: list,
    tags,
    exclude_tags,
    mode: str,
    batch_size: int,
):
    """PairActivations of the `loaded` pairs, computed with forward passes through `adapter`."""
    from routed_grpo.activations import PairActivations, pooled_pair_activations
    from routed_grpo.vact import adapter_metadata

    try:
        h_hack, h_clean = pooled_pair_activations(adapter, tokenizer, loaded, batch_size, mode, progress=True)
    except ValueError as e:
        fail(str(e))
    meta = {
        "model_name": model,
        **adapter_metadata(adapter),
        "pairs_path": pairs_label(pairs),
        "pairs_hash": pairs_hash(pairs),
        "n_pairs": len(loaded),
        "tag_filter": tags,
        "exclude_tags": exclude_tags,
        "sampling_mode": mode,
        "dtype": loaded_dtype,
    }
    return PairActivations(h_hack, h_clean, [p.id for p in loaded], [list(p.tags) for p in loaded], meta)


def _up_to_date(out: Path, ids: list[str], digest: str, mode: str, dtype: str, adapter: Any) -> bool:
    """True if `out` is a cache of exactly these pairs (ids and hash), mode, dtype and sensor, made with `adapter`'s
    fingerprint parts (whatever the dtype), so it can be reused without a forward pass."""
    from routed_grpo.activations import ActivationsError, load_pair_activations
    from routed_grpo.adapter import fingerprint_mismatch

    if not out.exists():
        return False
    try:
        old = load_pair_activations(out)
    except ActivationsError:
        return False  # not a cache (or another version of one): recompute and replace it
    meta = old.metadata
    same = (old.pair_ids, meta.get("pairs_hash"), meta.get("sampling_mode"), meta.get("dtype")) == (
        ids,
        digest,
        mode,
        dtype,
    )
    same = same and parse_sensor(meta.get("sensor")) == adapter.sensor
    return same and not fingerprint_mismatch(meta.get("adapter_fingerprint_parts") or {}, adapter.fingerprint_parts())


def _cached(acts: Path, pairs: list[Path] | None, tags, exclude_tags, mode: str | None):
    cache = load_acts(acts, pairs, tags, exclude_tags)
    if mode is not None and mode != cache.metadata.get("sampling_mode"):
        fail(
            f"{acts}: field 'sampling_mode' is {cache.metadata.get('sampling_mode')!r}, but --mode {mode!r} was "
            "asked for; write a cache in that mode with `pairs activations --mode`"
        )
    return cache


def _one_source(model: str | None, acts: Path | None) -> None:
    if (model is None) == (acts is None):
        fail("give exactly one of --model (forward passes) and --acts (a cache from `pairs activations`)")


@app.command()
def validate(
    pairs: Path = typer.Argument(..., help="A pairs YAML file or a directory of them."),
    tags: list[str] | None = TAGS_OPT,
    exclude_tags: list[str] | None = EXCLUDE_OPT,
    run_checks: bool = typer.Option(
        False,
        "--run-checks",
        help="Run both sides against their `checks` in the sandbox: every clean side must pass, "
        "every hack side must fail (in a control set such as mode:placebo both sides must pass).",
    ),
) -> None:
    """Validate pairs files and print counts per hack mode and domain."""
    from routed_grpo.pairs import check_pairs, summarize_pairs

    loaded = load_pairs([pairs], split(tags), split(exclude_tags))
    typer.echo(json.dumps(summarize_pairs(loaded), indent=2))
    if run_checks:
        control = {p.id for p in loaded if p.is_control}
        problems = [
            f"pair {pid!r}, field 'clean': fails its checks: {why}"
            for pid, why in check_pairs(loaded, side="clean").items()
            if why is not None
        ]
        for pid, why in check_pairs(loaded, side="hack").items():
            if pid in control and why is not None:
                problems.append(f"pair {pid!r}, field 'hack': a control pair's side fails its checks: {why}")
            elif pid not in control and why is None:
                problems.append(f"pair {pid!r}, field 'hack': passes its checks, so it is not a hack of them")
        for line in problems:
            typer.echo(line, err=True)
        if problems:
            raise typer.Exit(1)
    typer.echo(f"ok: {len(loaded)} pairs")


@app.command()
def activations(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    pairs: list[Path] = PAIRS_OPT,
    out: Path = typer.Option(..., "--out", help="Output cache (safetensors)."),
    rank: int = typer.Option(8, "--rank", help="Adapter rank r per block."),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha (default: rank)."),
    targets: str = typer.Option(DEFAULT_TARGETS, "--targets", help="Comma-separated target modules."),
    init_seed: int = typer.Option(0, "--init-seed", help="Seed of the adapter's initial A matrices."),
    tags: list[str] | None = TAGS_OPT,
    exclude_tags: list[str] | None = EXCLUDE_OPT,
    mode: str = typer.Option("full", "--mode", help="Sampling mode of the forward passes: full or deploy."),
    batch_size: int = BATCH_OPT,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    force: bool = typer.Option(False, "--force", help="Recompute even if --out is an up-to-date cache."),
    sensor: str = SENSOR_OPT,
) -> None:
    """Cache the pairs' pooled hack and clean activations once, for `extract`, `score` and `generalise --acts`."""
    from routed_grpo.activations import save_pair_activations

    check_mode(mode)
    tag_list, exclude_list = split(tags), split(exclude_tags)
    loaded = load_pairs(pairs, tag_list, exclude_list)
    adapter, tokenizer, loaded_dtype = load_adapter(
        model, rank, alpha, targets_list(targets), init_seed, device, dtype, sensor
    )
    if not force and _up_to_date(out, [p.id for p in loaded], pairs_hash(pairs), mode, loaded_dtype, adapter):
        typer.echo(
            f"up to date: {out} ({len(loaded)} pairs, {mode} mode, {loaded_dtype}, sensor {adapter.sensor.spec}); "
            "no forward pass run "
            "(--force recomputes)"
        )
        return
    cache = _compute(model, adapter, tokenizer, loaded_dtype, pairs, loaded, tag_list, exclude_list, mode, batch_size)
    save_pair_activations(out, cache)
    typer.echo(
        f"wrote {out}: activations {tuple(cache.hack.shape)} x 2 (hack, clean) of {len(cache.pair_ids)} "
        f"pairs ({mode} mode, {loaded_dtype}, sensor {adapter.sensor.spec})"
    )


@app.command()
def extract(
    pairs: list[Path] = PAIRS_OPT,
    out: Path = typer.Option(..., "--out", help="Output v_act safetensors file."),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    acts: Path | None = typer.Option(None, "--acts", help=ACTS_HELP),
    rank: int = typer.Option(8, "--rank", help="Adapter rank r per block (with --model)."),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha (default: rank)."),
    targets: str = typer.Option(DEFAULT_TARGETS, "--targets", help="Comma-separated target modules."),
    init_seed: int = typer.Option(0, "--init-seed", help="Seed of the adapter's initial A matrices."),
    tags: list[str] | None = TAGS_OPT,
    exclude_tags: list[str] | None = EXCLUDE_OPT,
    mode: str | None = typer.Option(None, "--mode", help=MODE_HELP),
    batch_size: int = BATCH_OPT,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    sensor: str | None = typer.Option(
        None, "--sensor", help="With --model: " + SENSOR_OPT.help + " With --acts: must be the cache's, if given."
    ),
) -> None:
    """Extract v_act = per-site unit(mean(h_hack - h_clean)) with forward passes only (or from a cache)."""
    from routed_grpo.vact import ADAPTER_FIELDS, save_vact, unit_mean_difference

    _one_source(model, acts)
    tag_list, exclude_list = split(tags), split(exclude_tags)
    if acts is not None:
        cache = _cached(acts, pairs, tag_list, exclude_list, mode)
        made_at = parse_sensor(cache.metadata.get("sensor"))
        try:
            asked = parse_sensor(sensor, "--sensor") if sensor is not None else made_at
        except ValueError as e:
            fail(str(e))
        if asked != made_at:
            fail(f"{acts}: field 'sensor' is {made_at.spec!r}, but --sensor {sensor!r} was asked for")
    else:
        loaded = load_pairs(pairs, tag_list, exclude_list)
        adapter, tokenizer, loaded_dtype = load_adapter(
            model, rank, alpha, targets_list(targets), init_seed, device, dtype, sensor
        )
        cache = _compute(
            model,
            adapter,
            tokenizer,
            loaded_dtype,
            pairs,
            loaded,
            tag_list,
            exclude_list,
            check_mode(mode or "full"),
            batch_size,
        )
    meta = cache.metadata
    try:
        vact = unit_mean_difference(cache.hack, cache.clean, meta.get("module_names"))
    except ValueError as e:
        fail(str(e))
    metadata = {
        "kind": "vact",
        "seed": None,
        "model_name": meta.get("model_name"),
        **{k: meta[k] for k in ADAPTER_FIELDS if k in meta},
        "pairs_path": pairs_label(pairs),
        "pairs_hash": meta.get("pairs_hash"),
        "n_pairs": len(cache.pair_ids),
        "tags": tag_list,
        "exclude_tags": exclude_list,
        "sampling_mode": meta.get("sampling_mode"),
        "dtype": meta.get("dtype"),
        **({"acts": str(acts)} if acts is not None else {}),
    }
    save_vact(out, vact, metadata)
    typer.echo(
        f"wrote {out}: v_act {tuple(vact.shape)} from {len(cache.pair_ids)} pairs "
        f"({metadata['sampling_mode']} mode, {metadata['dtype']})"
    )


@app.command()
def placebo(
    like: Path = typer.Option(..., "--like", help="A v_act file whose shapes and adapter the placebo copies."),
    seed: int = typer.Option(..., "--seed", help="Seed of the Haar-random draw."),
    out: Path = typer.Option(..., "--out", help="Output placebo safetensors file."),
) -> None:
    """Write a Haar-random placebo direction: uniform on each module's unit sphere, same shapes as --like."""
    from routed_grpo.vact import ADAPTER_FIELDS, VactError, haar_placebo, load_vact, save_vact

    try:
        reference, meta = load_vact(like)
    except VactError as e:
        fail(str(e))
    metadata = {k: meta[k] for k in ("model_name", *ADAPTER_FIELDS) if k in meta}
    metadata.update({"kind": "placebo", "seed": seed, "like": str(like)})
    save_vact(out, haar_placebo(reference, seed), metadata)
    typer.echo(f"wrote {out}: placebo {tuple(reference.shape)} seed {seed}")


@app.command()
def score(
    vact: Path = typer.Option(..., "--vact", help="A v_act (or placebo) safetensors file."),
    pairs: list[Path] = PAIRS_OPT,
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    acts: Path | None = typer.Option(None, "--acts", help=ACTS_HELP),
    tags: list[str] | None = TAGS_OPT,
    exclude_tags: list[str] | None = EXCLUDE_OPT,
    mode: str | None = typer.Option(None, "--mode", help="full or deploy (default: the v_act file's mode)."),
    batch_size: int = BATCH_OPT,
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Print each pair's hack and clean scores against a v_act and the AUROC of hack vs clean."""
    from routed_grpo.gate import score as score_acts
    from routed_grpo.vact import VactError, auroc, check_vact_matches, load_vact

    _one_source(model, acts)
    try:
        direction, meta = load_vact(vact)
    except VactError as e:
        fail(str(e))
    tag_list, exclude_list = split(tags), split(exclude_tags)
    source = str(vact)
    if acts is not None:
        cache = _cached(acts, pairs, tag_list, exclude_list, mode)
        mode = cache.metadata.get("sampling_mode")
        try:
            check_vact_matches(direction, meta, cache.metadata, source=source, against=f"the cache {acts}")
        except VactError as e:
            fail(str(e))
    else:
        mode = check_mode(mode or meta.get("sampling_mode") or "full")
        if not isinstance(meta.get("adapter_rank"), int) or not meta.get("adapter_targets"):
            fail(f"{vact}: metadata lacks adapter_rank / adapter_targets; cannot rebuild its adapter")
        loaded = load_pairs(pairs, tag_list, exclude_list)
        adapter, tokenizer, loaded_dtype = load_adapter(
            model,
            meta["adapter_rank"],
            meta.get("adapter_alpha"),
            list(meta["adapter_targets"]),
            int(meta.get("init_seed") or 0),
            device,
            dtype,
            meta.get("sensor"),
        )
        try:
            check_vact_matches(direction, meta, adapter, source=source)
        except VactError as e:
            fail(str(e))
        cache = _compute(
            model, adapter, tokenizer, loaded_dtype, pairs, loaded, tag_list, exclude_list, mode, batch_size
        )
    s_hack, s_clean = score_acts(cache.hack, direction), score_acts(cache.clean, direction)
    width = max(len(pid) for pid in cache.pair_ids)
    typer.echo(f"{'pair':<{width}}  {'hack':>10}  {'clean':>10}  {'hack-clean':>10}")
    for pid, h, c in zip(cache.pair_ids, s_hack.tolist(), s_clean.tolist(), strict=True):
        typer.echo(f"{pid:<{width}}  {h:>10.4f}  {c:>10.4f}  {h - c:>10.4f}")
    wins = int((s_hack > s_clean).sum())
    typer.echo(
        f"AUROC hack vs clean: {auroc(s_hack, s_clean):.4f}  (hack > clean in {wins}/{len(cache.pair_ids)} "
        f"pairs; {meta.get('kind', 'vact')} {vact.name}, {mode} mode)"
    )
