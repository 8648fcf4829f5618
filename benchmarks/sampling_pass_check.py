"""How far the gate's sampling-pass activations are from a teacher-forced forward, and whether the zones agree.

    python benchmarks/sampling_pass_check.py --size qwen2-0.5b --bf16      # on a GPU (benchmarks/gpu_check.sh)
    python benchmarks/sampling_pass_check.py --size tiny                   # CPU, seconds

One generation batch of a routed trainer (placebo direction, `gen_deploy_frac` 0.5, quarantine perturbed so the
two sampling modes differ): the activations pooled while sampling (what the trainer uses) against the same rows'
teacher-forced forward in their sampling modes (the fallback, which was the only source before), and the zones
a fresh gate with the same buffer gives for each. In float32 they agree to about 1e-6 (tests/test_behaviour.py);
in bfloat16 the two computations round differently, and a row on a threshold may change zone: this reports how
often. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(step_time.SIZES))
    parser.add_argument("--bf16", action="store_true")
    opts = parser.parse_args()
    opts.quant4 = False
    import torch

    from routed_grpo.gate import Gate

    size = step_time.SIZES[opts.size]
    tokenizer, data = step_time.tokenizer_and_data(512)
    state = {"weights": step_time.build_model(size, tokenizer).state_dict()}
    t = step_time.make_trainer("routed_frac0.5", size, state, tokenizer, data, 1, Path(tempfile.mkdtemp()), opts)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in t.adapter.parameters("quarantine"):
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 0.02)
    seen = {}
    flag, observed = t.scorer.flag, t._observed_behaviour

    def spy_flag(trainer, acts, rollouts):
        seen["buffer"] = t.gate.state_dict()
        seen["acts"] = acts.clone()
        return flag(trainer, acts, rollouts)

    def spy_observed(output):
        seen["output"] = output  # the batch the scorer flags, before TRL shuffles it
        return observed(output)

    t.scorer.flag, t._observed_behaviour = spy_flag, spy_observed
    t.model.train()
    t._prepare_inputs(next(iter(t.get_train_dataloader())))
    out = seen["output"]
    full = out["sampling_full"].bool()
    with torch.no_grad():
        _, teacher = t._sampling_mode_forward(out, full)
    zones = []
    for acts in (seen["acts"], teacher):
        gate = Gate(seen["buffer"]["vact"], t.args.route_tail_q, t.gate.buffer.capacity, None, acts.device)
        gate.load_state_dict(seen["buffer"])
        zones.append(gate.step(acts).zones)
    diff = (seen["acts"] - teacher).abs()
    print(
        json.dumps(
            {
                "size": opts.size,
                "bf16": opts.bf16,
                "rows": int(full.numel()),
                "acts_max_abs_diff": float(diff.max()),
                "acts_max_abs": float(teacher.abs().max()),
                "acts_rel_diff": float(diff.max() / teacher.abs().max().clamp_min(1e-12)),
                "zone_agreement": float((zones[0] == zones[1]).float().mean()),
            }
        )
    )


if __name__ == "__main__":
    main()
