"""Two CPU processes (torchrun, gloo) train two steps and gate with identical thresholds on both ranks (I6)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.multiprocess
def test_two_processes_train_with_identical_thresholds(tmp_path):
    with socket.socket() as sock:  # a free port on loopback for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # The workers run as a user's launch would, without pytest's variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        port,
        str(HERE / "mp_trainer_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["global_step"] == 2 for r in ranks)
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 2
    for a, b in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert (a["lo"], a["hi"], a["buffer"]) == (b["lo"], b["hi"], b["buffer"])
    # The buffer holds both ranks' rows.
    assert ranks[0]["steps"][0]["buffer"] == ranks[0]["steps"][0]["rows"] + ranks[1]["steps"][0]["rows"]
