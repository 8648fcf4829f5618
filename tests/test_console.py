"""The console: one progress bar per run with the few numbers that matter; known-harmless warnings hidden."""

import os
import subprocess
import sys

import pytest
from trainer_utils import trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from routed_grpo.lab.callbacks import ConsoleProgress, use_console

NOTICE = "Failed to load CPU gemm_4bit_forward"


def test_console_replaces_the_metrics_printer_and_shows_only_the_chosen_numbers(tmp_path):
    t = trainer(tmp_path, max_steps=2)
    use_console(t, "routed seed 0", heldout=None)
    kinds = [type(c) for c in t.callback_handler.callbacks]
    assert ProgressCallback not in kinds and PrinterCallback not in kinds and kinds.count(ConsoleProgress) == 1
    console = next(c for c in t.callback_handler.callbacks if isinstance(c, ConsoleProgress))
    t.train()
    assert set(console.last) == {"reward", "keep", "absorb", "route"}  # no sandbox reward here: no compiled/hinted
    assert console.last["reward"] == pytest.approx(t.state.log_history[-2]["reward"])


@pytest.mark.parametrize("verbose", [False, True])
def test_known_harmless_notice_is_hidden_unless_verbose(verbose):
    code = "from routed_grpo.utils import quiet_known_noise; quiet_known_noise(); import bitsandbytes.backends.cpu.ops"
    env = {**os.environ, "ROUTED_GRPO_VERBOSE": "1" if verbose else "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    if verbose and NOTICE not in out.stderr:
        pytest.skip("this CPU has no avx512bf16: bitsandbytes prints no kernel notice to hide")
    assert (NOTICE in out.stderr) == verbose
