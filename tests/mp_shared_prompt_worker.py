"""Worker for test_trainer_multiprocess: each rank trains two steps with `share_prompt_forward` and writes a digest
of its adapter blocks and how many prefix forwards ran on fewer rows than the batch."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer_utils import DEPLOYED, QUARANTINE, finish_worker, snapshot, trainer  # noqa: E402


def main(out: Path) -> None:
    kw = dict(share_prompt_forward=True, gradient_checkpointing=False)
    t = trainer(out, max_steps=2, gen_deploy_frac=0.5, ddp_backend="gloo", **kw)
    before = {b: snapshot(t.adapter, b) for b in (DEPLOYED, QUARANTINE)}
    shared = []
    decoder = t.adapter.model.get_base_model().get_decoder()

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if torch.is_grad_enabled() and ids is not None and ids.shape[0] < t.args.per_device_train_batch_size:
            shared.append(ids.shape[0])

    hook = decoder.register_forward_pre_hook(count, with_kwargs=True)
    t.train()
    hook.remove()
    after = {b: snapshot(t.adapter, b) for b in (DEPLOYED, QUARANTINE)}
    record = {
        "world": t.accelerator.num_processes,
        "shared": shared,
        "moved": {b: float((after[b] - before[b]).abs().sum()) for b in after},
        "params": {b: after[b].tolist() for b in after},
    }
    finish_worker(out / f"rank{t.accelerator.process_index}.json", record)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
