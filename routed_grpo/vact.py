"""`v_act`: the activation direction that replaces per-example labels, its Haar placebo, and its file format.

What it covers (DESIGN.md section 3 step 4, invariant I5):

- `unit_mean_difference` / `extract_vact`: per module, `unit(mean over pairs of (h_hack - h_clean))`, from the
  pooled deployed bottleneck `A_dep x` of forward passes only (`routed_grpo.activations.pooled_pair_activations`,
  re-exported here with `pooled_completion_activations`).
- `haar_placebo`: a direction drawn uniformly on each module's unit sphere (normalised Gaussian), seeded.
- `save_vact` / `load_vact`: safetensors with JSON metadata; loading against an adapter checks module names and
  shapes (naming the first module that does not match) and the adapter fingerprint part by part
  (`check_fingerprint`: seed, rank, targets, module shapes, base weights; never the dtype or device).
- `auroc`: rank-based AUROC of two score samples (a measurement for `pairs score`).

What it does not cover: the adapter and its hooks (routed_grpo/adapter.py), the pairs file format
(routed_grpo/pairs.py) and the gate that uses `v_act` (routed_grpo/gate.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from routed_grpo.activations import pooled_completion_activations, pooled_pair_activations  # noqa: F401 (re-export)
from routed_grpo.sensor import parse_sensor
from routed_grpo.utils import atomic_path

if TYPE_CHECKING:
    from routed_grpo.adapter import RoutedAdapter
    from routed_grpo.pairs import Pair

VACT_KEY = "vact"
KINDS = ("vact", "placebo")


class VactError(ValueError):
    """A `v_act` file is malformed or does not match the adapter it is used with."""


def unit_mean_difference(h_hack: Tensor, h_clean: Tensor, module_names: Sequence[str] | None = None) -> Tensor:
    """Per module, `unit(mean over pairs of (h_hack - h_clean))`: (P, M, r) x 2 -> (M, r) float32 unit rows."""
    if h_hack.shape != h_clean.shape or h_hack.dim() != 3 or h_hack.shape[0] == 0:
        raise ValueError(f"need two equal (P>0, M, r) tensors; got {tuple(h_hack.shape)} and {tuple(h_clean.shape)}")
    mean = (h_hack.double() - h_clean.double()).mean(dim=0)  # (M, r)
    norms = mean.norm(dim=-1, keepdim=True)  # (M, 1)
    zero = (norms.squeeze(-1) <= 1e-12).nonzero().flatten().tolist()
    if zero:
        name = module_names[zero[0]] if module_names is not None else f"#{zero[0]}"
        raise ValueError(f"mean hack - clean difference is zero at module {name}; no direction to normalise")
    return (mean / norms).float()


def haar_placebo(like: Tensor, seed: int) -> Tensor:
    """A direction with `like`'s shape (M, r), each row uniform on the unit sphere (normalised Gaussian), seeded."""
    if like.dim() != 2:
        raise ValueError(f"like must be (n_modules, rank); got shape {tuple(like.shape)}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(like.shape), generator=gen, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float()


def extract_vact(
    adapter: RoutedAdapter,
    tokenizer: Any,
    pairs: Sequence[Pair],
    batch_size: int = 8,
    mode: str = "full",
    progress: bool = False,
) -> Tensor:
    """`v_act` (n_sites, width) at the adapter's sensor (by default (n_modules, r) at the deployed bottleneck): per
    site, the unit mean of `h_hack - h_clean` over the pairs (I5)."""
    h_hack, h_clean = pooled_pair_activations(adapter, tokenizer, pairs, batch_size, mode, progress)
    return unit_mean_difference(h_hack, h_clean, adapter.sensor_names)


ADAPTER_FIELDS = (
    "adapter_rank",
    "adapter_alpha",
    "adapter_targets",
    "init_seed",
    "module_names",
    "sensor",
    "sensor_width",
    "adapter_fingerprint",
    "adapter_fingerprint_parts",
)


def adapter_metadata(adapter: RoutedAdapter) -> dict[str, Any]:
    """The adapter fields (ADAPTER_FIELDS) a `v_act` or activations file records and `check_vact_matches` checks.
    `module_names` names the rows: the sensor's sites (the target modules for the bottleneck sensors)."""
    config = adapter.model.peft_config.get("deployed")
    return {
        "adapter_rank": adapter.rank,
        "adapter_alpha": getattr(config, "lora_alpha", None),
        "adapter_targets": list(getattr(adapter, "targets", [])),
        "init_seed": getattr(adapter, "init_seed", None),
        "module_names": list(adapter.sensor_names),
        "sensor": adapter.sensor.spec,
        "sensor_width": adapter.sensor_width,
        "adapter_fingerprint": adapter.fingerprint(),
        "adapter_fingerprint_parts": adapter.fingerprint_parts(),
    }


def save_vact(path: str | Path, vact: Tensor, metadata: dict[str, Any]) -> Path:
    """Write `vact` (M, r) and JSON metadata to safetensors atomically (temp file + os.replace)."""
    path = Path(path)
    if vact.dim() != 2:
        raise VactError(f"vact must be (n_modules, rank); got shape {tuple(vact.shape)}")
    names = metadata.get("module_names")
    if names is not None and len(names) != vact.shape[0]:
        raise VactError(f"metadata names {len(names)} modules but vact has {vact.shape[0]} rows")
    if metadata.get("kind", "vact") not in KINDS:
        raise VactError(f"metadata kind must be one of {KINDS}; got {metadata['kind']!r}")
    encoded = {str(k): json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path) as tmp:
        save_file({VACT_KEY: vact.detach().float().cpu().contiguous()}, str(tmp), metadata=encoded)
    return path


def load_vact(path: str | Path, adapter: RoutedAdapter | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Read a `v_act` file; with `adapter`, refuse one whose modules, shapes or fingerprint differ."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            if VACT_KEY not in f.keys():
                raise VactError(f"{path}: no '{VACT_KEY}' tensor (found {list(f.keys())})")
            vact = f.get_tensor(VACT_KEY)
    except VactError:
        raise
    except Exception as e:  # missing file, not safetensors, truncated
        raise VactError(f"{path}: cannot read a v_act safetensors file: {e}") from None
    metadata = {k: _decode(v) for k, v in raw_meta.items()}
    if vact.dim() != 2:
        raise VactError(f"{path}: v_act must be (n_modules, rank); got shape {tuple(vact.shape)}")
    if adapter is not None:
        check_vact_matches(vact, metadata, adapter, source=str(path))
    return vact, metadata


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def check_vact_matches(
    vact: Tensor,
    metadata: dict[str, Any],
    adapter: RoutedAdapter | dict[str, Any],
    source: str = "v_act",
    against: str = "the adapter",
) -> None:
    """Raise VactError naming the first module whose name or shape differs, or the fingerprint parts that differ.

    `adapter` is a RoutedAdapter or the metadata of another file made with one (a pair-activations cache). The
    sensor is compared first; a file without one was made at the `bottleneck` sensor."""
    if isinstance(adapter, dict):
        expected = list(adapter.get("module_names") or [])
        rank = adapter.get("sensor_width", adapter.get("adapter_rank"))
        sensor = parse_sensor(adapter.get("sensor"))
    else:
        expected, rank, sensor = list(adapter.sensor_names), adapter.sensor_width, adapter.sensor
    stored = parse_sensor(metadata.get("sensor"))
    if stored != sensor:
        raise VactError(
            f"{source} does not match {against} in its sensor: it was made at sensor {stored.spec!r}, {against} "
            f"reads sensor {sensor.spec!r} (set `sensor` to match, or re-extract at this sensor)"
        )
    names = list(metadata.get("module_names") or [])
    for i in range(max(len(names), len(expected))):
        have = names[i] if i < len(names) else "<none>"
        want = expected[i] if i < len(expected) else "<none>"
        if have != want:
            raise VactError(
                f"{source} does not match {against} at module #{i}: v_act has {have!r}, {against} has {want!r} "
                f"(v_act shape {tuple(vact.shape)} for {len(names)} modules, {against} {len(expected)} modules x "
                f"rank {rank})"
            )
    if tuple(vact.shape) != (len(expected), rank):
        module = expected[0] if expected else "<none>"
        raise VactError(
            f"{source} does not match {against} at module {module!r}: v_act row shape {tuple(vact.shape[1:])} "
            f"(whole v_act {tuple(vact.shape)}), {against}'s sensor row shape ({rank},) "
            f"(needs {(len(expected), rank)})"
        )
    check_fingerprint(metadata, adapter, source, against, parts=None if sensor.reads_adapter else RESIDUAL_PARTS)


RESIDUAL_PARTS = ("base_weights",)  # a residual-stream direction depends on the base model only
_PART_WORDS = {
    "seed": "init seed",
    "rank": "rank",
    "targets": "target modules",
    "init": "adapter init (adapter_init and the hash of its initial factors)",
    "module_shapes": "module names or shapes",
    "base_weights": "base weights (sampled entries of the first, middle and last weight matrix differ beyond bf16 "
    "precision: another base model or checkpoint)",
}


def describe_mismatch(stored: dict[str, Any], current: dict[str, Any], differ: Sequence[str], against: str) -> str:
    """`init seed 0 in the file, 1 in this adapter; ...` for the differing fingerprint parts."""
    out = []
    for part in differ:
        if part in ("seed", "rank", "targets", "init"):
            out.append(f"{_PART_WORDS[part]} {stored.get(part)!r} in the file, {current.get(part)!r} in {against}")
        else:
            out.append(f"{_PART_WORDS[part]} differ")
    return "; ".join(out)


def check_fingerprint(
    metadata: dict[str, Any],
    adapter: RoutedAdapter | dict[str, Any],
    source: str,
    against: str = "the adapter",
    parts: Sequence[str] | None = None,
) -> None:
    """Raise VactError naming each fingerprint part (seed, rank, targets, module shapes, base weights) in which
    the file's adapter differs from `adapter` (a RoutedAdapter or another file's metadata). The dtype and device
    the weights are loaded in do not count. A file without fingerprint parts (routed-grpo <= 0.1) is accepted only
    if its old, dtype-dependent fingerprint still matches."""
    stored_fp, stored = metadata.get("adapter_fingerprint"), metadata.get("adapter_fingerprint_parts")
    if isinstance(adapter, dict):
        current, current_fp = adapter.get("adapter_fingerprint_parts"), adapter.get("adapter_fingerprint")
        legacy = None
    else:
        current, current_fp, legacy = adapter.fingerprint_parts(), adapter.fingerprint(), adapter.legacy_fingerprint
    if stored is None or current is None:
        if stored_fp is None or current_fp is None or stored_fp == current_fp:
            return
        if stored is None and legacy is not None and stored_fp == legacy():
            return
        raise VactError(
            f"{source} has an old-format adapter fingerprint {stored_fp} (routed-grpo <= 0.1 hashed a base weight's "
            f"bytes, so it also changes with the dtype the model is loaded in) that does not match {against}: the "
            f"init seed, rank, targets, base model or load dtype differ (file: seed {metadata.get('init_seed')!r}, "
            f"rank {metadata.get('adapter_rank')!r}, targets {metadata.get('adapter_targets')!r}). Re-extract it "
            "with this version (`routed-grpo pairs extract`) to get a dtype-independent fingerprint"
        )
    from routed_grpo.adapter import fingerprint_mismatch

    differ = [p for p in fingerprint_mismatch(stored, current) if parts is None or p in parts]
    if differ:
        raise VactError(
            f"{source} was made for another adapter or base model than {against}: "
            f"{describe_mismatch(stored, current, differ, against)} (fingerprint {stored_fp} vs {current_fp}; "
            "the dtype and device the weights are loaded in do not count)"
        )


def auroc(positive: Tensor, negative: Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half (Mann-Whitney U)."""
    pos, neg = positive.double().flatten(), negative.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))
