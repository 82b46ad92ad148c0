"""The gated clamp as Dynamic SAE Guardrails' code does it (``anthropic_clamp_resid_SAE_features``), made causal."""

import numpy as np
import torch

from kscope.model.sites import Site
from kscope.privacy.edit.guardrail import GatedClamp, sequence_threshold
from tests.privacy.test_parts import _Ident


def _dsg(resid, units, feats, multiplier, threshold):
    """DSG's ``anthropic_clamp_resid_SAE_features``, transcribed (an SAE given as kscope units)."""
    fa = units.encode(resid).clone()
    fa[:, 0, :] = 0.0
    error = resid - units.decode(fa)
    target = fa[:, :, feats]
    mask = (target > 0).sum(dim=2) > 0
    rates = mask.sum(dim=1) / mask.shape[1]
    final = mask.unsqueeze(2) & (rates > threshold).unsqueeze(1).unsqueeze(2)
    fa[:, :, feats] = torch.where(final, torch.full_like(target, -multiplier), target)
    return units.decode(fa) + error


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 9, 16, generator=g)
    x[0, :, [2, 5]] = -1.0  # a sequence where no located feature fires
    x[1, 1:, 2] = 1.0  # one where they fire everywhere but the first position
    return x


def test_each_position_is_what_dsg_gives_the_sequence_so_far():
    """At position t the output is DSG's output at t on positions 0..t; with the whole sequence that is DSG's at the
    last position."""
    units = _Ident(Site(0, "mlp.out"), 16).units
    x, feats = _inputs(), [2, 5]
    for thr in (0.0, 0.3, 0.6):
        ours = GatedClamp({0: (units, feats, torch.ones(2), thr)}, clamp=3.0).edit(units, feats, torch.ones(2), thr)(x)
        for t in range(x.shape[1]):
            assert torch.allclose(ours[:, t], _dsg(x[:, : t + 1], units, feats, 3.0, thr)[:, t], atol=1e-6)


def test_only_active_tokens_of_gated_sequences_change_bit_for_bit():
    units = _Ident(Site(0, "mlp.out"), 16).units
    x, feats = _inputs(), [2, 5]
    out = GatedClamp({}, clamp=2.0).edit(units, feats, torch.ones(2), 0.3)(x)
    active = (x[..., feats] > 0).any(-1)
    active[:, 0] = False
    rate = active.float().cumsum(1) / torch.arange(1, x.shape[1] + 1)
    changed = active & (rate > 0.3)
    assert torch.equal(out[~changed], x[~changed])  # untouched, bit for bit (the first position and sequence 0 too)
    err = x - x.relu()  # the stand-in SAE's error term, added back
    assert changed[1].sum() == x.shape[1] - 1
    assert torch.allclose(out[changed][:, feats], -2.0 + err[changed][:, feats])  # every located feature clamped, firing or not
    never = GatedClamp({}, clamp=2.0).edit(units, feats, torch.ones(2), 1.0)(x)  # a share nothing exceeds
    assert torch.equal(never, x)


def test_kv_cache_decoding_carries_the_prompts_share():
    """One token per call after the prompt gives what the whole sequence gives at once."""
    units = _Ident(Site(0, "mlp.out"), 16).units
    x, feats = _inputs(1), [2, 5]
    fn = GatedClamp({}, clamp=2.0).edit(units, feats, torch.ones(2), 0.4)
    whole = fn(x)
    steps = [fn(x[:, :5])] + [fn(x[:, t : t + 1]) for t in range(5, x.shape[1])]
    assert torch.equal(torch.cat(steps, 1), whole)


def test_greedy_decoding_with_a_cache_equals_teacher_forcing_under_the_clamp(llama_lm):
    site = Site(1, "mlp.out")
    units = _Ident(site, 32).units
    clamp = GatedClamp({1: (units, [3, 7], torch.ones(2), 0.2)}, clamp=4.0)
    ids = llama_lm.tokenizer("the capital of france is", return_tensors="pt").input_ids
    with torch.no_grad():
        clean = llama_lm.model(ids).logits
        with clamp.applied(llama_lm.model):
            gen = llama_lm.model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
            forced = llama_lm.model(gen).logits
            edited = llama_lm.model(ids).logits
    assert not torch.equal(edited, clean)  # the clamp acts on this prompt
    n = ids.shape[1]
    assert torch.equal(forced[0, n - 1 : -1].argmax(-1), gen[0, n:])


def test_the_sequence_threshold_is_dsgs_percentile_of_retain_shares():
    units = _Ident(Site(0, "mlp.out"), 4).units
    retain = []
    for k in range(10):  # sequence k: the located feature fires at k of 10 positions (after the first)
        a = -torch.ones(11, 4)
        a[1 : 1 + k, 1] = 1.0
        retain.append(a)
    shares = [k / 11 for k in range(10)]
    assert abs(sequence_threshold(units, retain, [1], 95.0) - np.percentile(shares, 95)) < 1e-9
    assert sequence_threshold(units, retain, [0], 95.0) == 0.0  # a feature silent on retain text: any firing gates
