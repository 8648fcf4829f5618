"""TRL's fused LM head on the CPU, scoring only the positions that have a label: the same numbers, less work.

TRL computes per-token log-probs through a fused LM head (`trl.trainer.utils.add_fused_lm_head`): the hidden states
are projected onto the vocabulary in tiles and folded into online-logsumexp statistics, without materialising the
logits. On Triton devices (CUDA, XPU) it scores only the positions whose label is not -100 (the completion tokens);
on every other device it scores every position of every row (the prompt, the padding) and masks the result to zero
afterwards, because on compiled backends such as Neuron the number of labelled positions would change the tile
shapes on every batch and trigger a recompilation. An eager CPU run has no such cost, and there the extra positions
are most of the head's work: in the organism a row is about 245 prompt tokens and 12 completion tokens, so the head
and its backward ran on about 20 times the positions they need (benchmarks/organism_step.py).

`scored_positions_only()` makes TRL take its compact branch on the CPU too, for the calls inside the context. Each
position's log-prob and entropy, and the gradient reaching each hidden state, are computed by the same tile
arithmetic whichever other positions share the tile, so the values are the same (tests/test_compact_head.py checks
the log-probs, entropies and gradients bit for bit against TRL's all-positions branch on this machine; the organism
benchmark checks a whole run's metrics). The switch is TRL's module-level `_use_triton` as read by
`trl.trainer.utils`; the kernel choice (`trl.kernels.chunked_logprob._use_triton`) is a different name and is not
touched, so the CPU still runs TRL's torch tiles. If a TRL version drops the name, nothing is changed (the test
says so).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trl.trainer.utils as trl_utils

_SWITCH = "_use_triton"


def available() -> bool:
    """Whether this TRL version has the switch `scored_positions_only` sets."""
    return callable(getattr(trl_utils, _SWITCH, None))


@contextlib.contextmanager
def scored_positions_only() -> Iterator[None]:
    """Inside: TRL's fused LM head scores only labelled positions on the CPU as well (other devices unchanged)."""
    if not available():
        yield
        return
    original = getattr(trl_utils, _SWITCH)
    setattr(trl_utils, _SWITCH, lambda device: device.type == "cpu" or original(device))
    try:
        yield
    finally:
        setattr(trl_utils, _SWITCH, original)
