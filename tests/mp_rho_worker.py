"""Worker for test_trainer_multiprocess's ratio-metric test: each rank trains 2 steps of 2 micro-batches, logged as one
window, records every row's ratios as the loss used them, and writes them with its log history."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer_utils import finish_worker, perturb_quarantine, trainer  # noqa: E402


def main(out: Path) -> None:
    t = trainer(
        out,
        max_steps=2,
        logging_steps=2,  # one logging window: 2 steps x 2 micro-batches x 2 ranks
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        gen_deploy_frac=0.5,  # mismatched rows: rho != 1
        ddp_backend="gloo",
        save_strategy="steps",
        save_steps=2,
    )
    perturb_quarantine(t.adapter)
    rows, original = [], t._check_finite

    def check_finite(loss, inputs):
        # The ratio before mismatch_ratio_cap, per row, computed here from what the loss forward used.
        mask = inputs["completion_mask"].bool()
        rho = torch.exp(t._loss_logps - t._uncapped_old_logps)
        for i in range(mask.size(0)):
            if mask[i].any():
                r = rho[i][mask[i]]
                rows.append({"zone": int(inputs["routing_zone"][i]), "mean": r.mean().item(), "max": r.max().item()})
        return original(loss, inputs)

    t._check_finite = check_finite
    t.train()
    rank = t.accelerator.process_index
    record = {"rows": rows, "log_history": t.state.log_history, "global_step": t.state.global_step}
    finish_worker(out / f"rho_rank{rank}.json", record)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
