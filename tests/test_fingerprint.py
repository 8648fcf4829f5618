"""The adapter fingerprint: same adapter geometry on the same base model, whatever dtype the weights are loaded in;
a mismatch names the part that differs; old (dtype-dependent) v_act files are accepted only if they still match."""

import pytest
import torch
from conftest import make_model
from transformers import AutoModelForCausalLM

from routed_grpo.adapter import attach_routed_adapter, fingerprint_mismatch
from routed_grpo.vact import VactError, adapter_metadata, check_vact_matches

TARGETS = ("q_proj", "down_proj")


def _adapter(model, rank=4, targets=TARGETS, seed=0):
    return attach_routed_adapter(model, rank=rank, targets=targets, init_seed=seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A tiny model saved in float32, as a user's checkpoint would be."""
    path = tmp_path_factory.mktemp("fp") / "model"
    make_model(len(tokenizer)).save_pretrained(path)
    return path


def _load(path, dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def test_equal_across_float32_bfloat16_and_float16_loads(saved):
    a32 = _adapter(_load(saved, torch.float32))
    a16 = _adapter(_load(saved, torch.bfloat16))
    assert next(a16.model.parameters()).dtype == torch.bfloat16
    assert a32.fingerprint() == a16.fingerprint()
    assert a32.fingerprint_parts() == a16.fingerprint_parts()
    assert a32.legacy_fingerprint() != a16.legacy_fingerprint(), "the old fingerprint hashed the dtype's bytes"
    h16 = _adapter(_load(saved, torch.float16))
    assert fingerprint_mismatch(a32.fingerprint_parts(), h16.fingerprint_parts()) == []


@pytest.mark.parametrize(
    ("change", "part"),
    [
        ({"rank": 2}, "rank"),
        ({"targets": ("q_proj", "v_proj")}, "targets"),
        ({"seed": 1}, "seed"),
        ({"base_seed": 9}, "base_weights"),
    ],
)
def test_differs_in_the_changed_part_only_and_the_error_names_it(tokenizer, change, part):
    ref = _adapter(make_model(len(tokenizer)))
    kw = {k: v for k, v in change.items() if k != "base_seed"}
    other = _adapter(make_model(len(tokenizer), seed=change.get("base_seed", 0)), **kw)
    assert other.fingerprint() != ref.fingerprint()
    differ = fingerprint_mismatch(ref.fingerprint_parts(), other.fingerprint_parts())
    expected = {part, "module_shapes"} if part in ("rank", "targets") else {part}
    assert set(differ) == expected
    meta = adapter_metadata(ref)
    vact = torch.ones(len(other.module_names), other.rank)
    meta["module_names"] = list(other.module_names)  # same names and shape: only the fingerprint can object
    words = {
        "rank": "rank 4 in the file, 2 in the adapter",
        "targets": "target modules",
        "seed": "init seed 0 in the file, 1 in the adapter",
        "base_weights": "base weights",
    }
    with pytest.raises(VactError, match=words[part]) as err:
        check_vact_matches(vact, {**meta, "adapter_rank": other.rank}, other, source="v.safetensors")
    assert "v.safetensors" in str(err.value) and "dtype" in str(err.value)
    if part != "base_weights":
        assert "base weights" not in str(err.value)


def test_old_files_are_read_when_their_fingerprint_still_matches_and_refused_clearly_otherwise(saved):
    adapter = _adapter(_load(saved, torch.float32))
    names = list(adapter.module_names)
    old = {
        "kind": "vact",
        "module_names": names,
        "adapter_rank": 4,
        "init_seed": 0,
        "adapter_targets": sorted(TARGETS),
        "adapter_fingerprint": adapter.legacy_fingerprint(),
    }  # no parts
    vact = torch.ones(len(names), 4)
    check_vact_matches(vact, old, adapter)  # same dtype as when it was written: accepted
    in_bf16 = _adapter(_load(saved, torch.bfloat16))
    with pytest.raises(VactError, match=r"old-format adapter fingerprint .*dtype.*Re-extract"):
        check_vact_matches(vact, old, in_bf16)
