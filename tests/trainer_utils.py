"""Helpers for the trainer tests: a tiny dataset, a reward, and trainer factories with shrunk settings."""

import torch
from conftest import make_model, make_tokenizer
from datasets import Dataset

from routed_grpo.adapter import DEPLOYED, QUARANTINE
from routed_grpo.config import RoutedGRPOConfig
from routed_grpo.trainer import RoutedGRPOTrainer

TOKENIZER = make_tokenizer()


def dataset(n: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"write code {i}"}], "k": i} for i in range(n)])


def reward_len(prompts, completions, **kw) -> list[float]:
    """A deterministic toy reward with spread within each group."""
    return [float(len(c[0]["content"]) % 7) for c in completions]


def config(tmp_path, **overrides) -> RoutedGRPOConfig:
    kw = dict(
        output_dir=str(tmp_path / "out"),
        routing="placebo",
        per_device_train_batch_size=8,  # 2 prompts x 4 generations per step
        num_generations=4,
        max_completion_length=10,  # tiny completions keep a step well under a second
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        adapter_rank=4,
        save_strategy="no",
        seed=0,
        data_seed=0,
    )
    kw.update(overrides)
    return RoutedGRPOConfig(**kw)


def trainer(tmp_path, model=None, measure_fn=None, **overrides) -> RoutedGRPOTrainer:
    model = model if model is not None else make_model(len(TOKENIZER))
    args = config(tmp_path, **overrides)
    return RoutedGRPOTrainer(
        model=model,
        reward_funcs=reward_len,
        args=args,
        train_dataset=dataset(),
        processing_class=TOKENIZER,
        measure_fn=measure_fn,
    )


def perturb_quarantine(adapter, seed: int = 0, scale: float = 0.5) -> None:
    """Make the quarantine block contribute, so deploy-mode and full-mode policies differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters(QUARANTINE):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def snapshot(adapter, block: str) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in adapter.parameters(block)])


__all__ = ["DEPLOYED", "QUARANTINE", "TOKENIZER", "config", "dataset", "perturb_quarantine", "reward_len", "snapshot"]


def finish_worker(path, record: dict) -> None:
    """End of a multi-process test worker: write this rank's `record` as JSON, wait for every rank, and leave without
    interpreter shutdown (under pytest the gloo workers were seen to hang at exit, after this point, on some runs;
    cause not found). What the test checks is all written before."""
    import json
    import os
    import sys

    path.write_text(json.dumps(record))
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
