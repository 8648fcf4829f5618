"""Recipes parse with TRL's parser, arms are like for like, bad keys fail naming the key; accelerate configs."""

import sys
from pathlib import Path

import pytest
import yaml

from routed_grpo.lab.evaluation import wilson
from routed_grpo.lab.experiment import ARM_ROUTING, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIRS = ("organism", "qwen3_4b")
ARMS = {
    "organism": ("baseline", "routed", "placebo", "labels", "oracle_direction"),
    "qwen3_4b": ("baseline", "routed", "placebo", "monitor"),
}
# keys allowed to differ between the arms of one recipe directory; everything else must be equal (same data,
# model, adapter, reward, seed, optimiser). The DIAGNOSTIC arms add their label source and knobs.
ARM_KEYS = {"arm", "routing", "vact_pairs_path", "placebo_seed", "output_dir", "measure_train"}
ARM_KEYS |= {"monitor_model", "monitor_base_url", "monitor_api_key_env", "monitor_concurrency", "monitor_timeout"}
ARM_KEYS |= {"monitor_extra_body"}
ARM_KEYS |= {"monitor_threshold", "intervention", "flag_penalty"}
DIAGNOSTIC_KEYS = {
    "label_source",
    "label_recall",
    "label_fpr",
    "label_negative_zone",
    "label_seed",
    "oracle_rollouts",
    "oracle_label",
}


def _argv(recipe_dir: str, arm: str, *extra: str) -> list[str]:
    argv = ["--config", str(ROOT / "recipes" / recipe_dir / f"{arm}.yaml"), *extra]
    return argv + (["--bf16", "false"] if recipe_dir == "qwen3_4b" else [])  # GPU recipe parsed on a CPU machine


@pytest.mark.parametrize("recipe_dir, arm", [(d, a) for d in RECIPE_DIRS for a in ARMS[d]])
def test_recipe_parses_and_matches_its_arm(recipe_dir, arm):
    script, training, model_args = parse_recipe(_argv(recipe_dir, arm))
    assert script.arm == arm and training.routing == ARM_ROUTING[arm]
    assert training.loss_type == "dr_grpo" and training.scale_rewards == "none"
    if recipe_dir == "qwen3_4b":  # the reference setting: KL 1e-3 to the base model, vLLM sampling per mode
        assert training.beta == 0.001 and training.use_vllm and training.vllm_mode == "colocate"
    else:
        assert training.beta == 0.0
    assert not model_args.use_peft
    assert Path(training.output_dir).name == arm


@pytest.mark.parametrize("recipe_dir", RECIPE_DIRS)
def test_arms_of_a_recipe_differ_only_in_arm_keys(recipe_dir):
    arms = ARMS[recipe_dir]
    docs = {arm: yaml.safe_load((ROOT / "recipes" / recipe_dir / f"{arm}.yaml").read_text()) for arm in arms}
    assert set(docs) == {p.stem for p in (ROOT / "recipes" / recipe_dir).glob("*.yaml")}
    keys = set().union(*docs.values()) - ARM_KEYS - DIAGNOSTIC_KEYS
    for arm, doc in docs.items():
        assert (DIAGNOSTIC_KEYS & set(doc)) == set() or arm in ("labels", "oracle_direction"), arm
    for key in sorted(keys):
        values = {arm: docs[arm].get(key) for arm in arms}
        assert len({repr(v) for v in values.values()}) == 1, f"{recipe_dir}: {key} differs between arms: {values}"


def test_malformed_recipe_key_fails_with_trl_parser_error_naming_it(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "organism" / "routed.yaml").read_text())
    recipe["learning_rat"] = 0.1  # typo of learning_rate
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"Unknown arguments from config file: \['--learning_rat'"):
        parse_recipe(["--config", str(path)])


def test_train_script_exits_2_on_malformed_recipe(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import train
    finally:
        sys.path.pop(0)
    path = tmp_path / "bad.yaml"
    path.write_text(
        "arm: routed\nrouting: vact\nvact_pairs_path: organism\nuse_cpu: true\nbf16: false\nnot_a_key: 3\n"
    )
    assert train.main(["--config", str(path), "--output_dir", str(tmp_path / "run")]) == 2
    assert "not_a_key" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--arm", "baseline"], "arm='baseline' needs routing='none'"),
        (["--arm", "control"], "arm must be one of"),
        (["--use_peft", "true"], "use_peft must be false"),
        (["--unhackable_frac", "1.5"], "unhackable_frac must be in"),
    ],
)
def test_inconsistent_recipe_values_are_refused(extra, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(_argv("organism", "routed", *extra))


def test_wilson_interval_matches_hand_computed_values():
    # k=5, n=10: centre (0.5 + 1.96^2/20) / (1 + 1.96^2/10) = 0.5; half-width 0.2634
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)  # upper = z^2/n / (1 + z^2/n) = 0.38416 / 1.38416
    assert lo == 0.0 and hi == pytest.approx(0.27754, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("name", ["ddp", "zero2", "fsdp"])
def test_accelerate_configs(name):
    cfg = yaml.safe_load((ROOT / "recipes" / "accelerate_configs" / f"{name}.yaml").read_text())
    want = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "fsdp": "FSDP"}[name]
    assert cfg["distributed_type"] == want and cfg["num_processes"] > 1
    if name == "zero2":
        assert cfg["deepspeed_config"]["zero_stage"] == 2
    root = yaml.safe_load((ROOT / "accelerate_config.yaml").read_text())
    assert root["num_processes"] == 1 and root["distributed_type"] == "NO"
