import pytest
import torch

from kscope.model.hooks import hooked
from kscope.model.prefix import PrefixRunner, common_prefix, continuation_nlls
from kscope.model.sites import Site


def test_prefix_runner_matches_full_forward(lm):
    ids = lm.tokenizer("the capital of germany is").input_ids
    runner = PrefixRunner(lm.model, ids)
    full = lm.model(torch.tensor([ids])).logits[0, -1]
    fast = runner.logits(3)
    assert fast.shape[0] == 3
    assert torch.allclose(fast[2], full, atol=1e-5)


def test_prefix_runner_edits_apply_to_last_token_only(lm):
    ids = lm.tokenizer("the capital of germany is").input_ids
    site = Site(0, "mlp.out")
    runner = PrefixRunner(lm.model, ids)
    with hooked(lm.model, {site: lambda x: x * 0}):
        edited = runner.logits(1)[0]
    # Same edit at the last position only, via a full forward.
    def last_only(x):
        x = x.clone()
        x[:, -1] = 0
        return x
    with hooked(lm.model, {site: last_only}):
        ref = lm.model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(edited, ref, atol=1e-5)


def test_grown_batch_rows_equal_the_plain_forward(lm):
    """Rows that join at blocks 0..2 (no edits) end with the plain forward's logits, and a joined row
    edited at its own block differs from the rows that joined above that block."""
    runner = PrefixRunner(lm.model, lm.tokenizer("the capital of germany is").input_ids)
    ref = runner.logits(1)[0]
    logits = runner.grown([2, 1, 3])[:, -1]
    assert logits.shape[0] == 7
    assert torch.allclose(logits, ref.expand_as(logits), atol=1e-5)

    def bump_last_row(x):
        x = x.clone()
        x[-1] += torch.linspace(-3, 3, x.shape[-1])  # not a uniform shift, which LayerNorm removes
        return x

    with hooked(lm.model, {Site(1, "mlp.out"): bump_last_row}):
        edited = runner.grown([2, 1, 0])[:, -1]  # rows 0-2 join at block 0, row 3 at block 1
    assert torch.allclose(edited[:3], ref.expand(3, -1), atol=1e-5)
    assert not torch.allclose(edited[3], ref, atol=1e-3)


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[5], [6]]) == 0
    assert common_prefix([[1, 2], [1, 2]]) == 2


def _full_nlls(model, n_prompt, rows):
    out = []
    for r in rows:
        ids = torch.tensor([r])
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
        out.append(-float(logp[n_prompt - 1 : len(r) - 1].gather(1, ids[0, n_prompt:, None]).sum()))
    return out


@pytest.mark.parametrize("rows", [
    [[2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 8], [2, 3, 4, 5, 9, 10, 11]],  # shared tokens after the prompt, ragged
    [[2, 3, 4, 5], [2, 3, 4, 6, 7], [2, 3, 4, 8]],  # differ right after the prompt
    [[2, 3, 9, 5], [2, 4, 4, 6, 7]],  # differ inside the prompt
    [[2, 3, 4, 5, a, b, c] for a in (6, 7, 8) for b in (6, 9) for c in (10, 11, 12)],  # a tree: levels span batches
])
def test_continuation_nlls_equal_scoring_each_row(lm, rows):
    n_prompt = 3
    with torch.no_grad():
        ref = _full_nlls(lm.model, n_prompt, rows)
    fast = continuation_nlls(lm.model, n_prompt, rows, batch_size=2)
    assert fast == pytest.approx(ref, abs=1e-4)


def test_continuation_nlls_need_a_token_after_the_prompt(lm):
    with pytest.raises(ValueError, match="after the prompt"):
        continuation_nlls(lm.model, 3, [[2, 3, 4], [2, 3, 4, 5]])


def test_grown_batch_with_a_continuation_equals_full_forwards(lm):
    """Teacher-forced continuation tokens after the prompt: every position of every joined row equals
    the plain full forward of prompt + continuation."""
    ids = lm.tokenizer("the capital of germany is").input_ids
    cont = lm.tokenizer(" berlin . it", add_special_tokens=False).input_ids
    runner = PrefixRunner(lm.model, ids)
    full = lm.model(torch.tensor([ids + cont])).logits[0, len(ids) - 1 :]
    out = runner.grown([1, 2, 0], continuation=cont)
    assert out.shape[:2] == (4, 1 + len(cont))
    assert torch.allclose(out, full.expand_as(out), atol=1e-5)
    assert torch.allclose(runner.logits(2, cont), full.expand(2, -1, -1), atol=1e-5)


def test_continuation_nlls_many_equal_scoring_each_set_alone(lm):
    """Sets of different prompt lengths share padded passes; each row's NLL is its own full forward's."""
    from kscope.model.prefix import continuation_nlls_many

    sets = [
        (3, [[2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 8], [2, 3, 4, 5, 9, 10, 11]]),
        (5, [[7, 2, 3, 4, 8, 5, a, b] for a in (6, 7, 8) for b in (6, 9, 10)]),  # a tree below a longer prompt
        (2, [[9, 4, 5], [9, 4, 6]]),  # nothing to forward below the prompt
        (2, [[3, 5, 7, 2], [6, 5, 7, 2, 2]]),  # differ inside the prompt
    ]
    with torch.no_grad():
        ref = [_full_nlls(lm.model, n, rows) for n, rows in sets]
    got = continuation_nlls_many(lm.model, sets, batch_size=4)
    for r, g in zip(ref, got):
        assert g == pytest.approx(r, abs=1e-4)
