"""What the adapter reads for the gate: the sensor's capture hooks and the frozen initial copy of `A_dep`.

`SensorCapture` is a mixin of `RoutedAdapter` (routed_grpo.adapter), which sets `layers`, `rank`, `init_seed`,
`model` and the capture state. It covers:
- `use_sensor`: the sensor's sites (routed_grpo.sensor) hooked with one capture hook each (`_capture_hook`):
  the deployed `lora_A` output (`bottleneck`), the frozen initial projection of its input (`bottleneck_init`), or a
  decoder layer's output (`residual:L`);
- `capture` (one forward, pooled over a token mask, optionally cut short once every site is captured),
  `stream_capture` (every forward to a sink, as the sampling pass pools while `generate` samples) and `pooled`;
- `initial_A`: a block's initial `A` (the frozen initial copy; routed_grpo.initial holds the factors), and
  `deployed_drift`: how far `A_dep` has moved from it.
Not covered: masks, modes, fingerprints and export (routed_grpo.adapter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from routed_grpo.sensor import Sensor, SensorError, parse_sensor

DEPLOYED = "deployed"
QUARANTINE = "quarantine"


class _CaptureComplete(Exception):
    """Raised by the last capture hook under `capture(stop=True)` and caught by `capture` itself."""


def _output(args, out: torch.Tensor) -> torch.Tensor:
    return out  # the hooked module's output (the live bottleneck A_dep x)


def _hidden(args, out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # a decoder layer's hidden state (older transformers: a tuple)


class SensorCapture:
    """Mixin of `RoutedAdapter`: sensor capture hooks and the frozen initial copy of `A_dep`."""

    def initial_A(self, block: str) -> dict[str, torch.Tensor]:
        """`{module name: A0}` of `block` (float32): the frozen initial copy, whatever the block's weights hold now
        (`initial_factors` of routed_grpo.initial: seeded, or in the SVD basis). The deployed block's is cached (the
        `bottleneck_init` sensor and the drift metric read it every batch)."""
        if block == DEPLOYED and self._initial_a is not None:
            return self._initial_a
        out = {name: a0 for name, (a0, _) in self.initial_factors(block).items()}
        if block == DEPLOYED:
            self._initial_a = out
        return out

    @torch.no_grad()
    def deployed_drift(self) -> torch.Tensor:
        """How far `A_dep` has moved from its initial value, (2,) float32: the mean over modules and rows of the
        cosine between each current and initial row, and the mean over modules of `|A - A0| / |A0|` (Frobenius)."""
        initial, cos, rel = self.initial_A(DEPLOYED), [], []
        for name, layer in self.layers.items():
            a = layer.lora_A[DEPLOYED].weight.detach().float()
            a0 = initial[name]  # (r, d_in) float32, on the device once
            if a0.device != a.device:
                a0 = initial[name] = a0.to(a.device)
            cos.append(torch.nn.functional.cosine_similarity(a, a0, dim=1).mean())
            rel.append((a - a0).norm() / a0.norm())
        return torch.stack([torch.stack(cos).mean(), torch.stack(rel).mean()]).cpu()

    @contextlib.contextmanager
    def capture(self, token_mask: torch.Tensor, stop: bool = False) -> Iterator[None]:
        """Record the sensor's reading (by default the deployed bottleneck `A_dep x`) of ONE forward, pooled over
        `token_mask` (B, T).

        With `stop=True` the forward is cut short as soon as every sensor site has been captured: the layers
        after the last one the sensor reads, and the LM head, never run (the forward returns nothing; use it
        for activations only, under `no_grad`). What is captured is the same either way.
        """
        self._token_mask, self._captured, self._stop = token_mask, {}, stop
        try:
            yield
        except _CaptureComplete:
            pass
        finally:
            self._token_mask, self._stop = None, False

    @contextlib.contextmanager
    def stream_capture(self, sink, wanted=None) -> Iterator[None]:
        """Call `sink(site_name, h)` with the sensor's reading `h` (B, L, width) of every forward (by default the
        deployed bottleneck `A_dep x`) for which `wanted()` is true (None: every forward); a reading that costs
        work (`bottleneck_init`'s projection) is not computed for the others."""
        self._sink, self._sink_wanted = sink, wanted
        try:
            yield
        finally:
            self._sink = self._sink_wanted = None

    def pooled(self) -> torch.Tensor:
        """The captured activations, `[batch, n_sites, width]` in `sensor_names` order (float32)."""
        missing = [n for n in self.sensor_names if n not in self._captured]
        if missing:
            raise RuntimeError(f"no activations captured for {len(missing)} sensor sites, e.g. {missing[0]}")
        return torch.stack([self._captured[n] for n in self.sensor_names], dim=1)

    def use_sensor(self, sensor: Sensor | str | None) -> None:
        """Read `sensor` (routed_grpo.sensor) from now on: its capture hooks replace the previous sensor's."""
        sensor = parse_sensor(sensor)
        sites = self._sensor_sites(sensor)  # checked before anything is replaced
        for handle in self._sensor_handles:
            handle.remove()
        hooks = [module.register_forward_hook(self._capture_hook(name, read)) for name, module, read in sites]
        self._sensor_handles = hooks
        self.sensor, self.sensor_names = sensor, [name for name, _, _ in sites]
        self.sensor_width = self.rank if sensor.reads_adapter else self.model.config.get_text_config().hidden_size

    def _decoder_layers(self) -> list[torch.nn.Module]:
        inner = self.model.get_base_model()
        layers = getattr(inner.get_decoder() if hasattr(inner, "get_decoder") else None, "layers", None)
        if layers is None:
            raise SensorError(f"sensor=residual:...: needs a decoder with `.layers`; {type(inner).__name__} has none")
        return list(layers)

    def _sensor_sites(self, sensor: Sensor) -> list[tuple[str, torch.nn.Module, Any]]:
        """(row name, hooked module, read(args, out) -> (B, T, width)) per pooled row of `sensor`."""
        if sensor.kind == "bottleneck":
            return [(n, layer.lora_A[DEPLOYED], _output) for n, layer in self.layers.items()]
        if sensor.kind == "bottleneck_init":
            return [(n, layer.lora_A[DEPLOYED], self._initial_reader(n)) for n, layer in self.layers.items()]
        if sensor.kind != "residual":
            raise SensorError(f"sensor={sensor.spec!r}: no sites for this kind")
        layers = self._decoder_layers()
        bad = [i for i in sensor.layers if i >= len(layers)]
        if bad:
            raise SensorError(
                f"sensor={sensor.spec!r}: layer {bad[0]} does not exist (the decoder has {len(layers)}, 0-based)"
            )
        return [(sensor.site_name(i), layers[i], _hidden) for i in sensor.layers]

    def _initial_reader(self, name: str):
        def read(args, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            a0 = self._initial_on.get(name)
            if a0 is None or a0.device != x.device or a0.dtype != x.dtype:
                a0 = self._initial_on[name] = self.initial_A(DEPLOYED)[name].to(x.device, x.dtype)
            return torch.nn.functional.linear(x, a0)  # (B, T, r): the frozen initial projection A_dep0 x

        return read

    def _capture_hook(self, name: str, read):
        def hook(module, args, out) -> None:
            if self._sink is None and self._token_mask is None:
                return
            if self._sink is not None:
                if self._sink_wanted is None or self._sink_wanted():
                    self._sink(name, read(args, out))
                return
            h = read(args, out)
            if name in self._captured:
                raise RuntimeError(f"capture() expects one forward, but {name} ran twice")
            mask = self._token_mask.to(h.device, torch.float32).unsqueeze(-1)  # (B, T, 1)
            h = h.detach().float()  # (B, T, width)
            self._captured[name] = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, width)
            if self._stop and len(self._captured) == len(self.sensor_names):
                raise _CaptureComplete

        return hook
