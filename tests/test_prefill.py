"""`routed_grpo.prefill`: one prompt forward per distinct prompt in `generate`, with the same samples and scores."""

import torch
from transformers import DynamicCache

from routed_grpo.prefill import distinct_rows, shared_prompt_prefill
from tests.conftest import make_model


def test_distinct_rows_keeps_first_occurrences_and_maps_every_row_back():
    rows = torch.tensor([[5, 1], [2, 2], [5, 1], [0, 9], [2, 2]])
    keep, inverse = distinct_rows(rows)
    assert keep.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(rows[keep][inverse], rows)
    assert distinct_rows(torch.tensor([[1, 2], [2, 1]])) is None


def _prompts(vocab: int, copies: int):
    """Three prompts of different lengths, left-padded, each repeated `copies` times in a row (TRL's layout)."""
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 11, 9]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, -n:] = 1
    return ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)


def _generate(model, ids, mask, shared: bool, rows_seen: list[int]):
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, args: rows_seen.append(args[0].shape[0]))
    torch.manual_seed(0)
    try:
        with shared_prompt_prefill(model) if shared else torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=0.7,
                max_new_tokens=6,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
    finally:
        hook.remove()
    return out


def test_shared_prefill_samples_the_same_tokens_with_the_same_scores_bit_for_bit(tokenizer):
    model = make_model(len(tokenizer), hidden=64)
    ids, mask = _prompts(len(tokenizer), copies=4)
    plain_rows, shared_rows = [], []
    plain = _generate(model, ids, mask, shared=False, rows_seen=plain_rows)
    with torch.no_grad():
        shared = _generate(model, ids, mask, shared=True, rows_seen=shared_rows)
    assert torch.equal(plain.sequences, shared.sequences)
    assert len(plain.scores) == len(shared.scores) > 1
    for a, b in zip(plain.scores, shared.scores, strict=True):
        assert torch.equal(a, b)
    assert plain_rows[0] == 12 and shared_rows[0] == 3  # the prefill ran once per distinct prompt
    assert set(shared_rows[1:]) == {12}  # decode steps: every row
    assert "forward" not in model.model.__dict__  # the wrapper is gone after the context


def test_shared_prefill_leaves_calls_it_cannot_share_unchanged(tokenizer):
    model = make_model(len(tokenizer))
    ids, mask = _prompts(len(tokenizer), copies=2)
    rows: list[int] = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    with torch.no_grad(), shared_prompt_prefill(model):
        embeds = model.get_input_embeddings()(ids)
        model.model(inputs_embeds=embeds, attention_mask=mask, cache=DynamicCache(config=model.config))
        model.model(input_ids=ids, attention_mask=mask)  # no cache: not generate's prefill
        cache = DynamicCache(config=model.config)
        model.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)  # shared: 3 rows
        model.model(input_ids=ids[:, -1:], attention_mask=mask, cache=cache)  # a decode step
    hook.remove()
    assert rows == [6, 6, 3, 6]
    assert cache.layers[0].keys.shape[0] == 6


def _grads(t, inputs):
    from routed_grpo.adapter import DEPLOYED, QUARANTINE

    t.current_gradient_accumulation_steps = 1  # set by train(); called directly here
    t.model.zero_grad(set_to_none=True)
    loss = t.compute_loss(t.model, inputs)
    loss.backward()
    t.adapter.clear_row_masks()
    blocks = {b: torch.cat([p.grad.flatten() for p in t.adapter.parameters(b)]) for b in (DEPLOYED, QUARANTINE)}
    return loss.detach(), t._loss_logps.clone(), blocks


def test_shared_prompt_loss_forward_gives_the_loss_and_gradients_of_trls_forward(tmp_path):
    """Mixed routing masks within a group: each distinct (prompt, masks) runs its own prefix; the loss, the log-probs
    and both blocks' gradients equal TRL's forward's to rounding, and a row with d = 1 still sends the deployed
    block nothing (the deployed gradient differs from the all-d = 0 one)."""
    from tests.trainer_utils import TOKENIZER, perturb_quarantine, trainer

    t = trainer(tmp_path, routing="placebo", max_completion_length=6, gradient_checkpointing=False)
    perturb_quarantine(t.adapter)  # the quarantine contributes, so m = 0 rows differ in the forward
    t.model.train()
    inputs = t._prepare_inputs(next(iter(t.get_train_dataloader())))
    first = (inputs["prompt_ids"] == inputs["prompt_ids"][0]).all(1)  # the rows of row 0's prompt
    inputs["prompt_mask"][first, :2] = 0  # left padding on one prompt: positions still count from column 0
    inputs["prompt_ids"][first, :2] = TOKENIZER.pad_token_id
    inputs["advantages"] = torch.linspace(-1.0, 1.0, 8)
    inputs["routing_m"] = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    inputs["routing_d"] = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    inputs["routing_logp_from_loss"] = torch.ones(8, dtype=torch.bool)
    plain = _grads(t, inputs)
    t.args.share_prompt_forward = True
    prefix_rows: list[int] = []
    decoder = t.adapter.model.get_base_model().get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda m, a, kw: prefix_rows.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        shared = _grads(t, inputs)
    finally:
        hook.remove()
    rows = zip(inputs["prompt_ids"].tolist(), inputs["routing_m"].tolist(), inputs["routing_d"].tolist(), strict=True)
    distinct = len({(tuple(ids), m, d) for ids, m, d in rows})
    assert 2 < distinct < 8  # the batch's 2 prompts under these masks (TRL shuffles the rows)
    assert prefix_rows[0][0] == distinct and prefix_rows[1][0] == 8  # the prefix once per distinct row, then all
    assert prefix_rows[1][1] == inputs["completion_ids"].shape[1] + 1  # the last prompt token and the completion
    assert torch.allclose(plain[0], shared[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(plain[1], shared[1], rtol=1e-5, atol=1e-5)
    for block in plain[2]:
        assert torch.allclose(plain[2][block], shared[2][block], rtol=1e-4, atol=1e-6), block
        assert plain[2][block].abs().sum() > 0
    inputs["routing_d"] = torch.zeros(8)
    undetached = _grads(t, inputs)
    assert not torch.allclose(undetached[2]["deployed"], shared[2]["deployed"], rtol=1e-3, atol=1e-5)


def test_share_prompt_forward_is_refused_with_gradient_checkpointing(tmp_path):
    import pytest

    from tests.trainer_utils import config

    with pytest.raises(ValueError, match="share_prompt_forward=True needs gradient_checkpointing=False"):
        config(tmp_path, share_prompt_forward=True, gradient_checkpointing=True)
