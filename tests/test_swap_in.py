"""The README's swap-in: a plain TRL GRPO script runs after changing the two classes and adding the v_act path."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STOCK_SCRIPT = """
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Write code {i}."}]} for i in range(16)])

def reward_len(completions, **kwargs):
    return [-abs(20 - len(c[0]["content"])) for c in completions]

args = GRPOConfig(output_dir=OUT, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                  max_steps=2, use_cpu=True, bf16=False, report_to="none", save_strategy="no")
trainer = GRPOTrainer(model=MODEL, reward_funcs=reward_len, args=args, train_dataset=dataset)
trainer.train()
print("TRAINED", type(trainer).__name__, trainer.state.global_step)
"""


def _run(script: str, model_dir: Path, out: Path) -> str:
    header = f"MODEL = {str(model_dir)!r}\nOUT = {str(out)!r}\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-c", header + script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_plain_trl_script_swaps_in_by_changing_two_classes(tiny_model_dir, tmp_path):
    assert "TRAINED GRPOTrainer 2" in _run(STOCK_SCRIPT, tiny_model_dir, tmp_path / "stock")
    vact = tmp_path / "vact.safetensors"
    extract = subprocess.run(
        [
            sys.executable,
            "-m",
            "routed_grpo.cli.main",
            "pairs",
            "extract",
            "--model",
            str(tiny_model_dir),
            "--pairs",
            str(ROOT / "pairs"),
            "--out",
            str(vact),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=ROOT,
    )
    assert extract.returncode == 0, extract.stderr[-3000:]
    routed = (
        STOCK_SCRIPT.replace(
            "from trl import GRPOConfig, GRPOTrainer", "from routed_grpo import RoutedGRPOConfig, RoutedGRPOTrainer"
        )
        .replace("GRPOConfig(output_dir=OUT,", f"RoutedGRPOConfig(output_dir=OUT, vact_path={str(vact)!r},")
        .replace("GRPOTrainer(model=", "RoutedGRPOTrainer(model=")
    )
    assert routed.count("Routed") == 4
    assert "TRAINED RoutedGRPOTrainer 2" in _run(routed, tiny_model_dir, tmp_path / "routed")
