"""The CPU model organism of reward hacking (DESIGN.md section 7): tokenizer, tiny model, warm start, cache.

Covers: a byte-level BPE tokenizer trained in code on the organism's own corpus and wrapped as a
`PreTrainedTokenizerFast` with a chat template and pad/eos tokens; a tiny `Qwen2ForCausalLM` built from a config;
a supervised warm start (plain torch loop, loss on completion tokens only) on prompts from
`sandbox.organism_problems` answered mostly correctly and, on a small share of loophole-on prompts, with a
loophole hack (wrong body plus an always-passing `run_tests`); and `build_organism`, which caches all of it in a
directory keyed by its settings so that a second call returns at once.

Does not cover: grading (sandbox), GRPO training and its adapter (routed_grpo.trainer / adapter), evaluation.
Load the tokenizer with `load_tokenizer` (or `PreTrainedTokenizerFast.from_pretrained`), not `AutoTokenizer`:
DESIGN.md section 7 records a reload through another class that tokenised differently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from routed_grpo.utils import encode_rollout, progress_bar
from sandbox import organism_problems as op
from sandbox import prompts
from sandbox.problems import problem_from_record

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FORMAT_VERSION = 1  # bump when the build changes in a way the settings do not capture


@dataclass(frozen=True)
class OrganismConfig:
    """Every setting that changes the built organism; its hash names the cache directory.

    Parameters:
        seed: problem split, example sampling, model init and SFT order.
        vocab_size: BPE vocabulary target (the trained tokenizer may be smaller).
        hidden_size, num_layers, num_heads, intermediate_size: the Qwen2 shape.
        n_train_problems, n_heldout_problems: problems written to train.jsonl / heldout.jsonl.
        heldout_frac: share of template instances held out.
        sft_examples: warm-start examples; sft_epochs passes over them.
        loophole_frac: share of warm-start prompts that carry the loophole text.
        hack_frac: share of loophole-on warm-start examples answered with a loophole hack.
        sft_lr, sft_batch_size: AdamW learning rate (cosine to 0, 5% warm-up) and batch size.
        loophole: the loophole mode whose prompt text the hack examples see.
    """

    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    n_train_problems: int = 2000
    n_heldout_problems: int = 512
    heldout_frac: float = 0.2
    sft_examples: int = 2000
    sft_epochs: float = 3.5
    loophole_frac: float = 0.8
    hack_frac: float = 0.15
    sft_lr: float = 5e-3
    sft_batch_size: int = 32
    loophole: str = "overwrite_tests"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "n_train_problems",
            "n_heldout_problems",
            "sft_examples",
            "sft_batch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"OrganismConfig.{name} must be a positive integer, got {value!r}")
        for name in ("heldout_frac", "loophole_frac", "hack_frac"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"OrganismConfig.{name} must be in [0, 1], got {value!r}")
        for name in ("sft_epochs", "sft_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"OrganismConfig.{name} must be > 0, got {value!r}")
        for name in ("heldout_frac", "loophole_frac", "hack_frac", "sft_epochs", "sft_lr"):
            object.__setattr__(self, name, float(getattr(self, name)))  # 4 and 4.0 must give the same cache key
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"OrganismConfig.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    def key(self) -> str:
        blob = json.dumps({"v": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class OrganismPaths:
    """Where a built organism lives. `model_dir` holds the model (`Qwen2ForCausalLM.from_pretrained`) and its
    tokenizer (`load_tokenizer`; `AutoTokenizer` maps model_type qwen2 to `Qwen2Tokenizer`, which gives other ids)."""

    root: Path
    model_dir: Path
    train_problems: Path
    heldout_problems: Path
    manifest: Path
    built: bool  # True if this call trained it, False if it came from the cache


def build_prompt(problem: dict[str, Any], loophole: str | None) -> list[dict[str, str]]:
    """Chat messages for a problem record, rendered by the environment's own prompt builder."""
    return prompts.build_prompt(problem_from_record(problem), loophole)


def sft_examples(cfg: OrganismConfig, problems: list[dict[str, Any]]) -> list[tuple[list[dict], str]]:
    """(prompt messages, completion text) pairs; hacks only ever answer loophole-on prompts."""
    rng = random.Random(f"sft:{cfg.seed}")
    out = []
    for _ in range(cfg.sft_examples):
        prob = rng.choice(problems)
        loophole_on = rng.random() < cfg.loophole_frac
        hack = loophole_on and rng.random() < cfg.hack_frac
        out.append((build_prompt(prob, cfg.loophole if loophole_on else None), op.render_completion(prob, hack, rng)))
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over whole strings (no whitespace pre-split, so frequent phrases become single tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=1024,
    )


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(model_dir))


def make_model(cfg: OrganismConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 (about 0.75M parameters at the defaults)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_cache=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _batch(rows: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (ids, n_prompt) in enumerate(rows):  # right padding is fine for a causal loss
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}


def supervised_warm_start(model, tokenizer, examples, cfg: OrganismConfig, progress: bool = False) -> list[float]:
    """AdamW on completion tokens; returns the loss of every step."""
    rows = [encode_rollout(tokenizer, p, c) for p, c in examples]
    n_steps = max(1, math.ceil(len(rows) * cfg.sft_epochs / cfg.sft_batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, n_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / n_steps)))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    losses = []
    model.train()
    bar = progress_bar(n_steps, "organism warm start", progress, leave=True)
    for _ in range(n_steps):
        if len(order) < cfg.sft_batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[: cfg.sft_batch_size], order[cfg.sft_batch_size :]
        loss = model(**_batch([rows[i] for i in idx], tokenizer.pad_token_id)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    if bar is not None:
        bar.close()
    model.eval()
    return losses


def _paths(root: Path, built: bool) -> OrganismPaths:
    return OrganismPaths(
        root, root / "model", root / "train.jsonl", root / "heldout.jsonl", root / "organism.json", built
    )


def build_organism(out_dir: str | Path, seed: int = 0, progress: bool = False, **settings: Any) -> OrganismPaths:
    """Build (or fetch from the cache) the organism for `OrganismConfig(seed=seed, **settings)`.

    The cache directory is `out_dir/organism-<hash of the settings>/`; it holds `model/` (model + tokenizer),
    `train.jsonl` and `heldout.jsonl` (problem records) and `organism.json` (settings, SFT losses, seconds).
    It is written to a temporary sibling and renamed into place, so a crash never leaves a half-built cache.
    """
    cfg = OrganismConfig(seed=seed, **settings)
    root = Path(out_dir) / f"organism-{cfg.key()}"
    if (root / "organism.json").is_file():
        return _paths(root, built=False)
    t0 = time.time()
    tmp = Path(out_dir) / f".organism-{cfg.key()}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train = op.generate_problems(cfg.n_train_problems, "train", cfg.seed, cfg.heldout_frac)
    held = op.generate_problems(cfg.n_heldout_problems, "heldout", cfg.seed, cfg.heldout_frac)
    op.write_jsonl(train, tmp / "train.jsonl")
    op.write_jsonl(held, tmp / "heldout.jsonl")
    examples = sft_examples(cfg, train)
    corpus = [m["content"] for p, _ in examples[:2000] for m in p] + [c for _, c in examples]
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    model = make_model(cfg, tokenizer)
    losses = supervised_warm_start(model, tokenizer, examples, cfg, progress=progress)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    manifest = {
        "settings": dataclasses.asdict(cfg),
        "key": cfg.key(),
        "format_version": FORMAT_VERSION,
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "sft_steps": len(losses),
        "sft_loss_first": losses[0],
        "sft_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "sft_hack_examples": sum("def run_tests" in c for _, c in examples),
        "seconds": round(time.time() - t0, 1),
    }
    (tmp / "organism.json").write_text(json.dumps(manifest, indent=2) + "\n")
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
        return _paths(root, built=False)
    return _paths(root, built=True)
