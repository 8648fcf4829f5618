"""`routed-grpo pairs`: validate (hack, clean) pairs files; extract, placebo and score `v_act`.

Covers the command line only; the maths and file format live in routed_grpo/vact.py, the pairs format in
routed_grpo/pairs.py. `extract` and `score` load a causal LM from a local directory (nothing is downloaded),
attach the routed adapter with the given rank, targets and init seed, and run forward passes only.
Bad input exits 2 with a message naming the file, pair and field; output files are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(no_args_is_help=True)

MODES = ("full", "deploy")
DTYPES = ("float32", "bfloat16", "float16")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _split(values: list[str] | None) -> list[str] | None:
    """Repeatable options that also accept comma-separated values."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _load_pairs(path: Path, tags: list[str] | None, exclude_tags: list[str] | None) -> list:
    from routed_grpo.pairs import PairsError, load_pairs

    try:
        return load_pairs(path, tags=tags, exclude_tags=exclude_tags)
    except PairsError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{path}: cannot read pairs: {e}")


def _load_tokenizer(model_dir: Path) -> Any:
    """The directory's tokenizer; a tokenizer saved from a bare `tokenizers` object is loaded as
    PreTrainedTokenizerFast (AutoTokenizer would pick the model family's class and tokenise differently)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    return AutoTokenizer.from_pretrained(str(model_dir))


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_adapter(
    model_dir: Path, rank: int, alpha: float | None, targets: list[str], init_seed: int, device: str, dtype: str
) -> tuple[Any, Any]:
    """(adapter, tokenizer) for a local model directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from routed_grpo.adapter import attach_routed_adapter

    if not model_dir.is_dir():
        _fail(f"{model_dir}: no such model directory")
    if dtype not in DTYPES:
        _fail(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    try:
        tokenizer = _load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        _fail(f"{model_dir}: cannot load the model or tokenizer: {e}")
    model.to(_device(device))
    try:
        adapter = attach_routed_adapter(model, rank=rank, alpha=alpha, targets=targets, init_seed=init_seed)
    except ValueError as e:
        _fail(f"cannot attach the adapter (rank {rank}, targets {targets}): {e}")
    return adapter, tokenizer


@app.command()
def validate(
    pairs: Path = typer.Argument(..., help="A pairs YAML file or a directory of them."),
    tags: list[str] | None = typer.Option(None, "--tags", help="Keep pairs with any of these tags."),
    exclude_tags: list[str] | None = typer.Option(None, "--exclude-tags", help="Drop pairs with any of these tags."),
    run_checks: bool = typer.Option(False, "--run-checks", help="Run each clean side against its `checks`."),
) -> None:
    """Validate pairs files and print counts per hack mode and domain."""
    from routed_grpo.pairs import check_pairs, summarize_pairs

    loaded = _load_pairs(pairs, _split(tags), _split(exclude_tags))
    typer.echo(json.dumps(summarize_pairs(loaded), indent=2))
    if run_checks:
        failures = {pid: why for pid, why in check_pairs(loaded, side="clean").items() if why is not None}
        for pid, why in failures.items():
            typer.echo(f"pair {pid!r}, field 'clean': fails its checks: {why}", err=True)
        if failures:
            raise typer.Exit(1)
    typer.echo(f"ok: {len(loaded)} pairs")


@app.command()
def extract(
    model: Path = typer.Option(..., "--model", help="Local model directory (weights + tokenizer)."),
    pairs: Path = typer.Option(..., "--pairs", help="Pairs YAML file or directory."),
    out: Path = typer.Option(..., "--out", help="Output v_act safetensors file."),
    rank: int = typer.Option(8, "--rank", help="Adapter rank r per block."),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha (default: rank)."),
    targets: str = typer.Option(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--targets", help="Comma-separated targets."
    ),
    init_seed: int = typer.Option(0, "--init-seed", help="Seed of the adapter's initial A matrices."),
    tags: list[str] | None = typer.Option(None, "--tags", help="Keep pairs with any of these tags."),
    exclude_tags: list[str] | None = typer.Option(None, "--exclude-tags", help="Drop pairs with any of these tags."),
    mode: str = typer.Option("full", "--mode", help="Sampling mode of the forward passes: full or deploy."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
) -> None:
    """Extract v_act = per-module unit(mean(h_hack - h_clean)) with forward passes only."""
    from routed_grpo.pairs import pairs_hash
    from routed_grpo.vact import adapter_metadata, extract_vact, save_vact

    if mode not in MODES:
        _fail(f"--mode must be one of {', '.join(MODES)}; got {mode!r}")
    tag_list, exclude_list = _split(tags), _split(exclude_tags)
    loaded = _load_pairs(pairs, tag_list, exclude_list)
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    adapter, tokenizer = _load_adapter(model, rank, alpha, target_list, init_seed, device, dtype)
    try:
        vact = extract_vact(adapter, tokenizer, loaded, batch_size=batch_size, mode=mode)
    except ValueError as e:
        _fail(str(e))
    metadata = {
        "kind": "vact",
        "seed": None,
        "model_name": str(model),
        **adapter_metadata(adapter),
        "pairs_path": str(pairs),
        "pairs_hash": pairs_hash(pairs),
        "n_pairs": len(loaded),
        "tags": tag_list,
        "exclude_tags": exclude_list,
        "sampling_mode": mode,
    }
    save_vact(out, vact, metadata)
    typer.echo(f"wrote {out}: v_act {tuple(vact.shape)} from {len(loaded)} pairs ({mode} mode)")


PLACEBO_KEEP = (
    "model_name",
    "adapter_rank",
    "adapter_alpha",
    "adapter_targets",
    "init_seed",
    "module_names",
    "adapter_fingerprint",
)


@app.command()
def placebo(
    like: Path = typer.Option(..., "--like", help="A v_act file whose shapes and adapter the placebo copies."),
    seed: int = typer.Option(..., "--seed", help="Seed of the Haar-random draw."),
    out: Path = typer.Option(..., "--out", help="Output placebo safetensors file."),
) -> None:
    """Write a Haar-random placebo direction: uniform on each module's unit sphere, same shapes as --like."""
    from routed_grpo.vact import VactError, haar_placebo, load_vact, save_vact

    try:
        reference, meta = load_vact(like)
    except VactError as e:
        _fail(str(e))
    metadata = {k: meta[k] for k in PLACEBO_KEEP if k in meta}
    metadata.update({"kind": "placebo", "seed": seed, "like": str(like)})
    save_vact(out, haar_placebo(reference, seed), metadata)
    typer.echo(f"wrote {out}: placebo {tuple(reference.shape)} seed {seed}")


@app.command()
def score(
    model: Path = typer.Option(..., "--model", help="Local model directory (weights + tokenizer)."),
    vact: Path = typer.Option(..., "--vact", help="A v_act (or placebo) safetensors file."),
    pairs: Path = typer.Option(..., "--pairs", help="Pairs YAML file or directory."),
    tags: list[str] | None = typer.Option(None, "--tags", help="Keep pairs with any of these tags."),
    exclude_tags: list[str] | None = typer.Option(None, "--exclude-tags", help="Drop pairs with any of these tags."),
    mode: str | None = typer.Option(None, "--mode", help="full or deploy (default: the file's sampling mode)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Print each pair's hack and clean scores against a v_act and the AUROC of hack vs clean."""
    from routed_grpo.gate import score as score_acts
    from routed_grpo.vact import VactError, auroc, check_vact_matches, load_vact, pooled_pair_activations

    try:
        direction, meta = load_vact(vact)
    except VactError as e:
        _fail(str(e))
    mode = mode or meta.get("sampling_mode") or "full"
    if mode not in MODES:
        _fail(f"--mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not isinstance(meta.get("adapter_rank"), int) or not meta.get("adapter_targets"):
        _fail(f"{vact}: metadata lacks adapter_rank / adapter_targets; cannot rebuild its adapter")
    loaded = _load_pairs(pairs, _split(tags), _split(exclude_tags))
    adapter, tokenizer = _load_adapter(
        model,
        meta["adapter_rank"],
        meta.get("adapter_alpha"),
        list(meta["adapter_targets"]),
        int(meta.get("init_seed") or 0),
        device,
        dtype,
    )
    try:
        check_vact_matches(direction, meta, adapter, source=str(vact))
    except VactError as e:
        _fail(str(e))
    h_hack, h_clean = pooled_pair_activations(adapter, tokenizer, loaded, batch_size=batch_size, mode=mode)
    s_hack, s_clean = score_acts(h_hack, direction), score_acts(h_clean, direction)
    width = max(len(p.id) for p in loaded)
    typer.echo(f"{'pair':<{width}}  {'hack':>10}  {'clean':>10}  {'hack-clean':>10}")
    for p, h, c in zip(loaded, s_hack.tolist(), s_clean.tolist(), strict=True):
        typer.echo(f"{p.id:<{width}}  {h:>10.4f}  {c:>10.4f}  {h - c:>10.4f}")
    wins = int((s_hack > s_clean).sum())
    typer.echo(
        f"AUROC hack vs clean: {auroc(s_hack, s_clean):.4f}  "
        f"(hack > clean in {wins}/{len(loaded)} pairs; {meta.get('kind', 'vact')} {vact.name}, {mode} mode)"
    )
