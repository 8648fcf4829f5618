"""One prompt forward per distinct prompt in transformers' `generate`.

GRPO samples each prompt `num_generations` times, and TRL hands `generate` one row per sample, so the prefill (the
forward over the prompts that fills the KV cache) computes every prompt that many times. In the CPU organism the
prompts are about 245 tokens and the completions about 12, so that prefill is a large share of generation.

`shared_prompt_prefill(lm)` wraps the decoder's forward (`lm.get_decoder()`) for the duration of the context. A call
that starts a cache (an empty `DynamicCache`) with more than one token per row and repeated rows runs on the distinct
rows only, then copies their outputs to every row: the last hidden states and, through the cache's own
`reorder_cache`, the keys and values of every layer. Decode steps, calls that carry other per-row inputs (embeddings,
4-D masks, multimodal fields, a `position_ids` that is not 2-D) and caches of other types run unchanged.

Rows are distinct by their token ids, attention mask and position ids together, so two rows share a forward only if
that forward is the same computation for both. Each row of a batched forward is computed independently of the other
rows, so the copied values are the values the full batch would have given: bit for bit on this CPU
(tests/test_prefill.py compares a whole `generate` with and without it, the sampled tokens and the scores), and to
floating-point order on a device whose matrix kernels depend on the batch size. Per-row adapter masks (sampling
modes mixed within a batch) index the full batch, so the caller leaves the context off then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache

ROW_INPUTS = ("input_ids", "attention_mask", "position_ids")  # per-row inputs a shared prefill compares and selects
CACHE_KEYS = ("cache", "past_key_values")


def distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(keep, inverse) for a (B, ...) tensor: `rows[keep]` are its distinct rows in the order of their first
    occurrence and `rows[keep][inverse] == rows`; None when no row repeats."""
    flat = rows.reshape(rows.shape[0], -1)
    unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
    if unique.shape[0] == rows.shape[0]:
        return None
    n = torch.arange(rows.shape[0], device=rows.device)
    first = torch.full((unique.shape[0],), rows.shape[0], device=rows.device).scatter_reduce(0, inverse, n, "amin")
    order = torch.argsort(first)  # distinct rows by first occurrence
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=rows.device))
    return first[order], rank[inverse]


def _shareable(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(keep, inverse) when this decoder call is a prefill with repeated rows that can be shared, else None."""
    ids = kwargs.get("input_ids")
    cache = next((kwargs[k] for k in CACHE_KEYS if kwargs.get(k) is not None), None)
    if args or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        return None
    if type(cache) is not DynamicCache or cache.get_seq_length() != 0:
        return None
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        return None
    parts = []
    for key, value in kwargs.items():
        if key in ROW_INPUTS and value is not None:
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != ids.shape[0]:
                return None
            parts.append(value.to(ids.dtype))
        elif isinstance(value, torch.Tensor) and key != "cache_position":
            return None  # another per-row input this wrapper does not know how to select
    return distinct_rows(torch.cat(parts, dim=1))


@contextlib.contextmanager
def shared_prompt_prefill(lm: torch.nn.Module) -> Iterator[None]:
    """Inside: `lm`'s decoder runs a prefill of repeated prompts once per distinct prompt (module docstring)."""
    decoder = lm.get_decoder()
    own = decoder.__dict__.get("forward")  # an instance-level forward already set by someone else, kept as is
    inner = decoder.forward

    def forward(*args, **kwargs):
        shared = _shareable(args, kwargs)
        if shared is None:
            return inner(*args, **kwargs)
        keep, inverse = shared
        rows = {k: v.index_select(0, keep) for k, v in kwargs.items() if k in ROW_INPUTS and v is not None}
        out = inner(**{**kwargs, **rows})
        out.last_hidden_state = out.last_hidden_state.index_select(0, inverse)
        next(kwargs[k] for k in CACHE_KEYS if kwargs.get(k) is not None).reorder_cache(inverse)
        return out

    decoder.forward = forward
    try:
        yield
    finally:
        if own is None:
            del decoder.forward
        else:
            decoder.forward = own
