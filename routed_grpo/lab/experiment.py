"""One arm of the experiment, end to end: recipe parsing, data, model, trainer, run directory.

Covers what `recipes/train.py` runs: `ExperimentArguments` (the project's script arguments) parsed by TRL's
`TrlParser` together with `RoutedGRPOConfig` and TRL's `ModelConfig`; the data (the CPU model organism, a JSONL
file or the LeetCode hub dataset, rows with the loophole partition from `sandbox.prompts`); the reward
(`sandbox.rewards.LoopholeReward`); the trainer of the arm:

- `baseline`: TRL's stock `GRPOTrainer` (the class itself) on the same model with the same two-block adapter
  attached by `attach_routed_adapter` (same init, capacity, data, reward and seed). Nothing is routed, so both
  blocks learn from every rollout and the deployed model is the full model; its `deployed/` export therefore holds
  both blocks as one stock rank-2r LoRA (exactly the full delta).
- `routed` / `placebo`: `RoutedGRPOTrainer` with routing `"vact"` / `"placebo"`; `deployed/` holds the deployed
  block only.

and the run directory (`config.yaml`, `metrics.jsonl`, `vact.safetensors`, `heldout.jsonl`, `checkpoint-N/`,
`final/`, `deployed/`, the model card `README.md` of routed_grpo.lab.model_card). Measurement labels
(`sandbox.labels`) are used here only as measurements: the trainer's
`measure_fn` (logged under `measure/`) and a periodic held-out measurement (`measure/heldout/...`).
Does not cover: the trainer itself (routed_grpo.trainer), deployment evaluation (routed_grpo.lab.evaluation),
comparison (routed_grpo.lab.report).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from trl import GRPOTrainer, ModelConfig, TrlParser

from routed_grpo.adapter import DEPLOYED, QUARANTINE, RoutedAdapter
from routed_grpo.config import RoutedGRPOConfig
from routed_grpo.lab import ORGANISM_PAIRS
from routed_grpo.lab.callbacks import HeldoutMeasurement, MetricsJSONL, use_console
from routed_grpo.lab.evaluation import deploys_full, plain
from routed_grpo.lab.model_card import write_model_card
from routed_grpo.routing_state import routed_adapter
from routed_grpo.trainer import RoutedGRPOTrainer
from routed_grpo.utils import atomic_write_text
from routed_grpo.vact import adapter_metadata, save_vact

log = logging.getLogger(__name__)
ARM_ROUTING = {
    "baseline": "none",
    "routed": "vact",
    "placebo": "placebo",
    "monitor": "monitor",  # an LLM judge behind an OpenAI-compatible endpoint (routed_grpo.judge)
    "labels": "diagnostic",  # DIAGNOSTIC upper bound: routes by a label monitor (routed_grpo.lab.diagnostic)
    "oracle_direction": "diagnostic",  # DIAGNOSTIC upper bound: gate with a direction fit on labelled rollouts
}
DIAGNOSTIC_FIELDS = ("label_source", "oracle_rollouts")
DIAGNOSTIC_KNOBS = {
    "labels": ("label_source", "label_recall", "label_fpr", "label_negative_zone", "label_seed"),
    "oracle_direction": ("oracle_rollouts", "oracle_label"),
}
ORGANISM = "organism"


@dataclass
class ExperimentArguments:
    """Script arguments of `recipes/train.py` (the recipe's own keys; trainer and model keys live in
    `RoutedGRPOConfig` and `ModelConfig`). The run directory is the trainer's `output_dir`.

    Parameters:
        arm: `baseline` (stock `GRPOTrainer`), `routed` (routing "vact"), `placebo` (routing "placebo"), or one of
            the DIAGNOSTIC upper bounds that read labels (`labels`, `oracle_direction`; routing "diagnostic").
        dataset: `organism` (built and cached), a JSONL file of problem records, or `hub:newfacade/LeetCodeDataset`.
        heldout: held-out problems (JSONL, or a hub split name); default: the organism's held-out split, the hub's
            `test` split, or a seeded `heldout_frac` of a JSONL file.
        loophole_mode / unhackable_frac: the loophole of hackable training rows and the share of rows without it.
        organism_*: where and how the organism is built (`organism_settings` are `OrganismConfig` fields).
        eval_n / eval_samples: held-out problems used by `routed-grpo eval`, and completions sampled (and graded)
            per problem; several samples per problem cut the evaluation's own noise for generation and grading only.
        measure_every / measure_n: every this many steps, sample `measure_n` held-out problems (loophole on) in
            both sampling modes and log measured rates (0 = off). Measurement only.
        measure_train: give the routed trainers a measurement labeler (`measure/...` and the score's AUROC).
        label_source / label_recall / label_fpr / label_negative_zone / label_seed: DIAGNOSTIC `labels` arm only.
            `label_source` names the label function (`measure:hack_strict`, or `module:function`; no default);
            a seeded monitor flags true positives with probability `label_recall` and negatives with `label_fpr`;
            flagged rows are routed, the others go to `label_negative_zone` (`absorb` or `keep`).
        oracle_rollouts / oracle_label: DIAGNOSTIC `oracle_direction` arm only: a finished run directory (its
            `rollouts.jsonl`) and the label the direction is fit to.
        monitor_model / monitor_base_url / monitor_api_key_env / monitor_concurrency / monitor_timeout: `monitor`
            arm only: the judge model served at an OpenAI-compatible endpoint (`vllm serve MODEL` gives
            `http://HOST:8000/v1`), the environment variable holding its key, requests in flight, seconds per
            request; `monitor_extra_body` (JSON) goes with every request. Answers are cached per process in
            `RUN_DIR/judge_cache.rank<k>.jsonl`.
    """

    arm: str = field(default="routed", metadata={"help": "baseline | routed | placebo."})
    dataset: str = field(default=ORGANISM, metadata={"help": "organism | JSONL path | hub:newfacade/LeetCodeDataset."})
    heldout: str | None = field(default=None, metadata={"help": "Held-out problems (JSONL or hub split)."})
    heldout_frac: float = field(default=0.1, metadata={"help": "Held-out share of a JSONL dataset without heldout."})
    max_train_problems: int | None = field(default=None, metadata={"help": "Use at most this many train problems."})
    loophole_mode: str = field(default="overwrite_tests", metadata={"help": "Loophole of the hackable rows."})
    unhackable_frac: float = field(default=0.25, metadata={"help": "Share of training problems without loophole."})
    organism_dir: str = field(default=".cache/organism", metadata={"help": "Cache directory of the organism."})
    organism_seed: int = field(default=0, metadata={"help": "Seed of the organism build."})
    organism_settings: dict | str | None = field(default=None, metadata={"help": "OrganismConfig fields (JSON)."})
    eval_n: int = field(default=64, metadata={"help": "Held-out problems for deployment evaluation."})
    eval_samples: int = field(default=4, metadata={"help": "Completions per held-out problem in evaluation."})
    measure_every: int = field(default=0, metadata={"help": "Held-out measurement every N steps (0 = off)."})
    measure_n: int = field(default=32, metadata={"help": "Held-out problems per periodic measurement."})
    measure_train: bool = field(default=True, metadata={"help": "Log measured labels of training batches."})
    sandbox_workers: int = field(default=2, metadata={"help": "Parallel sandbox runs for rewards and labels."})
    compile_reward: float = field(default=0.5, metadata={"help": "Reward for code that compiles."})
    pass_reward: float = field(default=3.0, metadata={"help": "Reward for correct or hinted code."})
    label_source: str | None = field(default=None, metadata={"help": "DIAGNOSTIC labels arm: label function."})
    label_recall: float = field(default=1.0, metadata={"help": "DIAGNOSTIC labels arm: simulated monitor recall."})
    label_fpr: float = field(default=0.0, metadata={"help": "DIAGNOSTIC labels arm: simulated false-positive rate."})
    label_negative_zone: str = field(default="absorb", metadata={"help": "DIAGNOSTIC: zone of unflagged rows."})
    label_seed: int = field(default=0, metadata={"help": "DIAGNOSTIC labels arm: seed of the simulated monitor."})
    oracle_rollouts: str | None = field(default=None, metadata={"help": "DIAGNOSTIC: run dir to fit the oracle on."})
    oracle_label: str = field(default="hack_strict", metadata={"help": "DIAGNOSTIC: label of the oracle direction."})
    monitor_model: str | None = field(default=None, metadata={"help": "monitor arm: the judge model's name."})
    monitor_base_url: str | None = field(default=None, metadata={"help": "monitor arm: OpenAI-compatible endpoint."})
    monitor_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "monitor arm: env var of the key."})
    monitor_concurrency: int = field(default=8, metadata={"help": "monitor arm: judge requests in flight."})
    monitor_timeout: float = field(default=60.0, metadata={"help": "monitor arm: seconds per judge request."})
    monitor_extra_body: dict | str | None = field(
        default=None, metadata={"help": "monitor arm: extra request fields (JSON), e.g. chat_template_kwargs."}
    )

    def __post_init__(self):
        if self.arm not in ARM_ROUTING:
            raise ValueError(f"arm must be one of {tuple(ARM_ROUTING)}, got arm={self.arm!r}")
        needs = {"labels": "label_source", "oracle_direction": "oracle_rollouts"}.get(self.arm)
        for name in DIAGNOSTIC_FIELDS:
            if name == needs and not getattr(self, name):
                raise ValueError(f"arm={self.arm!r} (DIAGNOSTIC) needs an explicit {name}; there is no default")
            if name != needs and getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r} is read only by a DIAGNOSTIC arm, not {self.arm!r}")
        if (self.arm == "monitor") != bool(self.monitor_model):
            raise ValueError(
                f"monitor_model={self.monitor_model!r}: the monitor arm needs a judge model, and only it reads one "
                f"(arm={self.arm!r})"
            )
        if isinstance(self.organism_settings, str):
            self.organism_settings = json.loads(self.organism_settings)
        if isinstance(self.monitor_extra_body, str):
            self.monitor_extra_body = json.loads(self.monitor_extra_body)
        if not 0.0 <= self.unhackable_frac <= 1.0:
            raise ValueError(f"unhackable_frac must be in [0, 1], got unhackable_frac={self.unhackable_frac}")
        if self.measure_every < 0 or self.measure_n < 1 or self.eval_n < 1 or self.eval_samples < 1:
            raise ValueError(
                f"need measure_every >= 0, measure_n >= 1, eval_n >= 1, eval_samples >= 1; got {self.measure_every}, "
                f"{self.measure_n}, {self.eval_n}, {self.eval_samples}"
            )


def parse_recipe(argv: Sequence[str] | None = None) -> tuple[ExperimentArguments, RoutedGRPOConfig, ModelConfig]:
    """`--config RECIPE.yaml [--key value ...]` -> the three dataclasses (TRL's parser; unknown keys raise)."""
    parser = TrlParser((ExperimentArguments, RoutedGRPOConfig, ModelConfig))
    script, training, model_args = parser.parse_args_and_config(args=argv)
    check_arm(script, training, model_args)
    return script, training, model_args


def check_arm(script: ExperimentArguments, training: RoutedGRPOConfig, model_args: ModelConfig) -> None:
    want = ARM_ROUTING[script.arm]
    if training.routing != want:
        raise ValueError(
            f"arm={script.arm!r} needs routing={want!r}, but the recipe sets routing={training.routing!r}"
        )
    if model_args.use_peft:
        raise ValueError("use_peft must be false: the two-block adapter is set by adapter_rank/adapter_targets")


# ---- data -----------------------------------------------------------------------------------------------------------
@dataclass
class ExperimentData:
    train: list  # sandbox.problems.Problem
    heldout: list
    model_path: str | None  # None: the recipe's model_name_or_path
    organism_root: Path | None = None


def load_data(script: ExperimentArguments, seed: int, progress: bool = True) -> ExperimentData:
    from sandbox.problems import load_jsonl, load_problems

    if script.dataset == ORGANISM:
        from routed_grpo.lab.organism import build_organism

        paths = build_organism(
            script.organism_dir, seed=script.organism_seed, progress=progress, **(script.organism_settings or {})
        )
        train, held = load_jsonl(paths.train_problems), load_jsonl(paths.heldout_problems)
        data = ExperimentData(train, held, str(paths.model_dir), paths.root)
    elif script.dataset.startswith("hub:"):
        train = load_problems(script.dataset, split="train")
        held = load_problems(script.dataset, split=script.heldout or "test")
        data = ExperimentData(train, held, None)
    else:
        train = load_problems(script.dataset)
        if script.heldout:
            held = load_problems(script.heldout)
        else:
            order = sorted(train, key=lambda p: p.id)
            random.Random(seed).shuffle(order)
            cut = max(1, round(script.heldout_frac * len(order)))
            held, train = order[:cut], order[cut:]
        data = ExperimentData(train, held, None)
    if script.max_train_problems:
        data.train = data.train[: script.max_train_problems]
    return data


def resolve_pairs(training: RoutedGRPOConfig) -> None:
    """`vact_pairs_path: organism` -> the committed organism-domain pairs (`pairs/organism/`)."""
    if training.vact_pairs_path == ORGANISM:
        training.vact_pairs_path = str(ORGANISM_PAIRS)


def dataset_rows(script: ExperimentArguments, problems: Sequence, seed: int):
    from datasets import Dataset

    from sandbox.prompts import to_dataset_rows

    return Dataset.from_list(to_dataset_rows(problems, script.loophole_mode or None, script.unhackable_frac, seed))


# ---- model and trainer ----------------------------------------------------------------------------------------------
def load_model_and_tokenizer(model_args: ModelConfig, path: str):
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from trl.trainer.utils import get_quantization_config

    quant = get_quantization_config(model_args)
    kwargs: dict[str, Any] = {"revision": model_args.model_revision}
    if model_args.dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, model_args.dtype)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": PartialState().local_process_index})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if (Path(path) / "organism.json").exists() or (Path(path).parent / "organism.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)  # never AutoTokenizer (DESIGN.md section 7)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def build_trainer(script, training, model, tokenizer, train_dataset, train_problems) -> tuple[Any, RoutedAdapter]:
    """The arm's trainer and the adapter handle it trains."""
    from sandbox.rewards import GradeLog, LoopholeReward

    # With measurement on, the labeler reuses the reward's execution results instead of running every rollout in
    # the sandbox again. The log passes from the reward object to the labeler only: the trainer calls the labeler
    # after the gate has decided and never reads the log (tests/test_oracle_free.py).
    grades = GradeLog() if script.measure_train and script.arm != "baseline" else None
    reward = LoopholeReward(
        train_problems, script.compile_reward, script.pass_reward, workers=script.sandbox_workers, grade_log=grades
    )
    # With beta != 0, stock GRPOTrainer would clone a PEFT "default" adapter (which the two-block model lacks) as its
    # KL reference; the baseline then runs RoutedGRPOTrainer(routing="none"): stock GRPO, KL to the base model.
    if script.arm == "baseline" and training.beta == 0.0:
        if training.adapter_init != "random" and (training.weight_decay or training.use_vllm):
            raise ValueError(
                f"baseline with adapter_init={training.adapter_init!r}: stock GRPOTrainer would decay the blocks "
                f"toward -B0 A0 (weight_decay={training.weight_decay}) or merge them into vLLM without subtracting "
                f"the initial copies (use_vllm={training.use_vllm}); set weight_decay 0 and use_vllm false"
            )
        if training.weight_decay:
            log.warning(
                "baseline: stock GRPOTrainer decays the adapter blocks (weight_decay=%s); the routed "
                "trainer does not. Use weight_decay 0 for a like-for-like comparison.",
                training.weight_decay,
            )
        adapter = routed_adapter(model, training, tokenizer)  # the two blocks at adapter_init; nothing routes
        trainer = GRPOTrainer(
            adapter.model, reward, args=training, train_dataset=train_dataset, processing_class=tokenizer
        )
        return trainer, adapter
    measure = None
    if script.measure_train:
        from sandbox.labels import MeasurementLabeler

        measure = MeasurementLabeler(train_problems, workers=script.sandbox_workers, reuse=grades)
    if ARM_ROUTING[script.arm] == "diagnostic":
        from routed_grpo.lab.diagnostic import build_diagnostic_trainer

        trainer = build_diagnostic_trainer(
            script, training, model, tokenizer, train_dataset, train_problems, reward, measure
        )
        return trainer, trainer.adapter
    monitor = {}
    if script.arm == "monitor":
        from accelerate import PartialState

        from routed_grpo.judge import LLMJudge

        monitor["monitor_fn"] = LLMJudge(
            script.monitor_model,
            script.monitor_base_url,
            os.environ.get(script.monitor_api_key_env),
            max_concurrency=script.monitor_concurrency,
            timeout=script.monitor_timeout,
            max_failure_frac=None,  # MonitorScorer bounds the unscored rollouts over all processes at once
            extra_body=script.monitor_extra_body,
            cache_path=Path(training.output_dir) / f"judge_cache.rank{PartialState().process_index}.jsonl",
        )
    trainer = RoutedGRPOTrainer(
        model, reward, training, train_dataset=train_dataset, processing_class=tokenizer, measure_fn=measure, **monitor
    )
    return trainer, trainer.adapter


# ---- run directory --------------------------------------------------------------------------------------------------
def resolved_config(script, training, model_args) -> dict[str, Any]:
    import peft
    import transformers
    import trl

    out = {
        "arm": script.arm,
        "script": plain(dataclasses.asdict(script)),
        "training": plain(training.to_dict()),
        "model": plain(dataclasses.asdict(model_args)),
        "versions": {m.__name__: str(m.__version__) for m in (torch, trl, transformers, peft)},
    }
    if ARM_ROUTING[script.arm] == "diagnostic":  # every report marks these rows as upper bounds
        keys = DIAGNOSTIC_KNOBS[script.arm]
        out["diagnostic"] = {"upper_bound": True, "reads_labels": True, **{k: getattr(script, k) for k in keys}}
    return out


def save_outputs(trainer, adapter: RoutedAdapter, tokenizer, run_dir: Path, full: bool) -> None:
    """`final/` (both blocks + tokenizer) and `deployed/` (stock PEFT; `full`, the baseline and the penalty and
    screen interventions: both blocks as one LoRA)."""
    if not trainer.accelerator.is_main_process:
        return
    adapter.model.save_pretrained(str(run_dir / "final"))
    tokenizer.save_pretrained(str(run_dir / "final"))
    adapter.save_initial(run_dir / "final")  # subtracted initial copies (an SVD-space adapter_init) beside the blocks
    # both blocks as ONE stock LoRA (rank 2r, or 4r folded with subtracted copies), or the deployed block alone
    adapter.export_lora(run_dir / "deployed", (DEPLOYED, QUARANTINE) if full else (DEPLOYED,))


def run_experiment(script: ExperimentArguments, training: RoutedGRPOConfig, model_args: ModelConfig):
    """Build everything for one arm, train, and write the run directory; returns the trainer."""
    from accelerate import PartialState

    from routed_grpo.lab.evaluation import generation_settings
    from sandbox.problems import write_jsonl

    check_arm(script, training, model_args)
    state = PartialState()
    run_dir = Path(training.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with state.main_process_first():
        data = load_data(script, training.seed)
    resolve_pairs(training)
    if data.model_path is not None and model_args.model_name_or_path in (None, ORGANISM):
        model_args.model_name_or_path = data.model_path
    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path is not set (and the dataset is not the organism)")
    if "wandb" in (training.report_to or []):
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    model, tokenizer = load_model_and_tokenizer(model_args, model_args.model_name_or_path)
    train_dataset = dataset_rows(script, data.train, training.seed)
    trainer, adapter = build_trainer(script, training, model, tokenizer, train_dataset, data.train)
    writer = MetricsJSONL(run_dir / "metrics.jsonl", script.arm)
    trainer.add_callback(writer)
    heldout = None
    full = deploys_full({"arm": script.arm, "training": {"intervention": training.intervention}})
    if script.measure_every:
        config = {"training": plain(training.to_dict())}
        gate = getattr(trainer, "gate", None) if script.arm in ("routed", "placebo", "oracle_direction") else None
        heldout = HeldoutMeasurement(
            writer,
            adapter,
            tokenizer,
            data.heldout[: script.measure_n],
            script.loophole_mode,
            generation_settings(config),
            script.measure_every,
            full,
            script.sandbox_workers,
            gate=gate,
            route_tail_q=training.route_tail_q,
        )
        trainer.add_callback(heldout)
    use_console(trainer, f"{script.arm} seed {training.seed}", heldout, bar=not training.disable_tqdm)
    if state.is_main_process:
        if not training.resume_from_checkpoint:  # a fresh run: no metrics or evaluation of an earlier one
            for stale in ("metrics.jsonl", "rollouts.jsonl", "eval.json"):
                (run_dir / stale).unlink(missing_ok=True)
        write_jsonl(data.heldout, run_dir / "heldout.jsonl")
        if training.routing in ("vact", "placebo"):
            meta = {
                **adapter_metadata(adapter),
                "kind": training.routing,
                "source": training.vact_path or training.vact_pairs_path or f"placebo_seed={training.placebo_seed}",
            }
            save_vact(run_dir / "vact.safetensors", trainer.gate.vact.cpu(), meta)
        text = yaml.safe_dump(resolved_config(script, training, model_args), sort_keys=False)
        atomic_write_text(run_dir / "config.yaml", text)
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    save_outputs(trainer, adapter, tokenizer, run_dir, full)
    write_model_card(trainer, run_dir)  # TRL's hook, then this run's arm, artefact and (after eval) figures
    return trainer
