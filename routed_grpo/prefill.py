"""One prompt forward per distinct prompt in transformers' `generate`.

GRPO samples each prompt `num_generations` times, and TRL hands `generate` one row per sample, so the prefill (the
forward over the prompts that fills the KV cache) computes every prompt that many times. In the CPU organism the
prompts are about 245 tokens and the completions about 12, so that prefill is a large share of generation.

`shared_prompt_prefill(lm)` wraps the decoder's forward (`lm.get_decoder()`) for the duration of the context. A call
that starts a cache (an empty `DynamicCache`) with more than one token per row and repeated rows runs on the distinct
rows only, then copies their outputs to every row: the last hidden states and, through the cache's own
`reorder_cache`, the keys and values of every layer. Decode steps, calls that carry other per-row inputs (embeddings,
4-D masks, multimodal fields, a `position_ids` that is not 2-D) and caches of other types run unchanged.

`shared_prefix_logps` does the same for the loss forward (`share_prompt_forward`, off by default): the prompt
minus its last token runs once per distinct (prompt, routing masks) with gradients, its KV cache is copied to the
rows that share it (a differentiable `index_select`), and the rest of each row (the last prompt token and the
completion) runs on top of it through TRL's fused LM head. Each row's loss and the total gradient are the same
mathematical quantities; the gradient of a shared prompt now sums its rows first, so it differs by rounding.

Rows are distinct by their token ids, attention mask and position ids together, so two rows share a forward only if
that forward is the same computation for both. Each row of a batched forward is computed independently of the other
rows, so the copied values are the values the full batch would have given: bit for bit on this CPU
(tests/test_prefill.py compares a whole `generate` with and without it, the sampled tokens and the scores), and to
floating-point order on a device whose matrix kernels depend on the batch size. Per-row adapter masks (sampling
modes mixed within a batch) index the full batch, so the caller leaves the context off then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


def shared_prefix_logps(
    model: torch.nn.Module,
    lm: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    row_keys: torch.Tensor | None = None,
    rows: Callable[[torch.Tensor], contextlib.AbstractContextManager] | None = None,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """TRL's per-token log-probs (B, logits_to_keep) and entropies of the last `logits_to_keep` tokens, with the prompt
    prefix run once per distinct (prefix, `row_keys` row); None when no prefix repeats (the caller runs TRL's).

    `model` is what TRL calls (it carries TRL's fused LM head, `fused_lm_head=True`), `lm` the causal LM inside it
    whose decoder runs the prefix; `row_keys` (B, k) are per-row settings the forward depends on (the routing
    masks), and `rows(keep)` the context the prefix forward runs in, on the rows `keep` only (the trainer sets the
    adapter's row masks of those rows there). Positions count from the first column, padding included, as in TRL's
    forward without a cache.
    """
    prefix = input_ids.shape[1] - logits_to_keep - 1  # the last prompt token predicts the first completion token
    if prefix < 1:
        return None
    key = [input_ids[:, :prefix], attention_mask[:, :prefix].to(input_ids.dtype)]
    if row_keys is not None:
        key.append(row_keys.to(input_ids.dtype).view(input_ids.shape[0], -1))
    shared = distinct_rows(torch.cat(key, dim=1))
    if shared is None:
        return None
    keep, inverse = shared
    cache = DynamicCache(config=lm.config)
    with rows(keep) if rows is not None else contextlib.nullcontext():
        ids, mask = input_ids[keep, :prefix], attention_mask[keep, :prefix]
        lm.get_decoder()(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    cache.reorder_cache(inverse)  # every row gets its prefix's keys and values; the gradient flows back through it
    suffix = input_ids[:, prefix:]
    labels = suffix.masked_fill(attention_mask[:, prefix:] == 0, -100)
    labels[:, 0] = -100  # the last prompt token: never a label (TRL labels only the completion)
    out = model(input_ids=suffix, attention_mask=attention_mask, cache=cache, labels=labels, fused_lm_head=True)
    logps = out.log_probs[:, -logits_to_keep:]
    return logps, out.entropy[:, -logits_to_keep:] if compute_entropy else None
