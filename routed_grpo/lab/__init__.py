"""The experiment harness that uses the routed-grpo core: the CPU model organism, one arm end to end, deployment
evaluation, reports, the multi-seed study and the DIAGNOSTIC label-reading arms.

What a TRL user imports (config, trainer, adapter, gate, `v_act`, pairs) lives in `routed_grpo` itself and never
imports this subpackage (`tests/test_layout.py` checks it). The organism recipes and pairs travel with the package
(`routed_grpo/lab/recipes` and `routed_grpo/lab/pairs` are the repository's `recipes/` and `pairs/`), so
`pip install .` followed by `routed-grpo demo` works from any directory.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
PAIRS_DIR = PACKAGE_DIR / "pairs"
ORGANISM_RECIPES = RECIPES_DIR / "organism"
ORGANISM_PAIRS = PAIRS_DIR / "organism"
