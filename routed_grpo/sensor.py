"""Sensors: what the gate pools per rollout (DESIGN.md section 10, "sensor").

A sensor names the places in the forward whose outputs are pooled over a rollout's completion tokens, and how each
output is read there. The adapter (`RoutedAdapter.use_sensor`) hooks those places; every consumer of pooled rows
(the sampling pass, TRL's old-log-prob forward, the fallback forward, pair extraction, the gate's buffer, `v_act`
files) then sees rows of shape `(n_sites, width)` without knowing which sensor made them.

- `bottleneck` (the default, the seed's design): the live deployed bottleneck `A_dep x` at every target module,
  `(n_modules, r)`. Its basis moves as `A_dep` trains, so buffer rows of different steps are in different
  coordinates, and a `v_act` fit at the start is read in a basis that drifts away from it.
- `bottleneck_init`: the frozen initial deployed projection `A_dep0 x` at every target module, `(n_modules, r)`,
  the basis `v_act` was fit in. `A_dep0` is the seeded initial value (`RoutedAdapter.initial_A`), recomputed from
  the adapter's seed and never trained, so it does not move when `A_dep` does (`x`, the module's input, still does).
- `residual:L[+L2...]`: the decoder's hidden state after decoder layer L (0-based), `(n_layers, hidden_size)`: the
  model's own basis, independent of the adapter's seed, rank and targets.

Pooling is the mean over the completion tokens for every sensor (what the gate has always pooled).
Not covered: last-token or max pooling, sites that are not a decoder layer's output or a target module's input.
"""

from __future__ import annotations

from dataclasses import dataclass

SENSOR_KINDS = ("bottleneck", "bottleneck_init", "residual")
DEFAULT_SENSOR = "bottleneck"


class SensorError(ValueError):
    """A sensor spec that cannot be parsed, or one the model cannot provide."""


@dataclass(frozen=True)
class Sensor:
    """A parsed sensor spec: its kind and, for `residual`, the decoder layers read (sorted, unique)."""

    kind: str = DEFAULT_SENSOR
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SENSOR_KINDS:
            raise SensorError(f"sensor={self.kind!r}: unknown sensor (known: {', '.join(SENSOR_KINDS)})")
        layers = tuple(self.layers)
        if self.kind != "residual" and layers:
            raise SensorError(f"sensor={self.kind!r}: the {self.kind} sensor takes no layers (got {layers})")
        if self.kind == "residual" and (not layers or layers != tuple(sorted(set(layers))) or min(layers) < 0):
            raise SensorError(
                f"sensor=residual with layers {layers}: needs one or more decoder layers, >= 0, sorted and unique"
            )

    @property
    def spec(self) -> str:
        """The spec string this sensor parses from (`bottleneck`, `residual:1+2`)."""
        return f"residual:{'+'.join(str(layer) for layer in self.layers)}" if self.kind == "residual" else self.kind

    @property
    def reads_adapter(self) -> bool:
        """Whether pooled rows are in the adapter's coordinates (so a direction depends on its seed, rank, targets)."""
        return self.kind != "residual"

    def site_name(self, layer: int) -> str:
        return f"layers.{layer}"


def parse_sensor(spec: str | Sensor | None, field: str = "sensor") -> Sensor:
    """`"bottleneck"`, `"bottleneck_init"` or `"residual:L[+L2...]"` -> Sensor; None reads as `bottleneck` (files
    and recipes from before sensors existed). Raises SensorError naming `field` and the value."""
    if isinstance(spec, Sensor):
        return spec
    if spec is None or spec == "":
        return Sensor()
    if not isinstance(spec, str):
        raise SensorError(f"{field}={spec!r}: a sensor is a string ({', '.join(SENSOR_KINDS[:2])}, residual:L)")
    kind, sep, rest = spec.strip().partition(":")
    if kind not in SENSOR_KINDS:
        raise SensorError(f"{field}={spec!r}: unknown sensor {kind!r} (known: {', '.join(SENSOR_KINDS)})")
    if kind != "residual":
        if sep:
            raise SensorError(f"{field}={spec!r}: the {kind} sensor takes no ':' part")
        return Sensor(kind)
    parts = rest.split("+") if sep else []
    if not parts or not all(p.strip().isdigit() for p in parts):
        raise SensorError(
            f"{field}={spec!r}: residual needs decoder layer indices, e.g. residual:1 or residual:1+2 (0-based)"
        )
    return Sensor("residual", tuple(sorted({int(p) for p in parts})))
