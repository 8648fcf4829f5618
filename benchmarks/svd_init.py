"""Cost of `adapter_init: svd` at start: the SVD of every target weight on Qwen2.5-0.5B's shape, once.

    OMP_NUM_THREADS=1 python benchmarks/svd_init.py            # fp32 weights, rank 8 per block
    OMP_NUM_THREADS=1 python benchmarks/svd_init.py --rank 32

Builds the model of benchmarks/vact_extract.py (Qwen2.5-0.5B's config, random weights: an SVD's cost depends on
the shapes, not the values), attaches the two blocks with `adapter_init: random` (the baseline: PEFT's own
initialisation plus the seeded `A`), then computes the `svd` factors of every target module
(`RoutedAdapter.compute_initial`, float64 on the CPU) and installs them (`set_initial`). Prints the seconds of each,
their ratio, and the modules' shapes; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vact_extract import build_model  # noqa: E402

from routed_grpo.adapter import attach_routed_adapter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    opts = parser.parse_args()
    model = build_model(torch.float32)
    t0 = time.perf_counter()
    adapter = attach_routed_adapter(model, rank=opts.rank)
    attach_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    factors = adapter.compute_initial("svd")
    svd_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    adapter.set_initial("svd", factors)
    install_s = time.perf_counter() - t2
    shapes = Counter(tuple(layer.get_base_layer().weight.shape) for layer in adapter.layers.values())
    print(f"threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), rank {opts.rank}")
    print(f"{len(adapter.layers)} target modules: " + ", ".join(f"{n} x {s}" for s, n in sorted(shapes.items())))
    print(f"attach (random init): {attach_s:.2f} s; svd factors: {svd_s:.2f} s; install: {install_s:.2f} s")
    out = {"modules": len(adapter.layers), "rank": opts.rank, "attach_s": round(attach_s, 3),
           "svd_s": round(svd_s, 3), "install_s": round(install_s, 3),
           "svd_over_attach": round(svd_s / attach_s, 2)}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
