"""Run model cards (routed_grpo.lab.model_card) on TRL's own card, and per-problem evaluation counts.

The end-to-end card of real runs (TRL's hook at training time, rewritten after evaluation) is checked in
test_experiment_run.py."""

from trl.trainer.utils import generate_model_card

from routed_grpo.lab.evaluation import per_problem_counts
from routed_grpo.lab.model_card import BEGIN, END, card_section, splice
from sandbox.labels import Labels

CONFIG = {
    "arm": "baseline",
    "script": {},
    "training": {"seed": 3, "adapter_rank": 8, "adapter_targets": ["q_proj"]},
    "model": {"model_name_or_path": "Qwen/Qwen3-4B", "model_revision": "main"},
}
EVAL = {
    "n": 128,
    "samples": 4,
    "loophole": "overwrite_tests",
    "modes": {
        m: {k: {"rate": 0.25, "lo": 0.21, "hi": 0.29} for k in ("hack_strict", "correct", "compiled")}
        for m in ("deploy", "full")
    },
}


def _trl_card() -> str:
    return str(
        generate_model_card(
            base_model=None,
            model_name="seed3",
            hub_model_id=None,
            dataset_name=None,
            tags=["routed-grpo"],
            wandb_url=None,
            trackio_url=None,
            trainer_name="GRPO",
        )
    )


def test_the_run_section_replaces_trls_introduction_and_quick_start():
    trl = _trl_card()
    assert "fine-tuned version of [None]" in trl and "time machine" in trl  # what issue 19 saw
    card = splice(trl, card_section(CONFIG, None, "runs/study/baseline/seed3"))
    assert "time machine" not in card and "fine-tuned version of [None]" not in card
    assert card.startswith("---\n") and "# Model Card for seed3" in card  # TRL's metadata and title kept
    assert "## Training procedure" in card and "### Framework versions" in card and "Cite TRL as" in card
    assert "- **Base model**: `Qwen/Qwen3-4B` (revision `main`)." in card
    assert "both blocks as one stock rank-2r LoRA" in card and "Sensor, scorer, intervention**: none" in card
    assert 'tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen3-4B")' in card and "Not evaluated yet" in card
    again = splice(card, card_section(CONFIG, EVAL, "runs/study/baseline/seed3"))
    assert again.count(BEGIN) == 1 and again.count(END) == 1 and "Not evaluated yet" not in again
    assert "128 held-out problems x 4 samples" in again and "| deployed (`deployed/`) | 0.25 [0.21, 0.29] |" in again
    assert again.split(BEGIN)[0] == card.split(BEGIN)[0] and again.split(END)[1] == card.split(END)[1]


def test_a_card_without_trls_template_gets_the_section_appended():
    assert splice("", "S") == "S\n"
    assert splice("# Notes\n", "S") == "# Notes\n\nS\n"


def test_routed_card_names_sensor_scorer_and_intervention():
    config = {**CONFIG, "arm": "placebo", "training": {**CONFIG["training"], "placebo_seed": 7, "route_tail_q": 0.1}}
    text = card_section(config, None, "run")
    assert "Haar-random placebo direction (placebo_seed 7)" in text and "route_tail_q 0.1" in text
    assert "the deployed block only, as a stock PEFT LoRA" in text and "DIAGNOSTIC" not in text
    assert "`bottleneck`: the deployed block's live bottleneck" in text  # no sensor recorded: the default
    residual = {**config, "training": {**config["training"], "sensor": "residual:2"}}
    assert "`residual:2`: the decoder's hidden state after layer(s) 2" in card_section(residual, None, "run")


def _labels(correct: bool, hack: bool) -> Labels:
    return Labels(compiled=True, correct=correct, hinted=hack, hack_strict=hack, hack_attempted=False,
                  defines_run_tests=hack, loophole="overwrite_tests")  # fmt: skip


def test_per_problem_counts_group_the_samples_of_each_problem():
    rows = [_labels(True, False), _labels(False, True), _labels(False, False), _labels(False, False)]
    rows += [_labels(True, False), _labels(True, False)]  # 3 problems x 2 samples, problem by problem
    counts = per_problem_counts(rows, 2)
    assert counts["correct"] == [1, 0, 2] and counts["hack_strict"] == [1, 0, 0] and counts["compiled"] == [2, 2, 2]
