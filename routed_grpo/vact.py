"""`v_act`: the activation direction that replaces per-example labels, its Haar placebo, and its file format.

What it covers (DESIGN.md section 3 step 4, invariant I5):

- `pooled_pair_activations`: forward passes only (`no_grad`, eval mode, batched, deterministic) over each pair's
  prompt + completion, capturing the deployed block's bottleneck `A_dep x` mean-pooled over the completion tokens,
  `[n_pairs, n_modules, r]` for the hack side and the clean side. The prompt is rendered with the tokenizer's own
  chat template (`add_generation_prompt=True`); prompt and completion are tokenised separately and concatenated,
  as in a GRPO rollout, and the completion gets the tokenizer's EOS token, as TRL's completion mask counts it.
- `unit_mean_difference` / `extract_vact`: per module, `unit(mean over pairs of (h_hack - h_clean))`.
- `haar_placebo`: a direction drawn uniformly on each module's unit sphere (normalised Gaussian), seeded.
- `save_vact` / `load_vact`: safetensors with JSON metadata; loading against an adapter checks module names,
  shapes and the adapter fingerprint and names the first module that does not match.
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

from routed_grpo.utils import atomic_path, batched, encode_rollout

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


def _batch(tokenizer: Any, prompts: Sequence[list[dict]], completions: Sequence[str]) -> dict[str, Tensor]:
    """Right-padded input_ids, attention_mask and the completion-token mask, all (B, T)."""
    encoded = [encode_rollout(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    completion = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        completion[i, n_prompt : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


@torch.no_grad()
def pooled_completion_activations(
    adapter: RoutedAdapter,
    tokenizer: Any,
    prompts: Sequence[list[dict]],
    completions: Sequence[str],
    batch_size: int = 8,
    mode: str = "full",
) -> Tensor:
    """Pooled deployed bottleneck over each completion's tokens, in `mode`: (N, n_modules, r) float32 on CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = adapter.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # deterministic: no dropout
    out = []
    try:
        rows = list(zip(prompts, completions, strict=True))
        for chunk in batched(rows, batch_size):
            batch = _batch(tokenizer, [p for p, _ in chunk], [c for _, c in chunk])
            batch = {k: v.to(device) for k, v in batch.items()}
            with adapter.sampling_mode(mode), adapter.capture(batch["completion_mask"]):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            out.append(adapter.pooled().float().cpu())  # (b, M, r)
    finally:
        model.train(was_training)
    return torch.cat(out)


def pooled_pair_activations(
    adapter: RoutedAdapter, tokenizer: Any, pairs: Sequence[Pair], batch_size: int = 8, mode: str = "full"
) -> tuple[Tensor, Tensor]:
    """(hack, clean) pooled activations, each (P, n_modules, r), for the pairs' shared prompts."""
    if not pairs:
        raise ValueError("no pairs given")
    prompts = [p.messages() for p in pairs]
    h_hack = pooled_completion_activations(adapter, tokenizer, prompts, [p.hack for p in pairs], batch_size, mode)
    h_clean = pooled_completion_activations(adapter, tokenizer, prompts, [p.clean for p in pairs], batch_size, mode)
    return h_hack, h_clean


def extract_vact(
    adapter: RoutedAdapter, tokenizer: Any, pairs: Sequence[Pair], batch_size: int = 8, mode: str = "full"
) -> Tensor:
    """`v_act` (n_modules, r): per module, the unit mean of `h_hack - h_clean` over the pairs (I5)."""
    h_hack, h_clean = pooled_pair_activations(adapter, tokenizer, pairs, batch_size, mode)
    return unit_mean_difference(h_hack, h_clean, adapter.module_names)


def adapter_metadata(adapter: RoutedAdapter) -> dict[str, Any]:
    """The adapter fields a `v_act` file records (and `load_vact` checks)."""
    config = adapter.model.peft_config.get("deployed")
    return {
        "adapter_rank": adapter.rank,
        "adapter_alpha": getattr(config, "lora_alpha", None),
        "adapter_targets": list(getattr(adapter, "targets", [])),
        "init_seed": getattr(adapter, "init_seed", None),
        "module_names": list(adapter.module_names),
        "adapter_fingerprint": adapter.fingerprint(),
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


def check_vact_matches(vact: Tensor, metadata: dict[str, Any], adapter: RoutedAdapter, source: str = "v_act") -> None:
    """Raise VactError naming the first module whose name or shape differs, or a fingerprint mismatch."""
    names = list(metadata.get("module_names") or [])
    expected = list(adapter.module_names)
    for i in range(max(len(names), len(expected))):
        have = names[i] if i < len(names) else "<none>"
        want = expected[i] if i < len(expected) else "<none>"
        if have != want:
            raise VactError(
                f"{source} does not match the adapter at module #{i}: v_act has {have!r}, the adapter has {want!r} "
                f"(v_act shape {tuple(vact.shape)} for {len(names)} modules, adapter {len(expected)} modules x "
                f"rank {adapter.rank})"
            )
    if tuple(vact.shape) != (len(expected), adapter.rank):
        module = expected[0] if expected else "<none>"
        raise VactError(
            f"{source} does not match the adapter at module {module!r}: v_act row shape {tuple(vact.shape[1:])} "
            f"(whole v_act {tuple(vact.shape)}), adapter deployed bottleneck shape ({adapter.rank},) "
            f"(needs {(len(expected), adapter.rank)})"
        )
    stored = metadata.get("adapter_fingerprint")
    if stored is not None and stored != adapter.fingerprint():
        raise VactError(
            f"{source} was extracted with adapter fingerprint {stored}, this adapter has {adapter.fingerprint()} "
            f"(init_seed, rank, targets or model differ: v_act {tuple(vact.shape)}, adapter "
            f"{(len(expected), adapter.rank)})"
        )


def auroc(positive: Tensor, negative: Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half (Mann-Whitney U)."""
    pos, neg = positive.double().flatten(), negative.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))
