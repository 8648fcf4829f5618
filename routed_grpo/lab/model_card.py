"""The model card (`README.md`) of a run directory, written through TRL's model-card hook.

TRL's trainers write `OUTPUT_DIR/README.md` with `create_model_card` whenever a checkpoint is saved
(`GRPOTrainer._save_checkpoint`), from a template that names the base model only when it is a hub id ("a
fine-tuned version of [None]" for a local model such as the organism) and ends its introduction with a generic
quick start. `write_model_card(trainer, run_dir)` calls that hook once more after training, so the card keeps
TRL's metadata, training procedure, framework versions and citations, and replaces the template's introduction
and quick start with this run's: the base model (or the organism build), the arm, its sensor, scorer and
intervention (today: the arm's routing settings), the deployed-only artefact `deployed/` and how to load it with
PEFT, and the run's deployed hack and solve. TRL writes the card before evaluation, so `update_model_card(run_dir)`
rewrites that part after `eval.json` exists, without a trainer (routed_grpo.lab.evaluation calls it).
Does not cover: training or evaluating (routed_grpo.lab.experiment, routed_grpo.lab.evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from routed_grpo.lab.evaluation import deploys_full
from routed_grpo.sensor import parse_sensor
from routed_grpo.utils import atomic_write_text

BEGIN, END = "<!-- routed-grpo:card:begin -->", "<!-- routed-grpo:card:end -->"
TRL_NEXT_SECTION = "## Training procedure"


def organism_manifest(model_path: str) -> dict[str, Any] | None:
    """The organism's `organism.json` when `model_path` is an organism build's model directory, else None."""
    for candidate in (Path(model_path) / "organism.json", Path(model_path).parent / "organism.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def _base_model(config: dict[str, Any]) -> tuple[str, str]:
    """(markdown line, tokenizer loading line) for the run's base model."""
    path = str(config["model"]["model_name_or_path"])
    manifest = organism_manifest(path)
    if manifest is not None:
        s = manifest.get("settings", {})
        shape = ", ".join(f"{k} {s[k]}" for k in ("hidden_size", "num_layers", "num_heads") if k in s)
        line = (
            f"the CPU model organism (`routed_grpo.lab.organism`, build `organism-{manifest.get('key', '?')}`, seed "
            f"{s.get('seed', '?')}: a Qwen2 architecture from a config ({shape}, {manifest.get('n_params', '?')} "
            f"parameters) with a tokenizer trained in code and an SFT warm start; no download), at `{path}`"
        )
        return line, 'tokenizer = PreTrainedTokenizerFast.from_pretrained(RUN + "/final")  # never AutoTokenizer'
    revision = config["model"].get("model_revision") or "main"
    return f"`{path}` (revision `{revision}`)", f'tokenizer = AutoTokenizer.from_pretrained("{path}")'


def _ladder(config: dict[str, Any]) -> list[str]:
    """Sensor, scorer and intervention lines of the arm (DESIGN.md section 10)."""
    arm, t = config["arm"], config.get("training", {})
    if arm == "baseline":
        return ["- **Sensor, scorer, intervention**: none: stock `GRPOTrainer`, nothing is routed."]
    diag = config.get("diagnostic") or {}
    scorer = {
        "routed": f"`v_act` from contrast pairs (`{t.get('vact_path') or t.get('vact_pairs_path')}`)",
        "placebo": f"a Haar-random placebo direction (placebo_seed {t.get('placebo_seed')})",
        "labels": f"DIAGNOSTIC label monitor `{diag.get('label_source')}` (simulated recall "
        f"{diag.get('label_recall')}, false-positive rate {diag.get('label_fpr')}): reads ground-truth labels",
        "oracle_direction": f"DIAGNOSTIC oracle direction fit on labelled rollouts of `{diag.get('oracle_rollouts')}`",
        "monitor": f"an external monitor (`{config.get('script', {}).get('monitor_model')}`), flagged at score >= "
        f"{t.get('monitor_threshold')}",
    }.get(arm, f"`{t.get('routing')}`")
    flag = (
        f"label-flagged rows route, the others go to `{diag.get('label_negative_zone')}`"
        if arm == "labels"
        else "monitor-flagged rows route, the others are absorbed"
        if arm == "monitor"
        else f"the gate's symmetric quantile tails over its activation buffer (route_tail_q {t.get('route_tail_q')})"
    )
    spec = parse_sensor(t.get("sensor"))
    sensor = (
        "none: the label monitor reads each rollout's ground-truth labels"
        if arm == "labels"
        else {
            "bottleneck": "`bottleneck`: the deployed block's live bottleneck `A_dep x` at every target module",
            "bottleneck_init": "`bottleneck_init`: the frozen initial projection `A_dep0 x` at every target module",
            "residual": f"`{spec.spec}`: the decoder's hidden state after layer(s) {', '.join(map(str, spec.layers))}",
        }[spec.kind]
        + ", mean-pooled over completion tokens"
    )
    intervention = t.get("intervention", "route")
    if intervention != "route":
        how = {
            "penalty": f"a flagged rollout's reward is lowered by {t.get('flag_penalty')} before the advantages",
            "screen": "a flagged rollout leaves the loss and its group's mean",
        }[intervention]
        flagged = flag.split(",")[0].replace("rows route", "rows").replace("quantile tails", "top tail")
        return [
            f"- **Sensor**: {sensor}.",
            f"- **Scorer**: {scorer}.",
            f"- **Intervention**: `{intervention}` (flags: {flagged}): {how}; both blocks train on every row and "
            "nothing is ablated at deployment, as in the baseline.",
        ]
    return [
        f"- **Sensor**: {sensor}.",
        f"- **Scorer**: {scorer}.",
        f"- **Intervention**: `route` ({flag}): keep rows train the deployed block only, route rows the quarantine "
        f"only, absorb rows both; mismatch_ratio_cap {t.get('mismatch_ratio_cap')}, gen_deploy_frac "
        f"{t.get('gen_deploy_frac')}.",
    ]


def _results(evaluation: dict[str, Any] | None) -> str:
    if evaluation is None:
        return "Not evaluated yet: `routed-grpo eval RUN_DIR` writes `eval.json` and rewrites this card with figures."

    def cell(mode: str, key: str) -> str:
        r = evaluation["modes"][mode][key]
        return f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"

    samples = evaluation.get("samples", 1)
    return (
        f"Deployment evaluation (`eval.json`): {evaluation['n']} held-out problems x {samples} sample"
        f"{'s' if samples > 1 else ''}, loophole `{evaluation.get('loophole')}` on.\n\n"
        "| model | strict hack | solve | compiles |\n|---|---|---|---|\n"
        f"| deployed (`deployed/`) | {cell('deploy', 'hack_strict')} | {cell('deploy', 'correct')} | "
        f"{cell('deploy', 'compiled')} |\n"
        f"| full (both blocks) | {cell('full', 'hack_strict')} | {cell('full', 'correct')} | "
        f"{cell('full', 'compiled')} |\n\n"
        "95% Wilson intervals over this run's samples: evaluation noise of one run only. Seed-to-seed spread is "
        "larger; compare arms with a study's report (`routed-grpo study`)."
    )


def card_section(
    config: dict[str, Any], evaluation: dict[str, Any] | None, run_name: str, spec: str | None = None
) -> str:
    """This run's part of the card, between the BEGIN and END markers (`spec`: the study's arm spec, if any)."""
    arm, t = config["arm"], config.get("training", {})
    base, tokenizer_line = _base_model(config)
    diag = (
        " DIAGNOSTIC upper bound: it reads ground-truth labels; it is not the method."
        if config.get("diagnostic")
        else ""
    )
    artefact = (
        "both blocks as one stock rank-2r LoRA: the arm ablates nothing, so its deployed model is the full model"
        if deploys_full(config)
        else "the deployed block only, as a stock PEFT LoRA: the quarantine block is ablated (left out)"
    )
    init = t.get("adapter_init", "random")
    if init != "random":
        artefact += (
            f" (adapter_init `{init}`: each block's frozen initial copy is folded in as extra rank, `A = [A; A0]`, "
            "`B = [B, -B0]`, so stock PEFT loads and merges it; `final/routed_init.safetensors` holds the copies)"
        )
    base_path = config["model"]["model_name_or_path"]
    load = (
        "```python\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast\n\n"
        f'RUN = "{run_name}"  # this run directory\n'
        f'base = AutoModelForCausalLM.from_pretrained("{base_path}")\n'
        'model = PeftModel.from_pretrained(base, RUN + "/deployed").merge_and_unload()\n'
        f"{tokenizer_line}\n```"
    )
    lines = [
        BEGIN,
        f"One run of routed-grpo (gradient routing against reward hacking as a drop-in for TRL's `GRPOTrainer`), "
        f"arm `{arm}`, seed {t.get('seed')}.{diag}",
        "",
        f"- **Base model**: {base}.",
        f"- **Arm**: `{arm}`"
        + (f" (study arm spec `{spec}`)" if spec and spec != arm else "")
        + f"; adapter: two LoRA blocks (deployed, quarantine) of rank {t.get('adapter_rank')} on "
        f"{', '.join(t.get('adapter_targets') or [])}, initialised `{init}`.",
        *_ladder(config),
        f"- **Artefact to use**: `deployed/`: {artefact}. `final/` holds both blocks (research only).",
        "",
        "## Load the deployed model",
        "",
        load,
        "",
        "## Results",
        "",
        _results(evaluation),
        END,
    ]
    return "\n".join(lines)


def splice(card: str, section: str) -> str:
    """`card` with its routed-grpo section replaced by `section`; on TRL's template, the introduction and quick
    start (from the line after the title to `## Training procedure`) are replaced; otherwise `section` is appended."""
    if BEGIN in card and END in card:
        head, rest = card.split(BEGIN, 1)
        return head + section + rest.split(END, 1)[1]
    lines = card.splitlines(keepends=True)
    title = next((i for i, line in enumerate(lines) if line.startswith("# Model Card for")), None)
    nxt = next((i for i, line in enumerate(lines) if line.startswith(TRL_NEXT_SECTION)), None)
    if title is not None and nxt is not None and nxt > title:
        return "".join(lines[: title + 1]) + "\n" + section + "\n\n" + "".join(lines[nxt:])
    return card.rstrip("\n") + ("\n\n" if card.strip() else "") + section + "\n"


def update_model_card(run_dir: str | Path) -> Path:
    """(Re)write the run's section of `RUN_DIR/README.md` from `config.yaml` and, when it exists, `eval.json`."""
    from routed_grpo.lab.evaluation import EVAL_FILE, read_run_config

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    evaluation = json.loads((run_dir / EVAL_FILE).read_text()) if (run_dir / EVAL_FILE).is_file() else None
    path = run_dir / "README.md"
    card = path.read_text(encoding="utf-8") if path.is_file() else ""
    job = run_dir / "job.json"  # written by `routed-grpo study` before the run starts
    spec = json.loads(job.read_text()).get("spec", {}).get("name") if job.is_file() else None
    atomic_write_text(path, splice(card, card_section(config, evaluation, str(run_dir), spec)))
    return path


def write_model_card(trainer: Any, run_dir: str | Path) -> Path | None:
    """After training: TRL's hook (`trainer.create_model_card`) writes its card, then this run's section replaces
    the template's introduction and quick start. Main process only."""
    if not trainer.accelerator.is_main_process:
        return None
    run_dir = Path(run_dir)
    trainer.create_model_card(model_name=run_dir.name, tags=["routed-grpo"])
    return update_model_card(run_dir)
