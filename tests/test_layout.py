"""The library/lab split: the core never imports the lab, and the lab's recipes and pairs travel with the package."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = [
    "activations",
    "adapter",
    "behaviour",
    "config",
    "gate",
    "ladder",
    "generalise",
    "loss",
    "pairs",
    "routing_state",
    "sensing",
    "sensor",
    "trainer",
    "vact",
    "utils",
    "vllm_sync",
]


def test_core_modules_never_import_the_lab():
    code = (
        "import sys\n"
        + "".join(f"import routed_grpo.{m}\n" for m in CORE)
        + "import routed_grpo; routed_grpo.RoutedGRPOConfig, routed_grpo.RoutedGRPOTrainer\n"
        + "print('LAB=' + ','.join(sorted(m for m in sys.modules if m.startswith('routed_grpo.lab'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert [x for x in out.stdout.splitlines() if x.startswith("LAB=")][-1] == "LAB="


def test_lab_resources_resolve_to_the_repository_files():
    from routed_grpo.lab import ORGANISM_PAIRS, ORGANISM_RECIPES

    for arm in ("baseline", "routed", "placebo"):
        shipped = (ROOT / "recipes" / "organism" / f"{arm}.yaml").read_text()
        assert (ORGANISM_RECIPES / f"{arm}.yaml").read_text() == shipped
    assert sorted(p.name for p in ORGANISM_PAIRS.glob("*.yaml")) == sorted(
        p.name for p in (ROOT / "pairs" / "organism").glob("*.yaml")
    )


@pytest.mark.slow
def test_wheel_carries_the_recipes_and_pairs(tmp_path):
    """A non-editable install gets real files (the links are followed when the wheel is built)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", ".cache", "build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, src, symlinks=True, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
        + [str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("routed_grpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for arm in ("baseline", "routed", "placebo"):
        assert f"routed_grpo/lab/recipes/organism/{arm}.yaml" in names
    assert any(n.startswith("routed_grpo/lab/pairs/organism/") and n.endswith(".yaml") for n in names)
    assert "routed_grpo/lab/cli/experiment_cmd.py" in names
