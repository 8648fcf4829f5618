"""The config's ladder fields (DESIGN.md section 10): scorer (the new name of routing), intervention, and the
route intervention's masks."""

import pytest
import torch

from routed_grpo.config import RoutedGRPOConfig
from routed_grpo.gate import ABSORB, KEEP, ROUTE
from routed_grpo.ladder import Route, intervention


def _config(**kw):
    kw.setdefault("vact_pairs_path", "pairs/organism")
    return RoutedGRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, **kw)


def test_scorer_is_routing_under_its_ladder_name():
    assert _config().scorer == "vact" and _config(routing="placebo").scorer == "placebo"
    assert _config(scorer="placebo").routing == "placebo"  # set alone, it replaces the default routing
    assert _config(routing="none").scorer is None
    assert _config(scorer="placebo", routing="placebo").routing == "placebo"
    with pytest.raises(ValueError, match="scorer='placebo' and routing='vact' disagree"):
        _config(scorer="placebo", routing="vact")  # an explicit routing is never overridden silently
    with pytest.raises(ValueError, match="scorer='placebo' and routing='none' disagree"):
        _config(scorer="placebo", routing="none")
    with pytest.raises(ValueError, match="scorer must be one of"):
        _config(scorer="labels")
    with pytest.raises(ValueError, match="intervention='bribe'"):
        _config(intervention="bribe")
    with pytest.raises(ValueError, match="routing='none' has no scorer"):
        _config(routing="none", intervention="screen")
    with pytest.raises(ValueError, match="gen_deploy_frac=0.5 applies to intervention='route' only"):
        _config(intervention="penalty", gen_deploy_frac=0.5)


def test_route_masks_are_the_zones_masks():
    zones = torch.tensor([KEEP, ABSORB, ROUTE])
    m, d = Route().masks(zones)
    assert m.tolist() == [0.0, 1.0, 1.0] and d.tolist() == [0.0, 0.0, 1.0]
    assert isinstance(intervention("route"), Route)
