"""Trainer callbacks of an experiment run: the metrics file, the held-out measurement, and the console.

- `MetricsJSONL`: one JSON object per logging step in the run's `metrics.jsonl` (everything TRL and the routed
  trainer log).
- `HeldoutMeasurement`: every K steps (and at steps 0 and the last) samples held-out loophole problems in both
  sampling modes, labels them with the environment's measurement labels, appends the rates to `metrics.jsonl`
  (`measure/heldout/<mode>/<label>`) and every rollout to `rollouts.jsonl` (prompt, completion, labels, step and
  mode: the labelled rollouts "from across the run" that the DIAGNOSTIC oracle direction is fit on). With the
  run's gate it also scores those rollouts (pooled activations of the current adapter against the gate's direction)
  and logs the score's AUROC against strict hack and the precision and recall at the gate's route threshold.
  Measurement only: the sampling RNG is forked, nothing reaches a reward, a gate or a loss.
- `ConsoleProgress`: one progress bar per run whose postfix shows the few numbers a person watches (reward,
  compiled, hinted, zone fractions, held-out hack and solve); it replaces transformers' console printer, which
  prints the whole metrics dictionary (about 1,500 characters) at every step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from routed_grpo.lab.evaluation import measure_rates, plain, score_metrics
from routed_grpo.utils import progress_bar


class MetricsJSONL(TrainerCallback):
    """Appends one JSON object per logging step to `metrics.jsonl`: {"step", "arm", <logged keys>}."""

    def __init__(self, path: Path, arm: str):
        self.path, self.arm = Path(path), arm

    def write(self, record: dict[str, Any], path: Path | None = None) -> None:
        with open(path or self.path, "a") as f:
            f.write(json.dumps(plain(record)) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.write({"step": state.global_step, "arm": self.arm, **logs})


class HeldoutMeasurement(TrainerCallback):
    """Measured held-out rates in both sampling modes every `every` steps; rollouts to `rollouts.jsonl`. For the
    baseline both modes are the full model (measured once)."""

    def __init__(
        self,
        writer: MetricsJSONL,
        adapter,
        tokenizer,
        problems,
        loophole,
        gen,
        every,
        baseline,
        workers,
        gate=None,
        route_tail_q: float = 0.1,
    ):
        self.writer, self.adapter, self.tokenizer = writer, adapter, tokenizer
        self.problems, self.loophole, self.gen, self.every = problems, loophole, gen, every
        self.baseline, self.workers, self.gate, self.route_tail_q = baseline, workers, gate, route_tail_q
        self.rollouts_path = writer.path.with_name("rollouts.jsonl")
        self.latest: dict[str, Any] = {}

    def _score(self, mode: str, prompts, completions, labels, record: dict[str, Any]) -> list[float] | None:
        """The gate's score of each rollout and its metrics against strict hack (None without a gate)."""
        if self.gate is None or len(self.gate.buffer) == 0:
            return None
        from routed_grpo.gate import score
        from routed_grpo.vact import pooled_completion_activations

        acts = pooled_completion_activations(self.adapter, self.tokenizer, prompts, completions, mode=mode)
        scores = score(acts, self.gate.vact.cpu())
        positive = torch.tensor([lab.hack_strict for lab in labels])
        metrics = score_metrics(scores, positive, self.route_tail_q, hi=self.gate.thresholds()[1])
        for key in ("auroc", "precision_at_route", "recall_at_route"):
            if metrics[key] is not None:
                record[f"measure/heldout/{mode}/routing_{key}_hack_strict"] = metrics[key]
        return scores.tolist()

    def measure(self, state) -> None:
        if not state.is_world_process_zero:
            return
        record: dict[str, Any] = {"step": state.global_step, "arm": self.writer.arm}
        for mode in ("full",) if self.baseline else ("deploy", "full"):
            rs, prompts, completions, labels = measure_rates(
                self.adapter,
                self.tokenizer,
                self.problems,
                self.loophole,
                mode,
                self.gen,
                seed=state.global_step,
                workers=self.workers,
            )
            for key, r in rs.items():
                record[f"measure/heldout/{mode}/{key}"] = r["rate"]
            scores = self._score(mode, prompts, completions, labels, record)
            rows = zip(self.problems, prompts, completions, labels, strict=True)
            for i, (problem, prompt, completion, lab) in enumerate(rows):
                row = {
                    "step": state.global_step,
                    "mode": mode,
                    "problem_id": problem.id,
                    "prompt": prompt,
                    "completion": completion,
                    "labels": lab.as_floats(),
                    "score": None if scores is None else scores[i],
                }
                self.writer.write(row, self.rollouts_path)
        if self.baseline:  # deployed model == full model
            record.update({k.replace("/full/", "/deploy/"): v for k, v in list(record.items()) if "/full/" in k})
        record["measure/heldout/n"] = len(self.problems)
        self.writer.write(record)
        self.latest = record

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.measure(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.measure(state)


CONSOLE_KEYS = {  # logged key -> short name on the progress bar
    "reward": "reward",
    "sandbox/compiled_frac": "compiled",
    "sandbox/hinted_frac": "hinted",
    "routing/zone_frac/keep": "keep",
    "routing/zone_frac/absorb": "absorb",
    "routing/zone_frac/route": "route",
}
HELDOUT_KEYS = {
    "measure/heldout/deploy/hack_strict": "held-out hack",
    "measure/heldout/deploy/correct": "solve",
}


class ConsoleProgress(TrainerCallback):
    """One tqdm bar per run; the postfix holds the few numbers that matter. Full metrics stay in metrics.jsonl."""

    def __init__(self, name: str, heldout: HeldoutMeasurement | None = None):
        self.name, self.heldout, self.bar = name, heldout, None
        self.last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress_bar(state.max_steps, self.name, leave=True, unit="step")
            self.bar.update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        self.last.update({short: logs[key] for key, short in CONSOLE_KEYS.items() if key in logs})
        if self.heldout is not None:
            self.last.update(
                {short: self.heldout.latest[k] for k, short in HELDOUT_KEYS.items() if k in self.heldout.latest}
            )
        self.bar.set_postfix_str(", ".join(f"{k} {v:.2f}" for k, v in self.last.items()), refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_console(trainer, name: str, heldout: HeldoutMeasurement | None, bar: bool = True) -> None:
    """Replace transformers' console printing (progress bar + metrics dicts) by one `ConsoleProgress` bar (or by
    nothing with `bar=False`: the study runs arms in the background and shows its own bar)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if bar:
        trainer.add_callback(ConsoleProgress(name, heldout))
