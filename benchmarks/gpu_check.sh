#!/usr/bin/env bash
# The GPU check of issue 10, prepared for a machine with one NVIDIA GPU. NOT YET RUN: written in a session without
# an accelerator; only its --dry-run (the same commands, CPU, tiny size) has run.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run    # here: checks the script itself in about a minute on CPU
#
# What it runs, in bf16 on a Qwen2-architecture model made from a config (Qwen2-0.5B's shape and vocabulary, about
# 494M parameters, random weights, nothing downloaded):
#   1. benchmarks/step_time.py: stock vs routed at gen_deploy_frac 0 and 0.5, plain weights, then a 4-bit NF4 base
#      (bitsandbytes); prints the table, step and memory ratios and tokens per second, last line JSON;
#   2. benchmarks/sampling_pass_check.py: the gate's sampling-pass activations against a teacher-forced forward in
#      bf16, and the share of rows whose zone agrees.
# Needs python3 with CUDA torch, transformers, peft, accelerate, datasets, trl==1.16.0 and bitsandbytes. A machine
# without network access can get the missing ones as wheels in .whl/ (pip download on a machine that has it):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl trl==1.16.0 datasets bitsandbytes ...
# and this script installs .whl/*.whl into /tmp/site first. Budget: about 8 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--dry-run" ]]; then
    PY=${PY_DRY:-.venv/bin/python}
    SIZE=tiny DTYPE="" STEPS="--steps 1 --warmup 1 --repeats 1"
    export OMP_NUM_THREADS=1
else
    SIZE=qwen2-0.5b DTYPE="--bf16" STEPS="--steps 3 --warmup 1 --repeats 2"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    fi
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
fi
"$PY" -c "import trl, peft, datasets, bitsandbytes; assert trl.__version__.startswith('1.16'), trl.__version__" || {
    echo "gpu_check: needs trl==1.16, peft, datasets and bitsandbytes importable by $PY (see the header)" >&2
    exit 2
}

echo "== step time, plain $SIZE $DTYPE =="
"$PY" benchmarks/step_time.py --sizes "$SIZE" $DTYPE $STEPS
echo "== step time, 4-bit NF4 base $SIZE $DTYPE =="
"$PY" benchmarks/step_time.py --sizes "$SIZE" $DTYPE --quant4 $STEPS
echo "== sampling-pass activations vs teacher-forced forward, $SIZE $DTYPE =="
"$PY" benchmarks/sampling_pass_check.py --size "$SIZE" $DTYPE
