"""Pure parts of v_act against hand-computed tensors: unit mean difference (I5), Haar placebo, file format, AUROC."""

import math

import pytest
import torch
from torch.testing import assert_close

from routed_grpo.sensor import parse_sensor
from routed_grpo.vact import VactError, auroc, haar_placebo, load_vact, save_vact, unit_mean_difference


def test_unit_mean_difference_hand_values_and_sign():
    h_hack = torch.tensor([[[3.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 3.0]]])  # (P=2, M=2, r=2)
    h_clean = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, 2.0]]])
    # module 0: diffs (3,0), (1,0) -> mean (2,0) -> (1,0); module 1: diffs (1,1), (-1,1) -> mean (0,1) -> (0,1)
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert_close(unit_mean_difference(h_hack, h_clean), expected)
    assert_close(unit_mean_difference(h_clean, h_hack), -expected)  # swapping sides flips the direction


def test_unit_of_mean_not_mean_of_units():
    h_hack = torch.tensor([[[10.0, 0.0]], [[0.0, 1.0]]])  # (2, 1, 2)
    h_clean = torch.zeros(2, 1, 2)
    # mean (5, 0.5) -> (5, 0.5) / sqrt(25.25); the mean of unit diffs would point along (1, 1)
    expected = torch.tensor([[5.0, 0.5]]) / math.sqrt(25.25)
    out = unit_mean_difference(h_hack, h_clean)
    assert_close(out, expected)
    assert_close(out.norm(dim=-1), torch.ones(1))


def test_unit_norm_per_module_not_global():
    gen = torch.Generator().manual_seed(0)
    h_hack, h_clean = torch.randn(5, 3, 4, generator=gen), torch.randn(5, 3, 4, generator=gen)
    h_hack[:, 2] *= 100.0  # one module with a much larger scale must still come out unit norm
    assert_close(unit_mean_difference(h_hack, h_clean).norm(dim=-1), torch.ones(3))


def test_zero_difference_names_the_module():
    h = torch.ones(2, 2, 3)
    h_hack = h.clone()
    h_hack[:, 0] += 1.0
    with pytest.raises(ValueError, match="layers.1.q_proj"):
        unit_mean_difference(h_hack, h, module_names=["layers.0.q_proj", "layers.1.q_proj"])


def test_placebo_shape_norm_and_seeding():
    like = torch.randn(6, 4)
    a, b, c = haar_placebo(like, 3), haar_placebo(like, 3), haar_placebo(like, 4)
    assert a.shape == like.shape and a.dtype == torch.float32
    assert_close(a.norm(dim=-1), torch.ones(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(haar_placebo(like * 5 + 1, 3), a)  # only the shape of `like` matters


def test_placebo_mean_direction_near_zero_over_seeds():
    draws = torch.stack([haar_placebo(torch.zeros(2, 8), s) for s in range(2000)])  # (2000, 2, 8)
    # uniform on the sphere: mean ~ 0 (norm ~ 1/sqrt(2000) = 0.022) and E[x_i^2] = 1/r
    assert draws.mean(dim=0).norm(dim=-1).max() < 0.08
    assert_close(draws.pow(2).mean(dim=0), torch.full((2, 8), 1 / 8), atol=0.015, rtol=0)


def test_save_load_round_trip_is_atomic(tmp_path):
    vact = haar_placebo(torch.zeros(3, 4), 0)
    meta = {"kind": "placebo", "seed": 0, "module_names": ["a", "b", "c"], "tags": None, "adapter_rank": 4}
    path = save_vact(tmp_path / "v.safetensors", vact, meta)
    loaded, loaded_meta = load_vact(path)
    assert torch.equal(loaded, vact)
    assert loaded_meta == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]  # no temp file left behind


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(VactError, match="kind"):
        save_vact(tmp_path / "v.safetensors", torch.zeros(2, 2), {"kind": "oracle"})
    with pytest.raises(VactError, match="3 modules"):
        save_vact(tmp_path / "v.safetensors", torch.zeros(2, 2), {"module_names": ["a", "b", "c"]})
    assert list(tmp_path.iterdir()) == []


def test_load_rejects_non_vact_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a safetensors file")
    with pytest.raises(VactError, match="bad.safetensors"):
        load_vact(bad)


class _StubAdapter:
    """Names, rank, sensor and fingerprints only; `fp` plays the old (<= 0.1) fingerprint the test file records."""

    def __init__(self, names, rank, fingerprint="fp0", sensor="bottleneck"):
        self.module_names, self.rank, self._fp = names, rank, fingerprint
        self.sensor_names, self.sensor_width, self.sensor = names, rank, parse_sensor(sensor)

    def fingerprint(self):
        return f"v2-{self._fp}"

    def legacy_fingerprint(self):
        return self._fp

    def fingerprint_parts(self):
        return {"seed": 0, "rank": self.rank, "targets": ["q_proj"], "module_shapes": "s", "base_weights": self._fp}


def test_load_against_mismatched_adapter_names_module_and_shapes(tmp_path):
    names = ["layers.0.q_proj", "layers.0.v_proj"]
    path = save_vact(
        tmp_path / "v.safetensors",
        torch.zeros(2, 4) + 0.5,
        {"kind": "vact", "module_names": names, "adapter_fingerprint": "fp0"},
    )
    load_vact(path, _StubAdapter(names, 4))  # matches
    with pytest.raises(VactError, match=r"layers\.0\.q_proj.*\(4,\).*\(8,\)"):
        load_vact(path, _StubAdapter(names, 8))
    with pytest.raises(VactError, match=r"#1.*layers\.0\.v_proj.*layers\.0\.k_proj"):
        load_vact(path, _StubAdapter(["layers.0.q_proj", "layers.0.k_proj"], 4))
    with pytest.raises(VactError, match="#2"):
        load_vact(path, _StubAdapter([*names, "layers.0.o_proj"], 4))
    with pytest.raises(VactError, match="old-format adapter fingerprint fp0.*dtype.*Re-extract"):
        load_vact(path, _StubAdapter(names, 4, fingerprint="fp1"))
    # a file without a sensor was made at the bottleneck: refused, with the part named, by any other sensor
    with pytest.raises(VactError, match=r"sensor 'bottleneck'.*reads sensor 'bottleneck_init'"):
        load_vact(path, _StubAdapter(names, 4, sensor="bottleneck_init"))


def test_auroc_hand_values():
    # pairs: 3>1, 3>2, 2>1 count 1 each, 2==2 counts 1/2 -> 3.5 / 4
    assert auroc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875)
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert auroc(torch.tensor([5.0, 6.0]), torch.tensor([1.0])) == 1.0
