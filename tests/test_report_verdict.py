"""The report of a synthetic study directory: the generated verdict line, collapse counting, the columns, the
missing-placebo note, the evaluation-noise column, report.json, the plots and the model-card splice.

Every run evaluates 10 problems x 2 samples = 20 samples, so a count k is the rate k / 20. Expected figures are
worked out by hand in the comments."""

import json

import pytest
from study_fixtures import make_run

from routed_grpo.lab.report import collapse_reason, write_report

# deployed hack counts per seed 0-4 (rates = counts / 20)
PLACEBO = [10, 10, 10, 10, 10]  # 0.50 each
ROUTED = [11, 12, 7, 14, 16]  # 0.55 0.60 0.35 0.70 0.80: differences +.05 +.10 -.15 +.20 +.30


@pytest.fixture()
def study(tmp_path):
    dirs = []
    for seed in range(5):
        dirs.append(make_run(tmp_path, "baseline", seed, 14, 2))
        dirs.append(make_run(tmp_path, "placebo@cap=4", seed, PLACEBO[seed], 1))
        # seed 4 collapsed: final training reward below the compile reward (0.5)
        dirs.append(make_run(tmp_path, "routed@cap=4", seed, ROUTED[seed], 1, final_reward=0.1 if seed == 4 else 2))
        dirs.append(make_run(tmp_path, "labels@cap=4", seed, 2, 5))
    # a deployed model that no longer compiles while the full model does: a result, not a collapse
    dirs.append(make_run(tmp_path, "routed@cap=10", 0, 0, 0, compiles=0, full_compiles=20))
    dirs.append(make_run(tmp_path, "routed@cap=10", 1, 3, 0, compiles=18, full_compiles=1))  # full: 0.05 < 0.1
    text, pngs = write_report(dirs, tmp_path / "report")
    return text, json.loads((tmp_path / "report" / "report.json").read_text()), pngs


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


def test_verdict_line_is_generated_from_the_runs(study):
    text, data, _ = study
    verdict = _section(text, "Verdict")
    # differences +.05 +.10 -.15 +.20 +.30: mean +0.10; sd sqrt(.115 / 4); t(4) = 2.776445 -> [-0.11, 0.31];
    # sign-flip p = 10/32 (test_report_stats enumerates this case). Solve: 1 vs 1 on every seed: all zero, p = 1.
    # Without seed 4 (collapsed): +.05 +.10 -.15 +.20: mean +0.05, sd sqrt(.065 / 3), t(3) = 3.182446 ->
    # [-0.18, 0.28]; |d| 1, 2, 3, 4 (x .05), sum 4 of 10: x <= 3 or x >= 7, 5 + 5 of 16 patterns: p = 0.625.
    want = (
        "- routed@cap=4 vs placebo@cap=4: deployed hack +0.10 [-0.11, 0.31], p = 0.3125; deployed solve +0.00 "
        "[0.00, 0.00], p = 1 (two-sided sign-flip, n = 5 seeds, smallest attainable p = 0.0625). Without collapsed "
        "runs (seed 4 dropped, n = 4, smallest attainable p = 0.125): deployed hack +0.05 [-0.18, 0.28], p = 0.625; "
        "deployed solve +0.00 [0.00, 0.00], p = 1."
    )
    assert want in verdict.splitlines()
    assert want[2:] in data["verdict"]
    lines = [line for line in verdict.splitlines() if line.startswith("- ") and " vs " in line]
    diagnostic = [i for i, line in enumerate(lines) if line.startswith("- DIAGNOSTIC")]
    assert diagnostic == [len(lines) - 1], "one line per DIAGNOSTIC rung, after the method's lines"
    assert lines[-1].startswith("- DIAGNOSTIC (upper bound, reads labels): labels@cap=4 vs baseline: ")
    assert "labels@cap=4 (DIAGNOSTIC upper bound) - placebo@cap=4" in _section(text, "Paired comparisons")
    # placebo vs baseline: .50 - .70 on every seed: -0.20 [-0.20, -0.20], every sign the same: p = 2/32
    assert "- placebo@cap=4 vs baseline: deployed hack -0.20 [-0.20, -0.20], p = 0.0625;" in verdict
    assert "- routed@cap=10: no placebo@cap=10 in this study, so it is not compared with a placebo" in verdict


def test_collapsed_runs_are_counted_and_shown(study):
    text, data, _ = study
    collapsed = _section(text, "Collapsed runs")
    assert collapsed.startswith("2 of 22 runs collapsed: routed@cap=4 seed 4 (final training reward 0.10 < 0.5); ")
    assert "routed@cap=10 seed 1 (full model compiles 0.05 < 0.1)" in collapsed
    assert "routed@cap=10 seed 0" not in collapsed  # its deployed model does not compile; the full model does
    table = _section(text, "Deployment evaluation over seeds").splitlines()
    rows = {r.split(" | ")[0][2:]: r.split(" | ") for r in table if r.startswith("| ")}
    assert rows["routed@cap=4"][2] == "1 (seed 4)" and rows["baseline"][2] == "0"
    assert "0.80*)" in rows["routed@cap=4"][3], "the collapsed seed's value is marked, and still included"
    assert data["arms"]["routed@cap=4"]["collapsed_seeds"] == [4]
    assert collapse_reason({"script": {"compile_reward": 0.5}}, _eval(full_compiled=0.5), 0.49) is not None
    assert collapse_reason({"script": {"compile_reward": 0.5}}, _eval(full_compiled=0.5), 0.5) is None


def _eval(full_compiled: float) -> dict:
    return {"modes": {"full": {"compiled": {"rate": full_compiled}}}}


def test_columns_t_intervals_and_the_dropped_column(study):
    text, data, _ = study
    table = _section(text, "Deployment evaluation over seeds")
    head = table.splitlines()[0].strip("| ").split(" | ")
    assert head == ["arm", "seeds", "collapsed", "deployed hack", "full hack", "deployed defines run_tests",
                    "deployed solve", "full solve", "deployed compiles", "routing mass (rollouts / grad)",
                    "final reward"]  # fmt: skip
    assert "Not shown, identical in every run: deployed attempted (0.00)." in table
    assert [c["column"] for c in data["dropped_columns"]] == ["deployed attempted"]
    # routed@cap=4 hack .55 .60 .35 .70 .80: mean .60, sd sqrt(.115 / 4) -> +-0.2105: [0.39, 0.81]
    assert "| 0.60 [0.39, 0.81] (0.55, 0.60, 0.35, 0.70, 0.80*) |" in table
    assert "[n/a]" not in table.split("routed@cap=10")[0]
    assert "Wilson" not in table, "a binomial interval only in the evaluation-noise table"
    noise = _section(text, "Seed spread against evaluation noise")
    assert "pooled Wilson (evaluation noise only)" in noise.splitlines()[0]
    # baseline: 14 of 20 on each seed -> pooled 70 of 100; seed SD 0
    baseline = next(line for line in noise.splitlines() if line.startswith("| baseline |"))
    assert baseline.split(" | ")[1:4] == ["20", "0.00", baseline.split(" | ")[3]] and "0.70 [0.60, 0.78]" in baseline
    every = _section(text, "Every run")
    assert every.splitlines()[0].startswith("| arm | seed | collapsed | deployed hack |")


def test_report_json_carries_the_comparisons(study):
    _, data, _ = study
    comp = next(c for c in data["comparisons"] if (c["arm"], c["reference"]) == ("routed@cap=4", "placebo@cap=4"))
    hack = comp["metrics"]["deployed hack"]
    assert hack["all"]["p"] == pytest.approx(10 / 32) and hack["all"]["seeds"] == [0, 1, 2, 3, 4]
    assert hack["without_collapsed"]["seeds"] == [0, 1, 2, 3] and comp["collapsed_pairs"] == [4]
    assert data["arms"]["baseline"]["rates"]["deployed hack"]["per_seed"] == {str(s): 0.7 for s in range(5)}
    assert all("per_problem" not in r["eval"] and "curves" not in r for r in data["runs"]), "kept in each run"


def test_the_verdicts_metrics_stay_when_identical_in_every_run(tmp_path):
    dirs = [make_run(tmp_path, arm, 0, 0, 0) for arm in ("baseline", "routed")]
    text, _ = write_report(dirs, tmp_path / "report")
    head = _section(text, "Deployment evaluation over seeds").splitlines()[0]
    assert "| deployed hack |" in head and "| deployed solve |" in head and "full hack" not in head


def test_plots_one_colour_per_arm_and_axes_fitted(study, tmp_path):
    from routed_grpo.lab.plots import OKABE_ITO, colours, limits

    _, _, pngs = study
    assert sorted(p.name for p in pngs) == ["tradeoff.png"]  # no held-out curves in these runs
    arms = ["baseline", "placebo", "routed", "oracle_direction", "labels", "placebo@cap=4", "routed@cap=4"]
    chosen = colours(arms)
    assert len(set(chosen.values())) == len(arms) and chosen["baseline"] == OKABE_ITO[0]
    assert len(set(colours([f"a{i}" for i in range(18)]).values())) == 18
    lo, hi = limits(0.0, 0.25)
    assert -0.02 <= lo <= 0.0 and 0.25 < hi < 0.3, "solve rates below 0.25 do not get a 0-1 axis"


def test_an_arm_is_paired_with_the_baseline_of_its_own_initialisation(tmp_path):
    from routed_grpo.lab.report import render_with_data, summarise_run

    dirs = []
    for seed in range(2):
        dirs.append(make_run(tmp_path, "baseline", seed, 14, 2))
        dirs.append(make_run(tmp_path, "baseline@adapter_init=svd", seed, 12, 3))
        dirs.append(make_run(tmp_path, "routed@adapter_init=svd", seed, 6, 3))
        dirs.append(make_run(tmp_path, "routed", seed, 8, 3))
        dirs.append(make_run(tmp_path, "routed@adapter_init=svd,intervention=penalty", seed, 7, 3))
    _, data = render_with_data([summarise_run(d) for d in dirs])
    refs = {c["arm"]: c["reference"] for c in data["comparisons"] if c["reference"].startswith("baseline")}
    assert refs == {
        "routed@adapter_init=svd": "baseline@adapter_init=svd",
        "routed@adapter_init=svd,intervention=penalty": "baseline@adapter_init=svd",  # its other keys: no baseline
        "routed": "baseline",
    }
    svd = next(
        c for c in data["comparisons"] if c["arm"] == "routed@adapter_init=svd" and "baseline" in c["reference"]
    )
    assert svd["metrics"]["deployed hack"]["all"]["mean"] == pytest.approx((6 - 12) / 20)
