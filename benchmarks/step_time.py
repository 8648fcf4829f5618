"""Step time and peak memory: stock `GRPOTrainer` vs `RoutedGRPOTrainer` at gen_deploy_frac 0 and 0.5, one process.

    OMP_NUM_THREADS=1 python benchmarks/step_time.py                      # both CPU sizes (minutes on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/step_time.py --sensor residual:1  # the routed arms read another sensor
    OMP_NUM_THREADS=1 python benchmarks/step_time.py --adapter-init svd   # the routed arms' blocks in SVD space
    python benchmarks/step_time.py --sizes qwen2-0.5b --bf16 --quant4 both  # the GPU check (benchmarks/gpu_check.sh)

All arms run in this one process on the same model weights, tokenizer, prompts and seed; each round builds a fresh
trainer per arm and the arms' order rotates from round to round, so machine noise spreads over all arms. Every arm
carries the same two-block adapter; the stock arm trains it with TRL's `GRPOTrainer`. A step is one optimizer step
(generation, rewards, gate, loss forward and backward, optimizer), timed from `on_step_begin` to `on_step_end`;
the figure per arm is the median over all measured steps of all rounds. Peak memory is measured on extra, untimed
steps per arm and round, and the median over rounds is reported:
- on a GPU, `torch.cuda.max_memory_allocated`;
- on CPU, the same quantity for torch's CPU allocator: the tensors held across steps (parameters, optimizer
  state, the gate's activation buffer) plus the peak of the bytes allocated during the step and not yet freed, read
  from `torch.profiler`'s allocation records (`profile_memory=True`), whose running total the CPU allocator keeps
  exactly. It counts tensors only, and is deterministic for a given computation;
- also on CPU, on the extra step before (the profiler not yet started), the growth of the resident set size during
  the step (peak minus start, after returning freed heap pages to the OS) plus the same held bytes (`rss` in the
  table and `rss_ratio` in the JSON).
  It includes everything the process touches, but it reads less than the tensors a step holds at once whenever the
  step reuses freed heap pages that are still resident, and how many there are moves from run to run (the organism's
  stock step, whose tensors peak at 763 MiB, grew the resident set by 344, 429 and 733 MiB in three runs), so it
  decides nothing at 10%.

Sizes: `organism` (the CPU model organism's Qwen2 shape, 8 prompts x 8 generations, 64 completion tokens), `large`
(hidden 512, 8 layers, 1 prompt x 4 generations, 256 completion tokens), `qwen2-0.5b` (Qwen2-0.5B's shape with its
151,936-token vocabulary, for a GPU), `tiny` (seconds; a dry run of the script itself). Models are made from a
config with random weights (nothing is downloaded), so completions run to the length limit in every arm.

The last line printed is one JSON object, routed over stock per size and fraction:
`{"step_ratio": {SIZE: {"0": r, "0.5": r}}, "memory_ratio": {SIZE: {"0": r, "0.5": r}}, ...}`, plus the same ratio
of process CPU time per step (`cpu_step_ratio`: on a machine shared with other jobs it moves less than wall time),
the resident-set ratio on CPU (`rss_ratio`) and tokens per second.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARMS = {"stock": None, "routed_frac0": 0.0, "routed_frac0.5": 0.5}
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    prompts: int
    generations: int
    completion: int
    vocab: int | None = None  # None: the tokenizer's
    rank: int = 8


SIZES = {
    "tiny": Size(128, 2, 4, 2, 256, 2, 4, 8),  # 128 wide: the 4-bit dry run needs blocks of 64
    "organism": Size(128, 3, 4, 4, 384, 8, 8, 64),
    "large": Size(512, 8, 8, 8, 1376, 1, 4, 256),
    "qwen2-0.5b": Size(896, 24, 14, 2, 4864, 8, 8, 256, vocab=151936, rank=32),
}


def build_model(size: Size, tokenizer, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=size.vocab or len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def tokenizer_and_data(n_prompts: int):
    from datasets import Dataset

    from routed_grpo.lab.organism import train_tokenizer

    corpus = [f"class Solution:\n    def f{i}(self, nums):\n        return sum(nums) * {i}\n" for i in range(50)]
    tokenizer = train_tokenizer(corpus, vocab_size=600)
    rows = [{"prompt": [{"role": "user", "content": f"Write f{i % 50}."}]} for i in range(n_prompts)]
    data = Dataset.from_list(rows)
    return tokenizer, data


def reward(prompts, completions, **kw):
    return [float(len(c[0]["content"]) % 5) for c in completions]


def make_trainer(arm: str, size: Size, state: dict, tokenizer, data, steps: int, out: Path, opts):
    import torch
    from trl import GRPOTrainer

    from routed_grpo.adapter import attach_routed_adapter
    from routed_grpo.config import RoutedGRPOConfig
    from routed_grpo.trainer import RoutedGRPOTrainer

    model = load_base(size, state, tokenizer, opts)
    frac = ARMS[arm]
    gpu = torch.cuda.is_available()
    args = RoutedGRPOConfig(
        output_dir=str(out / arm),
        routing="none" if frac is None else "placebo",
        gen_deploy_frac=frac or 0.0,
        per_device_train_batch_size=size.prompts * size.generations,
        num_generations=size.generations,
        max_completion_length=size.completion,
        max_steps=steps,
        learning_rate=2e-4,
        logging_steps=1,
        report_to="none",
        bf16=opts.bf16,
        use_cpu=not gpu,
        gradient_checkpointing=False,
        adapter_rank=size.rank,
        act_buffer_size=8192,  # the default before it became the run's length: comparisons across commits hold one
        save_strategy="no",
        seed=0,
        temperature=1.0,
        disable_tqdm=True,
        sensor=opts.sensor,
        adapter_init="random" if frac is None else opts.adapter_init,
    )
    common = dict(reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer)
    if frac is None:
        return GRPOTrainer(model=attach_routed_adapter(model, rank=size.rank).model, **common)
    return RoutedGRPOTrainer(model=model, **common)


def load_base(size: Size, state: dict, tokenizer, opts):
    """A fresh copy of the size's base model (same weights in every arm); 4-bit NF4 when `opts.quant4`."""
    import torch

    if not opts.quant4:
        model = build_model(size, tokenizer)
        model.load_state_dict(state["weights"])
        return model.to(torch.bfloat16) if opts.bf16 else model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    device = {"": 0} if torch.cuda.is_available() else None
    return AutoModelForCausalLM.from_pretrained(
        state["dir"], quantization_config=quant, dtype=dtype, device_map=device
    )


class StepTimer:
    """A TrainerCallback timing optimizer steps; measures the peak memory of step `memory_step` (on CPU, the resident
    set of step `memory_step - 1`, before the profiler first runs, is measured too). Those steps are not timed."""

    def __init__(self, memory_step: int, trainer):
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU time: what the step cost, less sensitive to other load
        self.memory_step, self.trainer = memory_step, trainer
        self.peak_bytes = self.rss_bytes = None
        self._t0, self._c0, self._rss_before, self._profiler = 0.0, 0.0, 0, None

    def on_step_begin(self, args, state, control, **kw):
        import torch

        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.synchronize()
        if state.global_step == self.memory_step:
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            else:
                self._profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
                )
                self._profiler.__enter__()
        elif state.global_step == self.memory_step - 1 and not gpu:
            self._rss_before = reset_peak_rss()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kw):
        import torch

        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.synchronize()
        step = state.global_step - 1
        if step == self.memory_step and gpu:
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif step == self.memory_step:
            self._profiler.__exit__(None, None, None)
            self.peak_bytes = held_bytes(self.trainer) + peak_allocated_during(self._profiler)
            self._profiler = None
        elif step == self.memory_step - 1 and not gpu:
            self.rss_bytes = proc_status_kib("VmHWM") * 1024 - self._rss_before + held_bytes(self.trainer)
        else:
            self.times.append(time.perf_counter() - self._t0)
            self.cpu_times.append(time.process_time() - self._c0)

    def __getattr__(self, name):  # the other TrainerCallback events: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Return freed heap pages to the OS, reset the peak resident set size to the current one; bytes resident now."""
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    return proc_status_kib("VmRSS") * 1024


def held_bytes(trainer) -> int:
    """Bytes of the tensors that live across steps: parameters, optimizer state, the gate's activation buffer."""
    import torch

    total = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    for s in trainer.optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in s.values() if isinstance(v, torch.Tensor))
    gate = getattr(trainer, "gate", None)
    if gate is not None:
        total += gate.buffer._data.numel() * gate.buffer._data.element_size()
    return total


def peak_allocated_during(profiler) -> int:
    """Peak of the CPU allocator's running total of bytes allocated while `profiler` ran and not yet freed.

    The CPU allocator reports every allocation and free to the profiler with that total (frees of tensors made
    before profiling started are not counted, the same in every arm)."""

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = walk(profiler.profiler.kineto_results.experimental_event_tree())
    totals = [e.extra_fields.total_allocated for e in events if hasattr(e.extra_fields, "total_allocated")]
    if not totals:
        raise RuntimeError("torch.profiler recorded no CPU allocation (profile_memory=True)")
    return max(totals)


def run_size(name: str, opts, out: Path) -> dict[str, dict]:
    import torch
    from transformers import PrinterCallback

    size = SIZES[name]
    tokenizer, data = tokenizer_and_data(512)
    base = build_model(size, tokenizer)
    state = {"weights": {k: v.clone() for k, v in base.state_dict().items()}}
    if opts.quant4:
        state["dir"] = str(out / f"{name}-base")
        base.save_pretrained(state["dir"])
        tokenizer.save_pretrained(state["dir"])
    n_params = sum(p.numel() for p in base.parameters())
    del base
    results = {arm: {"times": [], "cpu_times": [], "peaks": [], "rss": []} for arm in ARMS}
    arms = list(ARMS)
    for r in range(opts.repeats):
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
            gpu = torch.cuda.is_available()
            memory_step = opts.warmup + opts.steps + (0 if gpu else 1)  # extra steps per arm and round: the memory
            steps = memory_step + 1
            trainer = make_trainer(arm, size, state, tokenizer, data, steps, out, opts)
            timer = StepTimer(memory_step, trainer)
            trainer.add_callback(timer)
            trainer.remove_callback(PrinterCallback)  # no metrics dictionary per step on the terminal
            trainer.train()
            results[arm]["times"] += timer.times[opts.warmup :]
            results[arm]["cpu_times"] += timer.cpu_times[opts.warmup :]
            results[arm]["peaks"].append(timer.peak_bytes)
            results[arm]["rss"].append(timer.rss_bytes)

            results[arm]["breakdown"] = breakdown(trainer)
            print(
                f"[{name}] round {r + 1}/{opts.repeats} {arm}: {statistics.median(timer.times):.3f} s/step",
                file=sys.stderr,
                flush=True,
            )
            del trainer, timer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for res in results.values():
        res["median"] = statistics.median(res["times"])
        res["cpu_median"] = statistics.median(res["cpu_times"])
        res["peak"] = statistics.median(res["peaks"])
        res["rss_peak"] = statistics.median(res["rss"]) if None not in res["rss"] else None
        res["tokens_per_s"] = size.prompts * size.generations * size.completion / res["median"]
    results["_params"] = n_params
    return results


def breakdown(trainer) -> dict[str, float]:
    """Medians of the trainer's own timing metrics over the run (routed arms only) and of TRL's step time."""
    logs = trainer.state.log_history
    keys = ("timing/generate_and_score", "timing/behaviour_forward", "timing/gate")
    found = [k for k in keys if any(k in h for h in logs)]
    return {k.split("/")[-1]: statistics.median(h[k] for h in logs if k in h) for k in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="organism,large", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per arm and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all arms (order rotates)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast (GPU)")
    parser.add_argument("--quant4", action="store_true", help="4-bit NF4 base via bitsandbytes")
    parser.add_argument("--sensor", default="bottleneck", help="the routed arms' sensor, e.g. residual:1")
    parser.add_argument("--adapter-init", default="random", help="the routed arms' adapter_init: random or svd")
    opts = parser.parse_args()
    import torch

    names = [s for s in opts.sizes.split(",") if s]
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {sorted(SIZES)}")
    load = os.getloadavg()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads"
    print(
        f"device {device}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, bf16={opts.bf16}, "
        f"quant4={opts.quant4}, sensor={opts.sensor}, adapter_init={opts.adapter_init}, "
        f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    summary = {"step_ratio": {}, "memory_ratio": {}, "cpu_step_ratio": {}, "rss_ratio": {}, "tokens_per_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            res = run_size(name, opts, Path(tmp))
            print_table(name, res, opts)
            stock = res["stock"]
            summary["step_ratio"][name] = {}
            summary["memory_ratio"][name] = {}
            summary["cpu_step_ratio"][name] = {}
            summary["rss_ratio"][name] = {}
            summary["tokens_per_s"][name] = {"stock": round(stock["tokens_per_s"], 1)}
            for arm, frac in ARMS.items():
                if frac is None:
                    continue
                key = "0" if frac == 0 else str(frac)
                summary["step_ratio"][name][key] = round(res[arm]["median"] / stock["median"], 3)
                summary["memory_ratio"][name][key] = round(res[arm]["peak"] / stock["peak"], 3)
                summary["cpu_step_ratio"][name][key] = round(res[arm]["cpu_median"] / stock["cpu_median"], 3)
                if stock["rss_peak"] is not None:
                    summary["rss_ratio"][name][key] = round(res[arm]["rss_peak"] / stock["rss_peak"], 3)
                summary["tokens_per_s"][name][key] = round(res[arm]["tokens_per_s"], 1)
    load = os.getloadavg()
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(json.dumps(summary))


def print_table(name: str, res: dict, opts) -> None:
    size = SIZES[name]
    print(
        f"\n{name}: {res['_params'] / 1e6:.2f}M parameters, {size.prompts} prompts x {size.generations} "
        f"generations, {size.completion} completion tokens; {opts.repeats} rounds x {opts.steps} measured steps "
        f"per arm (after {opts.warmup} warm-up), median s/step"
    )
    print(
        "| arm | s/step | step ratio | CPU s/step | CPU ratio | peak MiB | memory ratio | rss MiB | rss ratio "
        "| tokens/s | gen+score | behaviour fwd | gate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    stock = res["stock"]
    for arm in ARMS:
        r = res[arm]
        b = r.get("breakdown", {})
        cells = [f"{b[k]:.3f}" if k in b else "-" for k in ("generate_and_score", "behaviour_forward", "gate")]
        rss = ["-", "-"]
        if r["rss_peak"] is not None:
            rss = [f"{r['rss_peak'] / 2**20:.1f}", f"{r['rss_peak'] / stock['rss_peak']:.3f}"]
        print(
            f"| {arm} | {r['median']:.3f} | {r['median'] / stock['median']:.3f} | {r['cpu_median']:.3f} | "
            f"{r['cpu_median'] / stock['cpu_median']:.3f} | {r['peak'] / 2**20:.1f} | "
            f"{r['peak'] / stock['peak']:.3f} | {rss[0]} | {rss[1]} | {r['tokens_per_s']:.0f} | "
            + " | ".join(cells)
            + " |"
        )


if __name__ == "__main__":
    main()
