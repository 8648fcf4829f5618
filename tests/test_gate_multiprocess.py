"""I6 across processes: two CPU processes (gloo) with different row counts hold the same buffer and thresholds."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from routed_grpo.gate import Gate

WORLD = 2
STEPS = 4
CAPACITY = 12  # small so the run wraps the ring buffer


def local_batch(step: int, rank: int) -> torch.Tensor:
    """This rank's activations at `step`: a different, seeded row count per rank and step."""
    n = 2 + rank * 3 + step % 2  # rank 0: 2-3 rows, rank 1: 5-6 rows
    if step == STEPS - 1 and rank == 0:
        n = 0  # a process may have no rows in a batch
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 3, 2, generator=gen)


def vact_at(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7 if step < 2 else 8)  # refreshed v_act from step 2 on
    v = torch.randn(3, 2, generator=gen)
    return v / v.norm(dim=-1, keepdim=True)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        gate = Gate(vact_at(0), route_tail_q=0.2, capacity=CAPACITY)
        results = []
        for step in range(STEPS):
            gate.set_vact(vact_at(step))
            dec = gate.step(local_batch(step, rank))
            results.append(
                {
                    "lo": dec.lo,
                    "hi": dec.hi,
                    "zones": dec.zones,
                    "scores": dec.scores,
                    "zone_frac": dec.zone_frac,
                    "buffer": gate.buffer.acts().clone(),
                }
            )
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_processes_share_buffer_and_thresholds(tmp_path):
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn"
    )
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    reference = Gate(vact_at(0), route_tail_q=0.2, capacity=CAPACITY)  # one process fed the global batches
    for step in range(STEPS):
        batches = [local_batch(step, r) for r in range(WORLD)]
        reference.set_vact(vact_at(step))
        ref = reference.step(torch.cat(batches))
        r0, r1 = per_rank[0][step], per_rank[1][step]
        assert (r0["lo"], r0["hi"]) == (r1["lo"], r1["hi"]) == (ref.lo, ref.hi)
        assert torch.equal(r0["buffer"], r1["buffer"])
        assert torch.equal(r0["buffer"], reference.buffer.acts())
        assert r0["zone_frac"] == r1["zone_frac"] == ref.zone_frac
        n0 = batches[0].shape[0]
        assert torch.equal(r0["zones"], ref.zones[:n0])
        assert torch.equal(r1["zones"], ref.zones[n0:])
        torch.testing.assert_close(r1["scores"], ref.scores[n0:])
    assert len(reference.buffer) == CAPACITY  # the run did wrap around
