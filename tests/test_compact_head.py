"""`routed_grpo.compact_head`: TRL's fused LM head scores only labelled positions on the CPU, with the same numbers."""

import pytest
import torch
import trl.trainer.utils as trl_utils
from trl.trainer.utils import add_fused_lm_head

from routed_grpo import compact_head
from routed_grpo.compact_head import scored_positions_only
from tests.conftest import make_model


def _batch(vocab: int, rows: int = 6, prompt: int = 9, completion: int = 5):
    """Left-padded prompts and right-padded completions; labels only on the completion tokens, as TRL's loss."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, prompt + completion), generator=gen)
    mask = torch.ones_like(ids)
    for r in range(rows):
        mask[r, : r % 3] = 0  # left padding
        mask[r, prompt + completion - r % 2 :] = 0  # right padding after the completion
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return ids, mask, labels


def _forward(model, ids, mask, labels):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + 0.3 * out.entropy.sum().detach()).backward()  # entropy: logged only, as in GRPO
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), out.entropy.detach(), grads


def test_compact_head_gives_trls_log_probs_entropies_and_gradients_bit_for_bit(tokenizer):
    model = make_model(len(tokenizer)).train()
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    ids, mask, labels = _batch(len(tokenizer))
    logps, entropy, grads = _forward(model, ids, mask, labels)
    with scored_positions_only():
        logps_c, entropy_c, grads_c = _forward(model, ids, mask, labels)
    assert torch.equal(logps, logps_c) and torch.equal(entropy, entropy_c)
    assert grads.keys() == grads_c.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grad, grads_c[name]), name
    assert bool((logps[labels[:, 1:] != -100] != 0).all())  # the labelled positions were scored


def test_compact_head_scores_only_the_labelled_positions(tokenizer, monkeypatch):
    assert compact_head.available()  # the pinned TRL has the switch; if it goes, this test and the next fail
    model = make_model(len(tokenizer))
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    seen = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        seen.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    ids, mask, labels = _batch(len(tokenizer))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        with scored_positions_only():
            model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert seen == [ids.shape[0] * (ids.shape[1] - 1), int((labels[:, 1:] != -100).sum())]


def test_scored_positions_only_restores_trls_switch():
    before = trl_utils._use_triton
    with scored_positions_only():
        assert trl_utils._use_triton is not before
        assert trl_utils._use_triton(torch.device("cpu"))
        assert trl_utils._use_triton(torch.device("meta")) == before(torch.device("meta"))
    assert trl_utils._use_triton is before
    with pytest.raises(RuntimeError), scored_positions_only():
        raise RuntimeError("the forward failed")
    assert trl_utils._use_triton is before
