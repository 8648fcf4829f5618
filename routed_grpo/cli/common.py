"""Helpers shared by the `routed-grpo pairs` commands: errors, pairs, models, adapters and activation caches.

Covers the command-line plumbing only. Bad input ends in `fail` (the message on stderr, exit code 2). A model
argument is passed to transformers as given, so a local directory and a hub id resolve exactly as
`from_pretrained` resolves them (offline: transformers' own error). Not covered: the maths (routed_grpo/vact.py,
routed_grpo/generalise.py) and the extraction (routed_grpo/activations.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import typer

MODES = ("full", "deploy")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def split(values: Sequence[str] | None) -> list[str] | None:
    """Repeatable options that also accept comma-separated values."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        fail(f"--mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def pairs_label(paths: Sequence[Path]) -> str | list[str]:
    """How a v_act or activations file records its pairs paths (one path as a string, as before)."""
    return str(paths[0]) if len(paths) == 1 else [str(p) for p in paths]


def load_pairs(paths: Sequence[Path], tags: list[str] | None, exclude_tags: list[str] | None) -> list:
    from routed_grpo.pairs import PairsError
    from routed_grpo.pairs import load_pairs as load

    try:
        return load(list(paths), tags=tags, exclude_tags=exclude_tags)
    except PairsError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{', '.join(map(str, paths))}: cannot read pairs: {e}")


def pairs_hash(paths: Sequence[Path]) -> str:
    from routed_grpo.pairs import PairsError
    from routed_grpo.pairs import pairs_hash as digest

    try:
        return digest(list(paths))
    except (PairsError, OSError) as e:
        fail(str(e))


def load_tokenizer(model: str) -> Any:
    """The model's tokenizer; one saved from a bare `tokenizers` object is loaded as PreTrainedTokenizerFast
    (AutoTokenizer would pick the model family's class and tokenise differently, DESIGN.md section 7)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import cached_file

    config_file = cached_file(model, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False)
    config = json.loads(Path(config_file).read_text()) if config_file else {}
    if config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(model)
    return AutoTokenizer.from_pretrained(model)


def device_name(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_adapter(
    model: str,
    rank: int,
    alpha: float | None,
    targets: list[str],
    init_seed: int,
    device: str,
    dtype: str,
    sensor: str | None = None,
    init: str = "random",
) -> tuple[Any, Any, str]:
    """(adapter, tokenizer, dtype name) for a local model directory or a hub id, reading `sensor` (None: the
    default, `bottleneck`), at adapter init `init` (`random` or `svd`); `dtype="auto"` keeps the checkpoint's own
    stored dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from routed_grpo.adapter import attach_routed_adapter

    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    try:
        tokenizer = load_tokenizer(model)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    except (OSError, ValueError) as e:
        fail(f"{model}: cannot load the model or tokenizer: {e}")
    lm.to(device_name(device))
    loaded = str(next(lm.parameters()).dtype).removeprefix("torch.")
    try:
        adapter = attach_routed_adapter(lm, rank=rank, alpha=alpha, targets=targets, init_seed=init_seed, init=init)
    except ValueError as e:
        fail(f"cannot attach the adapter (rank {rank}, targets {targets}, init {init}): {e}")
    try:
        adapter.use_sensor(sensor)
    except ValueError as e:
        fail(f"--sensor {sensor!r}: {e}")
    return adapter, tokenizer, loaded


def targets_list(targets: str) -> list[str]:
    out = [t.strip() for t in targets.split(",") if t.strip()]
    if not out:
        fail(f"--targets names no module: {targets!r}")
    return out


def load_acts(path: Path, pairs: Sequence[Path] | None, tags: list[str] | None, exclude_tags: list[str] | None):
    """A pair-activations cache, checked against the pairs' hash when `pairs` are given, restricted to the pairs
    the tag filters select (those of `pairs` if given, else the cache's own tags)."""
    from routed_grpo.activations import ActivationsError, load_pair_activations

    try:
        acts = load_pair_activations(path)
        if not pairs:
            return acts.filter(tags, exclude_tags)
        digest = pairs_hash(pairs)
        if acts.metadata.get("pairs_hash") != digest:
            fail(
                f"{path}: field 'pairs_hash' is {str(acts.metadata.get('pairs_hash'))[:12]}..., but "
                f"{', '.join(map(str, pairs))} now hashes to {digest[:12]}...: the pairs changed since the cache "
                "was written; rerun `routed-grpo pairs activations`"
            )
        return acts.select([p.id for p in load_pairs(pairs, tags, exclude_tags)], source=str(path))
    except ActivationsError as e:
        fail(str(e))
