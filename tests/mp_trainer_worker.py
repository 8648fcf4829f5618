"""Worker for test_trainer_multiprocess: each rank trains two steps and writes its gate thresholds."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from trainer_utils import finish_worker, trainer  # noqa: E402


def main(out: Path) -> None:
    t = trainer(out, max_steps=2, gen_deploy_frac=0.5, ddp_backend="gloo")
    seen = []
    original = t.gate.step

    def step(acts):
        decision = original(acts)
        seen.append({"lo": decision.lo, "hi": decision.hi, "buffer": decision.buffer_size, "rows": len(acts)})
        return decision

    t.gate.step = step
    t.train()
    rank = t.accelerator.process_index
    record = {"steps": seen, "world": t.accelerator.num_processes, "global_step": t.state.global_step}
    finish_worker(out / f"rank{rank}.json", record)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
