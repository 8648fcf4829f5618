"""`routed-grpo study`: arm specs and variants, the plan, skipping finished runs, and a tiny study end to end."""

import json
from pathlib import Path

import pytest
import yaml
from test_experiment_run import TINY_ORGANISM

from routed_grpo.lab import study
from routed_grpo.lab.study import ArmSpec, execute, parse_arm_spec, plan, split_arms

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "organism"


def test_arm_specs_and_variants():
    assert parse_arm_spec("routed") == ArmSpec("routed", "routed", {})
    assert parse_arm_spec("labels@0.7").overrides == {"label_recall": 0.7}
    spec = parse_arm_spec("labels@recall=0.9,fpr=0.05,neg=keep")
    assert spec.overrides == {"label_recall": 0.9, "label_fpr": 0.05, "label_negative_zone": "keep"}
    assert spec.diagnostic and not parse_arm_spec("placebo").diagnostic
    assert parse_arm_spec("routed@cap=10").overrides == {"mismatch_ratio_cap": 10}
    assert parse_arm_spec("routed@exclude=mode:hardcode+mode:exit_code").overrides == {
        "vact_pairs_exclude_tags": ["mode:hardcode", "mode:exit_code"]
    }
    assert parse_arm_spec("routed@route_tail_q=0.2").overrides == {"route_tail_q": 0.2}
    # a sensor rung: "+" separates layers inside the value (a "," would start the next key)
    assert parse_arm_spec("routed@sensor=residual:1+2").overrides == {"sensor": "residual:1+2"}
    assert parse_arm_spec("oracle_direction@sensor=bottleneck_init").overrides == {"sensor": "bottleneck_init"}
    with pytest.raises(ValueError, match="unknown arm 'rooted'"):
        parse_arm_spec("rooted")
    with pytest.raises(ValueError, match="not key=value"):
        parse_arm_spec("routed@0.7")


def test_split_arms_keeps_a_variant_with_commas_together():
    text = "baseline,labels@recall=0.7,fpr=0.1,routed@cap=5,placebo"
    assert split_arms(text) == ["baseline", "labels@recall=0.7,fpr=0.1", "routed@cap=5", "placebo"]


def test_plan_orders_baselines_first_and_points_oracles_at_them(tmp_path):
    specs = [parse_arm_spec(a) for a in ("oracle_direction", "routed", "baseline", "labels@0.7")]
    runs = plan(specs, [0, 1], tmp_path, tmp_path / "org")
    names = [(r.spec.name, r.seed) for r in runs]
    assert names[:4] == [("baseline", 0), ("routed", 0), ("labels@0.7", 0), ("oracle_direction", 0)]
    oracle = runs[3]
    assert oracle.after == tmp_path / "baseline" / "seed0"
    assert oracle.argv[oracle.argv.index("--oracle_rollouts") + 1] == str(tmp_path / "baseline" / "seed0")
    labels = runs[2]
    assert labels.argv[labels.argv.index("--label_recall") + 1] == "0.7"
    assert labels.run_dir == tmp_path / "labels@0.7" / "seed0"
    with pytest.raises(ValueError, match="add 'baseline'"):
        plan([parse_arm_spec("oracle_direction")], [0], tmp_path, tmp_path)
    with pytest.raises(ValueError, match="not_a_key"):
        plan([parse_arm_spec("routed@not_a_key=1")], [0], tmp_path, tmp_path)


def test_a_finished_run_is_skipped_and_a_changed_one_is_not(tmp_path, monkeypatch):
    runs = plan([parse_arm_spec("routed"), parse_arm_spec("placebo")], [0], tmp_path, tmp_path / "org")
    finished, changed = (next(r for r in runs if r.spec.name == n) for n in ("routed", "placebo"))
    for run in runs:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "eval.json").write_text(json.dumps({"samples": run.eval_samples}))
    (finished.run_dir / "study.json").write_text(json.dumps({"argv": finished.argv}))
    (changed.run_dir / "study.json").write_text(json.dumps({"argv": [*changed.argv, "--learning_rate", "1"]}))
    launched = []

    class Done:
        returncode = 0
        log = open(tmp_path / "log", "w")  # noqa: SIM115

        def poll(self):
            return 0

    monkeypatch.setattr(study, "_launch", lambda run, *a: launched.append(run.spec.name) or Done())
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    status = execute(runs, jobs=2, progress=False)
    assert launched == ["placebo"]
    assert status["skipped"] == [str(finished.run_dir)] and status["failed"] == []


def test_a_run_evaluated_with_other_samples_per_problem_is_evaluated_again_without_training(tmp_path, monkeypatch):
    (run,) = plan([parse_arm_spec("routed")], [0], tmp_path, tmp_path / "org")
    assert run.eval_samples == 4  # the organism recipes' eval_samples
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "eval.json").write_text(json.dumps({"n": 128}))  # before eval_samples: one sample per problem
    (run.run_dir / "study.json").write_text(json.dumps({"argv": run.argv, "train_seconds": 12.5}))
    assert run.trained() and not run.finished()
    started = []
    monkeypatch.setattr(study.subprocess, "Popen", lambda *a, **k: started.append(a[0]) or type("P", (), {})())
    study._launch(run, None, 1)
    job = json.loads((run.run_dir / "job.json").read_text())
    assert job["evaluate_only"] is True and job["train_seconds"] == 12.5 and len(started) == 1
    evaluated = []  # the job evaluates with the recipe's samples, not those of the run's own (older) config
    monkeypatch.setattr("routed_grpo.lab.evaluation.evaluate_run", lambda *a, **k: evaluated.append(k) or {})
    study.run_job(run.run_dir / "job.json")
    assert [k["samples"] for k in evaluated] == [4]
    assert not (run.run_dir / "eval.json").exists(), "the stale evaluation is removed before the new one"
    (run.run_dir / "study.json").write_text(json.dumps({"argv": [*run.argv, "--seed", "9"]}))
    study._launch(run, None, 1)
    assert json.loads((run.run_dir / "job.json").read_text())["evaluate_only"] is False  # other argv: train


@pytest.fixture()
def tiny_recipes(tmp_path):
    """The organism recipes shrunk to a 2-step tiny organism (as in test_experiment_run)."""
    out = tmp_path / "recipes"
    out.mkdir()
    for arm in ("baseline", "labels"):
        doc = yaml.safe_load((RECIPES / f"{arm}.yaml").read_text())
        doc.update(organism_settings=TINY_ORGANISM, max_steps=2, per_device_train_batch_size=8, num_generations=4,
                   max_completion_length=16, measure_every=1, measure_n=4, eval_n=4, sandbox_workers=1,
                   save_strategy="no")  # fmt: skip
        (out / f"{arm}.yaml").write_text(yaml.safe_dump(doc))
    return out


def test_tiny_study_end_to_end_then_resumes_without_rerunning(tmp_path, tiny_recipes):
    from typer.testing import CliRunner

    from routed_grpo.cli.main import app

    argv = ["study", "--out", str(tmp_path / "s"), "--arms", "baseline,labels@0.5", "--seeds", "0", "--jobs", "2",
            "--organism-dir", str(tmp_path / "org"), "--recipes", str(tiny_recipes)]  # fmt: skip
    first = CliRunner().invoke(app, argv)
    assert first.exit_code == 0, first.output
    assert "ran 2, skipped 0" in first.output
    report = (tmp_path / "s" / "report.md").read_text()
    assert "labels@0.5 (DIAGNOSTIC upper bound)" in report and "| baseline |" in report
    assert (tmp_path / "s" / "curves.png").is_file() and (tmp_path / "s" / "tradeoff.png").is_file()
    config = yaml.safe_load((tmp_path / "s" / "labels@0.5" / "seed0" / "config.yaml").read_text())
    assert config["diagnostic"]["label_recall"] == 0.5
    second = CliRunner().invoke(app, [*argv, "--publish", str(tmp_path / "published")])
    assert second.exit_code == 0 and "ran 0, skipped 2" in second.output
    published = tmp_path / "published"
    assert (published / "report.md").read_text() == (tmp_path / "s" / "report.md").read_text()
    assert json.loads((published / "report.json").read_text())["verdict"], "the verdict travels with the report"


def test_report_names_a_run_whose_ratio_cap_is_not_todays_default():
    from routed_grpo.config import RoutedGRPOConfig
    from routed_grpo.lab.report import arm_name

    default = RoutedGRPOConfig.__dataclass_fields__["mismatch_ratio_cap"].default
    spec = {"spec": {"name": "routed"}}
    assert arm_name({"arm": "routed", "training": {"mismatch_ratio_cap": default}}, spec) == "routed"
    assert arm_name({"arm": "routed", "training": {"mismatch_ratio_cap": None}}, spec) == "routed@cap=None"
    capped = {"spec": {"name": "routed@cap=10"}}
    assert arm_name({"arm": "routed", "training": {"mismatch_ratio_cap": 10}}, capped) == "routed@cap=10"
    assert arm_name({"arm": "baseline", "training": {"mismatch_ratio_cap": None}}, {}) == "baseline"
