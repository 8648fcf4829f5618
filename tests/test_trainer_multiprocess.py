"""Two CPU processes (torchrun, gloo) train two steps and gate with identical thresholds on both ranks (I6)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _launch(worker: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `worker` in two CPU processes (torchrun, gloo), as a user's launch would."""
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
        str(HERE / worker),
        str(tmp_path),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.multiprocess
def test_two_processes_train_with_identical_thresholds(tmp_path):
    proc = _launch("mp_trainer_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["global_step"] == 2 for r in ranks)
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 2
    for a, b in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert (a["lo"], a["hi"], a["buffer"]) == (b["lo"], b["hi"], b["buffer"])
    # The buffer holds both ranks' rows.
    assert ranks[0]["steps"][0]["buffer"] == ranks[0]["steps"][0]["rows"] + ranks[1]["steps"][0]["rows"]


@pytest.mark.multiprocess
def test_rho_metrics_are_the_true_maximum_and_row_weighted_mean_over_ranks_micro_batches_and_steps(tmp_path):
    """2 processes x 2 accumulation micro-batches x 2 steps in one logging window; the gate is saved once."""
    proc = _launch("mp_rho_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rho_rank{r}.json").read_text()) for r in (0, 1)]
    rows = ranks[0]["rows"] + ranks[1]["rows"]
    assert len(rows) == 2 * 2 * 2 * 4  # ranks x steps x micro-batches x rows
    for rank in ranks:
        logged = next(h for h in rank["log_history"] if any(k.startswith("routing/rho_max/") for k in h))
        for z, name in enumerate(("keep", "absorb", "route")):
            zone_rows = [r for r in rows if r["zone"] == z]
            if not zone_rows:
                assert f"routing/rho_max/{name}" not in logged
                continue
            assert logged[f"routing/rho_max/{name}"] == pytest.approx(max(r["max"] for r in zone_rows), rel=1e-6)
            mean = sum(r["mean"] for r in zone_rows) / len(zone_rows)
            assert logged[f"routing/rho_mean/{name}"] == pytest.approx(mean, rel=1e-5)
    assert max(r["max"] for r in rows) > 1.01, "mismatched rows must give ratios away from 1"
    folder = tmp_path / "out" / "checkpoint-2"
    assert (folder / "routing_gate.pt").exists()
    assert sorted(p.name for p in folder.glob("routing_*")) == [
        "routing_gate.pt",
        "routing_state_rank0.pt",
        "routing_state_rank1.pt",
    ]


@pytest.mark.multiprocess
def test_two_processes_with_share_prompt_forward_keep_identical_blocks(tmp_path):
    """The prompt forward that bypasses DDP's wrapper still has its gradient all-reduced: both ranks' blocks stay
    equal after two steps, and both moved."""
    proc = _launch("mp_shared_prompt_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["shared"] for r in ranks)  # the shared prefix ran on both ranks
    for block in ("deployed", "quarantine"):
        assert ranks[0]["moved"][block] > 0
        assert ranks[0]["params"][block] == ranks[1]["params"][block], block
