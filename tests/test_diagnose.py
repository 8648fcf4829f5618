"""`pairs diagnose` (DIAGNOSTIC): it recovers a planted direction and reports chance on unplanted activations."""

import json

import pytest
import torch

from routed_grpo.lab.diagnose import cv_auroc, diagnose, haar_aurocs, markdown, png

S, W = 3, 6


def _planted(n=200, shift=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(S, W, generator=g), dim=-1)
    y = torch.rand(n, generator=g) < 0.3
    acts = torch.randn(n, S, W, generator=g) + shift * y[:, None, None].float() * direction
    return acts, y, direction


def _pairs(direction, n=12, seed=1, modes=("a", "b")):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, S, W, generator=g)
    hack = clean + direction + 0.3 * torch.randn(n, S, W, generator=g)
    tags = [[f"mode:{modes[i % len(modes)]}"] for i in range(n)]
    return hack, clean, tags


def test_a_planted_direction_is_seen_by_v_act_and_the_oracle_and_beats_the_null():
    acts, y, direction = _planted(shift=1.5)
    hack, clean, tags = _pairs(direction)
    out = diagnose(hack, clean, tags, acts, {"hack_strict": y}, n_null=100)["hack_strict"]
    assert out["vact"] > 0.9 and out["oracle_cv"] > 0.9
    assert out["vact"] > out["null_q95"] and abs(out["null_mean"] - 0.5) < 0.1
    assert set(out["loo"]) == {"a", "b"} and min(out["loo"].values()) > 0.9
    assert out["cos_vact_oracle"] > 0.8
    assert out["n"] == 200 and out["n_positive"] == int(y.sum())


def test_pairs_that_point_elsewhere_score_chance_while_the_oracle_still_sees_the_hack():
    acts, y, direction = _planted(shift=1.5)
    other = torch.nn.functional.normalize(torch.randn(S, W, generator=torch.Generator().manual_seed(9)), dim=-1)
    other = torch.nn.functional.normalize(other - (other * direction).sum(-1, keepdim=True) * direction, dim=-1)
    hack, clean, tags = _pairs(other)  # orthogonal to the planted direction at every site
    out = diagnose(hack, clean, tags, acts, {"hack_strict": y}, n_null=100)["hack_strict"]
    assert abs(out["vact"] - 0.5) < 0.12 and out["vact"] < out["null_q95"]
    assert out["oracle_cv"] > 0.9 and abs(out["cos_vact_oracle"]) < 0.3


def test_unplanted_activations_give_chance_everywhere():
    acts, y, _ = _planted(shift=0.0, n=400)
    hack, clean, tags = _pairs(torch.zeros(S, W))
    out = diagnose(hack, clean, tags, acts, {"hack_strict": y}, n_null=100)["hack_strict"]
    assert abs(out["oracle_cv"] - 0.5) < 0.1 and abs(out["vact"] - 0.5) < 0.1


def test_cross_validation_does_not_score_rows_it_was_fit_on():
    """Pure noise with few rows: an in-sample fit would score well above chance, the cross-validated one does not."""
    g = torch.Generator().manual_seed(4)
    acts, y = torch.randn(40, S, 50, generator=g), torch.arange(40) % 2 == 0
    assert cv_auroc(acts, y, folds=5) < 0.75
    from routed_grpo.gate import score
    from routed_grpo.lab.diagnose import oracle_direction
    from routed_grpo.vact import auroc

    s = score(acts, oracle_direction(acts, y))
    assert auroc(s[y], s[~y]) > 0.95  # what cross-validation protects against


def test_a_label_with_one_class_is_left_out_and_the_outputs_render(tmp_path):
    acts, y, direction = _planted()
    hack, clean, tags = _pairs(direction)
    labels = {"hack_strict": y, "correct": torch.zeros_like(y)}
    results = {"bottleneck": diagnose(hack, clean, tags, acts, labels, n_null=20)}
    assert list(results["bottleneck"]) == ["hack_strict"]
    text = markdown(results, "runs/x/rollouts.jsonl")
    assert "DIAGNOSTIC" in text and "## sensor `bottleneck`" in text and "v_act without a" in text
    assert png(results)[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(results)  # the record is plain JSON


def test_haar_null_is_seeded_and_centred():
    acts, y, _ = _planted(shift=0.0)
    a, b = haar_aurocs(acts, y, 50, seed=3), haar_aurocs(acts, y, 50, seed=3)
    assert torch.equal(a, b) and abs(float(a.mean()) - 0.5) < 0.05
    with pytest.raises(ValueError, match="one class"):
        cv_auroc(acts, torch.arange(len(y)) == 0, folds=5)


def test_a_single_mode_has_no_leave_one_out():
    acts, y, direction = _planted()
    hack, clean, _ = _pairs(direction)
    out = diagnose(hack, clean, [["mode:a"]] * len(hack), acts, {"hack_strict": y}, n_null=10)
    assert out["hack_strict"]["loo"] == {}


def test_the_command_writes_its_three_files_and_refuses_rollouts_without_labels(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner
    from vact_helpers import write_pairs

    from routed_grpo.cli.main import app

    pairs = tmp_path / "pairs.yaml"
    write_pairs(pairs, n=4)
    rows = [
        {"mode": "full", "prompt": [{"role": "user", "content": f"task {i}"}], "completion": f"def f(): return {i}",
         "labels": {"hack_strict": float(i % 2), "defines_run_tests": float(i % 3 == 0), "correct": float(i % 5 == 0)}}
        for i in range(30)
    ]  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    (run / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "diag"
    args = ["pairs", "diagnose", "--pairs", str(pairs), "--model", str(tiny_model_dir), "--rollouts", str(run)]
    args += ["--rank", "4", "--targets", "q_proj,down_proj", "--n-null", "20", "--folds", "3", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "diagnose.json").read_text())
    assert list(record["sensors"]) == ["bottleneck", "residual:1"]  # at initialisation bottleneck_init == bottleneck
    assert set(record["sensors"]["residual:1"]) == {"hack_strict", "defines_run_tests", "correct"}
    assert (out / "diagnose.md").read_text().startswith("# `pairs diagnose` (DIAGNOSTIC")
    assert (out / "diagnose.png").stat().st_size > 1000
    svd = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "diag_svd"), "--adapter-init", "svd"])
    assert svd.exit_code == 0, svd.output
    in_svd = json.loads((tmp_path / "diag_svd" / "diagnose.json").read_text())
    assert in_svd["adapter"]["init"] == "svd" and record["adapter"]["init"] == "random"
    assert in_svd["sensors"]["residual:1"] == record["sensors"]["residual:1"]  # the residual stream: no adapter
    assert in_svd["sensors"]["bottleneck"] != record["sensors"]["bottleneck"]  # another basis
    for r in rows:
        del r["labels"]["correct"]
    (run / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out2 = tmp_path / "diag2"
    result = CliRunner().invoke(app, [*args[:-1], str(out2)])
    assert result.exit_code == 2 and "field 'labels' lacks ['correct']" in result.output and not out2.exists()


def test_with_a_checkpoint_the_bottleneck_is_read_with_the_trained_blocks(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner
    from vact_helpers import write_pairs

    from routed_grpo.adapter import DEPLOYED, attach_routed_adapter
    from routed_grpo.cli.main import app

    adapter = attach_routed_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), rank=4, targets=["q_proj"])
    with torch.no_grad():  # "training" moved A_dep
        for layer in adapter.layers.values():
            layer.lora_A[DEPLOYED].weight.add_(torch.randn_like(layer.lora_A[DEPLOYED].weight))
    adapter.model.save_pretrained(tmp_path / "ckpt")  # deployed/ and quarantine/, as a trainer checkpoint
    pairs = tmp_path / "pairs.yaml"
    write_pairs(pairs, n=4)
    rows = [{"mode": "full", "prompt": [{"role": "user", "content": f"t {i}"}], "completion": f"x = {i}",
             "labels": {"hack_strict": float(i % 2), "defines_run_tests": float(i % 3 == 0), "correct": 0.0}}
            for i in range(20)]  # fmt: skip
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["pairs", "diagnose", "--pairs", str(pairs), "--model", str(tiny_model_dir), "--out", str(tmp_path / "d")]
    args += ["--rollouts", str(tmp_path / "rollouts.jsonl"), "--rank", "4", "--targets", "q_proj", "--n-null", "10"]
    args += ["--folds", "2", "--checkpoint", str(tmp_path / "ckpt")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert list(record["sensors"]) == ["bottleneck", "residual:1", "bottleneck_init"]
    live, init = record["sensors"]["bottleneck"], record["sensors"]["bottleneck_init"]
    assert live["hack_strict"]["vact"] != init["hack_strict"]["vact"]  # A_dep moved: two different bases
    assert "correct" not in live  # one class only: left out
    result = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no 'deployed' block" in result.output
