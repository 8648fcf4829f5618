"""End to end on a tiny organism: each arm (also the DIAGNOSTIC labels and oracle_direction arms) trains 2 steps from
its real recipe and writes the run directory; eval and the report run on all runs; the baseline is TRL's stock
GRPOTrainer; exports load in stock PEFT."""

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOTrainer

from routed_grpo.adapter import RoutedAdapter, attach_routed_adapter
from routed_grpo.lab.diagnostic import ORACLE_FILE, LabelScorer, OracleDirectionScorer
from routed_grpo.lab.evaluation import evaluate_run
from routed_grpo.lab.experiment import parse_recipe, run_experiment
from routed_grpo.lab.report import write_report
from routed_grpo.ladder import DirectionScorer
from routed_grpo.trainer import RoutedGRPOTrainer
from routed_grpo.vact import load_vact

ARMS = ("baseline", "routed", "placebo", "labels", "oracle_direction")
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "organism"
TINY_ORGANISM = {  # shrunk so that the build takes seconds: 1 layer, hidden 32, 64 SFT examples
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 400,
    "n_train_problems": 48,
    "n_heldout_problems": 16,
    "sft_examples": 64,
    "sft_batch_size": 16,
}


def tiny_argv(arm: str, out, organism_dir) -> list[str]:
    extra = ["--oracle_rollouts", str(out / "oracle_source")] if arm == "oracle_direction" else []
    return extra + [
        "--config",
        str(RECIPES / f"{arm}.yaml"),
        "--output_dir",
        str(out / arm),
        "--organism_dir",
        str(organism_dir),
        "--organism_settings",
        json.dumps(TINY_ORGANISM),
        "--max_steps",
        "2",
        "--save_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--num_generations",
        "4",  # 2 prompts x 4 generations
        "--max_completion_length",
        "16",
        "--learning_rate",
        "0.05",  # large lr: the blocks visibly move in 2 steps
        "--measure_every",
        "1",
        "--measure_n",
        "4",
        "--eval_n",
        "4",
        "--sandbox_workers",
        "1",
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    organism_dir = tmp_path_factory.mktemp("organism")
    trainers = {}
    for arm in ARMS:
        if arm == "oracle_direction":
            _synthetic_oracle_source(out)
        trainers[arm] = run_experiment(*parse_recipe(tiny_argv(arm, out, organism_dir)))
    return out, trainers


def _synthetic_oracle_source(out):
    """The baseline's saved rollouts with alternating strict-hack labels: a 2-step tiny run rarely hacks, and this
    test is about the plumbing (the fit itself is tested in test_diagnostic_arms.py)."""
    rows = [json.loads(line) for line in (out / "baseline" / "rollouts.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["labels"]["hack_strict"] = float(i % 2)
    (out / "oracle_source").mkdir()
    (out / "oracle_source" / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_baseline_is_stock_grpo_trainer_and_arms_use_their_trainer(runs):
    _, trainers = runs
    assert type(trainers["baseline"]) is GRPOTrainer
    assert type(trainers["routed"]) is RoutedGRPOTrainer and trainers["routed"].args.routing == "vact"
    assert type(trainers["placebo"]) is RoutedGRPOTrainer and trainers["placebo"].args.routing == "placebo"
    assert {type(trainers[a].scorer) for a in ("routed", "placebo")} == {DirectionScorer}
    assert not trainers["routed"].scorer.diagnostic and trainers["labels"].scorer.diagnostic
    assert type(trainers["labels"].scorer) is LabelScorer
    assert type(trainers["oracle_direction"].scorer) is OracleDirectionScorer
    assert {trainers[a].args.routing for a in ("labels", "oracle_direction")} == {"diagnostic"}


def test_same_adapter_capacity_and_init_in_every_arm(runs):
    _, trainers = runs
    names = {arm: sorted(n for n, _ in t.model.named_parameters() if "lora_" in n) for arm, t in trainers.items()}
    assert all(names[arm] == names["baseline"] for arm in ARMS)
    assert any(".quarantine." in n for n in names["baseline"])


def test_run_directory_contents(runs):
    out, _ = runs
    for arm in ARMS:
        run = out / arm
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["arm"] == arm and config["training"]["max_steps"] == 2
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert {r["arm"] for r in records} == {arm}
        assert {1, 2} <= {r["step"] for r in records if "reward" in r}
        assert any("measure/heldout/deploy/hack_strict" in r for r in records)
        for path in (
            "checkpoint-2",
            "final/deployed",
            "final/quarantine",
            "deployed/adapter_model.safetensors",
            "heldout.jsonl",
        ):
            assert (run / path).exists(), f"{arm}: {path} missing"
        assert (run / "vact.safetensors").exists() == (arm in ("routed", "placebo"))
        assert (run / ORACLE_FILE).exists() == (arm == "oracle_direction")
        rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
        assert {r["step"] for r in rollouts} == {0, 1, 2} and all("hack_strict" in r["labels"] for r in rollouts)
        diagnostic = config.get("diagnostic")
        assert (diagnostic is not None) == (arm in ("labels", "oracle_direction"))
        if arm == "labels":
            assert diagnostic["label_source"] == "measure:hack_strict" and diagnostic["label_recall"] == 1.0
        if arm == "oracle_direction":
            assert diagnostic["oracle_rollouts"].endswith("oracle_source")
        card = (run / "README.md").read_text()  # TRL's hook, then this run's section (no eval.json yet)
        assert "# Model Card for" in card and "### Framework versions" in card and "time machine" not in card
        assert f"arm `{arm}`" in card and "CPU model organism" in card and "Not evaluated yet" in card
        assert 'PeftModel.from_pretrained(base, RUN + "/deployed")' in card
        assert ("DIAGNOSTIC upper bound" in card) == (diagnostic is not None)
    routed_records = (out / "routed" / "metrics.jsonl").read_text()
    assert "routing/qmass" in routed_records and "measure/hack_strict" in routed_records


def test_saved_vact_is_the_one_the_gate_used(runs):
    out, trainers = runs
    for arm, kind in (("routed", "vact"), ("placebo", "placebo")):
        vact, meta = load_vact(out / arm / "vact.safetensors", trainers[arm].adapter)
        assert meta["kind"] == kind
        torch.testing.assert_close(vact, trainers[arm].gate.vact.cpu())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arm", ["routed", "baseline"])
def test_run_deployed_export_loads_in_stock_peft(runs, arm):
    """The run's deployed/ loads with stock PEFT and gives the deployed model's logits."""
    out, trainers = runs
    model = trainers[arm].model.eval()
    adapter = RoutedAdapter.of(model)
    base_path = yaml.safe_load((out / arm / "config.yaml").read_text())["model"]["model_name_or_path"]
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(out / arm / "deployed"))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with adapter.deployment_ablation() if arm != "baseline" else contextlib.nullcontext():
        want = _logits(model, ids)
    torch.testing.assert_close(_logits(stock.eval(), ids), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("init", ["random", "svd"])
@pytest.mark.parametrize("full", [True, False])
def test_exports_reproduce_deployed_or_full_model(tmp_path, full, init):
    """With both blocks moved: the export of both blocks == full model, export_deployed == quarantine ablated, in
    stock PEFT (with svd: folded, the subtracted initial copies as extra rank)."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )  # tiny: logits in milliseconds
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "base")
    base_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    adapter = attach_routed_adapter(base_model, rank=2, alpha=4, init=init)
    with torch.no_grad():
        for name, p in adapter.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model = adapter.model.eval()
    ids = torch.tensor([[1, 5, 9, 33, 60]])
    if full:
        adapter.export_lora(tmp_path / "export", ("deployed", "quarantine"))
        want = _logits(model, ids)
    else:
        adapter.export_deployed(tmp_path / "export")
        with adapter.deployment_ablation():
            want = _logits(model, ids)
        assert not torch.allclose(want, _logits(model, ids), atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert not torch.allclose(want, _logits(base, ids), atol=1e-4)
    stock = PeftModel.from_pretrained(base, str(tmp_path / "export")).eval()
    torch.testing.assert_close(_logits(stock, ids), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_logits(stock.merge_and_unload(), ids), want, atol=1e-5, rtol=1e-4)


def test_eval_and_compare(runs, tmp_path):
    out, _ = runs
    for arm in ARMS:
        result = evaluate_run(out / arm, n=4, workers=1, samples=2)
        on_disk = json.loads((out / arm / "eval.json").read_text())
        assert on_disk == json.loads(json.dumps(result))
        assert set(on_disk["modes"]) == {"deploy", "full"} and on_disk["n"] == 4 and on_disk["samples"] == 2
        assert on_disk["deployed_is_full"] == (arm == "baseline")
        for mode in ("deploy", "full"):
            r = on_disk["modes"][mode]["hack_strict"]
            assert r["n"] == 8 and r["rate"] == r["k"] / 8 and r["lo"] <= r["rate"] <= r["hi"]
            counts = on_disk["per_problem"][mode]["correct"]  # 4 problems x 2 samples each
            assert len(counts) == 4 and sum(counts) == on_disk["modes"][mode]["correct"]["k"]
        card = (out / arm / "README.md").read_text()  # rewritten after evaluation, with the figures
        deployed = on_disk["modes"]["deploy"]["hack_strict"]
        assert "Not evaluated yet" not in card and "4 held-out problems x 2 samples" in card
        assert f"{deployed['rate']:.2f} [{deployed['lo']:.2f}, {deployed['hi']:.2f}]" in card
        assert card.count("<!-- routed-grpo:card:begin -->") == 1 and "### Framework versions" in card
    text, pngs = write_report([out / a for a in ARMS], tmp_path)
    pooled = text.split("## Deployment evaluation over seeds")[1].split("##")[0]
    rows = [line.split("|")[1].strip() for line in pooled.splitlines() if line.startswith("| ")][1:]
    mark = "(DIAGNOSTIC upper bound)"
    assert rows == ["baseline", "placebo", "routed", f"oracle_direction {mark}", f"labels {mark}"]
    assert text.count(mark) >= 5, "every row of a label-reading arm is marked, in every table"
    assert sorted(p.name for p in pngs) == ["curves.png", "tradeoff.png"] and all(
        p.stat().st_size > 1000 for p in pngs
    )
    assert (tmp_path / "report.md").read_text() == text
    assert len(json.loads((tmp_path / "report.json").read_text())["runs"]) == len(ARMS)


def test_compare_refuses_unevaluated_run(runs, tmp_path):
    out, _ = runs
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text((out / "routed" / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="eval.json"):
        write_report([tmp_path / "run"], tmp_path)


def test_diag_routing_auroc_script_runs_on_a_run(runs):
    out, _ = runs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import diag_routing_auroc
    finally:
        sys.path.pop(0)
    assert diag_routing_auroc.main([str(out / "routed"), "--n", "4", "--placebos", "2", "--workers", "1"]) == 0
    result = json.loads((out / "routed" / "diag_routing_auroc.json").read_text())
    assert result["n"] == 4 and len(result["placebo_metrics"]) == 2 and result["vact_kind"] == "vact"
    assert diag_routing_auroc.main([str(out / "baseline"), "--n", "4"]) == 2  # a baseline has no v_act


@pytest.mark.slow
def test_report_to_wandb_works_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    argv = tiny_argv("baseline", tmp_path, tmp_path / "organism") + ["--max_steps", "1", "--measure_every", "0"]
    argv[argv.index("--report_to") + 1] = "wandb"
    run_experiment(*parse_recipe(argv))
    assert list((tmp_path / "baseline" / "wandb").glob("offline-run-*")), "no offline wandb run in the run directory"
