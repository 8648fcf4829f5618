"""vLLM generation per sampling mode (DESIGN.md section 3, step 1; TRL's `use_vllm=True`, colocate or server).

vLLM cannot apply per-row quarantine masks, so each sampling mode gets its own weights and its own `generate` call:
- `mode_weights(adapter, mode)`: the merged weights vLLM must hold to sample in `mode`, under the names vLLM
  expects: `W + s B_dep A_dep` for `deploy`, plus `s B_q A_q` for `full` (PEFT's `get_delta_weight`, less the
  subtracted initial copies' `s B0 A0` with an SVD-space `adapter_init`: `RoutedAdapter.delta_weight`), computed out
  of place, one tensor at a time (PEFT's merge state is never touched).
- `rows_by_mode(full)`: the row indices of each mode, in batch order.
- `PerModeGeneration`: installed on TRL's `VLLMGeneration`, whose weight iterator then yields the current mode's
  weights, so every sync TRL makes (also the re-push after sleep mode) pushes the right mode. `generate` pushes each
  mode that has rows (once per optimizer step and mode: one sync at `gen_deploy_frac` 0 or 1, two otherwise),
  generates that mode's rows with `n = 1` per row, padded to the same count on every process (TRL's server and
  tensor-parallel paths slice results by equal per-process counts), and reassembles completions and sampling
  log-probs in row order.

The behaviour log-probs are computed by the HF model, never taken from vLLM: matched rows' from the loss's own
forward (rho == 1), mismatched rows' from a forward in their sampling mode (routed_grpo.behaviour); with
`vllm_importance_sampling_correction` (TRL's default) TRL's old-log-prob forward runs in those modes too, so its
importance weight corrects only the vLLM-versus-HF numerical mismatch and `rho` keeps its meaning.

Not covered: quantised bases (merging into 4-bit weights), DoRA, FSDP / ZeRO-3 (rejected with routing on anyway).
vLLM is not installable on the project's CPU machines: the pieces above are unit-tested with a stand-in for
`VLLMGeneration`, and the path has not yet run on a GPU end to end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from routed_grpo.adapter import DEPLOYED, QUARANTINE, RoutedAdapter

MODE_BLOCKS = {"deploy": (DEPLOYED,), "full": (DEPLOYED, QUARANTINE)}


def vllm_name(name: str) -> str:
    """A PeftModel parameter name as vLLM (and a plain transformers checkpoint) spells it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace("_checkpoint_wrapped_module.", "")


def mode_weights(adapter: RoutedAdapter, mode: str) -> Iterator[tuple[str, Tensor]]:
    """(name, weight) of the base model with the blocks of `mode` merged in; adapter parameters are not yielded."""
    if mode not in MODE_BLOCKS:
        raise ValueError(f"sampling mode must be 'deploy' or 'full', got {mode!r}")
    if getattr(adapter.model.config, "quantization_config", None) is not None:
        raise ValueError("vLLM generation per sampling mode needs an unquantised base (merging into 4/8-bit weights)")
    module_of = {id(layer.get_base_layer().weight): name for name, layer in adapter.layers.items()}
    for name, param in adapter.model.named_parameters():
        if ".lora_" in name:
            continue
        module = module_of.get(id(param))
        if module is None:
            yield vllm_name(name), param.data
            continue
        with torch.no_grad():
            delta = sum(adapter.delta_weight(module, block) for block in MODE_BLOCKS[mode])
            yield vllm_name(name), param.data + delta.to(param.dtype)


def rows_by_mode(full: Tensor) -> dict[str, list[int]]:
    """Row indices of each sampling mode, in batch order: {"deploy": [...], "full": [...]}. full: (B,) bool."""
    flags = full.bool().tolist()
    return {"deploy": [i for i, f in enumerate(flags) if not f], "full": [i for i, f in enumerate(flags) if f]}


class PerModeGeneration:
    """Per-mode weight sync and generation on top of TRL's `VLLMGeneration` (see the module docstring)."""

    def __init__(self, vllm_generation, adapter: RoutedAdapter):
        if getattr(adapter.model.config, "quantization_config", None) is not None:
            raise ValueError("use_vllm with routing on needs an unquantised base: each mode's weights are merged")
        self.vllm = vllm_generation
        self.adapter = adapter
        self.mode = "full"  # the mode the next sync pushes
        self.loaded: tuple[int, str] | None = None  # (optimizer step, mode) of the weights vLLM holds
        vllm_generation._iter_named_params = self._named_params

    def _named_params(self) -> Iterator[tuple[str, Tensor]]:
        yield from mode_weights(self.adapter, self.mode)

    def sync(self, mode: str, step: int) -> bool:
        """Push `mode`'s weights unless vLLM already holds them for this step; True if it pushed."""
        if self.loaded == (step, mode):
            return False
        self.mode = mode
        self.vllm.sync_weights()
        self.loaded = (step, mode)
        return True

    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        full: Tensor,
        step: int,
        global_counts: Callable[[list[int]], list[int]],
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Completions and sampling log-probs of every row, each generated with its own mode's weights.

        `global_counts([n_deploy, n_full])` returns the largest count of each mode over all processes (a
        collective): every process then makes the same syncs and `generate` calls, with equally long lists.
        """
        rows = rows_by_mode(full)
        deploy_max, full_max = global_counts([len(rows["deploy"]), len(rows["full"])])
        order = ["full", "deploy"] if self.loaded != (step, "deploy") else ["deploy", "full"]  # reuse what is loaded
        completions: list = [None] * len(prompt_ids)
        logprobs: list = [None] * len(prompt_ids)
        for mode in order:
            n_max = deploy_max if mode == "deploy" else full_max
            if n_max == 0:
                continue
            self.sync(mode, step)
            index = rows[mode]
            prompts = [prompt_ids[i] for i in index]
            prompts += [prompt_ids[0]] * (n_max - len(prompts))  # padding rows, dropped below
            _, comp, lps, _ = self.vllm.generate(prompts=prompts, images=None, num_generations=1)
            for j, i in enumerate(index):
                completions[i] = comp[j]
                logprobs[i] = [lp[0] for lp in lps[j]] if lps is not None else None
        if any(lp is None for lp in logprobs):
            return completions, None
        return completions, logprobs
