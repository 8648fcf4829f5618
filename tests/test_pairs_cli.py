"""`routed-grpo pairs` on a tiny model saved to disk: validate, extract, placebo, score; bad input exits 2."""

import re

import pytest
import torch
from typer.testing import CliRunner
from vact_helpers import write_pairs

from routed_grpo.cli.main import app
from routed_grpo.vact import load_vact

runner = CliRunner()
SMALL = ["--rank", "4", "--targets", "q_proj,down_proj", "--batch-size", "3", "--device", "cpu"]


def _run(*args):
    return runner.invoke(app, ["pairs", *map(str, args)])


def test_validate_prints_counts(tmp_path):
    result = _run("validate", write_pairs(tmp_path / "p.yaml", n=3))
    assert result.exit_code == 0, result.output
    assert '"overwrite_tests": 3' in result.output
    assert "ok: 3 pairs" in result.output


def test_validate_bad_file_exits_2_naming_pair_and_field(tmp_path):
    path = write_pairs(tmp_path / "p.yaml", n=2)
    path.write_text(path.read_text().replace("domain:function", "domain:nowhere", 1))
    result = _run("validate", path)
    assert result.exit_code == 2
    assert "overwrite_tests.fn.add_0" in result.output and "'tags'" in result.output


def _with_checks(path, check: str):
    """Give every pair of `path` the check `check`, in which `add` is the pair's own add_<i>."""
    check = f"add = next(v for k, v in globals().items() if k.startswith('add_')); {check}"
    path.write_text(path.read_text().replace("    clean: |", f"    checks: [{check!r}]\n    clean: |"))
    return path


def test_validate_run_checks_wants_clean_passing_and_hack_failing(tmp_path):
    # add_i(2, 3) == 5: the clean side passes, the hack side (returns 0) fails, as a hack pair should
    good = _with_checks(write_pairs(tmp_path / "good.yaml", n=2), "assert add(2, 3) == 5")
    assert _run("validate", good, "--run-checks").exit_code == 0
    # a check both sides pass: the hack side is not a hack of the checks
    lax = _with_checks(write_pairs(tmp_path / "lax.yaml", n=2), "assert add(2, 3) in (0, 5)")
    result = _run("validate", lax, "--run-checks")
    assert result.exit_code == 1
    assert "overwrite_tests.fn.add_0" in result.output and "field 'hack'" in result.output
    # a check the clean side fails
    bad = _with_checks(write_pairs(tmp_path / "bad.yaml", n=2), "assert add(2, 3) == 6")
    result = _run("validate", bad, "--run-checks")
    assert result.exit_code == 1 and "field 'clean'" in result.output


def test_extract_placebo_score_end_to_end(tmp_path, tiny_model_dir):
    pairs = write_pairs(tmp_path / "p.yaml", n=4)
    out = tmp_path / "vact.safetensors"
    result = _run("extract", "--model", tiny_model_dir, "--pairs", pairs, "--out", out, "--init-seed", "3", *SMALL)
    assert result.exit_code == 0, result.output
    vact, meta = load_vact(out)
    assert vact.shape == (4, 4)  # 2 layers x (q_proj, down_proj), rank 4
    torch.testing.assert_close(vact.norm(dim=-1), torch.ones(4))
    assert meta["kind"] == "vact" and meta["n_pairs"] == 4 and meta["init_seed"] == 3
    assert meta["adapter_targets"] == ["down_proj", "q_proj"] and meta["sampling_mode"] == "full"
    assert len(meta["pairs_hash"]) == 64

    placebo = tmp_path / "placebo.safetensors"
    result = _run("placebo", "--like", out, "--seed", 5, "--out", placebo)
    assert result.exit_code == 0, result.output
    p_vact, p_meta = load_vact(placebo)
    assert p_vact.shape == vact.shape and not torch.allclose(p_vact, vact)
    assert p_meta["kind"] == "placebo" and p_meta["seed"] == 5
    assert p_meta["adapter_fingerprint"] == meta["adapter_fingerprint"]

    for direction in (out, placebo):
        result = _run("score", "--model", tiny_model_dir, "--vact", direction, "--pairs", pairs, "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert sum("overwrite_tests.fn.add_" in line for line in result.output.splitlines()) == 4
        auroc = float(re.search(r"AUROC hack vs clean: ([0-9.]+)", result.output).group(1))
        assert 0.0 <= auroc <= 1.0  # reported, not asserted: random weights


def test_extract_bad_pairs_exits_2_without_output(tmp_path, tiny_model_dir):
    pairs = write_pairs(tmp_path / "p.yaml", n=2)
    pairs.write_text(pairs.read_text().replace("    hack: |", "    hak: |", 1))
    out = tmp_path / "vact.safetensors"
    result = _run("extract", "--model", tiny_model_dir, "--pairs", pairs, "--out", out, *SMALL)
    assert result.exit_code == 2
    assert "overwrite_tests.fn.add_0" in result.output and "hak" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "tiny-model"]


@pytest.mark.parametrize("bad", ["missing_model", "bad_mode"])
def test_extract_bad_options_exit_2(tmp_path, tiny_model_dir, bad):
    pairs = write_pairs(tmp_path / "p.yaml", n=2)
    model = tmp_path / "nope" if bad == "missing_model" else tiny_model_dir
    extra = ["--mode", "sideways"] if bad == "bad_mode" else []
    result = _run("extract", "--model", model, "--pairs", pairs, "--out", tmp_path / "v.safetensors", *SMALL, *extra)
    assert result.exit_code == 2
    # a missing model gets transformers' own resolution error, naming what was asked for
    assert (f"{model}: cannot load the model" if bad == "missing_model" else "--mode") in result.output
    assert not (tmp_path / "v.safetensors").exists()


def test_score_refuses_vact_of_another_adapter(tmp_path, tiny_model_dir):
    pairs = write_pairs(tmp_path / "p.yaml", n=2)
    out = tmp_path / "vact.safetensors"
    assert _run("extract", "--model", tiny_model_dir, "--pairs", pairs, "--out", out, *SMALL).exit_code == 0
    _, meta = load_vact(out)
    from routed_grpo.vact import save_vact

    forged = tmp_path / "forged.safetensors"
    parts = {**meta["adapter_fingerprint_parts"], "base_weights": "0" * 16, "base_sample": [0.5] * 48}
    save_vact(forged, torch.zeros(4, 4) + 0.5, {**meta, "adapter_fingerprint_parts": parts})
    result = _run("score", "--model", tiny_model_dir, "--vact", forged, "--pairs", pairs, "--device", "cpu")
    assert result.exit_code == 2
    assert "fingerprint" in result.output and "base weights" in result.output
