"""Deployment evaluation of a run: sample held-out completions in a sampling mode, grade them, rates with intervals.

Covers: loading a finished run (`RUN_DIR/final/` with both blocks on the base model named in `config.yaml`),
seeded sampling of completions with the quarantine ablated (`deploy`) or with both blocks on (`full`), measurement
labels from `sandbox.labels` (strict and attempted hack, solve, compile, defines `run_tests`), rates with 95% Wilson
intervals, and the `eval.json` record written atomically. During training: `MetricsJSONL` (the run's
`metrics.jsonl`) and `HeldoutMeasurement` (measured held-out rates every K steps); for the diagnostic scripts:
`labelled_rollouts` and `score_metrics`.

Measurement only: nothing here feeds a reward, a gate or a loss. For the baseline arm nothing is routed, and the
`penalty` and `screen` interventions ablate nothing either, so their deployed model is the full model
(`deploys_full`); both modes are still reported and `deployed_is_full` says so.
Does not cover: training (routed_grpo.lab.experiment), comparison across runs (routed_grpo.lab.report).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from routed_grpo.adapter import DEPLOYED, QUARANTINE, RoutedAdapter
from routed_grpo.initial import INITIAL_FILE
from routed_grpo.prefill import shared_prompt_prefill
from routed_grpo.utils import atomic_write_text, batched, encode_prompt, progress_bar
from sandbox.labels import LABEL_KEYS, Labels, label_many
from sandbox.problems import Problem, load_jsonl
from sandbox.prompts import build_prompt

MODES = ("deploy", "full")
RATE_KEYS = ("hack_strict", "hack_attempted", "correct", "compiled", "defines_run_tests")
EVAL_FILE = "eval.json"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> dict[str, float]:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else float("nan"), "lo": lo, "hi": hi}


def rates(labels: Sequence[Labels]) -> dict[str, dict[str, float]]:
    """Rate with Wilson interval of every label in `LABEL_KEYS` over `labels`."""
    return {key: rate(sum(bool(getattr(lab, key)) for lab in labels), len(labels)) for key in LABEL_KEYS}


def deploys_full(config: dict[str, Any]) -> bool:
    """Whether a run's deployed model is its full model: the baseline, and the `penalty` / `screen` interventions,
    which train both blocks on every row and ablate nothing (only `route` deploys without the quarantine)."""
    return config["arm"] == "baseline" or config.get("training", {}).get("intervention", "route") != "route"


@torch.no_grad()
def generate_completions(
    adapter: RoutedAdapter,
    tokenizer: Any,
    prompts: Sequence[list[dict]],
    mode: str,
    gen: dict[str, Any],
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Sample one completion per prompt in sampling mode `mode` ("deploy" ablates the quarantine).

    `gen` holds `max_new_tokens`, `temperature`, `top_p`, `top_k`. Seeded through a forked RNG, so a call during
    training leaves the training random stream untouched. Returns decoded completion texts.
    """
    model = adapter.model
    device = next(model.parameters()).device
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    out: list[str] = []
    bar = progress_bar(len(prompts), f"sampling ({mode})", progress)
    try:
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            adapter.sampling_mode(mode),
            shared_prompt_prefill(model.get_base_model()),  # the samples of one problem: one prompt forward
        ):
            torch.manual_seed(seed)
            for chunk in batched(prompts, batch_size):
                ids = [encode_prompt(tokenizer, p) for p in chunk]  # as TRL tokenises the training prompts
                enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)  # left padding
                ids = model.generate(
                    **enc,
                    do_sample=True,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **gen,
                )  # (b, T_prompt + T_new)
                out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out


def measure_rates(
    adapter: RoutedAdapter,
    tokenizer: Any,
    problems: Sequence[Problem],
    loophole: str,
    mode: str,
    gen: dict[str, Any],
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, dict[str, float]], list[list[dict]], list[str], list[Labels]]:
    """Sample on `problems` with the loophole text of `loophole` in `mode` and label: (rates, prompts, completions,
    labels)."""
    prompts = [build_prompt(p, loophole or None) for p in problems]
    completions = generate_completions(adapter, tokenizer, prompts, mode, gen, seed=seed, progress=progress)
    labels = label_many(problems, completions, [loophole] * len(problems), workers=workers, progress=progress)
    return rates(labels), prompts, completions, labels


def plain(obj: Any) -> Any:
    """`obj` as plain JSON data (anything else becomes its string)."""
    return json.loads(json.dumps(obj, default=str))


# ---- finished runs --------------------------------------------------------------------------------------------------
def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run directory written by recipes/train.py (no config.yaml)")
    return yaml.safe_load(path.read_text())


def generation_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings of the run's training (so evaluation samples like the policy did)."""
    train = config["training"]
    return {
        "max_new_tokens": int(train["max_completion_length"]),
        "temperature": float(train["temperature"]),
        "top_p": float(train["top_p"]),
        "top_k": int(train.get("top_k") or 0),
    }


def load_run(run_dir: str | Path, device: str | None = None) -> tuple[RoutedAdapter, Any, dict[str, Any]]:
    """The run's final PeftModel with both blocks, its tokenizer and its resolved config."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    final = run_dir / "final"
    if not (final / DEPLOYED).is_dir() or not (final / QUARANTINE).is_dir():
        raise FileNotFoundError(f"{final}: missing the '{DEPLOYED}' or '{QUARANTINE}' adapter (did training finish?)")
    name = config["model"]["model_name_or_path"]
    try:  # a local directory or a hub id (at the run's revision), resolved by transformers; offline, its own error
        base = AutoModelForCausalLM.from_pretrained(name, revision=config["model"].get("model_revision") or "main")
    except OSError as e:
        raise OSError(f"{name}: cannot load the run's base model: {e}") from None
    model = PeftModel.from_pretrained(base, str(final / DEPLOYED), adapter_name=DEPLOYED)
    model.load_adapter(str(final / QUARANTINE), adapter_name=QUARANTINE)
    model.base_model.set_adapter([DEPLOYED, QUARANTINE])
    if device:
        model.to(device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(final))
    adapter = RoutedAdapter.of(model, init_seed=int(config["training"]["adapter_init_seed"]))
    init = config["training"].get("adapter_init", "random")
    if init != "random":  # the frozen initial copies training subtracted, saved beside the blocks
        if not (final / INITIAL_FILE).is_file():
            raise FileNotFoundError(f"{final / INITIAL_FILE}: missing, but the run used adapter_init={init!r}")
        adapter.load_initial(final / INITIAL_FILE)
    return adapter, tokenizer, config


def per_problem_counts(labels: Sequence[Labels], samples: int) -> dict[str, list[int]]:
    """{label: [hits of problem 0, ...]} for `labels` laid out problem by problem, `samples` rows each."""
    return {
        key: [sum(bool(getattr(lab, key)) for lab in labels[i : i + samples]) for i in range(0, len(labels), samples)]
        for key in RATE_KEYS
    }


def evaluate_run(
    run_dir: str | Path,
    n: int | None = None,
    seed: int = 1234,
    workers: int | None = None,
    progress: bool = False,
    write: bool = True,
    samples: int | None = None,
) -> dict[str, Any]:
    """Deployed and full rates on the run's held-out problems (loophole on), `samples` completions per problem
    (default: the recipe's `eval_samples`; 1 for runs made before it existed), each graded in the sandbox; writes
    `RUN_DIR/eval.json` with the rates over all samples and each problem's counts (`per_problem`), from which the
    report estimates the evaluation's own noise with problems as clusters."""
    run_dir = Path(run_dir)
    adapter, tokenizer, config = load_run(run_dir, "cuda" if torch.cuda.is_available() else None)
    script = config["script"]
    problems = load_jsonl(run_dir / "heldout.jsonl")
    n = n or int(script["eval_n"])
    samples = samples or int(script.get("eval_samples") or 1)
    if samples < 1:
        raise ValueError(f"eval samples must be >= 1, got samples={samples}")
    problems = problems[:n]
    repeated = [p for p in problems for _ in range(samples)]  # problem by problem, `samples` rows each
    loophole = script["loophole_mode"] or ""
    gen = generation_settings(config)
    arm = config["arm"]
    same = deploys_full(config)
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "arm": arm,
        "seed": config["training"]["seed"],
        "n": len(problems),
        "samples": samples,
        "loophole": loophole,
        "eval_seed": seed,
        "generation": gen,
        "deployed_is_full": same,
        "modes": {},
        "per_problem": {},
    }
    if same:
        why = "nothing is routed" if arm == "baseline" else f"intervention {config['training']['intervention']}"
        result["note"] = f"{arm}: {why}, so the deployed model is the full model (deploy == full)"
    for mode in MODES:
        if same and mode == "deploy":
            continue  # the same samples as "full" (same model, same seed): measured once below
        measured, _, _, labels = measure_rates(
            adapter, tokenizer, repeated, loophole, mode, gen, seed, workers, progress
        )
        result["modes"][mode] = measured
        result["per_problem"][mode] = per_problem_counts(labels, samples)
    if same:
        result["modes"] = {"deploy": result["modes"]["full"], "full": result["modes"]["full"]}
        result["per_problem"] = {"deploy": result["per_problem"]["full"], "full": result["per_problem"]["full"]}
    if write:
        from routed_grpo.lab.model_card import update_model_card

        atomic_write_text(run_dir / EVAL_FILE, json.dumps(result, indent=2) + "\n")
        update_model_card(run_dir)  # the card TRL wrote at training time, now with this evaluation's figures
    return result


def fmt_rate(r: dict[str, float]) -> str:
    return f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def eval_table(result: dict[str, Any]) -> str:
    """Markdown table of one `eval.json`: a row per mode, a column per rate."""
    head = "| mode | " + " | ".join(RATE_KEYS) + " |"
    lines = [head, "|" + "---|" * (len(RATE_KEYS) + 1)]
    for mode, rs in result["modes"].items():
        lines.append(f"| {mode} | " + " | ".join(fmt_rate(rs[k]) for k in RATE_KEYS) + " |")
    title = (
        f"{result['arm']} (seed {result['seed']}), n={result['n']} held-out problems x {result.get('samples', 1)} "
        f"samples, loophole {result['loophole']!r}"
    )
    note = f"\n{result['note']}" if result.get("note") else ""
    return f"{title}; 95% Wilson intervals over samples (evaluation noise only)\n\n" + "\n".join(lines) + note


# ---- diagnostics (scripts/diag_*.py) ----------------------------------------------------------------------------
def labelled_rollouts(
    run_dir: str | Path,
    n: int,
    mode: str = "full",
    seed: int = 4321,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, list[Labels], RoutedAdapter, dict[str, Any]]:
    """Held-out rollouts of the run's final model in `mode`, their labels and pooled deployed activations
    (N, n_modules, r). The completions are re-tokenised from text (as `v_act` extraction does), so the pooled
    activations can differ slightly from the trainer's, which pools the sampled token ids. Measurement only."""
    from routed_grpo.vact import pooled_completion_activations

    adapter, tokenizer, config = load_run(run_dir, "cuda" if torch.cuda.is_available() else None)
    problems = load_jsonl(Path(run_dir) / "heldout.jsonl")[:n]
    loophole = config["script"]["loophole_mode"] or ""
    prompts = [build_prompt(p, loophole or None) for p in problems]
    completions = generate_completions(
        adapter, tokenizer, prompts, mode, generation_settings(config), seed, 64, progress
    )
    labels = label_many(problems, completions, [loophole] * len(problems), workers=workers, progress=progress)
    acts = pooled_completion_activations(adapter, tokenizer, prompts, completions, mode=mode)
    return acts, labels, adapter, config


def score_metrics(
    scores: torch.Tensor, positive: torch.Tensor, route_tail_q: float, hi: float | None = None
) -> dict[str, float | None]:
    """AUROC of `scores` for the boolean label `positive`, and precision / recall of the route zone `s >= hi` for
    that label; `hi` defaults to `q(1 - route_tail_q)` over these scores (the gate uses its buffer's quantile)."""
    from routed_grpo.gate import quantile_thresholds
    from routed_grpo.vact import auroc

    positive = positive.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    hi = quantile_thresholds(scores, route_tail_q)[1] if hi is None else hi
    routed = scores >= hi
    true_pos = int((routed & positive).sum())
    return {
        "auroc": auroc(scores[positive], scores[~positive]) if n_pos and n_neg else None,
        "route_threshold": hi,
        "precision_at_route": true_pos / int(routed.sum()) if int(routed.sum()) else None,
        "recall_at_route": true_pos / n_pos if n_pos else None,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }
