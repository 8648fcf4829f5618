"""The report's scorer x intervention table: one row per set of flags, one column pair per intervention, and the
route-minus-X differences paired by seed; the collapse rule reads what the environment paid (`env_reward`)."""

import json

import pytest
from study_fixtures import make_run

from routed_grpo.lab.report import arm_name, render_with_data, summarise_run
from routed_grpo.lab.report_tables import split_intervention

N = 20  # 10 problems x 2 samples per run


def test_split_intervention_keeps_the_other_variants():
    assert split_intervention("labels@recall=0.7,intervention=penalty") == ("labels@recall=0.7", "penalty")
    assert split_intervention("routed@intervention=screen") == ("routed", "screen")
    assert split_intervention("placebo@sensor=residual:1") == ("placebo@sensor=residual:1", "route")


def test_a_run_outside_a_study_is_named_with_its_intervention():
    config = {"arm": "labels", "training": {"intervention": "screen", "mismatch_ratio_cap": 4.0}}
    assert arm_name(config, {}) == "labels@intervention=screen"
    assert arm_name(config, {"spec": {"name": "labels@0.7,intervention=screen"}}) == "labels@0.7,intervention=screen"


def test_the_table_and_the_paired_differences(tmp_path):
    route = {0: (4, 10), 1: (6, 9), 2: (2, 11)}  # seed: (hack, solve) counts out of N
    penalty = {0: (5, 8), 1: (6, 6), 2: (8, 8)}
    runs = [make_run(tmp_path, "labels", s, h, c) for s, (h, c) in route.items()]
    runs += [make_run(tmp_path, "labels@intervention=penalty", s, h, c) for s, (h, c) in penalty.items()]
    runs += [make_run(tmp_path, "routed@intervention=screen", s, 3, 7) for s in range(3)]
    text, data = render_with_data([summarise_run(r) for r in runs])
    section = text.split("## The same flags, three interventions")[1].split("##")[0]
    hack_mean = sum(h for h, _ in route.values()) / 3 / N
    label_row = next(line for line in section.splitlines() if line.startswith("| labels (DIAGNOSTIC"))
    cells = [c.strip() for c in label_row.strip("|").split("|")]
    assert cells[1].startswith(f"{hack_mean:.2f} [") and cells[3].startswith(f"{(5 + 6 + 8) / 3 / N:.2f} [")
    assert cells[5] == cells[6] == "-"  # no labels@intervention=screen run
    routed_row = next(line for line in section.splitlines() if line.startswith("| routed |"))
    assert [c.strip() for c in routed_row.strip("|").split("|")][1] == "-"  # no routed (route) run
    (comp,) = data["interventions"]["route_minus"]
    assert (comp["arm"], comp["reference"]) == ("labels", "labels@intervention=penalty")
    diffs = [(route[s][0] - penalty[s][0]) / N for s in range(3)]
    assert comp["metrics"]["deployed hack"]["all"]["mean"] == pytest.approx(sum(diffs) / 3)
    solve = [(route[s][1] - penalty[s][1]) / N for s in range(3)]
    assert comp["metrics"]["deployed solve"]["all"]["mean"] == pytest.approx(sum(solve) / 3)
    assert "labels@intervention=penalty" in section and data["interventions"]["table"]["routed"] == {
        "screen": "routed@intervention=screen"
    }


def test_no_section_without_two_interventions_of_the_same_flags(tmp_path):
    runs = [make_run(tmp_path, "labels", s, 4, 10) for s in range(2)]
    runs += [make_run(tmp_path, "routed@intervention=penalty", s, 4, 10) for s in range(2)]
    text, data = render_with_data([summarise_run(r) for r in runs])
    assert "three interventions" not in text and data["interventions"] == {}


def test_collapse_reads_the_environments_reward_not_the_penalised_one(tmp_path):
    run = make_run(tmp_path, "labels@intervention=penalty", 0, 4, 10, final_reward=2.0)
    rows = [{"step": s, "reward": -1.0, "env_reward": 2.0} for s in range(1, 6)]  # penalised below, paid above
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarise_run(run)
    assert summary["final_reward"] == 2.0 and summary["collapse_reason"] is None
    rows = [{"step": s, "reward": 2.0, "env_reward": 0.1} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "final training reward 0.10" in summarise_run(run)["collapse_reason"]


def test_penalty_and_screen_arms_show_no_routing_mass(tmp_path):
    runs = [make_run(tmp_path, "labels", s, 4, 10) for s in range(2)]
    for s in range(2):
        run = make_run(tmp_path, "labels@intervention=screen", s, 4, 10)
        config = (run / "config.yaml").read_text().replace("training:", "training:\n  intervention: screen", 1)
        (run / "config.yaml").write_text(config)
        runs.append(run)
    text, _ = render_with_data([summarise_run(r) for r in runs])
    row = next(line for line in text.splitlines() if line.startswith("| labels@intervention=screen (DIAG"))
    assert "not routed (both blocks train on every row)" in row
    assert "not routed" not in next(line for line in text.splitlines() if line.startswith("| labels (DIAG"))
