"""The blocks' initial values and, when `B0 != 0`, their subtracted frozen copies (`adapter_init`; DESIGN.md 4).

`InitialCopies` is a mixin of `RoutedAdapter` (routed_grpo.adapter), which sets `layers`, `rank`, `init_seed` and
`model`. It covers:
- `initial_factors(block)`: `{module: (A0, B0)}` in float32. `random` (PEFT's geometry, the default): `A0` uniform
  `+-1/sqrt(d_in)` from a name-keyed seed, `B0 = None` (zero), recomputed from the seed whenever asked.
  `svd`, `signed`, `signed_reverse` (routed_grpo.svd_init): factors in the base weight's singular basis, held.
- with `B0 != 0` (`subtracted`), the forward of each block is `s (B A x - B0 A0 x)`: a forward hook on `lora_A`
  computes `A0 x` from the same input, and a hook on `lora_B`, placed before every other hook, subtracts `B0 A0 x`
  from `B A x`. At initialisation both terms are the same operations on the same values, so the net delta is
  exactly zero (I1), and every later hook (deployment ablation, the base-model-only path, the quarantine's row mask,
  which then applies at the output, and the deployed block's gradient mask) sees the net delta: ablation returns the
  quarantine to its initial value exactly (I2). The base weights are never touched.
- `delta_weight(name, block)`: the net `s (B A - B0 A0)` (for vLLM's merged weights); `folded_state(blocks)`: the
  blocks as ONE stock PEFT LoRA, `A = [A; A0 ...]`, `B = [B, -B0 ...]` (rank r per part, alpha scaled with it so the
  scaling stays `s`), which stock PEFT loads and merges with the same outputs.
- `save_initial(dir)` / `load_initial(path)`: `routed_init.safetensors` beside the blocks, so a reload of `final/`
  or a resume from a checkpoint uses the very factors training used (PEFT's state holds only `A` and `B`).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from routed_grpo.sensing import DEPLOYED, QUARANTINE
from routed_grpo.svd_init import INITS, SUBTRACTED, factors_digest, signed_slots, split_slots, svd_slots
from routed_grpo.utils import atomic_path

INITIAL_FILE = "routed_init.safetensors"
Factors = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def _module_seed(init_seed: int, block: str, name: str) -> int:
    return zlib.crc32(f"{init_seed}:{block}:{name}".encode())


class InitialCopies:
    """Mixin of `RoutedAdapter`: initial factors, subtracted frozen copies, folded export, saving them."""

    adapter_init: str = "random"

    @property
    def subtracted(self) -> bool:
        return self.adapter_init in SUBTRACTED

    def scaling(self) -> float:
        return float(next(iter(self.layers.values())).scaling[DEPLOYED])

    def initial_factors(self, block: str) -> Factors:
        """`{module name: (A0, B0)}` of `block` (float32 on the CPU; `B0` None means zero)."""
        if block in self._initial:
            return self._initial[block]
        out = {}
        for name, layer in self.layers.items():
            shape = layer.lora_A[block].weight.shape
            gen = torch.Generator().manual_seed(_module_seed(self.init_seed, block, name))
            out[name] = ((torch.rand(shape, generator=gen) * 2 - 1).mul_(1.0 / math.sqrt(shape[1])), None)
        if block == DEPLOYED:
            self._initial[block] = out  # the bottleneck_init sensor and the drift metric read it every batch
        return out

    def compute_initial(self, init: str, hack_in: dict[str, torch.Tensor] | None = None) -> dict[str, Factors]:
        """Both blocks' factors for `init` (svd / signed / signed_reverse) from the base weights; `hack_in`
        (module -> (d_in,) mean input difference of the pairs) for the signed ones."""
        if init not in SUBTRACTED:
            raise ValueError(f"adapter_init must be one of {SUBTRACTED} here, got {init!r}")
        missing = [n for n in self.layers if n not in (hack_in or {})]
        if init != "svd" and missing:
            raise ValueError(
                f"adapter_init={init!r} needs the pairs' hack direction per module; none for {len(missing)} modules, "
                f"e.g. {missing[0]}"
            )
        s = self.scaling()
        out: dict[str, Factors] = {DEPLOYED: {}, QUARANTINE: {}}
        for name, layer in self.layers.items():
            weight = layer.get_base_layer().weight
            if not weight.is_floating_point():
                raise ValueError(f"adapter_init={init!r} needs float base weights; {name} is {weight.dtype}")
            try:
                a, b, sv = svd_slots(weight, self.rank, s)
                if init != "svd":
                    reverse = init == "signed_reverse"
                    a, b = signed_slots(a, b, sv, weight, hack_in[name], self.rank, s, reverse=reverse)
            except ValueError as err:
                raise ValueError(f"adapter_init={init!r} at module {name}: {err}") from None
            for block, factors in split_slots(a, b, self.rank).items():
                out[block][name] = factors
        return out

    def set_initial(self, init: str, factors: dict[str, Factors]) -> None:
        """Use `factors` (block -> module -> (A0, B0)) as the blocks' initial values and frozen copies, and reset both
        blocks to them."""
        if init not in INITS:
            raise ValueError(f"adapter_init must be one of {INITS}, got {init!r}")
        if init == "random":
            raise ValueError("adapter_init='random' has no stored factors (A0 comes from the seed, B0 is zero)")
        for block in (DEPLOYED, QUARANTINE):
            have = set(factors.get(block, {}))
            if have != set(self.layers):
                odd = sorted(have ^ set(self.layers))
                raise ValueError(
                    f"initial factors of '{block}' do not match the adapter's {len(self.layers)} modules "
                    f"({len(odd)} differ, e.g. {odd[0]})"
                )
        self.adapter_init = init
        # Contiguous like the parameters they copy: a strided copy (the SVD's factors are views) takes another GEMM
        # path, whose rounding differs on some CPUs (an AMD EPYC did), and I1 needs B0 A0 x to equal B A x exactly.
        self._initial = {
            b: {n: (a.float().cpu().contiguous(), bb.float().cpu().contiguous()) for n, (a, bb) in f.items()}
            for b, f in factors.items()
        }
        self._initial_on.clear()
        self._initial_a = None
        self._frozen_on = {}
        if not self._frozen_handles:
            for name, layer in self.layers.items():
                for block in (DEPLOYED, QUARANTINE):
                    key = (block, name)
                    self._frozen_handles.append(layer.lora_A[block].register_forward_hook(self._frozen_input(key)))
                    hook = self._frozen_output(key)
                    self._frozen_handles.append(layer.lora_B[block].register_forward_hook(hook, prepend=True))
        self.reinitialise(DEPLOYED)
        self.reinitialise(QUARANTINE)

    def _frozen(self, key: tuple[str, str], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._frozen_on.get(key)
        if pair is None or pair[0].device != like.device or pair[0].dtype != like.dtype:
            a0, b0 = self._initial[key[0]][key[1]]
            pair = self._frozen_on[key] = (a0.to(like.device, like.dtype), b0.to(like.device, like.dtype))
        return pair

    def _frozen_input(self, key):
        def hook(module, args, out) -> None:
            self._frozen_h0[key] = torch.nn.functional.linear(args[0], self._frozen(key, module.weight)[0])

        return hook

    def _frozen_output(self, key):
        def hook(module, args, out: torch.Tensor) -> torch.Tensor:
            h0 = self._frozen_h0.pop(key)  # A0 x of the same forward (same input as lora_A)
            return out - torch.nn.functional.linear(h0, self._frozen(key, module.weight)[1])

        return hook

    # ---- merged and exported weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, name: str, block: str) -> torch.Tensor:
        """The block's net weight delta at module `name`: `s B A` (PEFT's `get_delta_weight`), or with subtracted
        copies `s (B A - B0 A0)` in float32 on the weights' device from the copies the forward subtracts (the same
        rounded values), so it is exactly zero while the block holds its initial value."""
        layer = self.layers[name]
        if not self.subtracted:
            return layer.get_delta_weight(block)
        a, b = layer.lora_A[block].weight, layer.lora_B[block].weight
        a0, b0 = self._frozen((block, name), a)
        delta = (b.float() @ a.float() - b0.float() @ a0.float()) * self.scaling()
        return delta.to(a.dtype)

    @torch.no_grad()
    def folded_state(self, blocks: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], int]:
        """(PEFT state dict under the deployed adapter's keys, number of rank-r parts) of `blocks` as one LoRA."""
        from peft import get_peft_model_state_dict

        states = {b: get_peft_model_state_dict(self.model, adapter_name=b) for b in blocks}
        prefix = "base_model.model."
        out, parts = {}, 0
        for key, a in states[blocks[0]].items():
            name = key.removeprefix(prefix).rsplit(".lora_", 1)[0]
            is_a = ".lora_A." in key
            pieces = []
            for block in blocks:
                pieces.append(states[block][key])
                if self.subtracted:
                    a0, b0 = self._initial[block][name]
                    pieces.append(a0.to(a.dtype) if is_a else (-b0).to(a.dtype))
            parts = len(pieces)
            out[key] = torch.cat(pieces, dim=0 if is_a else 1).detach().cpu().contiguous()  # A rows, B columns
        return out, parts

    # ---- saving and loading the factors -------------------------------------------------------------------------
    def save_initial(self, out_dir: str | Path) -> Path | None:
        """Write `routed_init.safetensors` (both blocks' A0 and B0) into `out_dir` when the copies are subtracted."""
        if not self.subtracted:
            return None
        path = Path(out_dir) / INITIAL_FILE
        tensors = {f"{b}|{n}|{i}": t.contiguous() for b, f in self._initial.items() for n, ab in f.items()
                   for i, t in zip("AB", ab, strict=True)}  # fmt: skip
        meta = {"adapter_init": self.adapter_init, "digest": factors_digest(self._initial)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"routed_grpo": json.dumps(meta)})
        return path

    def load_initial(self, path: str | Path) -> None:
        """Use the factors saved by `save_initial` (after loading the blocks' weights: it does not reset them)."""
        path = Path(path)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("routed_grpo", "{}"))
        if meta.get("adapter_init") not in SUBTRACTED:
            raise ValueError(f"{path}: not a routed_grpo initial-factors file (metadata {meta})")
        factors: dict[str, dict[str, list]] = {}
        for key, t in load_file(str(path)).items():
            block, name, which = key.split("|")
            factors.setdefault(block, {}).setdefault(name, [None, None])["AB".index(which)] = t
        params = [p for b in (DEPLOYED, QUARANTINE) for p in self.parameters(b)]
        weights = [p.detach().clone() for p in params]
        self.set_initial(meta["adapter_init"], {b: {n: tuple(ab) for n, ab in f.items()} for b, f in factors.items()})
        with torch.no_grad():  # set_initial reset the blocks; the loaded weights stay what they were
            for p, w in zip(params, weights, strict=True):
                p.copy_(w)
        if factors_digest(self._initial) != meta.get("digest"):
            raise ValueError(f"{path}: the factors do not match their recorded digest (a damaged file?)")

    def broadcast_initial(self) -> None:
        """Under torch.distributed, every rank takes rank 0's factors (SVD signs and rounding may differ by device)."""
        if not (self.subtracted and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        device = next(self.model.parameters()).device
        device = device if torch.distributed.get_backend() != "gloo" else torch.device("cpu")
        factors = {}
        for block, f in self._initial.items():
            factors[block] = {}
            for name, (a0, b0) in f.items():
                a0, b0 = a0.to(device), b0.to(device)
                torch.distributed.broadcast(a0, src=0)
                torch.distributed.broadcast(b0, src=0)
                factors[block][name] = (a0.cpu(), b0.cpu())
        self.set_initial(self.adapter_init, factors)

    def fingerprint_init(self) -> Any:
        """The fingerprint's `init` part: None for `random` (files made before it existed agree), else the init's
        name and the digest of its factors."""
        return None if not self.subtracted else f"{self.adapter_init}:{factors_digest(self._initial)}"
