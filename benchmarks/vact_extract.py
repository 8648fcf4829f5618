"""`v_act` extraction, old against new, in one run on a Qwen2.5-0.5B-shaped model built from a config.

    OMP_NUM_THREADS=1 nice python benchmarks/vact_extract.py --pairs pairs/            # all 42 pairs: ~25 min
    OMP_NUM_THREADS=1 python benchmarks/vact_extract.py --save-model .cache/qwen2.5-0.5b-random  # for the CLI
    OMP_NUM_THREADS=1 python benchmarks/vact_extract.py --pairs pairs/ --limit 8       # a quick look

The model is `Qwen2ForCausalLM` with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151,936, tied embeddings) and random weights (seeded); nothing is downloaded. The
tokenizer is a byte-level BPE (GPT-2/Qwen-style regex pre-tokenizer) trained here on the pairs' own text with a
ChatML template; it has a few thousand tokens and about the token counts Qwen's tokenizer gives these pairs, while
the embedding and the tied LM head keep the full 151,936 rows, so the LM head costs what it costs on the real model.

OLD is the extraction as it stood before (kept below, `old_pooled`): every prompt + completion in its own row,
batches of 8 in file order, right-padded, through the full causal LM (logits over the whole vocabulary included).
NEW is `routed_grpo.activations.pooled_pair_activations`: length-sorted batches of pairs, every token once (the
batch's common prompt prefix, each pair's prompt and shared completion start, each completion's own tokens, one KV
cache), the decoder only, cut short after the last target module. Both run in the same process on the same adapter
(rank 8 on all attention and MLP projections, init seed 0) in float32, each with its own batches, interleaved batch
by batch (two OLD batches, then one NEW batch) so that load from other processes falls on both alike. A third run,
NEW on a bf16 copy of the weights, shows
what `--dtype auto` gives on a checkpoint stored in bf16 (as Qwen2.5 is); its v_act is compared with OLD's too.
Prints the times and ratios, token counts, per-module cosines between the `v_act`s, and a JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(pairs, vocab_size: int):
    """Byte-level BPE trained on the pairs' prompts and completions, wrapped with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for p in pairs for t in [m["content"] for m in p.prompt] + [p.hack, p.clean]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(dtype).eval()


# ---- OLD: the extraction before this change, kept verbatim in substance ----------------------------------------
def _old_batch(tokenizer, prompts, completions):
    """Right-padded input_ids, attention_mask and the completion-token mask, all (B, T)."""
    from routed_grpo.utils import encode_rollout

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
def old_pooled(adapter, tokenizer, prompts, completions, batch_size=8, mode="full"):
    """(N, M, r): batches in the given order through the full causal LM (logits over the whole vocabulary)."""
    from routed_grpo.utils import batched

    model = adapter.model
    model.eval()
    out, padded = [], 0
    rows = list(zip(prompts, completions, strict=True))
    for chunk in batched(rows, batch_size):
        batch = _old_batch(tokenizer, [p for p, _ in chunk], [c for _, c in chunk])
        padded += batch["input_ids"].numel()
        with adapter.sampling_mode(mode), adapter.capture(batch["completion_mask"]):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        out.append(adapter.pooled().float().cpu())
    return torch.cat(out), padded


# ---- the run ----------------------------------------------------------------------------------------------------
def token_counts(tokenizer, pairs, batch_size: int) -> dict[str, int]:
    """Real tokens of the 2P rollouts, and the tokens NEW runs (three passes per sorted batch, padding included)."""
    from routed_grpo.activations import encode_pair, shared_prefix_len

    rows = [encode_pair(tokenizer, p) for p in pairs]
    real = sum(2 * len(pr) + len(h) + len(c) for pr, h, c in rows)
    rows.sort(key=lambda r: len(r[0]) + max(len(r[1]), len(r[2])))
    new = 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        k0 = shared_prefix_len([r[0] for r in chunk])
        shared = [shared_prefix_len([r[1], r[2]]) for r in chunk]
        new += k0 + len(chunk) * max(len(r[0]) - k0 + k for r, k in zip(chunk, shared, strict=True))
        new += 2 * len(chunk) * max(len(side) - k for r, k in zip(chunk, shared, strict=True) for side in r[1:])
    return {"real_rollout_tokens": real, "new_processed_tokens": new}


def _cosines(v_ref: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(v_ref.double(), v.double(), dim=-1)  # (M,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, default=Path("pairs"))
    parser.add_argument("--limit", type=int, default=0, help="Use only the first N pairs (0 = all).")
    parser.add_argument("--batch-size", type=int, default=8, help="OLD: rows per batch; NEW: pairs per batch.")
    parser.add_argument("--no-bf16", action="store_true", help="Skip NEW on a bf16 copy (Qwen2.5's stored dtype).")
    parser.add_argument("--vocab", type=int, default=4000, help="BPE vocabulary target of the tokenizer.")
    parser.add_argument(
        "--save-model",
        type=Path,
        help="Only save the model (bf16, as Qwen2.5 stores it) and its "
        "tokenizer to this directory, for `routed-grpo pairs activations --model DIR`, and exit.",
    )
    a = parser.parse_args()

    from routed_grpo.activations import encode_pair, pair_order, pooled_pair_activations
    from routed_grpo.adapter import attach_routed_adapter
    from routed_grpo.pairs import load_pairs
    from routed_grpo.utils import batched
    from routed_grpo.vact import unit_mean_difference

    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    pairs = load_pairs(a.pairs)[: a.limit or None]
    tokenizer = build_tokenizer(pairs, a.vocab)
    if a.save_model:
        build_model(torch.bfloat16).save_pretrained(a.save_model)
        tokenizer.save_pretrained(a.save_model)
        print(f"saved {a.save_model}: Qwen2.5-0.5B shape, random, bf16, tokenizer of {len(tokenizer)} tokens")
        return
    t0 = time.perf_counter()
    model = build_model(torch.float32)
    bf16 = None if a.no_bf16 else attach_routed_adapter(copy.deepcopy(model).to(torch.bfloat16), rank=8)
    adapter = attach_routed_adapter(model, rank=8, init_seed=0)
    print(
        f"model: Qwen2.5-0.5B shape, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, random "
        f"(built in {time.perf_counter() - t0:.0f} s); tokenizer: byte-level BPE of {len(tokenizer)} tokens trained "
        f"on the pairs, embedding {QWEN25_05B['vocab_size']} rows; {len(pairs)} pairs; {threads} thread(s); "
        f"{len(adapter.module_names)} target modules, rank 8",
        flush=True,
    )

    n, prompts = len(pairs), [p.messages() for p in pairs]
    out: dict[str, dict[str, list]] = {k: {"hack": [None] * n, "clean": [None] * n} for k in ("old", "new", "bf16")}
    seconds = {"old": 0.0, "new": 0.0, "bf16": 0.0}

    def run_old(side: str, idx) -> None:  # one OLD batch: rows of one side, in file order
        acts, _ = old_pooled(
            adapter, tokenizer, [prompts[i] for i in idx], [getattr(pairs[i], side) for i in idx], batch_size=len(idx)
        )
        for j, i in enumerate(idx):
            out["old"][side][i] = acts[j]

    def run_new(name: str, handle, idx) -> None:  # one NEW batch, exactly as pooled_pair_activations batches them
        h, c = pooled_pair_activations(handle, tokenizer, [pairs[i] for i in idx], batch_size=len(idx))
        for j, i in enumerate(idx):
            out[name]["hack"][i], out[name]["clean"][i] = h[j], c[j]

    rows = [encode_pair(tokenizer, p) for p in pairs]  # (prompt, hack, clean) token ids
    old_jobs = [(side, idx) for side in ("hack", "clean") for idx in batched(range(n), a.batch_size)]
    new_jobs = list(batched(pair_order(rows), a.batch_size))
    per_new = len(old_jobs) / len(new_jobs)  # 2: OLD has twice NEW's batches; alternate so load hits both alike
    for k, idx in enumerate(new_jobs):
        for side, old_idx in old_jobs[round(k * per_new) : round((k + 1) * per_new)]:
            t0 = time.perf_counter()
            run_old(side, old_idx)
            seconds["old"] += time.perf_counter() - t0
        for name, handle in (("new", adapter), ("bf16", bf16)):
            if handle is not None:
                t0 = time.perf_counter()
                run_new(name, handle, idx)
                seconds[name] += time.perf_counter() - t0
        print(
            f"slot {k + 1}/{len(new_jobs)}: " + ", ".join(f"{key} {v:.0f} s" for key, v in seconds.items()), flush=True
        )

    v = {
        k: unit_mean_difference(torch.stack(d["hack"]), torch.stack(d["clean"]))
        for k, d in out.items()
        if d["hack"][0] is not None
    }  # (M, r) each
    cos = _cosines(v["old"], v["new"])
    diff = max((torch.stack(out["old"][s]) - torch.stack(out["new"][s])).abs().max().item() for s in ("hack", "clean"))
    counts = token_counts(tokenizer, pairs, a.batch_size)
    side_index = {"hack": 1, "clean": 2}
    old_padded = sum(
        len(idx) * max(len(rows[i][0]) + len(rows[i][side_index[side]]) for i in idx) for side, idx in old_jobs
    )
    worst = int(cos.argmin())
    print(
        f"tokens: {counts['real_rollout_tokens']} real in the {2 * n} rollouts; OLD ran {old_padded} (every rollout "
        f"whole, padded, LM head too); NEW ran {counts['new_processed_tokens']} (padding included)"
    )
    print(
        f"time, float32: OLD {seconds['old']:.1f} s, NEW {seconds['new']:.1f} s -> NEW is "
        f"{seconds['old'] / seconds['new']:.2f}x faster"
    )
    print(
        f"v_act cosine OLD vs NEW per module (float32): min {cos.min():.10f} ({adapter.module_names[worst]}), "
        f"mean {cos.mean():.10f}; max |pooled activation difference| {diff:.2e}"
    )
    record = {
        "benchmark": "vact_extract",
        "model": "qwen2.5-0.5b-shape-random",
        "n_pairs": n,
        "threads": threads,
        "batch_size": a.batch_size,
        "tokenizer_vocab": len(tokenizer),
        "old_s": round(seconds["old"], 2),
        "new_s": round(seconds["new"], 2),
        "ratio": round(seconds["old"] / seconds["new"], 3),
        "cos_min": float(cos.min()),
        "cos_mean": float(cos.mean()),
        "max_abs_act_diff": diff,
        "old_padded_tokens": old_padded,
        **counts,
    }
    if bf16 is not None:
        cos16 = _cosines(v["old"], v["bf16"])
        print(
            f"NEW in bf16 (what `--dtype auto` runs on a bf16 checkpoint such as Qwen2.5): "
            f"{seconds['bf16']:.1f} s -> {seconds['old'] / seconds['bf16']:.2f}x faster than OLD in "
            f"float32; v_act cosine with OLD's: min {cos16.min():.6f}, mean {cos16.mean():.6f}"
        )
        record.update(
            {
                "new_bf16_s": round(seconds["bf16"], 2),
                "ratio_bf16": round(seconds["old"] / seconds["bf16"], 3),
                "cos_min_bf16": float(cos16.min()),
                "cos_mean_bf16": float(cos16.mean()),
            }
        )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
