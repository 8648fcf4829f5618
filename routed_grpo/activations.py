"""Pooled activations of (hack, clean) pairs at the adapter's sensor: fast forward-only extraction and a cache file.

What it covers (the inputs of invariant I5, DESIGN.md section 3 step 3):

- `pooled_completion_activations`: any (prompt, completion) rows; `pooled_pair_activations`: every token of a
  batch of pairs runs once (`share_prompt=True`, the default): the prompts' common prefix, then each pair's prompt
  and the start its two completions share, then each completion's own tokens, each pass extending one KV cache
  (transformers' `DynamicCache`; `encode_pair`, `pair_order` and `shared_prefix_len` give the token ids, the batch
  order and the shared prefixes it plans with). Both run under `no_grad` in eval mode, call the decoder only (no
  LM head) and cut the forward short once every sensor site is captured (`RoutedAdapter.capture(stop=True)`),
  process batches sorted by length and return rows in the order given, with an optional progress bar. What is
  pooled is the adapter's sensor (routed_grpo.sensor; by default the deployed bottleneck `A_dep x`,
  `(n_modules, r)`; a residual sensor gives `(n_layers, hidden)`). Token ids are those of a GRPO rollout
  (`encode_rollout`: chat template with the generation prompt, the completion tokenised alone plus EOS); the
  pooled tokens are the completion's, EOS included. What is captured is what a full forward gives (the tests
  compare it with an unbatched full-model forward per sequence).
- `PairActivations` with `save_pair_activations` / `load_pair_activations`: the cache written by
  `routed-grpo pairs activations` (hack and clean pooled activations, pair ids, tags, the adapter metadata with its
  fingerprint parts, the pairs' hash, sampling mode and dtype), so `extract`, `score` and `generalise` need no
  forward pass.

Not covered: the maths on these activations (routed_grpo/vact.py, routed_grpo/generalise.py), the pairs format
(routed_grpo/pairs.py). `share_prompt` needs a decoder that takes a transformers `DynamicCache`; pass
`share_prompt=False` for one that does not (each sequence then runs whole).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from routed_grpo.utils import atomic_path, batched, encode_rollout, progress_bar

if TYPE_CHECKING:
    from routed_grpo.adapter import RoutedAdapter
    from routed_grpo.pairs import Pair

ACTS_KIND = "pair_activations"
ACTS_FORMAT = 1


class ActivationsError(ValueError):
    """A pair-activations cache is malformed, stale, or lacks the pairs asked for."""


# ---- extraction ------------------------------------------------------------------------------------------------
def _decoder(adapter: RoutedAdapter) -> torch.nn.Module:
    """The causal LM's decoder (everything but the LM head), or the whole model if it exposes none."""
    inner = adapter.model.get_base_model()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner
    return decoder if decoder is not inner else adapter.model


def _cache_kwarg(module: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache`; use whichever the decoder's forward takes."""
    target = module.get_base_model() if hasattr(module, "get_base_model") else module
    return "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _right_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, T) token ids and (B, T) attention mask, right-padded to the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def _inference(adapter: RoutedAdapter, total: int, desc: str, progress: bool) -> Iterator[Any]:
    """Eval mode (no dropout) and a progress bar for the duration; the model's training flag is restored."""
    model = adapter.model
    was_training = model.training
    model.eval()
    bar = progress_bar(total, desc, progress, unit="pair" if "pair" in desc else "seq")
    try:
        with torch.no_grad():
            yield bar
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()


def _captured(adapter: RoutedAdapter, forward: torch.nn.Module, mode: str, pool: Tensor, **inputs) -> Tensor:
    """One forward cut short after the last target module: pooled `A_dep x` over `pool` (B, T) -> (B, M, r)."""
    with adapter.sampling_mode(mode), adapter.capture(pool, stop=True):
        forward(**inputs)
    return adapter.pooled().float().cpu()


def pooled_completion_activations(
    adapter: RoutedAdapter,
    tokenizer: Any,
    prompts: Sequence[list[dict]],
    completions: Sequence[str],
    batch_size: int = 8,
    mode: str = "full",
    progress: bool = False,
) -> Tensor:
    """The sensor's reading pooled over each completion's tokens, in `mode`: (N, n_sites, width) float32 on CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = [encode_rollout(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]  # (ids, n_prompt)
    if not rows:
        raise ValueError("no completions given")
    device, decoder, pad = next(adapter.model.parameters()).device, _decoder(adapter), _pad_id(tokenizer)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # length-sorted batches: little padding
    out: list[Tensor | None] = [None] * len(rows)
    with _inference(adapter, len(rows), "activations", progress) as bar:
        for chunk in batched(order, batch_size):
            ids, mask = _right_pad([rows[i][0] for i in chunk], pad, device)  # (b, T)
            pool = mask.clone()
            for j, i in enumerate(chunk):
                pool[j, : rows[i][1]] = 0  # completion tokens only
            acts = _captured(adapter, decoder, mode, pool, input_ids=ids, attention_mask=mask, use_cache=False)
            for j, i in enumerate(chunk):
                out[i] = acts[j]
            if bar is not None:
                bar.update(len(chunk))
    return torch.stack(out)


def encode_pair(tokenizer: Any, pair: Pair) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, hack completion ids, clean completion ids); completions carry their EOS."""
    hack, n_prompt = encode_rollout(tokenizer, pair.messages(), pair.hack)
    clean, n_clean_prompt = encode_rollout(tokenizer, pair.messages(), pair.clean)
    if hack[:n_prompt] != clean[:n_clean_prompt]:
        raise ValueError(f"pair {pair.id!r}: the prompt tokenises differently before its two completions")
    return hack[:n_prompt], hack[n_prompt:], clean[n_prompt:]


def shared_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the common prefix of `seqs`, leaving every sequence at least one token of its own."""
    n = min(len(x) for x in seqs) - 1
    for i in range(max(n, 0)):
        if any(x[i] != seqs[0][i] for x in seqs[1:]):
            return i
    return max(n, 0)


def pair_order(rows: Sequence[tuple[list[int], list[int], list[int]]]) -> list[int]:
    """Indices of `encode_pair` rows by length (prompt + longer completion): consecutive slices batch with little
    padding."""
    return sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + max(len(rows[i][1]), len(rows[i][2])))


def _pair_batch(adapter: RoutedAdapter, decoder, rows, mode: str, pad: int) -> Tensor:
    """Every token of a batch of b pairs runs once, in three passes that extend one KV cache: (1) the prompts'
    common prefix (1 row, e.g. the system prompt), (2) each pair's rest of the prompt plus the start its two
    completions share (b rows), (3) the two completions' own tokens (2b rows: h0, c0, h1, c1, ...). Returns the
    pooled bottleneck over each completion's tokens (passes 2 and 3 combined): (2b, M, r)."""
    from transformers import DynamicCache

    device, cache_kw = next(adapter.model.parameters()).device, _cache_kwarg(decoder)
    k0 = shared_prefix_len([r[0] for r in rows])  # tokens in pass 1
    shared_c = [shared_prefix_len([r[1], r[2]]) for r in rows]  # completion tokens in pass 2, per pair
    part2 = [r[0][k0:] + r[1][:k] for r, k in zip(rows, shared_c, strict=True)]
    part3 = [side[k:] for r, k in zip(rows, shared_c, strict=True) for side in (r[1], r[2])]
    cache = DynamicCache(config=decoder.config)
    with adapter.sampling_mode(mode):
        if k0:
            ids = torch.tensor([rows[0][0][:k0]], device=device)  # (1, k0)
            decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{cache_kw: cache})
            cache.batch_repeat_interleave(len(rows))
    ids2, mask2 = _right_pad(part2, pad, device)  # (b, S)
    pool2 = torch.zeros_like(mask2)
    for i, (r, k) in enumerate(zip(rows, shared_c, strict=True)):
        pool2[i, len(r[0]) - k0 : len(r[0]) - k0 + k] = 1  # the completions' shared start
    ones = torch.ones((len(rows), k0), dtype=torch.long, device=device)
    inputs = {
        "input_ids": ids2,
        "attention_mask": torch.cat([ones, mask2], 1),
        "use_cache": True,
        "position_ids": k0 + torch.arange(ids2.shape[1], device=device)[None].expand(len(rows), -1),
    }
    with adapter.sampling_mode(mode), adapter.capture(pool2):  # the whole decoder: pass 3 needs every layer's cache
        decoder(**inputs, **{cache_kw: cache})
    pooled2 = adapter.pooled().float().cpu().repeat_interleave(2, dim=0)  # (2b, M, r)
    cache.batch_repeat_interleave(2)
    ids3, mask3 = _right_pad(part3, pad, device)  # (2b, C)
    start = (k0 + mask2.sum(1)).repeat_interleave(2)[:, None]  # (2b, 1): each completion continues its own prefix
    attention = torch.cat([ones, mask2], 1).repeat_interleave(2, dim=0)
    inputs = {
        "input_ids": ids3,
        "attention_mask": torch.cat([attention, mask3], 1),
        "use_cache": True,
        "position_ids": start + torch.arange(ids3.shape[1], device=device),
    }
    pooled3 = _captured(adapter, decoder, mode, mask3, **inputs, **{cache_kw: cache})  # (2b, M, r)
    n2 = torch.tensor(shared_c, dtype=torch.float32).repeat_interleave(2)[:, None, None]  # (2b, 1, 1)
    n3 = mask3.sum(1).float().cpu()[:, None, None]
    return (pooled2 * n2 + pooled3 * n3) / (n2 + n3)


def pooled_pair_activations(
    adapter: RoutedAdapter,
    tokenizer: Any,
    pairs: Sequence[Pair],
    batch_size: int = 8,
    mode: str = "full",
    progress: bool = False,
    share_prompt: bool = True,
) -> tuple[Tensor, Tensor]:
    """(hack, clean) pooled activations, each (P, n_sites, width) float32, in the pairs' order.

    `batch_size` counts pairs: a batch runs its b prompts, then 2b completions. `share_prompt=False` runs every
    prompt + completion whole (for decoders without a transformers KV cache).
    """
    if not pairs:
        raise ValueError("no pairs given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not share_prompt:
        prompts = [p.messages() for p in pairs] * 2
        both = pooled_completion_activations(
            adapter, tokenizer, prompts, [p.hack for p in pairs] + [p.clean for p in pairs], batch_size, mode, progress
        )
        return both[: len(pairs)], both[len(pairs) :]
    rows = [encode_pair(tokenizer, p) for p in pairs]
    decoder, pad = _decoder(adapter), _pad_id(tokenizer)
    order = pair_order(rows)
    hack: list[Tensor | None] = [None] * len(rows)
    clean: list[Tensor | None] = [None] * len(rows)
    with _inference(adapter, len(rows), "pair activations", progress) as bar:
        for chunk in batched(order, batch_size):
            acts = _pair_batch(adapter, decoder, [rows[i] for i in chunk], mode, pad)  # (2b, M, r)
            for j, i in enumerate(chunk):
                hack[i], clean[i] = acts[2 * j], acts[2 * j + 1]
            if bar is not None:
                bar.update(len(chunk))
    return torch.stack(hack), torch.stack(clean)


# ---- the cache file ----------------------------------------------------------------------------------------------
@dataclass
class PairActivations:
    """Cached pooled activations of pairs. hack, clean: (P, M, r) float32; `metadata` holds the adapter fields
    (`vact.adapter_metadata`), `pairs_hash`, `pairs_path`, `sampling_mode`, `dtype` and `model_name`."""

    hack: Tensor
    clean: Tensor
    pair_ids: list[str]
    tags: list[list[str]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hack.shape != self.clean.shape or self.hack.dim() != 3:
            raise ActivationsError(
                f"hack and clean must be equal (P, M, r); got {tuple(self.hack.shape)} and {tuple(self.clean.shape)}"
            )
        if not (len(self.pair_ids) == len(self.tags) == self.hack.shape[0]):
            raise ActivationsError(
                f"{self.hack.shape[0]} rows but {len(self.pair_ids)} pair ids and {len(self.tags)} tag lists"
            )

    def select(self, ids: Sequence[str], source: str = "the cache") -> PairActivations:
        """The rows of these pair ids, in this order; names the first id the cache lacks."""
        index = {pid: i for i, pid in enumerate(self.pair_ids)}
        missing = [pid for pid in ids if pid not in index]
        if missing:
            raise ActivationsError(
                f"{source}: field 'pair_ids' lacks {len(missing)} of the {len(ids)} pairs asked for, e.g. "
                f"{missing[0]!r}; rebuild it with `routed-grpo pairs activations`"
            )
        rows = torch.tensor([index[pid] for pid in ids], dtype=torch.long)
        return PairActivations(
            self.hack[rows], self.clean[rows], list(ids), [self.tags[index[p]] for p in ids], dict(self.metadata)
        )

    def filter(self, tags: Sequence[str] | None, exclude_tags: Sequence[str] | None) -> PairActivations:
        """Pairs with ANY of `tags` (None = all), then without any of `exclude_tags` (as `pairs.load_pairs`)."""
        keep, drop = set(tags or ()), set(exclude_tags or ())
        ids = [
            pid
            for pid, t in zip(self.pair_ids, self.tags, strict=True)
            if (not keep or keep & set(t)) and not (drop & set(t))
        ]
        if not ids:
            raise ActivationsError(
                f"tag filter tags={sorted(keep)} exclude_tags={sorted(drop)} leaves 0 of "
                f"{len(self.pair_ids)} cached pairs"
            )
        return self.select(ids)


def save_pair_activations(path: str | Path, acts: PairActivations) -> Path:
    """Write the cache atomically: tensors `hack`, `clean`; JSON metadata including `pair_ids` and `tags`."""
    meta = {**acts.metadata, "kind": ACTS_KIND, "format": ACTS_FORMAT, "pair_ids": acts.pair_ids, "tags": acts.tags}
    tensors = {
        "hack": acts.hack.detach().float().cpu().contiguous(),
        "clean": acts.clean.detach().float().cpu().contiguous(),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={str(k): json.dumps(v) for k, v in meta.items()})
    return Path(path)


def load_pair_activations(path: str | Path) -> PairActivations:
    """Read a cache written by `save_pair_activations`; errors name the file and the field."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw, keys = f.metadata() or {}, set(f.keys())
            tensors = {k: f.get_tensor(k) for k in ("hack", "clean") if k in keys}
    except Exception as e:  # missing file, not safetensors, truncated
        raise ActivationsError(f"{path}: cannot read a pair-activations safetensors file: {e}") from None
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    if meta.get("kind") != ACTS_KIND:
        raise ActivationsError(
            f"{path}: field 'kind' is {meta.get('kind')!r}, not {ACTS_KIND!r} "
            "(write the cache with `routed-grpo pairs activations`)"
        )
    if meta.get("format") != ACTS_FORMAT:
        raise ActivationsError(f"{path}: field 'format' is {meta.get('format')!r}; this version reads {ACTS_FORMAT}")
    for name in ("hack", "clean"):
        if name not in tensors:
            raise ActivationsError(f"{path}: no '{name}' tensor (found {sorted(keys)})")
    ids, tags = meta.pop("pair_ids", None), meta.pop("tags", None)
    if not isinstance(ids, list) or not isinstance(tags, list):
        raise ActivationsError(f"{path}: fields 'pair_ids' and 'tags' must be lists; got {ids!r:.60}, {tags!r:.60}")
    for key in ("kind", "format"):
        meta.pop(key)
    try:
        return PairActivations(tensors["hack"], tensors["clean"], ids, tags, meta)
    except ActivationsError as e:
        raise ActivationsError(f"{path}: {e}") from None


@torch.no_grad()
def pair_input_differences(adapter: RoutedAdapter, tokenizer: Any, pairs: Sequence[Pair]) -> dict[str, Tensor]:
    """Per target module, the mean over pairs of `x_hack - x_clean`: its Linear's input mean-pooled over each
    completion's tokens, in full mode, float32 (d_in,) (the signed adapter init's hack direction, before `unit`)."""
    sums: dict[str, Tensor] = {}
    sign = [1.0]

    def hook(name):
        def read(module, args, out) -> None:
            if adapter._token_mask is None:
                return
            mask = adapter._token_mask.to(args[0].device, torch.float32).unsqueeze(-1)  # (B, T, 1)
            pooled = (args[0].float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, d_in)
            sums[name] = sums.get(name, 0.0) + sign[0] * pooled.sum(0).cpu()

        return read

    handles = [  # before the capture hooks: the last of them ends the forward
        layer.lora_A["deployed"].register_forward_hook(hook(n), prepend=True) for n, layer in adapter.layers.items()
    ]
    try:
        for sign[0], side in ((1.0, "hack"), (-1.0, "clean")):
            completions = [getattr(p, side) for p in pairs]
            pooled_completion_activations(adapter, tokenizer, [p.messages() for p in pairs], completions)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / len(pairs) for name, total in sums.items()}
